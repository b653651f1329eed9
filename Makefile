# rerouted: `sudo make demo` shows it working; `sudo make test` runs every test.
# Both install what they need first (Debian packages, staticcheck).

GO          ?= go
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck
# command:package pairs the tests and the demo need (the daemon itself needs none)
TOOLS       := systemd-analyze:systemd dpkg-deb:dpkg lintian:lintian ip:iproute2 nsenter:util-linux ethtool:ethtool ss:iproute2 sysctl:procps nft:nftables iptables:iptables conntrack:conntrack

.PHONY: all build deb deps deps-kernels demo test test-kernels kernels-clean lint unit fuzz

all: build

# rerouted version prints them; a plain go build falls back to the module's
# version. COMMIT is used where go build leaves no VCS stamp (a git worktree).
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null)
COMMIT      ?= $(shell git rev-parse HEAD 2>/dev/null)
MODIFIED    ?= $(shell git diff-index --quiet HEAD -- 2>/dev/null && echo false || echo true)
LDFLAGS     := -X main.version=$(VERSION) -X main.commit=$(COMMIT) -X main.modified=$(MODIFIED)

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/rerouted ./cmd/rerouted

# The Debian package, rerouted_VERSION_amd64.deb here: built by tools/mkdeb
# (nfpm as a Go library, in a module of its own, so the daemon's module
# never sees it), versioned from git describe, its files dated by the commit.
DEB_MAINTAINER ?= $(shell git log -1 --format='%an <%ae>' 2>/dev/null)
deb:
	$(GO) build -trimpath -buildmode=pie -ldflags '$(LDFLAGS) -s -w' -o bin/deb/rerouted ./cmd/rerouted
	cd tools/mkdeb && SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null) \
		$(GO) run . -root ../.. -binary ../../bin/deb/rerouted -describe '$(VERSION)' -maintainer '$(DEB_MAINTAINER)' -out ../..

