# rerouted: `sudo make demo` shows it working; `sudo make test` runs every test.
# Both install what they need first (Debian packages, staticcheck).

GO          ?= go
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck
# command:package pairs the tests and the demo need (the daemon itself needs none)
TOOLS       := systemd-analyze:systemd ip:iproute2 nsenter:util-linux ethtool:ethtool ss:iproute2 sysctl:procps nft:nftables iptables:iptables conntrack:conntrack

.PHONY: all build deps demo test lint unit e2e fuzz

all: build

build:
	$(GO) build -o bin/rerouted ./cmd/rerouted

deps:
	@missing=""; for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "not root: not installing$$missing (end-to-end tests will skip)"; fi; \
	fi
	@test -x $(STATICCHECK) || $(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2

demo: deps
	$(GO) run ./cmd/rerouted demo

lint: deps
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# Every test, unit and end-to-end, under the race detector (the daemon the
# end-to-end tests run is built with -race too), then a short run of each
# fuzz target (FUZZTIME inputs each; longer: make fuzz FUZZTIME=50000000x).
test: lint
	$(GO) test -race -count=1 -timeout 15m ./...
	$(MAKE) --no-print-directory fuzz

# A count, not a duration: with a duration Go 1.26's fuzz coordinator can
# fail a clean run with "context deadline exceeded" (golang/go#75804).
FUZZTIME ?= 300000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzRewrite$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./rewrite
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./policy
