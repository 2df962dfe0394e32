"""Live counters for the admin API and /metrics. Pure: no sockets, no trio, no locks.

The relay path only does integer arithmetic on these objects (trio runs every connection
in one thread, so a plain ``+=`` is safe); everything else (Prometheus exposition, the
JSON of /routes, the status page) reads them when asked. Bytes of connections still open
are not lost until they close: each open connection's RelayResult is kept in ``open`` and
summed at read time, so a long-lived connection's traffic shows while it flows.

Counters live per route *name* (port and source network), not per route object, so that a
reload that changes a route's spec keeps its history (see Server.reload).
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass, field

# Connect latency buckets (seconds): sub-millisecond on a LAN up to the connect timeout.
CONNECT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Outcome(enum.StrEnum):
    """How a connection ended: the ``outcome`` of its log line, the key of ``outcomes`` and
    the label of ``ambassadord_connections_total`` (README, "Logs"). A ``str``: log lines,
    JSON and metric labels show the plain value, and it counts under the same key as the
    relay's plain-string outcomes."""

    # The relay ran (relay.py sets these, as plain strings):
    OK = "ok"
    IDLE_TIMEOUT = "idle-timeout"
    CLIENT_RESET = "client-reset"
    BACKEND_RESET = "backend-reset"
    # Closed before any byte was relayed:
    LOOP = "loop"  # our own upstream connection came back, or every backend is the client's host
    NO_ROUTE = "no-route"
    LIMIT = "limit"  # max_connections, or every backend at max_backend_connections
    NO_BACKENDS = "no-backends"
    CAPACITY = "capacity"  # this host had no fd, local port or memory for the upstream socket
    ALL_BACKENDS_FAILED = "all-backends-failed"
    # Either:
    ERROR = "error"  # a bug, logged with its traceback
    SHUTDOWN = "shutdown"  # cancelled when the grace period ran out
    # Connect mode (connect/feed.py): the consumer's own connect to the backend failed.
    CONNECT_FAILED = "connect-failed"
    RESET = "reset"  # connect mode: it ended in a reset (the kernel does not say whose)
    # on_down = "shutdown": closed because its backend left the set, was ejected or is down
    # by the health checks (after the route's drain time).
    BACKEND_DOWN = "backend-down"


@dataclass(slots=True, eq=False)
class BackendStats:
    """One backend of one route."""

    backend: object = None  # the Backend (address, port, priority, weight, host name)
    active: int = 0
    connecting: int = 0  # connects in progress (counted against max_backend_connections)
    connections: int = 0  # successful connects
    failures: int = 0  # failed connects (refused, timeout, ...)
    last_connect: float | None = None  # wall clock of the last successful connect
    up: int = 0  # bytes client -> backend, closed connections
    down: int = 0
    last_error: str | None = None
    last_failure: float | None = None  # wall clock (time.time())


