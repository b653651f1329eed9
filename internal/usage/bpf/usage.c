// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// rerouted's usage accounting: every packet a socket of the daemon's
// network namespace sends or receives through a counted interface (an
// uplink's, or one the host's default routes use) is counted in the kernel,
// per socket and uplink, in bytes and packets as the wire carries them.
//
//   - cgroup/sock_create enters each new socket of the namespace in `socks`
//     with its owner: uid, cgroup, process and comm, read in the process
//     that creates it;
//   - cgroup/sock_release marks it released (a TCP socket may still send
//     what was queued, and is counted until the daemon retires it);
//   - cgroup_skb egress and ingress count its packets in `acct`.
//
// The daemon reads `acct`, attributes each socket to its owner, and retires
// the entries of sockets that are gone. A packet that cannot be entered (a
// full map) is counted in `lost`, per uplink, never dropped: the programs
// only count, they always let the packet through.
//
// Built by `go generate ./internal/usage` (bpf2go, clang); the object is
// committed, so nothing is compiled at run time.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define MAX_UPLINKS 64

#define SOCK_RELEASED 1

// What the daemon set: its namespace's cookie, 0 until it has learnt it
// (sockets are then entered in `probe`, where it looks for its own).
struct conf {
	__u64 netns;
};

struct sock_info {
	__u64 cgroup; // cgroup v2 id of the creating process
	__u32 uid;
	__u32 pid;    // thread group id of the creating process
	__u32 flags;  // SOCK_RELEASED
	__u32 pad;
	char comm[16];
};

struct acct_key {
	__u64 cookie; // the socket's
	__u32 uplink; // the daemon's index, from `ifaces`
	__u32 pad;
};

struct counts {
	__u64 bytes_out;
	__u64 packets_out;
	__u64 bytes_in;
	__u64 packets_in;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct conf);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);   // socket cookie
	__type(value, __u64); // its namespace's cookie
} probe SEC(".maps");

// socks and acct are allocated as they fill (BPF_F_NO_PREALLOC): their
// size is what a busy host may need, not what every host pays for.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); // socket cookie
	__type(value, struct sock_info);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);   // ifindex
	__type(value, __u32); // uplink index
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct acct_key);
	__type(value, struct counts);
} acct SEC(".maps");

// lost[uplink]: packets counted to no socket, because `acct` was full, or
// their socket was not in `socks` (full, too).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_UPLINKS);
	__type(key, __u32);
	__type(value, struct counts);
} lost SEC(".maps");

// owners: a listening socket's owner, cloned into each socket it accepts
// (BPF_F_CLONE), which sock_create never sees.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_info);
} owners SEC(".maps");

// created: each new socket's cookie and process, for the daemon to read
// the process's executable while it lives. Without a wakeup each (the
// daemon reads every 50 ms), unless the ring is half full.
struct new_sock {
	__u64 cookie;
	__u32 pid;
	__u32 pad;
};

#define CREATED_SIZE (256 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CREATED_SIZE);
} created SEC(".maps");

// socks_full counts sockets that could not be entered.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} socks_full SEC(".maps");

SEC("cgroup/sock_create")
int sock_create(struct bpf_sock *sk)
{
	__u32 zero = 0;
	struct conf *c = bpf_map_lookup_elem(&settings, &zero);
	if (!c)
		return 1;
	__u64 ns = bpf_get_netns_cookie(sk);
	__u64 cookie = bpf_get_socket_cookie(sk);
	if (c->netns == 0) {
		bpf_map_update_elem(&probe, &cookie, &ns, BPF_ANY);
		return 1;
	}
	if (ns != c->netns)
		return 1;
	struct sock_info si = {
		.cgroup = bpf_get_current_cgroup_id(),
		.uid = (__u32)bpf_get_current_uid_gid(),
		.pid = bpf_get_current_pid_tgid() >> 32,
	};
	bpf_get_current_comm(si.comm, sizeof(si.comm));
	if (bpf_map_update_elem(&socks, &cookie, &si, BPF_ANY)) {
		__u64 *n = bpf_map_lookup_elem(&socks_full, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		return 1;
	}
	struct new_sock *e = bpf_ringbuf_reserve(&created, sizeof(*e), 0);
	if (e) {
		e->cookie = cookie;
		e->pid = si.pid;
		e->pad = 0;
		__u64 flags = BPF_RB_NO_WAKEUP;
		if (bpf_ringbuf_query(&created, BPF_RB_AVAIL_DATA) > CREATED_SIZE / 2)
			flags = BPF_RB_FORCE_WAKEUP;
		bpf_ringbuf_submit(e, flags);
	}
	return 1;
}

SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_socket_cookie(sk);
	struct sock_info *si = bpf_map_lookup_elem(&socks, &cookie);
	if (si)
		si->flags |= SOCK_RELEASED;
	return 1;
}

