package connect

// The BPF object is built from bpf/connect.c with clang and committed, so
// that neither the build nor the daemon needs a compiler:
//
//	go generate ./internal/connect
//
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target bpfel -type conf -type rule -type uplink -type lpm_key -type id_key -type cg_key -type comm_key connect bpf/connect.c -- -I/usr/include/x86_64-linux-gnu
