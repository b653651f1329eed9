package usage

// The BPF object is built from bpf/usage.c with clang and committed, so
// that neither the build nor the daemon needs a compiler:
//
//	go generate ./internal/usage
//
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target bpfel -type conf -type sock_info -type acct_key -type counts usage bpf/usage.c -- -I/usr/include/x86_64-linux-gnu
//go:generate go test -run ^TestBPFObjectIsCurrent$ -args -record
