// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// rerouted's connect-time steering: a cgroup/connect4 and connect6 program
// that decides a new TCP connection or connected UDP socket by the policy's
// rules, as compiled by the daemon into the maps below, and binds the
// socket to its uplink's address (bpf_bind) with the uplink's mark
// (SO_MARK). The socket then is on the uplink: no packet of it needs
// rewriting. A rule the kernel cannot decide (an exe key, a process whose
// comm does not answer) stops the evaluation: the socket is left alone and
// its SYN goes the queue's way, where the daemon decides it in full.
//
// Built by `go generate ./internal/connect` (bpf2go, clang); the object is
// committed, so nothing is compiled at run time.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_RULES 64    // per generation
#define MAX_CHOICES 8
#define MAX_UPLINKS 16  // per generation
#define MAX_CG_LEVEL 16
#define CHOICE_DEFAULT 255

#define AF_INET 2
#define AF_INET6 10
#define SOL_SOCKET 1
#define SO_MARK 36

// rule.flags
#define F_DST (1 << 0)
#define F_NOT_DST (1 << 1)
#define F_DPORT (1 << 2)
#define F_NOT_DPORT (1 << 3)
#define F_UID (1 << 4)
#define F_NOT_UID (1 << 5)
#define F_GID (1 << 6)
#define F_NOT_GID (1 << 7)
#define F_CGROUP (1 << 8)
#define F_COMM (1 << 9)
#define F_STOP (1 << 10)  // a key the kernel cannot test: leave to the queue

// rule.action
#define A_UPLINK 0
#define A_DEFAULT 1
#define A_BALANCE 2

// id kinds
#define K_UID 0
#define K_NOT_UID 1
#define K_GID 2
#define K_NOT_GID 3

// event kinds
#define E_BIND 1
#define E_REFUSED 2

// stats
#define S_STEERED 0
#define S_DEFAULT 1
#define S_REFUSED 2
#define S_STOPPED 3
#define S_BIND_FAILED 4
#define S_NO_MATCH 5
#define S_DATAGRAMS 6 // unconnected UDP datagrams given their uplink's source address
#define S_MAX 7

struct conf {
	__u64 netns;     // the daemon's network namespace cookie: others are left alone
	__u32 nrules;    // rules of the active generation
	__u32 rules_gen; // 0 or 1
	__u32 uplinks_gen;
	__u32 honor_marks;    // a socket that carries a mark already is the host's to route
	__u32 probe_priority; // the daemon's health probes choose their uplink themselves
	__u32 port_lo, port_hi; // the ephemeral ports: an unconnected socket on another is a service's
	__u32 emit;             // events wanted: the daemon prints the debug stream
	__u32 pad;
};

struct rule {
	__u32 flags;
	__u8 protos; // bit 0: tcp, bit 1: udp; 0: any
	__u8 action;
	__u8 nchoices;
	__u8 drop_when_down;
	__u8 choice[MAX_CHOICES]; // uplink index, or CHOICE_DEFAULT
	__u32 weight[MAX_CHOICES];
	__u32 total_weight;
};

struct uplink {
	__u32 mark;
	__u8 up4, up6;
	__u8 pad[2];
	__u32 addr4;     // network order
	__u32 addr6[4];  // network order
};

struct lpm_key {
	__u32 prefixlen; // 32 (the set) + the prefix's bits (IPv4 as ::ffff:a.b.c.d)
	__u32 set;       // rule * 4 + 2 for not_dst + 1 for IPv6
	__u8 addr[16];
};

struct id_key {
	__u32 rule;
	__u32 kind;
	__u32 id;
};

struct cg_key {
	__u32 rule;
	__u32 pad;
	__u64 id;
};

struct comm_key {
	__u32 rule;
	char comm[16];
};

struct event {
	__u32 kind;
	__u32 rule;   // global index
	__u32 uplink; // global index
	__u32 uid;
	__u32 pid;
	__u8 family;
	__u8 proto;
	__u16 dport;
	__u8 dst[16];
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct conf);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule);
} rule_table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_UPLINKS);
	__type(key, __u32);
	__type(value, struct uplink);
} uplink_table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} dsts SEC(".maps");

// ports: a bitmap of the 65,536 ports per rule and polarity (rule * 2 + 1:
// not_dport).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * 2 * MAX_RULES);
	__type(key, __u32);
	__type(value, __u8[8192]);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct id_key);
	__type(value, __u8);
} ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct cg_key);
	__type(value, __u8);
} cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct comm_key);
	__type(value, __u8);
} comms SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, S_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} events SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &what);
	if (v)
		(*v)++;
}

static __always_inline int bit(__u8 *bm, __u32 port)
{
	__u32 i = port >> 3;
	// Keep the mask: clang would drop it (a port is 16 bits), and kernels
	// before 6.x do not bound the byte swap the port came through.
	asm volatile("" : "+r"(i));
	i &= 8191;
	return (bm[i] >> (port & 7)) & 1;
}

