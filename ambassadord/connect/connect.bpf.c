// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * connect.bpf.c: the kernel half of connect mode.
 *
 * A consumer's connect() to a mapped port is rewritten, inside the kernel, to a live
 * backend picked from the route's map value: the consumer then talks to the backend
 * directly, and no proxy sits in the path (the technique of Cilium's bpf_sock.c and
 * Kmesh: socket-level load balancing). Every program here is attached to one cgroup v2
 * directory, so it covers every process in that cgroup, in any network namespace.
 *
 *   cgroup/connect4, cgroup/connect6
 *       TCP connects to a mapped port on a "caught" address: a loopback address, only
 *       from the daemon's own network namespace (a container's own 127.0.0.1 is its own),
 *       or an address in the catch set (the host's bridge addresses) from any namespace.
 *       The route is looked up by (port, scope): first scope = the consumer's netns cookie
 *       (routes limited to one consumer), then scope 0 (host-wide). The backend is chosen
 *       from the route's inline list: lowest priority among backends that are not
 *       ejected, then weighted random or round robin. The dialled address, the backend
 *       and the route's timers go into the socket's local storage.
 *   cgroup/getpeername4, cgroup/getpeername6
 *       The consumer sees what it dialled: the dialled address from socket storage.
 *   sockops
 *       Only for rewritten sockets: bounds the connect by the route's connect timeout
 *       (TCP_USER_TIMEOUT while in SYN_SENT, the consumer's own value restored once
 *       established), asks for state callbacks, and at the socket's end ejects the
 *       backend of a failed connect and sends an event (ring buffer).
 *
 * Layouts of every key and value are mirrored byte for byte in layout.py; change both.
 * Byte order: addresses are always network order; ports in map keys and events are host
 * order, the backend ports that are written into the socket are network order.
 *
 * Build: scripts/build-bpf (clang -O2 -g -target bpf -mcpu=v3); the compiled object is
 * committed next to this file.
 */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* From the C library's socket headers, which do not build for -target bpf. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_TCP 6
#define TCP_USER_TIMEOUT 18

#define PASS 1 /* a cgroup sock_addr program's "go on"; 0 would fail the call with EPERM */

#define MAX_BACKENDS 32 /* per route, inline in one map value: see struct route */
#define WAKE_BYTES (64 << 10) /* a connection-end event wakes the reader once this much is unread */

enum balance {
	BALANCE_RANDOM = 0,	 /* weighted random (bpf_get_prandom_u32) */
	BALANCE_ROUND_ROBIN = 1, /* rotate through the tier by a per-route counter */
};

enum outcome {
	OUTCOME_OK = 0,
	OUTCOME_REFUSED = 1,
	OUTCOME_TIMEOUT = 2,
	OUTCOME_RESET = 3,
};

enum event_kind {
	EVENT_CLOSED = 1,  /* a rewritten socket ended (or its connect failed) */
	EVENT_EJECTED = 2, /* a backend was ejected after a failed connect */
};

enum counter {
	COUNTER_REWRITTEN = 0,	   /* connects rewritten to a backend */
	COUNTER_NO_BACKEND = 1,	   /* a route matched but had no usable backend: passed as is */
	COUNTER_ALL_EJECTED = 2,   /* every usable backend was ejected: picked from them anyway */
	COUNTER_NO_STORAGE = 3,	   /* no socket storage (memory): rewritten, but unobserved */
	COUNTER_EVENTS_LOST = 4,   /* the ring buffer was full */
	COUNTER_MAX = 5,
};

struct backend {
	__u32 addr[4];	 /* network order; IPv4 in addr[0], the rest zero */
	__u16 port;	 /* network order (written into the socket as is) */
	__u8 family;	 /* AF_INET or AF_INET6 */
	__u8 pad;
	__u16 weight;	 /* random: relative weight; 0 only when the whole tier is 0 */
	__u16 priority;	 /* lower is preferred */
}; /* 24 bytes */

struct route_key {
	__u64 scope; /* 0: host-wide; otherwise the consumer's network namespace cookie */
	__u16 port;  /* host order */
	__u16 pad[3];
}; /* 16 bytes */

/*
 * A route: the whole backend set in one value. The daemon replaces it with one
 * bpf_map_update_elem(); the map is a hash map without preallocation, whose update swaps
 * in a new element and frees the old one only after an RCU grace period, so a connect
 * sees either the old set or the new one, never half of each.
 */
struct route {
	__u32 rr;		  /* round-robin counter, incremented here (atomic) */
	__u32 connect_timeout_ms; /* 0: the kernel's own SYN retries */
	__u64 eject_ns;		  /* how long a failed backend is skipped; 0: never */
	__u8 count;		  /* backends[0..count) are used */
	__u8 balance;		  /* enum balance */
	__u8 pad[6];
	struct backend backends[MAX_BACKENDS];
}; /* 24 + 32 * 24 = 792 bytes */

struct addr_key {
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u8 family;
	__u8 pad[3];
}; /* 20 bytes */

struct eject_key {
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u16 port;    /* network order */
	__u8 family;
	__u8 pad;
}; /* 20 bytes */

struct config {
	__u64 netns_cookie; /* the daemon's network namespace: its loopback is caught */
	__u64 flags;	    /* CONFIG_* */
};

/* An event for every connection's end; without it, only failed connects and ejections
 * are events, and the counts of the others are in conn_stats alone. */
#define CONFIG_CONNECTION_EVENTS 1

/* conn_stats: what the connections of one route to one backend came to, per CPU. */
struct stat_key {
	__u64 scope;
	__u32 backend_addr[4]; /* network order; IPv4 in [0] */
	__u16 backend_port;    /* network order */
	__u16 route_port;      /* host order */
	__u8 backend_family;
	__u8 pad[3];
}; /* 32 bytes */

struct conn_stat {
	__u64 ok;	      /* ended in order */
	__u64 reset;	      /* established, then ended by a reset */
	__u64 bytes_acked;    /* payload to the backend */
	__u64 bytes_received; /* payload from the backend */
	__u64 established;    /* connects that succeeded: minus ok and reset, the ones open now */
}; /* 40 bytes */

/* What a rewritten socket remembers (socket local storage: freed with the socket). */
struct sock_state {
	__u64 start_ns;
	__u64 eject_ns;
	__u64 scope;
	__u32 orig_addr[4];
	__u32 backend_addr[4];
	__u16 orig_port;    /* network order */
	__u16 backend_port; /* network order */
	__u16 route_port;   /* host order */
	__u8 orig_family;
	__u8 backend_family;
	__u32 connect_timeout_ms;
	__u32 saved_user_timeout; /* the consumer's TCP_USER_TIMEOUT, restored when established */
	__u8 active;		  /* the latest connect of this socket was rewritten */
	__u8 timeout_set;	  /* TCP_USER_TIMEOUT was set by us and not yet restored */
	/* For the payload counts at the end (see payload()): */
	__u8 established;	  /* the connect succeeded (the SYN was acknowledged) */
	__u8 fin_sent;		  /* we entered FIN_WAIT1 or LAST_ACK */
	__u8 peer_fin;		  /* we entered CLOSE_WAIT or CLOSING */
	__u8 pad[3];
	__u32 rcv_nxt_fin_wait2;  /* rcv_nxt when FIN_WAIT2 began */
	__u32 pad2;
};

/* One ring buffer record; see layout.Event. */
struct event {
	__u64 cookie; /* the socket's cookie (SO_COOKIE) */
	__u64 start_ns;
	__u64 end_ns; /* EVENT_EJECTED: ejected until (CLOCK_MONOTONIC ns) */
	__u64 bytes_received; /* payload from the backend (see payload()) */
	__u64 bytes_acked;    /* payload to the backend, acknowledged by it */
	__u64 scope;
	__u32 src_addr[4];
	__u32 orig_addr[4];
	__u32 backend_addr[4];
	__u16 src_port;	    /* host order */
	__u16 orig_port;    /* host order */
	__u16 backend_port; /* host order */
	__u16 route_port;   /* host order */
	__u8 kind;	    /* enum event_kind */
	__u8 outcome;	    /* enum outcome */
	__u8 src_family;
	__u8 orig_family;
	__u8 backend_family;
	__u8 pad[3];
}; /* 112 bytes */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* RCU-freed elements: see struct route */
	__uint(max_entries, 4096);
	__type(key, struct route_key);
	__type(value, struct route);
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct addr_key);
	__type(value, __u8);
} catch_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); /* never full: the oldest ejection goes first */
	__uint(max_entries, 4096);
	__type(key, struct eject_key);
	__type(value, __u64); /* ejected until, CLOCK_MONOTONIC ns (bpf_ktime_get_ns) */
} ejected SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH); /* never full: the longest unused goes first */
	__uint(max_entries, 16384);
	__type(key, struct stat_key);
	__type(value, struct conn_stat);
} conn_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sock_states SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024); /* ~9,000 events: 0.25 s of the fastest churn measured here */
} events SEC(".maps");

