"""The BPF maps' keys and values and the ring buffer's records, byte for byte (pure).

Mirrors the structs of ``connect.bpf.c``; a change there is a change here (ConnectPlane
checks every map's key and value size against these at load, and refuses a mismatch).
Nothing here touches the kernel: it packs Python values into bytes and unpacks records
into frozen dataclasses, and is tested with tables.

Byte order, as in the C source: addresses are network order (an IPv4 address fills the
first 4 of 16 bytes); ports in map keys and events are host order; a backend's port is
network order (the program writes it into the socket as it is); every other integer is
host order.

Values the daemon gives (all validated here, with ValueError quoting the bad value):

* :class:`Backend` ``(ip, port, weight=1, priority=0)``: ``ip`` an IPv4 or IPv6 literal
  (an IPv4-mapped IPv6 address counts as IPv4), ``weight`` 0..65535 (relative, used by
  ``random``; a tier whose weights are all 0 is chosen from uniformly, a 0 beside non-zero
  weights is never chosen), ``priority`` 0..65535 (lower is preferred).
* ``balance``: ``"random"`` (weighted) or ``"round-robin"`` (weights ignored, as in the
  proxy's round-robin).
* ``eject_for``: seconds a backend is skipped after a failed connect (0: never ejected).
* ``connect_timeout``: seconds a rewritten connect may take (0: the kernel's own SYN
  retries; otherwise rounded up to whole milliseconds).
"""

from __future__ import annotations

import ipaddress
import math
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAX_BACKENDS = 32  # per route, inline in one map value (MAX_BACKENDS in the C source)

BALANCES = {"random": 0, "round-robin": 1}  # enum balance
OUTCOMES = ("ok", "refused", "timeout", "reset")  # enum outcome, by value
COUNTERS = ("rewritten", "no_backend", "all_ejected", "no_storage", "events_lost")  # enum counter

EVENT_CLOSED, EVENT_EJECTED = 1, 2  # enum event_kind

# struct layouts ("=": host byte order, no padding but what the C structs have, spelled out)
ROUTE_KEY = struct.Struct("=QH6x")  # scope, port
BACKEND = struct.Struct("=16s2sBxHH")  # addr, port (network order), family, weight, priority
ROUTE_HEAD = struct.Struct("=IIQBB6x")  # rr, connect_timeout_ms, eject_ns, count, balance
ROUTE_SIZE = ROUTE_HEAD.size + MAX_BACKENDS * BACKEND.size
ADDR_KEY = struct.Struct("=16sB3x")  # addr, family
EJECT_KEY = struct.Struct("=16s2sBx")  # addr, port (network order), family
EJECT_VALUE = struct.Struct("=Q")  # ejected until, CLOCK_MONOTONIC ns
CONFIG = struct.Struct("=QQ")  # the daemon's netns cookie, flags (CONFIG_*)
CONFIG_CONNECTION_EVENTS = 1  # an event for every connection's end, not only failed connects
# conn_stats: scope, backend addr, backend port (network order), route port, backend family
STAT_KEY = struct.Struct("=Q16s2sHB3x")
STAT_VALUE = struct.Struct("=QQQQQ")  # ok, reset, bytes_acked, bytes_received, established (one CPU's)
COUNTER = struct.Struct("=Q")  # one CPU's count
# cookie, start_ns, end_ns, bytes_received, bytes_acked, scope, src/orig/backend addr,
# src/orig/backend/route port, kind, outcome, src/orig/backend family
EVENT = struct.Struct("=QQQQQQ16s16s16sHHHHBBBBB3x")

