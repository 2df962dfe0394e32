"""The route table: (intended port, source address) -> Route. Pure: no sockets, no trio.

A route maps one intended destination port, optionally limited to a source network, to a
backend spec and its options. Several routes may share a port with different source
networks; the most specific (longest prefix) match wins, and a route without a source
network matches everyone.

A Route also carries its live state: the current BackendSet (replaced whole, never
mutated, by its resolver) and the selection state used by the balancer. Because trio runs
everything in one thread, swapping the set is a single attribute assignment: a connection
reads whatever set is current and needs no lock.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from ambassadord.backends.interface import BackendSet, Spec

from .balancer import PickState
from .stats import RouteStats

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Connections one route holds open at once, per process (0: no limit). High enough that no
# ordinary use meets it (a service seldom has more than hundreds of clients per host; the
# benchmarks hold 2,000 idle ones), low enough that a routing loop between two hosts (each
# hop holds two sockets per daemon) stops at 20,000 fds, inside the 65,536 of the deploy
# files' LimitNOFILE, instead of running the daemon out of fds. See README, "Limits".
DEFAULT_MAX_CONNECTIONS = 10_000
MODES = ("proxy", "connect")
# What happens to a route's open connections when their backend leaves the set, is ejected
# or is down by the health checks: "keep" them (they end by themselves), or "shutdown" them
# after the route's drain time (HAProxy's on-marked-down shutdown-sessions).
ON_DOWN = ("keep", "shutdown")
# The kernel's bounds for TCP_KEEPIDLE / TCP_KEEPINTVL (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL)
# and TCP_KEEPCNT (MAX_TCP_KEEPCNT).
_KEEPALIVE_MAX = (32767, 32767, 127)


@dataclass(frozen=True, slots=True)
class SpecText:
    """A spec known only by its text, never resolved: a route as a --workers helper gets it
    (it need not import Consul, etcd or DNS clients to unpickle it), or a passthrough's."""

    text: str


# RouteConfig.origin of a route that --docker's passthrough makes for one connection
# (server.py): straight to where a container's connection was headed. Never ejected.
PASSTHROUGH = "passthrough"