// decided: the rule (global index) that bound each socket, by cookie,
// for the daemon's usage accounting. The oldest are forgotten first.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} decided SEC(".maps");

// rule_names: each rule's name, by global index, for the daemon (and the
// next one, which adopts the maps) to name what `decided` holds. A
// generation's names stay when it is emptied: its sockets live on.
struct rule_name {
	char name[64];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule_name);
} rule_names SEC(".maps");

static __always_inline void emit(struct conf *c, __u32 kind, __u32 rule, __u32 uplink, __u32 uid, __u8 family, __u8 proto,
				 __u16 dport, const __u8 *dst)
{
	if (!c->emit)
		return; // no reader: waking the daemon for nothing costs every connect
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	e->kind = kind;
	e->rule = rule;
	e->uplink = uplink;
	e->uid = uid;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->family = family;
	e->proto = proto;
	e->dport = dport;
	__builtin_memcpy(e->dst, dst, 16);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int decide(struct bpf_sock_addr *ctx, int v6, int sendmsg)
{
	__u32 zero = 0;
	struct conf *c = bpf_map_lookup_elem(&settings, &zero);
	if (!c || c->nrules == 0 || bpf_get_netns_cookie(ctx) != c->netns)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	if (sk->priority == c->probe_priority || (c->honor_marks && sk->mark != 0))
		return 1;
	// A local service's unconnected socket (bound to a port of its own)
	// answers clients by their address, not by the policy's destination
	// rules: the daemon's to decide, by its owner.
	if (sendmsg && sk->src_port && (sk->src_port < c->port_lo || sk->src_port > c->port_hi))
		return 1;
	__u8 proto;
	if (ctx->protocol == IPPROTO_TCP)
		proto = 1;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = 2;
	else
		return 1;
	__u16 dport = bpf_ntohs(ctx->user_port);
	struct lpm_key k = {};
	if (v6) {
		__u32 *a = (__u32 *)k.addr;
		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
	} else {
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		__u32 *a = (__u32 *)k.addr;
		a[3] = ctx->user_ip4;
	}
	// An IPv6 socket connecting to an IPv4-mapped address goes out as
	// IPv4: it takes the uplink's IPv4 address, mapped.
	int mapped = v6 && ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0xffff);
	int fam6 = v6 && !mapped;
	__u64 ug = bpf_get_current_uid_gid();
	__u32 uid = ug, gid = ug >> 32;
	char comm[16] = {};
	int have_comm = 0;
	__u32 rbase = c->rules_gen ? MAX_RULES : 0;
	__u32 ubase = c->uplinks_gen ? MAX_UPLINKS : 0;
	__u32 n = c->nrules;

	for (__u32 i = 0; i < MAX_RULES; i++) {
		if (i >= n)
			break;
		__u32 ri = rbase + i;
		struct rule *r = bpf_map_lookup_elem(&rule_table, &ri);
		if (!r)
			break;
		__u32 f = r->flags;
		if (r->protos && !(r->protos & proto))
			continue;
		if (f & (F_DST | F_NOT_DST)) {
			k.prefixlen = 32 + 128;
			if (f & F_DST) {
				k.set = ri * 4 + fam6;
				if (!bpf_map_lookup_elem(&dsts, &k))
					continue;
			}
			if (f & F_NOT_DST) {
				k.set = ri * 4 + 2 + fam6;
				if (bpf_map_lookup_elem(&dsts, &k))
					continue;
			}
		}
		if (f & F_DPORT) {
			__u32 pi = ri * 2;
			__u8 *bm = bpf_map_lookup_elem(&ports, &pi);
			if (!bm || !bit(bm, dport))
				continue;
		}
		if (f & F_NOT_DPORT) {
			__u32 pi = ri * 2 + 1;
			__u8 *bm = bpf_map_lookup_elem(&ports, &pi);
			if (!bm || bit(bm, dport))
				continue;
		}
		if (f & (F_UID | F_NOT_UID | F_GID | F_NOT_GID)) {
			struct id_key ik = {.rule = ri};
			if (f & F_UID) {
				ik.kind = K_UID;
				ik.id = uid;
				if (!bpf_map_lookup_elem(&ids, &ik))
					continue;
			}
			if (f & F_NOT_UID) {
				ik.kind = K_NOT_UID;
				ik.id = uid;
				if (bpf_map_lookup_elem(&ids, &ik))
					continue;
			}
			if (f & F_GID) {
				ik.kind = K_GID;
				ik.id = gid;
				if (!bpf_map_lookup_elem(&ids, &ik))
					continue;
			}
			if (f & F_NOT_GID) {
				ik.kind = K_NOT_GID;
				ik.id = gid;
				if (bpf_map_lookup_elem(&ids, &ik))
					continue;
			}
		}
		if (f & F_CGROUP) {
			int found = 0;
			struct cg_key ck = {.rule = ri};
			for (int level = 0; level < MAX_CG_LEVEL; level++) {
				ck.id = bpf_get_current_ancestor_cgroup_id(level);
				if (ck.id == 0)
					break;
				if (bpf_map_lookup_elem(&cgroups, &ck)) {
					found = 1;
					break;
				}
			}
			if (!found)
				continue;
		}
		if (f & F_COMM) {
			if (!have_comm) {
				bpf_get_current_comm(comm, sizeof(comm));
				have_comm = 1;
			}
			struct comm_key mk = {.rule = ri};
			__builtin_memcpy(mk.comm, comm, sizeof(comm));
			if (!bpf_map_lookup_elem(&comms, &mk)) {
				// The process may still match by its exe's name: the
				// daemon's to tell.
				count(S_STOPPED);
				return 1;
			}
		}
		if (f & F_STOP) {
			count(S_STOPPED);
			return 1;
		}

		// The rule matches: its uplink.
		__u32 chosen = CHOICE_DEFAULT;
		if (r->action == A_DEFAULT) {
			count(S_DEFAULT);
			return 1;
		}
		if (r->action == A_BALANCE) {
			__u32 total = 0;
			__u32 w[MAX_CHOICES] = {};
			for (int j = 0; j < MAX_CHOICES; j++) {
				if (j >= r->nchoices)
					break;
				__u32 ui = ubase + r->choice[j];
				struct uplink *u = bpf_map_lookup_elem(&uplink_table, &ui);
				if (u && (fam6 ? u->up6 : u->up4)) {
					w[j] = r->weight[j];
					total += w[j];
				}
			}
			if (total > 0) {
				__u32 pick = bpf_get_prandom_u32() % total;
				for (int j = 0; j < MAX_CHOICES; j++) {
					if (pick < w[j]) {
						chosen = r->choice[j];
						break;
					}
					pick -= w[j];
				}
			}
		} else {
			for (int j = 0; j < MAX_CHOICES; j++) {
				if (j >= r->nchoices)
					break;
				__u8 ch = r->choice[j];
				if (ch == CHOICE_DEFAULT) {
					count(S_DEFAULT);
					return 1;
				}
				__u32 ui = ubase + ch;
				struct uplink *u = bpf_map_lookup_elem(&uplink_table, &ui);
				if (u && (fam6 ? u->up6 : u->up4)) {
					chosen = ch;
					break;
				}
			}
		}
		if (chosen == CHOICE_DEFAULT) {
			if (r->drop_when_down) {
				count(S_REFUSED);
				if (sendmsg)
					return 0; // sendmsg() fails: EPERM
				emit(c, E_REFUSED, ri, 0, uid, v6 ? 10 : 2, proto, dport, k.addr);
				return 0; // connect() fails: EPERM
			}
			count(S_DEFAULT);
			return 1;
		}
		__u32 ui = ubase + chosen;
		struct uplink *u = bpf_map_lookup_elem(&uplink_table, &ui);
		if (!u)
			return 1;
		if (sendmsg) {
			// An unconnected socket's datagram: its source address, this
			// datagram only (the socket may talk to peers other rules
			// send elsewhere). Its mark is the daemon's to set.
			if (v6) {
				if (mapped) {
					ctx->msg_src_ip6[0] = 0;
					ctx->msg_src_ip6[1] = 0;
					ctx->msg_src_ip6[2] = bpf_htonl(0xffff);
					ctx->msg_src_ip6[3] = u->addr4;
				} else {
					ctx->msg_src_ip6[0] = u->addr6[0];
					ctx->msg_src_ip6[1] = u->addr6[1];
					ctx->msg_src_ip6[2] = u->addr6[2];
					ctx->msg_src_ip6[3] = u->addr6[3];
				}
			} else {
				ctx->msg_src_ip4 = u->addr4;
			}
			count(S_DATAGRAMS);
			return 1;
		}
		int err;
		if (v6) {
			struct sockaddr_in6 sa = {.sin6_family = AF_INET6};
			if (mapped) {
				sa.sin6_addr.in6_u.u6_addr32[2] = bpf_htonl(0xffff);
				sa.sin6_addr.in6_u.u6_addr32[3] = u->addr4;
			} else {
				__builtin_memcpy(&sa.sin6_addr, u->addr6, 16);
			}
			err = bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
		} else {
			struct sockaddr_in sa = {.sin_family = AF_INET};
			sa.sin_addr.s_addr = u->addr4;
			err = bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
		}
		if (err) {
			// Bound already (by the application): the queue's way.
			count(S_BIND_FAILED);
			return 1;
		}
		__u32 mark = u->mark;
		bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
		__u64 cookie = bpf_get_socket_cookie(ctx);
		bpf_map_update_elem(&decided, &cookie, &ri, BPF_ANY);
		count(S_STEERED);
		emit(c, E_BIND, ri, ui, uid, v6 ? 10 : 2, proto, dport, k.addr);
		return 1;
	}
	count(S_NO_MATCH);
	return 1;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 0, 0);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 1, 0);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 0, 1);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return decide(ctx, 1, 1);
}

char _license[] SEC("license") = "Dual BSD/GPL";