static __always_inline void bump(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &which);

	if (value)
		*value += 1; /* per CPU: no atomics needed */
}

static __always_inline int is_loopback4(__u32 addr)
{
	return (addr & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000); /* 127.0.0.0/8 */
}

static __always_inline int is_v4_mapped(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_loopback6(const __u32 *addr)
{
	if (is_v4_mapped(addr))
		return is_loopback4(addr[3]); /* ::ffff:127.x.y.z */
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* Is a connect to this address ours? Loopback only from the daemon's own namespace;
 * catch-set addresses from anywhere. An IPv4 catch address also catches its v4-mapped
 * form dialled on an IPv6 socket. */
static __always_inline int caught(void *ctx, __u8 family, const __u32 *addr)
{
	struct addr_key key = {};
	__u32 zero = 0;
	int loopback;

	if (family == AF_INET) {
		loopback = is_loopback4(addr[0]);
		key.family = AF_INET;
		key.addr[0] = addr[0];
	} else if (is_v4_mapped(addr)) {
		loopback = is_loopback4(addr[3]);
		key.family = AF_INET;
		key.addr[0] = addr[3];
	} else {
		loopback = is_loopback6(addr);
		key.family = AF_INET6;
		key.addr[0] = addr[0];
		key.addr[1] = addr[1];
		key.addr[2] = addr[2];
		key.addr[3] = addr[3];
	}
	if (loopback) {
		struct config *cfg = bpf_map_lookup_elem(&config, &zero);

		return cfg && cfg->netns_cookie && cfg->netns_cookie == bpf_get_netns_cookie(ctx);
	}
	return bpf_map_lookup_elem(&catch_addrs, &key) != NULL;
}

/* The exact scope (the consumer's netns) wins over the host-wide route. */
static __always_inline struct route *find_route(void *ctx, __u16 port, __u64 *scope)
{
	struct route_key key = {};
	struct route *route;

	key.port = port;
	key.scope = bpf_get_netns_cookie(ctx);
	route = bpf_map_lookup_elem(&routes, &key);
	if (route) {
		*scope = key.scope;
		return route;
	}
	key.scope = 0;
	*scope = 0;
	return bpf_map_lookup_elem(&routes, &key);
}

static __always_inline int is_ejected(const struct backend *b, __u64 now)
{
	struct eject_key key = {};
	__u64 *until;

	key.family = b->family;
	key.port = b->port;
	key.addr[0] = b->addr[0];
	key.addr[1] = b->addr[1];
	key.addr[2] = b->addr[2];
	key.addr[3] = b->addr[3];
	until = bpf_map_lookup_elem(&ejected, &key);
	return until && *until > now;
}

/*
 * A backend's rank: live before ejected, then by priority (lower first). The chosen tier
 * is the backends of the lowest rank: the lowest priority among those not ejected, or, if
 * every usable backend is ejected, the lowest priority of them all (a dead set is tried
 * rather than refused: the connect fails as it would anyway, and a backend that came back
 * is found). RANK_NONE: unusable (an IPv6 backend on an IPv4 socket, a bad family).
 */
#define RANK_NONE 0xffffffffu
#define RANK_EJECTED 0x10000u

/* A global function: the verifier checks it once, on its own, rather than once for
 * every backend of every path through pick() (which would pass its limit). */
__attribute__((noinline)) __u32 rank(const struct backend *b, __u32 allow_v6, __u64 now)
{
	if (!b)
		return RANK_NONE;
	if (b->family == AF_INET6 ? !allow_v6 : b->family != AF_INET)
		return RANK_NONE;
	return (is_ejected(b, now) ? RANK_EJECTED : 0) | b->priority;
}

/* What pick() carries from one backend to the next. */
struct tally {
	__u32 best;    /* the lowest rank seen */
	__u32 total;   /* the weights of the backends of that rank */
	__u32 members; /* how many they are */
	__u32 ticket;  /* second pass: the draw, counted down */
	__u32 round_robin;
	__u32 pad;
	__u64 now;
};

/*
 * The steps of pick(), one backend each, as global functions. The verifier checks a
 * global function once, on its own, and sees only an unknown result where it is called;
 * written inline, the three passes over 32 backends multiply the states it must keep
 * (a first version took 40 % of its limit of a million instructions).
 */

/* First pass: the lowest rank, and the weight and size of its tier. */
__attribute__((noinline)) int tally_backend(const struct route *route, __u32 i, __u32 allow_v6, struct tally *t)
{
	__u32 r;

	if (!route || !t || i >= MAX_BACKENDS)
		return 0;
	r = rank(&route->backends[i], allow_v6, t->now);
	if (r == RANK_NONE)
		return 0;
	if (r < t->best) {
		t->best = r;
		t->total = 0;
		t->members = 0;
	}
	if (r == t->best) {
		t->total += route->backends[i].weight;
		t->members++;
	}
	return 0;
}

/* Second pass: 1 if backend i holds the ticket (weighted, or one each for round robin
 * and for a tier whose weights are all 0). */
__attribute__((noinline)) int draw_backend(const struct route *route, __u32 i, __u32 allow_v6, struct tally *t)
{
	__u32 w;

	if (!route || !t || i >= MAX_BACKENDS)
		return 0;
	if (rank(&route->backends[i], allow_v6, t->now) != t->best)
		return 0;
	w = (t->round_robin || !t->total) ? 1 : route->backends[i].weight;
	if (t->ticket < w)
		return 1;
	t->ticket -= w;
	return 0;
}

/* Third pass, only when an ejection added since the first (by sockops, on another CPU)
 * left the second short: 1 for any backend of the tier's priority, ejected or not. */
__attribute__((noinline)) int fallback_backend(const struct route *route, __u32 i, __u32 allow_v6, struct tally *t)
{
	__u32 r;

	if (!route || !t || i >= MAX_BACKENDS)
		return 0;
	r = rank(&route->backends[i], allow_v6, t->now);
	return r != RANK_NONE && (r & 0xffff) == (t->best & 0xffff);
}

/*
 * Which backend: the tier of the lowest rank (above), then weighted random or round robin
 * within it. Returns an index, or -1 when nothing is usable. The passes share one clock,
 * so an ejection cannot expire between them.
 */
static __always_inline int pick(struct route *route, int allow_v6)
{
	struct tally t = {};
	__u32 count = route->count, i;

	t.best = RANK_NONE;
	t.now = bpf_ktime_get_ns();
	t.round_robin = route->balance == BALANCE_ROUND_ROBIN;
	for (i = 0; i < MAX_BACKENDS && i < count; i++)
		tally_backend(route, i, allow_v6, &t);
	if (t.best == RANK_NONE || !t.members)
		return -1;
	if (t.best & RANK_EJECTED)
		bump(COUNTER_ALL_EJECTED);
	if (t.round_robin)
		t.ticket = __sync_fetch_and_add(&route->rr, 1) % t.members; /* weights ignored, as in the proxy */
	else
		t.ticket = bpf_get_prandom_u32() % (t.total ? t.total : t.members); /* all-zero weights: uniform */
	for (i = 0; i < MAX_BACKENDS && i < count; i++)
		if (draw_backend(route, i, allow_v6, &t))
			return i;
	for (i = 0; i < MAX_BACKENDS && i < count; i++)
		if (fallback_backend(route, i, allow_v6, &t))
			return i;
	return -1;
}

static __always_inline struct sock_state *remember(struct bpf_sock_addr *ctx, struct route *route,
						   const struct backend *b, __u64 scope, __u16 port,
						   __u8 family, const __u32 *dialled)
{
	struct sock_state *st;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return NULL;
	st = bpf_sk_storage_get(&sock_states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		bump(COUNTER_NO_STORAGE);
		return NULL;
	}
	st->start_ns = bpf_ktime_get_ns();
	st->eject_ns = route->eject_ns;
	st->connect_timeout_ms = route->connect_timeout_ms;
	st->scope = scope;
	st->route_port = port;
	st->orig_family = family;
	st->orig_port = bpf_htons(port);
	st->orig_addr[0] = dialled[0];
	st->orig_addr[1] = dialled[1];
	st->orig_addr[2] = dialled[2];
	st->orig_addr[3] = dialled[3];
	st->backend_family = b->family;
	st->backend_port = b->port;
	st->backend_addr[0] = b->addr[0];
	st->backend_addr[1] = b->addr[1];
	st->backend_addr[2] = b->addr[2];
	st->backend_addr[3] = b->addr[3];
	st->saved_user_timeout = 0;
	st->timeout_set = 0;
	st->established = 0;
	st->fin_sent = 0;
	st->peer_fin = 0;
	st->rcv_nxt_fin_wait2 = 0;
	st->active = 1;
	return st;
}

/* A connect that is not rewritten: a socket that was rewritten before (a failed connect,
 * tried again elsewhere) must not keep reporting its old dialled address. */
static __always_inline void forget(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *st;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	if (st)
		st->active = 0;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	__u32 dialled[4] = {};
	struct route *route;
	struct backend *b;
	__u64 scope;
	__u16 port;
	int i;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return PASS;
	dialled[0] = ctx->user_ip4;
	port = bpf_ntohs((__u16)ctx->user_port);
	if (!caught(ctx, AF_INET, dialled))
		goto untouched;
	route = find_route(ctx, port, &scope);
	if (!route)
		goto untouched;
	i = pick(route, 0); /* an IPv4 socket cannot reach an IPv6 backend: skipped */
	if (i < 0 || i >= MAX_BACKENDS) {
		bump(COUNTER_NO_BACKEND);
		goto untouched;
	}
	b = &route->backends[i];
	ctx->user_ip4 = b->addr[0];
	ctx->user_port = b->port;
	bump(COUNTER_REWRITTEN);
	remember(ctx, route, b, scope, port, AF_INET, dialled);
	return PASS;
untouched:
	forget(ctx);
	return PASS;
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	__u32 dialled[4];
	struct route *route;
	struct backend *b;
	__u64 scope;
	__u16 port;
	int i;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return PASS;
	dialled[0] = ctx->user_ip6[0];
	dialled[1] = ctx->user_ip6[1];
	dialled[2] = ctx->user_ip6[2];
	dialled[3] = ctx->user_ip6[3];
	port = bpf_ntohs((__u16)ctx->user_port);
	if (!caught(ctx, AF_INET6, dialled))
		goto untouched;
	route = find_route(ctx, port, &scope);
	if (!route)
		goto untouched;
	i = pick(route, 1);
	if (i < 0 || i >= MAX_BACKENDS) {
		bump(COUNTER_NO_BACKEND);
		goto untouched;
	}
	b = &route->backends[i];
	if (b->family == AF_INET) {
		/* An IPv4 backend, dialled from an IPv6 socket: its v4-mapped form (fails with
		 * ENETUNREACH on an IPV6_V6ONLY socket, which cannot reach IPv4 at all). */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = b->addr[0];
	} else {
		ctx->user_ip6[0] = b->addr[0];
		ctx->user_ip6[1] = b->addr[1];
		ctx->user_ip6[2] = b->addr[2];
		ctx->user_ip6[3] = b->addr[3];
	}
	ctx->user_port = b->port;
	bump(COUNTER_REWRITTEN);
	remember(ctx, route, b, scope, port, AF_INET6, dialled);
	return PASS;
untouched:
	forget(ctx);
	return PASS;
}

static __always_inline struct sock_state *rewritten(struct bpf_sock *sk)
{
	struct sock_state *st;

	if (!sk)
		return NULL;
	st = bpf_sk_storage_get(&sock_states, sk, 0, 0);
	return st && st->active ? st : NULL;
}

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock_state *st = rewritten(ctx->sk);

	if (st && st->orig_family == AF_INET) {
		ctx->user_ip4 = st->orig_addr[0];
		ctx->user_port = st->orig_port;
	}
	return PASS;
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	struct sock_state *st = rewritten(ctx->sk);

	if (st && st->orig_family == AF_INET6) {
		ctx->user_ip6[0] = st->orig_addr[0];
		ctx->user_ip6[1] = st->orig_addr[1];
		ctx->user_ip6[2] = st->orig_addr[2];
		ctx->user_ip6[3] = st->orig_addr[3];
		ctx->user_port = st->orig_port;
	}
	return PASS;
}

/*
 * How a rewritten socket ended, from the state it left for CLOSE. A connect that never
 * got past SYN_SENT failed: "timeout" if its SYN was retransmitted or it lasted (nearly)
 * the whole connect timeout, "refused" otherwise (an RST came back). sockops cannot see
 * the socket's error, so a consumer that closes a socket whose connect is still pending
 * counts as "refused" too. Leaving ESTABLISHED, CLOSE_WAIT or FIN_WAIT1 straight for
 * CLOSE is an abort (a reset sent or received); every other way is an orderly end.
 */
static __always_inline __u8 outcome_of(struct bpf_sock_ops *ctx, struct sock_state *st, __u32 old,
				      __u64 now)
{
	__u64 limit_ns = (__u64)st->connect_timeout_ms * 1000000;

	switch (old) {
	case BPF_TCP_SYN_SENT:
		if (ctx->total_retrans || (limit_ns && now - st->start_ns >= limit_ns - limit_ns / 10))
			return OUTCOME_TIMEOUT;
		return OUTCOME_REFUSED;
	case BPF_TCP_ESTABLISHED:
	case BPF_TCP_CLOSE_WAIT:
	case BPF_TCP_FIN_WAIT1:
		return OUTCOME_RESET;
	default:
		return OUTCOME_OK;
	}
}

static __always_inline void copy_backend(struct event *e, struct sock_state *st)
{
	e->scope = st->scope;
	e->start_ns = st->start_ns;
	e->route_port = st->route_port;
	e->orig_family = st->orig_family;
	e->orig_port = bpf_ntohs(st->orig_port);
	e->orig_addr[0] = st->orig_addr[0];
	e->orig_addr[1] = st->orig_addr[1];
	e->orig_addr[2] = st->orig_addr[2];
	e->orig_addr[3] = st->orig_addr[3];
	e->backend_family = st->backend_family;
	e->backend_port = bpf_ntohs(st->backend_port);
	e->backend_addr[0] = st->backend_addr[0];
	e->backend_addr[1] = st->backend_addr[1];
	e->backend_addr[2] = st->backend_addr[2];
	e->backend_addr[3] = st->backend_addr[3];
}

static __always_inline void copy_source(struct event *e, struct bpf_sock_ops *ctx)
{
	e->src_family = ctx->family;
	e->src_port = ctx->local_port; /* host order in bpf_sock_ops */
	if (ctx->family == AF_INET) {
		e->src_addr[0] = ctx->local_ip4;
	} else {
		e->src_addr[0] = ctx->local_ip6[0];
		e->src_addr[1] = ctx->local_ip6[1];
		e->src_addr[2] = ctx->local_ip6[2];
		e->src_addr[3] = ctx->local_ip6[3];
	}
}

static __always_inline void eject(struct bpf_sock_ops *ctx, struct sock_state *st, __u64 now)
{
	struct eject_key key = {};
	__u64 until = now + st->eject_ns;
	struct event *e;

	key.family = st->backend_family;
	key.port = st->backend_port;
	key.addr[0] = st->backend_addr[0];
	key.addr[1] = st->backend_addr[1];
	key.addr[2] = st->backend_addr[2];
	key.addr[3] = st->backend_addr[3];
	bpf_map_update_elem(&ejected, &key, &until, BPF_ANY);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		bump(COUNTER_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = EVENT_EJECTED;
	e->cookie = bpf_get_socket_cookie(ctx);
	copy_backend(e, st);
	e->end_ns = until;
	bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP); /* rare, and the daemon reports it at once */
}

/*
 * The socket's counters (tcp_info's bytes_acked and bytes_received, RFC 4898) count the
 * SYN and each FIN as one byte; the payload is what is left once they are taken off. Our
 * FIN counts in bytes_acked once acknowledged: we sent one and everything we sent is
 * acknowledged. The peer's FIN counts in bytes_received once it arrived: we went to
 * CLOSE_WAIT or CLOSING, or we leave FIN_WAIT2 with rcv_nxt moved since it began (its
 * other ways out, the FIN_WAIT2 timer of an orphan and the fast hand-over to a
 * time-wait socket on the ACK of our FIN, receive nothing).
 */
static __always_inline void payload(struct bpf_sock_ops *ctx, struct sock_state *st, __u32 old, struct event *e)
{
	__u64 acked = ctx->bytes_acked, received = ctx->bytes_received;
	__u64 fins_out = 1, fin_in = st->peer_fin;

	if (old == BPF_TCP_FIN_WAIT2 && ctx->rcv_nxt != st->rcv_nxt_fin_wait2)
		fin_in = 1;
	if (st->fin_sent && ctx->snd_una == ctx->snd_nxt)
		fins_out = 2; /* the SYN and our FIN */
	e->bytes_acked = st->established && acked > fins_out ? acked - fins_out : 0;
	e->bytes_received = received > fin_in ? received - fin_in : 0;
}

/* The counts of a socket's route and backend on this CPU, made at first use. The daemon
 * reads them every second, summed over CPUs: they are the metrics. */
static __always_inline struct conn_stat *stat_of(struct sock_state *st)
{
	struct stat_key key = {};
	struct conn_stat *v, zero = {};

	key.scope = st->scope;
	key.backend_addr[0] = st->backend_addr[0];
	key.backend_addr[1] = st->backend_addr[1];
	key.backend_addr[2] = st->backend_addr[2];
	key.backend_addr[3] = st->backend_addr[3];
	key.backend_port = st->backend_port;
	key.route_port = st->route_port;
	key.backend_family = st->backend_family;
	v = bpf_map_lookup_elem(&conn_stats, &key);
	if (!v) {
		bpf_map_update_elem(&conn_stats, &key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&conn_stats, &key);
	}
	return v;
}

/* An established connection's end, added to its counts (per CPU: no atomics). */
static __always_inline void count(struct sock_state *st, __u8 outcome, const struct event *e)
{
	struct conn_stat *v = stat_of(st);

	if (!v)
		return;
	if (outcome == OUTCOME_RESET)
		v->reset += 1;
	else
		v->ok += 1;
	v->bytes_acked += e->bytes_acked;
	v->bytes_received += e->bytes_received;
}

static __always_inline int connection_events(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	return cfg && (cfg->flags & CONFIG_CONNECTION_EVENTS);
}

static __always_inline void closed(struct bpf_sock_ops *ctx, struct sock_state *st, __u32 old)
{
	__u64 now = bpf_ktime_get_ns();
	__u8 outcome = outcome_of(ctx, st, old, now);
	int failed = outcome == OUTCOME_REFUSED || outcome == OUTCOME_TIMEOUT;
	struct event *e, counted = {};

	st->active = 0;
	if (failed && st->eject_ns)
		eject(ctx, st, now);
	if (!failed) {
		payload(ctx, st, old, &counted);
		count(st, outcome, &counted);
		if (!connection_events())
			return; /* counted; nobody logs it */
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		bump(COUNTER_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = EVENT_CLOSED;
	e->outcome = outcome;
	e->cookie = bpf_get_socket_cookie(ctx);
	copy_backend(e, st);
	copy_source(e, ctx);
	e->end_ns = now;
	e->bytes_acked = counted.bytes_acked;
	e->bytes_received = counted.bytes_received;
	/* Wake the reader only once WAKE_BYTES have piled up: it also reads every
	 * READ_INTERVAL (plane.py), so under churn it takes the events in batches instead
	 * of being woken for every connection (thousands of wake-ups a second). */
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKE_BYTES ? BPF_RB_FORCE_WAKEUP
											    : BPF_RB_NO_WAKEUP);
}

SEC("sockops")
int sock_ops(struct bpf_sock_ops *ctx)
{
	struct sock_state *st;
	__u32 op = ctx->op, ms;

	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	st = rewritten(ctx->sk);
	if (!st)
		return 1;

	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* The SYN is about to go out: watch this socket's states from here on. */
		bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
		ms = st->connect_timeout_ms;
		if (ms) {
			/* TCP_USER_TIMEOUT bounds SYN_SENT too (the retransmit timer is clamped
			 * to it); the consumer's own value comes back once established. */
			__u32 saved = 0;

			if (bpf_getsockopt(ctx, SOL_TCP, TCP_USER_TIMEOUT, &saved, sizeof(saved)) == 0)
				st->saved_user_timeout = saved;
			if (bpf_setsockopt(ctx, SOL_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms)) == 0)
				st->timeout_set = 1;
		}
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		struct conn_stat *v = stat_of(st);

		if (v)
			v->established += 1; /* per CPU: no atomics needed */
		st->established = 1;
		if (st->timeout_set) {
			ms = st->saved_user_timeout;
			bpf_setsockopt(ctx, SOL_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms));
			st->timeout_set = 0;
		}
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		switch (ctx->args[1]) {
		case BPF_TCP_FIN_WAIT1:
		case BPF_TCP_LAST_ACK:
			st->fin_sent = 1;
			break;
		case BPF_TCP_CLOSE_WAIT:
		case BPF_TCP_CLOSING:
			st->peer_fin = 1;
			break;
		case BPF_TCP_FIN_WAIT2:
			st->rcv_nxt_fin_wait2 = ctx->rcv_nxt;
			break;
		case BPF_TCP_CLOSE:
			closed(ctx, st, ctx->args[0]);
			break;
		}
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