deps:
	@missing=""; for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "not root: not installing$$missing (end-to-end tests will skip)"; fi; \
	fi
	@test -x $(STATICCHECK) || $(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2

# What make test-kernels needs: QEMU (TCG; KVM where /dev/kvm exists), a
# static busybox for the guest's initramfs, kmod (depmod, modprobe -d), cpio.
KERNEL_TOOLS := qemu-system-x86_64:qemu-system-x86 cpio:cpio depmod:kmod xz:xz-utils dpkg-deb:dpkg
deps-kernels:
	@missing=""; for t in $(KERNEL_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; done; \
	dpkg-query -W -f '$${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing="$$missing busybox-static"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "not root: not installing$$missing (make test-kernels will skip)"; fi; \
	fi

# The demo runs in rerouted-lab, which runs the rerouted built beside it
# (the daemon does not link the namespace world).
demo: deps
	@$(GO) build -ldflags '$(LDFLAGS)' -o bin/rerouted ./cmd/rerouted
	@$(GO) build -o bin/rerouted-lab ./cmd/rerouted-lab
	bin/rerouted-lab demo

lint: deps
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) mod tidy -diff
	$(GO) vet ./...
	$(STATICCHECK) ./...
	cd tools/mkdeb && $(GO) vet ./... && $(STATICCHECK) ./...

# The unit tests alone, in under a minute: no root needed (tests that need
# it or a kernel feature skip, even under REROUTED_REQUIRE_E2E), no
# packages installed, no end-to-end tests, no -race (with it they take
# longer than a minute on a 2-core VM). make test runs them all under -race.
unit:
	REROUTED_REQUIRE_E2E= $(GO) test -count=1 -short $$($(GO) list ./... | grep -v '/e2e$$')

# Every test, unit and end-to-end, under the race detector (the daemon the
# end-to-end tests run is built with -race too), then a short run of each
# fuzz target (FUZZTIME inputs each; longer: make fuzz FUZZTIME=50000000x).
test: lint
	$(GO) test -race -count=1 -timeout 15m ./...
	cd tools/mkdeb && $(GO) test -count=1 -timeout 5m ./...
	$(MAKE) --no-print-directory fuzz
	$(MAKE) --no-print-directory test-kernels E2E_RUN='$(KERNEL_CORE)' KERNEL_EXPECT=$(KERNEL_CORE_PASSES) KERNEL_TIMEOUT=15m

# The end-to-end tests on Debian's stock kernels, each booted under QEMU
# (see "Other kernels" in the README). KERNELS: Debian suites, 5.10, 6.1 or
# 6.12 (bullseye's, bookworm's, trixie's), or packages
# linux-image-VERSION-amd64; E2E_RUN: a go test -run regex (empty: every
# test; each test a ^(A|B)$ list names must have a result); KERNEL_EXPECT:
# subtests each kernel must pass (0: any); KERNEL_JOBS: kernels booted at once; KERNEL_TIMEOUT: the tests' time
# in each guest (every test under TCG: about 40 minutes a kernel). Downloads and unpacked kernels
# stay in KERNEL_CACHE (git-ignored); make kernels-clean removes them.
KERNELS      ?= bullseye bookworm trixie
E2E_RUN      ?=
KERNEL_JOBS  ?= 1
KERNEL_CACHE ?= .cache/kernels
KERNEL_TIMEOUT ?= 90m
KERNEL_EXPECT ?= 0
# KERNEL_ACCEL: auto (KVM where /dev/kvm opens), kvm or tcg (for a nested
# /dev/kvm that cannot run the guest: "failed to set MSR").
KERNEL_ACCEL ?= auto
# What make test runs on each kernel: the core of rerouted, on both
# datapaths, within CI's time (about 7 minutes a kernel under TCG).
# KERNEL_CORE_PASSES: the subtests it passes on each kernel, exactly (a
# subtest added to these tests changes it).
KERNEL_CORE_PASSES := 31
KERNEL_CORE  := ^(TestKernelHasEveryFeature|TestForeignSourceFixedForHostMarks|TestRuleDecidesUplink|TestStatefulFirewallFINAndRST|TestUDPRequestResponse|TestPingViaISPB|TestIPv6TCP|TestRestartAdoptsFlows|TestPathMTUDiscovery|TestTableRepair|TestManagedUplinks|TestConnectSteering)$$
test-kernels: deps-kernels
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v depmod >/dev/null; then \
		if [ "$$REROUTED_REQUIRE_E2E" = 1 ]; then echo "test-kernels: QEMU or kmod is missing (sudo make deps-kernels)"; exit 1; fi; \
		echo "test-kernels: skipped: QEMU or kmod is missing (sudo make deps-kernels)"; exit 0; \
	fi; \
	echo "$(GO) run ./e2e/qemu -kernels '$(KERNELS)' -run '$(E2E_RUN)' -expect $(KERNEL_EXPECT) -accel $(KERNEL_ACCEL) -jobs $(KERNEL_JOBS) -timeout $(KERNEL_TIMEOUT) -cache '$(KERNEL_CACHE)'"; \
	$(GO) run ./e2e/qemu -kernels '$(KERNELS)' -run '$(E2E_RUN)' -expect $(KERNEL_EXPECT) -accel $(KERNEL_ACCEL) -jobs $(KERNEL_JOBS) -timeout $(KERNEL_TIMEOUT) -cache '$(KERNEL_CACHE)'

kernels-clean:
	rm -rf '$(KERNEL_CACHE)'

# A count, not a duration: with a duration Go 1.26's fuzz coordinator can
# fail a clean run with "context deadline exceeded" (golang/go#75804).
FUZZTIME ?= 300000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzRewrite$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./internal/rewrite
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./internal/policy
	$(GO) test -run '^$$' -fuzz '^FuzzMessages$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./internal/nlmsg
	$(GO) test -run '^$$' -fuzz '^FuzzParsePacket$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./internal/queue
	$(GO) test -run '^$$' -fuzz '^FuzzParseMsg$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2000x ./internal/sockdiag