# Every map's (key size, value size), checked against the loaded object.
MAP_SIZES = {
    "routes": (ROUTE_KEY.size, ROUTE_SIZE),
    "catch_addrs": (ADDR_KEY.size, 1),
    "ejected": (EJECT_KEY.size, EJECT_VALUE.size),
    "config": (4, CONFIG.size),
    "counters": (4, COUNTER.size),
    "conn_stats": (STAT_KEY.size, STAT_VALUE.size),
}

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Backend:
    """One backend of a route, as the kernel chooses among them."""

    ip: str
    port: int
    weight: int = 1
    priority: int = 0

    def __post_init__(self) -> None:
        address(self.ip)  # raises ValueError naming it
        for name, value, low in (("port", self.port, 1), ("weight", self.weight, 0), ("priority", self.priority, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _U16:
                raise ValueError(f"backend {self.ip}:{self.port}: {name} {value!r} is not an integer in {low}..{_U16}")


def address(ip: str) -> tuple[int, bytes]:
    """``(family, 16 bytes)`` of an IP literal: IPv4 (also IPv4-mapped IPv6) in the first
    4 bytes, AF_INET; IPv6, AF_INET6. ValueError quotes what is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return socket.AF_INET, addr.packed + bytes(12)
    return socket.AF_INET6, addr.packed


def ip_text(family: int, raw: bytes) -> str:
    """The literal of an address as the kernel stores it (see :func:`address`)."""
    # inet_ntop, not ipaddress: the same text (RFC 5952 for IPv6) in a hundredth of the
    # time, and an event carries three addresses (measured: 42 -> 6 us an event).
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def route_key(port: int, scope: int = 0) -> bytes:
    """Key of the route for ``port``: ``scope`` 0 is host-wide, otherwise the network
    namespace cookie of the consumers it is limited to (which wins over host-wide)."""
    if not isinstance(port, int) or not 1 <= port <= _U16:
        raise ValueError(f"route port {port!r} is not in 1..65535")
    if not isinstance(scope, int) or not 0 <= scope < 2**64:
        raise ValueError(f"route scope {scope!r} is not a netns cookie (0..2**64-1)")
    return ROUTE_KEY.pack(scope, port)


def _ns(seconds: float, what: str) -> int:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} {seconds!r} is not a number of seconds >= 0")
    return round(seconds * 1e9)


def route_value(backends: Sequence[Backend], *, balance: str = "random", eject_for: float,
                connect_timeout: float) -> bytes:
    """The whole route in one map value: up to MAX_BACKENDS backends (see module doc)."""
    if balance not in BALANCES:
        raise ValueError(f"balance {balance!r} is not one of {', '.join(BALANCES)}")
    if len(backends) > MAX_BACKENDS:
        raise ValueError(f"{len(backends)} backends: connect mode takes at most {MAX_BACKENDS} per route")
    eject_ns = _ns(eject_for, "eject_for")
    if eject_ns >= 2**64:
        raise ValueError(f"eject_for {eject_for!r} is too long")
    timeout_ms = math.ceil(_ns(connect_timeout, "connect_timeout") / 1e6)
    if timeout_ms > _U32:
        raise ValueError(f"connect_timeout {connect_timeout!r} is too long")
    parts = [ROUTE_HEAD.pack(0, timeout_ms, eject_ns, len(backends), BALANCES[balance])]
    for b in backends:
        if not isinstance(b, Backend):
            raise ValueError(f"{b!r} is not a Backend")
        family, raw = address(b.ip)
        parts.append(BACKEND.pack(raw, b.port.to_bytes(2, "big"), family, b.weight, b.priority))
    parts.append(bytes(BACKEND.size * (MAX_BACKENDS - len(backends))))
    return b"".join(parts)


def unpack_route(value: bytes) -> tuple[list[Backend], dict]:
    """The backends and settings of a route value (the inverse of :func:`route_value`,
    plus the kernel's round-robin counter ``rr``)."""
    rr, timeout_ms, eject_ns, count, balance = ROUTE_HEAD.unpack_from(value)
    backends = []
    for i in range(min(count, MAX_BACKENDS)):
        raw, port, family, weight, priority = BACKEND.unpack_from(value, ROUTE_HEAD.size + i * BACKEND.size)
        backends.append(Backend(ip_text(family, raw), int.from_bytes(port, "big"), weight, priority))
    names = {v: k for k, v in BALANCES.items()}
    return backends, {"rr": rr, "connect_timeout": timeout_ms / 1e3, "eject_for": eject_ns / 1e9,
                      "balance": names.get(balance, str(balance))}


def addr_key(ip: str) -> bytes:
    """Key of an address in the catch set."""
    family, raw = address(ip)
    return ADDR_KEY.pack(raw, family)


def unpack_addr_key(key: bytes) -> str:
    raw, family = ADDR_KEY.unpack(key)
    return ip_text(family, raw)


def eject_key(ip: str, port: int) -> bytes:
    family, raw = address(ip)
    return EJECT_KEY.pack(raw, port.to_bytes(2, "big"), family)


def unpack_eject_key(key: bytes) -> tuple[str, int]:
    """``(ip, port)`` of an ejection map key."""
    raw, port, family = EJECT_KEY.unpack(key)
    return ip_text(family, raw), int.from_bytes(port, "big")


@dataclass(frozen=True)
class ConnectionEnded:
    """A rewritten connection ended, or its connect failed (``outcome`` refused/timeout).

    Addresses are ``(ip, port)``; ``source`` is the consumer's end (its port 0 when the
    connect failed before one was bound), ``dialled`` what it connected to, ``backend``
    where the kernel sent it. Bytes are payload, from the socket's own counters (tcp_info's
    ``tcpi_bytes_received`` and ``tcpi_bytes_acked``) less the SYN and FINs that those
    count as one byte each: ``bytes_received`` from the backend, ``bytes_acked`` to it
    and acknowledged by it (bytes still unacknowledged at a reset are not counted).
    Times are CLOCK_MONOTONIC ns
    (``time.clock_gettime_ns(time.CLOCK_MONOTONIC)``): start at connect(), end at close.
    """

    cookie: int
    source: tuple[str, int]
    dialled: tuple[str, int]
    backend: tuple[str, int]
    route_port: int
    scope: int
    outcome: str
    bytes_received: int
    bytes_acked: int
    start_ns: int
    end_ns: int

    @property
    def duration(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class BackendEjected:
    """The kernel ejected ``backend`` after a failed connect (socket ``cookie``) on route
    ``route_port``/``scope``, until ``until_ns`` (CLOCK_MONOTONIC ns)."""

    cookie: int
    backend: tuple[str, int]
    dialled: tuple[str, int]
    route_port: int
    scope: int
    start_ns: int
    until_ns: int


Event = ConnectionEnded | BackendEjected


def unpack_event(record: bytes) -> Event:
    """One ring buffer record as its dataclass; ValueError for a record of another size or kind."""
    if len(record) < EVENT.size:
        raise ValueError(f"event record of {len(record)} bytes, expected {EVENT.size}")
    (cookie, start_ns, end_ns, received, acked, scope, src, orig, backend, src_port, orig_port, backend_port,
     route_port, kind, outcome, src_family, orig_family, backend_family) = EVENT.unpack_from(record)
    dialled = (ip_text(orig_family, orig), orig_port)
    target = (ip_text(backend_family, backend), backend_port)
    if kind == EVENT_CLOSED:
        return ConnectionEnded(
            cookie=cookie, source=(ip_text(src_family, src), src_port), dialled=dialled, backend=target,
            route_port=route_port, scope=scope,
            outcome=OUTCOMES[outcome] if outcome < len(OUTCOMES) else str(outcome),
            bytes_received=received, bytes_acked=acked, start_ns=start_ns, end_ns=end_ns)
    if kind == EVENT_EJECTED:
        return BackendEjected(cookie=cookie, backend=target, dialled=dialled, route_port=route_port, scope=scope,
                              start_ns=start_ns, until_ns=end_ns)
    raise ValueError(f"event record of unknown kind {kind}")


@dataclass(frozen=True)
class ConnStats:
    """The established connections of one route (``route_port``, ``scope``) to one
    ``backend`` (ip, port), since the plane was made: ended in order (``ok``) or by a
    reset, their payload bytes each way (to the backend: ``bytes_acked``), and how many
    were ``established`` at all (so :attr:`open` are open now)."""

    ok: int
    reset: int
    bytes_acked: int
    bytes_received: int
    established: int = 0

    @property
    def open(self) -> int:
        return max(0, self.established - self.ok - self.reset)


def unpack_stat_key(key: bytes) -> tuple[int, int, tuple[str, int]]:
    """``(route_port, scope, (backend ip, backend port))`` of a conn_stats key."""
    scope, raw, port, route_port, family = STAT_KEY.unpack(key)
    return route_port, scope, (ip_text(family, raw), int.from_bytes(port, "big"))


def sum_stats(value: bytes) -> ConnStats:
    """A per-CPU conn_stats value (one STAT_VALUE per CPU), summed."""
    return ConnStats(*(sum(column) for column in zip(*STAT_VALUE.iter_unpack(value))))
