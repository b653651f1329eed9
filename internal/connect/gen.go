package connect

// The BPF object is built from bpf/connect.c with clang and committed, so
// that neither the build nor the daemon needs a compiler:
//
//	go generate ./internal/connect
//
// which also records the SHA-256 of the source, of the bpf2go line and of
// the object in bpf/connect.sha256: TestBPFObjectIsCurrent fails when they
// no longer match (a source edited without go generate).
//
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target bpfel -type conf -type rule -type uplink -type lpm_key -type id_key -type cg_key -type comm_key -type rule_name connect bpf/connect.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go test -run ^TestBPFObjectIsCurrent$ -args -record
