"""The upstream connector (upstream.py): its decisions, with scripted sockets and trio's
``autojump_clock``, so that timeouts, capacity waits, failover and ejections run in
milliseconds and their times are exact.

The socket factory is the connector's seam: ``Network`` below makes sockets whose
connect() meets what the test scripted for each backend address (refused at once, never
answered, out of local ports, ...). Nothing here sends a packet; the same paths against real
sockets are in tests/test_server.py and tests/test_faults_server.py.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

import pytest
import trio

from ambassadord.health import NoResult
from ambassadord.relay import RelayResult
from ambassadord.routes import Keepalive, Route, RouteConfig
from ambassadord.stats import Outcome
from ambassadord.upstream import (
    CAPACITY_SLEEP,
    SO_MARK,
    Connector,
    Refused,
    failure_reason,
    host_short,
    no_upstream_outcome,
)
from ambassadord.backends import parse_spec
from ambassadord.backends.interface import Backend

A, B, C = Backend("10.0.0.1", 6379), Backend("10.0.0.2", 6379), Backend("10.0.0.3", 6379)
PEER = "192.0.2.7"  # TEST-NET-1: never an address of this host

# What connect() meets at a backend (Network.script):
OK = "ok"  # connected at once (the second connect_ex says EISCONN)
HANG = "hang"  # no answer ever: the socket never becomes writable
LATE_OK = "late-ok"  # in progress, then writable with SO_ERROR 0
LATE_REFUSED = "late-refused"  # in progress, then writable with SO_ERROR ECONNREFUSED
# or an errno: connect_ex returns it at once (ECONNREFUSED, EADDRNOTAVAIL, ...)


class Network:
    """The socket factory: makes ScriptedSockets, or fails as told (``no_fds``)."""

    def __init__(self, script: dict[Backend, object], *, no_fds: int = 0, deny_mark: bool = False):
        self.script = {(b.address, b.port): what for b, what in script.items()}
        self.no_fds = no_fds  # socket() calls that fail with EMFILE first (-1: all of them)
        self.deny_mark = deny_mark  # SO_MARK raises PermissionError (no CAP_NET_ADMIN)
        self.sockets: list[ScriptedSocket] = []
        self.next_port = 40000

    def __call__(self, family: int, type: int) -> ScriptedSocket:
        assert type & socket.SOCK_NONBLOCK
        if self.no_fds:
            self.no_fds -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        self.next_port += 1
        sock = ScriptedSocket(self, family, ("10.0.0.9", self.next_port))
        self.sockets.append(sock)
        return sock

    def open_sockets(self) -> list[ScriptedSocket]:
        return [s for s in self.sockets if not s.closed]


class ScriptedSocket:
    """Just what the connector calls on a socket. fileno() is a real pipe end, so that
    trio's wait_writable() waits on it: the read end never becomes writable (HANG), the
    write end is writable at once."""

    def __init__(self, net: Network, family: int, local: tuple[str, int]):
        self.net, self.family, self.local = net, family, local
        self.options: dict[tuple[int, int], object] = {}
        self.closed = False
        self.what = None
        self._r, self._w = os.pipe()

    def setsockopt(self, level: int, option: int, value) -> None:
        if option == SO_MARK and self.net.deny_mark:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        self.options[(level, option)] = value

    def connect_ex(self, address) -> int:
        if self.what is None:  # the first call starts the connect
            self.what = self.net.script[address]
            return self.what if isinstance(self.what, int) else errno.EINPROGRESS
        return errno.EISCONN if self.what == OK else errno.EALREADY

    def getsockname(self):
        return self.local

    def fileno(self) -> int:
        return self._r if self.what == HANG else self._w

    def getsockopt(self, level: int, option: int):
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR)
        return errno.ECONNREFUSED if self.what == LATE_REFUSED else 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


@dataclass
class Client:
    """The accepted client socket, as far as the peer-host loop check asks it."""

    family: int = socket.AF_INET

    def getsockname(self):
        return ("10.0.0.9", 7000)


def route_to(*backends: Backend, **options) -> Route:
    spec = ",".join(f"{b.address}:{b.port}" for b in backends)
    return Route(RouteConfig(port=6379, spec=parse_spec(spec), origin="test", **options))


def connector(net: Network, ejected: list | None = None, *, listen_addrs=frozenset({("127.0.0.1", 10000)}),
              **kw) -> Connector:
    """A Connector on ``net``; the backends it ejects, with their durations, go to ``ejected``."""
    def on_eject(route: Route, backend: Backend, seconds: float) -> None:
        if ejected is not None:
            ejected.append((backend, seconds))

    return Connector(listen_addrs, socket_factory=net, on_eject=on_eject, **kw)


async def connect(conn: Connector, route: Route, order: list[Backend], peer: str = PEER):
    result = RelayResult()
    sock, own, b = await conn.connect(route, order, result, peer, Client())
    return sock, own, b, result


# ---- failover and timeouts ----------------------------------------------------------------


async def test_timeout_moves_on_to_the_next_backend_after_exactly_connect_timeout(autojump_clock, caplog):
    net, ejected = Network({A: HANG, B: OK}), []
    conn, route = connector(net, ejected), route_to(A, B, connect_timeout=2.5, eject_for=7)
    t0 = trio.current_time()
    sock, own, b, result = await connect(conn, route, [A, B])
    assert trio.current_time() - t0 == pytest.approx(2.5)  # one attempt's timeout, no more
    assert sock.what == OK and result.backend == str(B) and b is route.stats.backends[str(B)]
    assert (b.active, b.connections, b.connecting) == (1, 1, 0) and route.stats.open == {result}
    a = route.stats.backends[str(A)]
    assert (a.failures, a.last_error, route.stats.failures, a.connecting) == (1, "timeout", 1, 0)
    assert ejected == [(A, 7)] and A in route.pick.ejections.until
    (line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "backend-failed"]
    assert line.getMessage() == "route 6379: backend 10.0.0.1:6379 failed (timeout); ejected for 7s"
    assert net.open_sockets() == [sock] and conn.own == {own: 1}
    conn.release(sock, own)
    assert net.open_sockets() == [] and conn.own == {}


async def test_refused_fails_over_at_once_and_a_late_answer_counts_too(autojump_clock):
    net = Network({A: errno.ECONNREFUSED, B: LATE_REFUSED, C: LATE_OK})
    conn, route = connector(net), route_to(A, B, C)
    t0 = trio.current_time()
    sock, own, b, result = await connect(conn, route, [A, B, C])
    assert trio.current_time() == t0 and result.backend == str(C)
    assert {k: s.last_error for k, s in route.stats.backends.items()} == {
        str(A): "Connection refused", str(B): "Connection refused", str(C): None}
    assert route.stats.connect_counts[0] == 1  # one connect, observed in the first bucket
    conn.release(sock, own)


async def test_every_backend_failing_is_all_backends_failed_with_each_reason(autojump_clock):
    net, ejected = Network({A: errno.ECONNREFUSED, B: HANG}), []
    conn, route = connector(net, ejected), route_to(A, B, connect_timeout=1)
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [A, B])
    assert refused.value.outcome is Outcome.ALL_BACKENDS_FAILED
    assert refused.value.error == "10.0.0.1:6379: Connection refused; 10.0.0.2:6379: timeout"
    assert [b for b, _ in ejected] == [A, B] and route.stats.failures == 2
    assert net.open_sockets() == [] and conn.own == {}


async def test_a_backend_already_ejected_is_not_ejected_again(autojump_clock, caplog):
    net, ejected = Network({A: errno.ECONNREFUSED}), []
    conn, route = connector(net, ejected), route_to(A)
    for _ in range(2):
        with pytest.raises(Refused):
            await connect(conn, route, [A])
    assert ejected == [(A, 10.0)] and route.stats.backends[str(A)].failures == 2
    lines = [r.getMessage() for r in caplog.records if getattr(r, "fields", {}).get("event") == "backend-failed"]
    assert lines[-1].endswith("failed (Connection refused); still ejected")


async def test_a_connect_that_succeeds_restores_an_ejected_backend(autojump_clock):
    net = Network({A: OK})
    conn, route = connector(net), route_to(A)
    route.pick.ejections.eject(A, 0.0, 10.0)
    sock, own, _, _ = await connect(conn, route, [A])
    assert A not in route.pick.ejections.last and A not in route.pick.ejections.until
    conn.release(sock, own)


async def test_cancelled_mid_connect_closes_the_socket_and_forgets_it(autojump_clock):
    net = Network({A: HANG})
    conn, route = connector(net), route_to(A, connect_timeout=60)
    with trio.move_on_after(1):
        await connect(conn, route, [A])
    assert net.open_sockets() == [] and conn.own == {}
    assert route.stats.backends[str(A)].connecting == 0 and route.stats.failures == 0


# ---- this host's shortage is not the backend's failure -------------------------------------


async def test_out_of_local_ports_moves_on_without_blaming_the_backend(autojump_clock, caplog):
    net, ejected = Network({A: errno.EADDRNOTAVAIL, B: OK}), []
    conn, route = connector(net, ejected), route_to(A, B)
    sock, own, _, result = await connect(conn, route, [A, B])
    assert result.backend == str(B) and ejected == [] and route.stats.failures == 0
    assert route.stats.backends[str(A)].failures == 0 and not route.pick.ejections.until
    (line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "capacity"]
    assert "ip_local_port_range" in line.getMessage() and line.levelno == logging.ERROR
    conn.release(sock, own)


async def test_out_of_local_ports_everywhere_is_capacity(autojump_clock):
    net = Network({A: errno.EADDRNOTAVAIL, B: errno.ECONNREFUSED})
    conn, route = connector(net), route_to(A, B)
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [A, B])
    # One backend could not be tried: capacity, not all-backends-failed.
    assert refused.value.outcome is Outcome.CAPACITY
    assert refused.value.error == "10.0.0.2:6379: Connection refused; 10.0.0.1:6379: Cannot assign requested address"


async def test_short_of_fds_waits_for_one_then_connects(autojump_clock):
    net = Network({A: OK}, no_fds=3)
    conn, route = connector(net), route_to(A, connect_timeout=2)
    t0 = trio.current_time()
    sock, own, _, _ = await connect(conn, route, [A])
    assert trio.current_time() - t0 == pytest.approx(3 * CAPACITY_SLEEP)
    assert conn.short_of_fds > 0  # the accept loop yields after every accept for a while
    conn.release(sock, own)


async def test_short_of_fds_for_the_whole_connect_timeout_is_capacity(autojump_clock):
    net = Network({A: OK, B: OK}, no_fds=-1)
    conn, route = connector(net), route_to(A, B, connect_timeout=2)
    t0 = trio.current_time()
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [A, B])
    assert trio.current_time() - t0 <= 2
    assert refused.value.outcome is Outcome.CAPACITY
    assert refused.value.error == "cannot open a socket to 10.0.0.1:6379: Too many open files"
    assert route.stats.failures == 0 and not route.pick.ejections.until  # nobody blamed, B never waited for


# ---- limits and loops ---------------------------------------------------------------------


async def test_a_backend_at_max_backend_connections_is_passed_over(autojump_clock):
    net = Network({A: OK, B: OK})
    conn, route = connector(net), route_to(A, B, max_backend_connections=2)
    route.stats.backend(str(A), A).active = 1
    route.stats.backend(str(A), A).connecting = 1
    sock, own, _, result = await connect(conn, route, [A, B])
    assert result.backend == str(B)
    route.stats.backend(str(B), B).active = 2
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [A, B])
    assert refused.value.outcome is Outcome.LIMIT
    assert refused.value.error == ("10.0.0.1:6379: 2 connections, its max_backend_connections; "
                                   "10.0.0.2:6379: 2 connections, its max_backend_connections")
    conn.release(sock, own)


async def test_own_listener_is_never_dialled(autojump_clock):
    own_listener = Backend("127.0.0.1", 10000)
    net = Network({own_listener: OK, B: OK})
    conn, route = connector(net, listen_addrs={("0.0.0.0", 10000)}), route_to(own_listener, B)
    sock, own, _, result = await connect(conn, route, [own_listener, B])
    assert result.backend == str(B) and len(net.sockets) == 1
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [own_listener])
    assert refused.value.outcome is Outcome.ALL_BACKENDS_FAILED
    assert refused.value.error == "127.0.0.1:10000: is ambassadord's own listener (loop)"
    conn.release(sock, own)


@pytest.mark.parametrize("listen, backend, own", [
    (("127.0.0.1", 10000), Backend("127.0.0.1", 10000), True),
    (("127.0.0.1", 10000), Backend("127.0.0.1", 10001), False),
    (("0.0.0.0", 10000), Backend("127.0.0.1", 10000), True),
    (("0.0.0.0", 10000), Backend("127.0.0.2", 10000), True),
    (("0.0.0.0", 10000), Backend("10.0.0.1", 10000), False),  # another host's port 10000
    (("::", 10000), Backend("::1", 10000), True),
    (("::", 10000), Backend("127.0.0.1", 10000), False),  # v6-only listeners
    (("0.0.0.0", 10000), Backend("::1", 10000), False),
])
def test_is_own_listener(listen, backend, own):
    assert Connector({listen}).is_own_listener(backend) is own


async def test_backends_on_the_clients_own_host_are_left_out(autojump_clock):
    on_peer = Backend(PEER, 6379)
    net = Network({on_peer: OK, B: OK})
    conn, route = connector(net), route_to(on_peer, B)
    sock, own, _, result = await connect(conn, route, [on_peer, B])
    assert result.backend == str(B)
    with pytest.raises(Refused) as refused:
        await connect(conn, route, [on_peer])
    assert refused.value.outcome is Outcome.LOOP and "all on 192.0.2.7, the host that connected" in refused.value.error
    # ... unless the client is a process of this host: a backend on loopback is fine.
    local = Backend("127.0.0.1", 6379)
    net.script[("127.0.0.1", 6379)] = OK
    sock2, own2, _, result2 = await connect(conn, route_to(local), [local], peer="127.0.0.1")
    assert result2.backend == str(local)
    conn.release(sock, own)
    conn.release(sock2, own2)


async def test_registry_counts_sockets_that_share_a_local_port(autojump_clock):
    net = Network({A: OK, B: OK})
    conn = connector(net)
    s1, s2 = await conn.open(A, 1), await conn.open(B, 1)
    s2.local = s1.local  # Linux may give one local port to connections to different places
    k1, k2 = await conn.dial(s1, A, 1), await conn.dial(s2, B, 1)
    assert k1 == k2 and conn.own == {k1: 2}
    assert conn.is_own(s1.local, 6379) and not conn.is_own(s1.local, 6380) and not conn.is_own(("10.0.0.9", 1), 6379)
    conn.release(s1, k1)
    assert conn.is_own(s1.local, 6379)  # the other one is still ours
    conn.release(s2, k2)
    assert conn.own == {}


# ---- what every upstream socket gets ------------------------------------------------------


async def test_upstream_socket_options_and_a_mark_without_permission(autojump_clock, caplog):
    net = Network({A: OK})
    conn = connector(net, mark=0x1A3B)
    sock = await conn.open(A, 1, Keepalive(30, 5, 3))
    assert sock.options == {(socket.IPPROTO_TCP, socket.TCP_NODELAY): 1, (socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
                            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): 30, (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): 5,
                            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): 3, (socket.SOL_SOCKET, SO_MARK): 0x1A3B}
    sock.close()
    net.deny_mark = True
    for _ in range(2):
        (await conn.open(A, 1, Keepalive.parse("off"))).close()
    assert conn.mark is None  # given up after the first refusal: one warning, not one per socket
    assert [r.getMessage() for r in caplog.records].count(
        "cannot set SO_MARK on upstream sockets (needs CAP_NET_ADMIN); relying on the loop guard alone") == 1


# ---- health checks connect through the same path ------------------------------------------


async def test_probe_resets_at_once_and_says_when_this_host_could_not_try(autojump_clock):
    net = Network({A: OK, B: errno.ECONNREFUSED, C: errno.EADDRNOTAVAIL})
    conn = connector(net)
    await conn.probe(A, 1)
    assert net.sockets[-1].options[(socket.SOL_SOCKET, socket.SO_LINGER)] == b"\x01\x00\x00\x00\x00\x00\x00\x00"
    with pytest.raises(OSError) as refused:
        await conn.probe(B, 1)
    assert refused.value.errno == errno.ECONNREFUSED
    with pytest.raises(NoResult):
        await conn.probe(C, 1)
    net.no_fds = -1
    with pytest.raises(NoResult):
        await conn.probe(A, 1)
    with pytest.raises(OSError) as looped:
        await connector(net, listen_addrs={("127.0.0.1", 6379)}).probe(Backend("127.0.0.1", 6379), 1)
    assert looped.value.errno == errno.ELOOP
    assert net.open_sockets() == [] and conn.own == {}


# ---- the decisions, as tables -------------------------------------------------------------


@pytest.mark.parametrize("short, full, outcome", [
    ([], [], Outcome.ALL_BACKENDS_FAILED),
    (["a: no port"], [], Outcome.CAPACITY),
    ([], ["a: 2 connections"], Outcome.LIMIT),
    (["a: no port"], ["b: 2 connections"], Outcome.CAPACITY),
])
def test_outcome_when_no_backend_took_the_connection(short, full, outcome):
    assert no_upstream_outcome(short, full) is outcome


@pytest.mark.parametrize("exc, short, reason", [
    (OSError(errno.ECONNREFUSED, "Connection refused"), False, "Connection refused"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), False, "No route to host"),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), False, "Connection timed out"),
    (trio.TooSlowError(), False, "timeout"),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), True, "Cannot assign requested address"),
    (OSError(errno.EAGAIN, "Resource temporarily unavailable"), True, "Resource temporarily unavailable"),
    (OSError(errno.ENOBUFS, "No buffer space available"), True, "No buffer space available"),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), True, "Cannot allocate memory"),
])
def test_whose_fault_a_failed_connect_is(exc, short, reason):
    assert host_short(exc) is short
    assert failure_reason(exc) == reason