def client_address(text: str) -> str | None:
    """A connection's source address as --docker knows containers' (an IPv4 client of a
    dual-stack listener without its ``::ffff:``), or None for loopback (the host's own
    processes, never a container)."""
    if text.startswith("::ffff:"):
        text = text[7:]
    return None if text.startswith("127.") or text == "::1" else text


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive on both sockets of a connection: after ``idle`` seconds without a
    packet, probe every ``interval`` seconds; ``count`` unanswered probes and the kernel
    fails the socket (ETIMEDOUT), which ends the relay. 60/10/6: a peer that vanished
    (power cut, cable, a NAT that forgot the flow) is noticed about 2 minutes after the
    last packet, at the cost of one small packet a minute per idle connection.
    ``idle == 0`` means off."""

    idle: int = 60
    interval: int = 10
    count: int = 6

    def __bool__(self) -> bool:
        return self.idle > 0

    def __str__(self) -> str:
        return f"{self.idle},{self.interval},{self.count}" if self else "off"

    @classmethod
    def parse(cls, text: str) -> Keepalive:
        """``off``, ``IDLE``, ``IDLE,INTERVAL`` or ``IDLE,INTERVAL,COUNT`` (whole seconds; the
        ones left out keep their defaults). ValueError quoting ``text`` otherwise."""
        t = str(text).strip()
        if t.lower() == "off":
            return cls(0, 0, 0)
        parts = [p.strip() for p in t.split(",")]
        bad = ValueError(f"bad keepalive {text!r}: expected off or IDLE[,INTERVAL[,COUNT]] in whole seconds, "
                         f"e.g. 60,10,6 (IDLE and INTERVAL 1-32767, COUNT 1-127)")
        if not 1 <= len(parts) <= 3 or not all(p.isascii() and p.isdigit() for p in parts):
            raise bad
        values = [int(p) for p in parts]
        if not all(1 <= v <= top for v, top in zip(values, _KEEPALIVE_MAX)):
            raise bad
        return cls(*values)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A route as configured: validated once, at the edge. ``origin`` says where it came from."""

    port: int
    spec: Spec
    source: IPNetwork | None = None
    balance: str = "random"
    connect_timeout: float = 2.0
    idle_timeout: float | None = None
    eject_for: float = 10.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open at once; 0: no limit (per process)
    max_backend_connections: int = 0  # open or connecting at once per backend; 0: no limit
    keepalive: Keepalive = Keepalive()
    # Active health checks (health.py): a TCP connect to each backend every check_interval
    # seconds (None: no checks); down after check_fall failures in a row, up again after
    # check_rise successes.
    check_interval: float | None = None
    check_rise: int = 2
    check_fall: int = 3
    # "proxy": connections come to the listener (REDIRECT) and are relayed; "connect": a
    # cgroup BPF program rewrites the consumer's connect() to a backend (connect/).
    mode: str = "proxy"
    on_down: str = "keep"
    drain: float = 0.0  # on_down = "shutdown": seconds a connection may go on first
    origin: str = ""
    # What logs, metrics, /routes and the page call the route ("redis-primary"); "": its
    # port (and source network). Only a name: serving does not depend on it.
    name: str = ""
    # A route a Docker container declared for itself (containers.py): "NAME (SHORT_ID)";
    # "" for the host's routes. Shown by /routes, the status page and ``status``.
    container: str = ""

    @property
    def key(self) -> tuple[int, IPNetwork | None]:
        return (self.port, self.source)

    def describe(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"{self.port}{src}"

    def same_route(self, other: RouteConfig) -> bool:
        """Equal in everything that matters for serving (``origin`` and ``container`` only
        say where it was read, ``name`` what it is called; a renamed container keeps its
        route)."""
        return (self.port, self.spec, self.source, self.balance, self.connect_timeout, self.idle_timeout,
                self.eject_for, self.max_connections, self.max_backend_connections, self.keepalive,
                self.check_interval, self.check_rise, self.check_fall, self.mode, self.on_down, self.drain) == (
                    other.port, other.spec, other.source, other.balance, other.connect_timeout, other.idle_timeout,
                    other.eject_for, other.max_connections, other.max_backend_connections, other.keepalive,
                    other.check_interval, other.check_rise, other.check_fall, other.mode, other.on_down, other.drain)


@dataclass(eq=False)
class Route:
    """A configured route plus its live state."""

    config: RouteConfig
    backends: BackendSet = field(default_factory=lambda: BackendSet((), source="(not resolved yet)"))
    resolved: bool = False  # True once the resolver has published its first answer
    pick: PickState = field(default_factory=PickState)
    # Resolver counters: answers published, failed look-ups (published with an error).
    updates: int = 0
    errors: int = 0
    updated_at: float | None = None  # wall clock of the last publish (a change or a failure)
    changed_at: float | None = None  # wall clock of the last publish that changed the set
    stats: RouteStats = field(default_factory=RouteStats)
    resolver: object = None  # the running Resolver (set by the server), for answered_at

    @property
    def answered_at(self) -> float | None:
        """When the source last gave a good answer, changed or not (None: never)."""
        at = getattr(self.resolver, "answered_at", None)
        return at if at is not None else (None if self.backends.stale else self.updated_at)

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def name(self) -> str:
        return self.config.name or self.config.describe()

    def update(self, new: BackendSet) -> None:
        """Install a resolver's fresh set (called by the resolver task only)."""
        old = self.backends
        self.backends = new
        self.resolved = True
        self.updates += 1
        self.updated_at = time.time()
        if new.backends != old.backends or self.changed_at is None:
            self.changed_at = self.updated_at
        if new.error:
            self.errors += 1
        self.pick.ejections.forget_missing(new.backends)
        self.stats.prune({str(b) for b in new.backends})


class RouteTable:
    """Routes keyed by port, then by source network (most specific first)."""

    def __init__(self, routes: list[Route]):
        self.routes = list(routes)
        by_port: dict[int, list[Route]] = {}
        for r in self.routes:
            by_port.setdefault(r.port, []).append(r)
        # Longest prefix first; the catch-all (source None) last. Within a port, source
        # networks are unique (config validation guarantees it).
        self._by_port = {
            port: sorted(rs, key=lambda r: -1 if r.config.source is None else r.config.source.prefixlen, reverse=True)
            for port, rs in by_port.items()
        }
        # The common case, one route per port and no source limits, is a dict hit.
        self._only = {port: rs[0] for port, rs in self._by_port.items() if len(rs) == 1 and rs[0].config.source is None}

    def __len__(self) -> int:
        return len(self.routes)

    def ports(self) -> list[int]:
        return sorted(self._by_port)

    def lookup(self, port: int, source: str) -> Route | None:
        """The route for a connection from ``source`` (an IP string) to ``port``, or None."""
        route = self._only.get(port)
        if route is not None:
            return route
        candidates = self._by_port.get(port)
        if not candidates:
            return None
        addr = ipaddress.ip_address(source)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for r in candidates:
            net = r.config.source
            if net is None or (addr.version == net.version and addr in net):
                return r
        return None