@dataclass(slots=True, eq=False)
class RouteStats:
    active: int = 0
    failures: int = 0  # failed connects to any backend (including ones since gone from the set)
    outcomes: dict[str, int] = field(default_factory=dict)  # closed connections by outcome
    up: int = 0  # closed connections' bytes
    down: int = 0
    open: set = field(default_factory=set)  # RelayResult of every open connection
    backends: dict[str, BackendStats] = field(default_factory=dict)  # key: str(Backend)
    # Connect latency histogram: per-bucket (not cumulative) counts, +Inf last.
    connect_counts: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_sum: float = 0.0
    current: frozenset = frozenset()  # str() of the backends in the route's current set
    # --workers (merged() only): backend str() -> seconds it stays ejected in another process.
    ejected: dict[str, float] = field(default_factory=dict)

    def backend(self, key: str, backend=None) -> BackendStats:
        b = self.backends.get(key)
        if b is None:
            b = self.backends[key] = BackendStats(backend)
        elif backend is not None:
            b.backend = backend
        return b

    def observe_connect(self, seconds: float) -> None:
        self.connect_counts[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
        self.connect_sum += seconds

    def total(self) -> int:
        return sum(self.outcomes.values()) + self.active

    def bytes(self) -> tuple[int, int]:
        """(up, down) including the connections still open."""
        up, down = self.up, self.down
        for r in self.open:
            if r.refresh is not None:
                r.refresh()
            up += r.up
            down += r.down
        return up, down

    def backend_bytes(self, key: str) -> tuple[int, int]:
        b = self.backends.get(key)
        up, down = (b.up, b.down) if b else (0, 0)
        for r in self.open:
            if r.backend == key:
                if r.refresh is not None:
                    r.refresh()
                up += r.up
                down += r.down
        return up, down

    def connect_histogram(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``[(le, count), ...]`` ending with +Inf, and the sum."""
        out, acc = [], 0
        for bound, n in zip((*CONNECT_BUCKETS, math.inf), self.connect_counts):
            acc += n
            out.append(("+Inf" if bound == math.inf else repr(bound), acc))
        return out, self.connect_sum

    def prune(self, current: set[str]) -> None:
        """Forget backends that left the set and have nothing open (called on publish)."""
        self.current = frozenset(current)
        for key in [k for k, b in self.backends.items() if k not in current and b.active == 0 and b.connecting == 0]:
            del self.backends[key]

    # ---- one connection's life, as the connection handler counts it -------------------
    # (``active`` counts it open as soon as it has a route: the handler's one ``+= 1``)

    def connect_failed(self, b: BackendStats, reason: str, now: float) -> None:
        """A connect to backend ``b`` failed (refused, timeout, ...) at wall-clock ``now``."""
        b.failures += 1
        self.failures += 1
        b.last_error, b.last_failure = reason, now

    def opened(self, key: str, b: BackendStats, result, seconds: float | None, now: float) -> None:
        """A connection reached backend ``key`` (stats ``b``) after ``seconds`` of connect
        (None: not measured, as in connect mode), at wall-clock ``now``; its bytes are
        counted in ``result`` (a relay.RelayResult) from now on, and read while it is open."""
        result.backend = key
        if seconds is not None:
            self.observe_connect(seconds)
        b.active += 1
        b.connections += 1
        b.last_connect = now
        self.open.add(result)

    def closed(self, outcome: str, result, b: BackendStats | None) -> None:
        """A connection of this route ended with ``outcome``; ``b``: its backend's stats, if
        it was opened(). Its bytes move from ``result`` to the totals; a backend that has
        left the set is forgotten with its last connection."""
        self.active -= 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if b is None:
            return
        self.open.discard(result)
        up, down = result.up, result.down
        self.up += up
        self.down += down
        b.active -= 1
        b.up += up
        b.down += down
        if b.active == 0 and result.backend not in self.current:
            self.backends.pop(result.backend, None)


# ---- --workers: one process's counters, and the sum over all of them ---------------------

_BACKEND_SUMS = ("active", "connections", "failures", "up", "down")


def snapshot(st: RouteStats) -> dict:
    """``st`` as plain data (picklable), bytes of open connections included."""
    up, down = st.bytes()
    backends = {}
    for key, b in st.backends.items():
        bup, bdown = st.backend_bytes(key)
        backends[key] = {"backend": b.backend, "active": b.active, "connections": b.connections,
                         "failures": b.failures, "up": bup, "down": bdown, "last_connect": b.last_connect,
                         "last_error": b.last_error, "last_failure": b.last_failure}
    return {"active": st.active, "failures": st.failures, "outcomes": dict(st.outcomes), "up": up, "down": down,
            "connect_counts": list(st.connect_counts), "connect_sum": st.connect_sum, "backends": backends,
            "ejected": {}}


def merged(local: RouteStats, snaps: list[dict]) -> RouteStats:
    """One RouteStats summing ``local`` and other processes' snapshots of the same route.
    Its ``ejected`` maps a backend's str() to the longest remaining ejection elsewhere."""
    view = RouteStats(current=local.current)
    for snap in (snapshot(local), *snaps):
        view.active += snap["active"]
        view.failures += snap["failures"]
        for outcome, n in snap["outcomes"].items():
            view.outcomes[outcome] = view.outcomes.get(outcome, 0) + n
        view.up += snap["up"]
        view.down += snap["down"]
        view.connect_counts = [a + b for a, b in zip(view.connect_counts, snap["connect_counts"])]
        view.connect_sum += snap["connect_sum"]
        for key, b in snap["backends"].items():
            mine = view.backend(key, b["backend"])
            for name in _BACKEND_SUMS:
                setattr(mine, name, getattr(mine, name) + b[name])
            if b["last_connect"] is not None and (mine.last_connect or 0) < b["last_connect"]:
                mine.last_connect = b["last_connect"]
            if b["last_failure"] is not None and (mine.last_failure or 0) < b["last_failure"]:
                mine.last_failure, mine.last_error = b["last_failure"], b["last_error"]
        for key, left in snap["ejected"].items():
            view.ejected[key] = max(left, view.ejected.get(key, 0.0))
    return view
