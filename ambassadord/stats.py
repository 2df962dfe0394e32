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
import math
from dataclasses import dataclass, field

# Connect latency buckets (seconds): sub-millisecond on a LAN up to the connect timeout.
CONNECT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True, eq=False)
class BackendStats:
    """One backend of one route."""

    backend: object = None  # the Backend (address, port, priority, weight, host name)
    active: int = 0
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

    def backend(self, key: str, backend=None) -> BackendStats:
        b = self.backends.get(key)
        if b is None:
            b = self.backends[key] = BackendStats(backend)
        elif backend is not None:
            b.backend = backend
        return b

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

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
        for key in [k for k, b in self.backends.items() if k not in current and b.active == 0]:
            del self.backends[key]

    def closed(self, key: str, b: BackendStats) -> None:
        """A connection to backend ``key`` closed: forget it if it was the last one to a
        backend that has left the set."""
        if b.active == 0 and key not in self.current:
            self.backends.pop(key, None)