// headers is the length of the headers each segment of a GSO packet
// repeats: IP, and TCP or UDP.
static __always_inline __u64 headers(struct __sk_buff *skb)
{
	__u8 b;
	__u32 l3, proto;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, &b, 1))
			return 0;
		l3 = (b & 0xf) * 4;
		if (bpf_skb_load_bytes(skb, 9, &b, 1))
			return 0;
		proto = b;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		l3 = 40;
		if (bpf_skb_load_bytes(skb, 6, &b, 1))
			return 0;
		proto = b;
	} else {
		return 0;
	}
	if (proto == IPPROTO_UDP)
		return l3 + 8;
	if (proto != IPPROTO_TCP)
		return l3;
	if (bpf_skb_load_bytes(skb, l3 + 12, &b, 1))
		return l3;
	return l3 + (b >> 4) * 4;
}

static __always_inline int count(struct __sk_buff *skb, int egress)
{
	__u32 ifindex = skb->ifindex;
	__u32 *up = bpf_map_lookup_elem(&ifaces, &ifindex);
	if (!up)
		return 1;
	struct acct_key k = {.cookie = bpf_get_socket_cookie(skb), .uplink = *up};
	struct counts *c = bpf_map_lookup_elem(&acct, &k);
	if (!c) {
		// The socket's first packet here: is it one of the namespace's?
		struct bpf_sock *sk = skb->sk;
		if (!sk)
			return 1;
		sk = bpf_sk_fullsock(sk);
		if (!sk)
			return 1;
		struct sock_info *si = bpf_map_lookup_elem(&socks, &k.cookie);
		if (si) {
			if (sk->state == BPF_TCP_LISTEN) // a SYN: what it accepts inherits its owner
				bpf_sk_storage_get(&owners, sk, si, BPF_SK_STORAGE_GET_F_CREATE);
		} else {
			// An accepted socket has its listener's owner, if any;
			// others are another namespace's, or from before the start.
			si = bpf_sk_storage_get(&owners, sk, 0, 0);
			if (!si)
				return 1;
			struct sock_info n = *si;
			n.flags = 0;
			if (bpf_map_update_elem(&socks, &k.cookie, &n, BPF_NOEXIST))
				return 1;
		}
		struct counts z = {};
		bpf_map_update_elem(&acct, &k, &z, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&acct, &k);
		if (!c) {
			__u32 i = k.uplink;
			c = bpf_map_lookup_elem(&lost, &i);
			if (!c)
				return 1;
		}
	}
	// The wire carries a GSO packet as gso_segs packets, each with the
	// headers again.
	__u64 bytes = skb->len, segs = skb->gso_segs;
	if (segs > 1)
		bytes += (segs - 1) * headers(skb);
	else
		segs = 1;
	if (egress) {
		__sync_fetch_and_add(&c->bytes_out, bytes);
		__sync_fetch_and_add(&c->packets_out, segs);
	} else {
		__sync_fetch_and_add(&c->bytes_in, bytes);
		__sync_fetch_and_add(&c->packets_in, segs);
	}
	return 1;
}

SEC("cgroup_skb/egress")
int egress(struct __sk_buff *skb) { return count(skb, 1); }

SEC("cgroup_skb/ingress")
int ingress(struct __sk_buff *skb) { return count(skb, 0); }

char _license[] SEC("license") = "Dual BSD/GPL";
