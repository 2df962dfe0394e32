"""The server and relay against real sockets on loopback, in-process under trio.

Listeners are not redirected here, so connections are routed by the port they arrive on
(the same path a plain ``--listen HOST:PORT`` takes). The iptables path is covered in the
namespace tests.

Tests of timeouts (connect, idle, a route that never resolves) and of the grace period
run on trio's virtual clock (``autojump_clock``): loopback sockets in one process are
ready as soon as the other end acts, so when every task waits the clock jumps to the next
deadline, and a 0.5 s grace period takes no real time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from ambassadord import server as server_mod
from tests.trio_servers import echo, tcp_server
from ambassadord.logs import Throttled
from ambassadord.relay import KernelRelay, SockmapError
from ambassadord.relay.contract import RelayResult, pass_reset
from ambassadord.relay.tcp_abi import LINGER_RESET
from ambassadord.relay.user import relay_user
from ambassadord.routes import Keepalive, Route, RouteConfig, RouteTable
from ambassadord.server import ListenAddress, Server, bind_listeners, intended_port
from ambassadord.backends import parse_spec
from ambassadord.backends.interface import Backend, BackendSet, Resolver, Spec

# Relay modes: recv/send; splice once a direction is bulky; the kernel (BPF sockmap).
MODES = ["copy", "splice", "sockmap"]


# ---- backends: small real TCP servers ------------------------------------------------


def dead_port() -> int:
    """A loopback port where nothing listens (connect is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def black_hole():
    """A loopback port that silently drops new connections: a listen(0) socket whose one
    accept-queue slot is taken. Further SYNs are ignored, so connects hang (timeout path)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    filler = socket.create_connection(lsock.getsockname())
    try:
        yield lsock.getsockname()[1]
    finally:
        filler.close()
        lsock.close()


# ---- the proxy under test --------------------------------------------------------------


@dataclass
class Proxy:
    server: Server
    port: int

    def route(self) -> Route:
        return self.server.table.lookup(self.port, "127.0.0.1")

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def proxy(spec: str | Spec | None, *, use_splice=False, grace=5.0, **route_opts):
    """Run a Server on 127.0.0.1:<free port>, routing that port to ``spec`` (None: no route).
    ``use_splice``: a bool, or one of MODES."""
    mode = use_splice if isinstance(use_splice, str) else ("splice" if use_splice else "copy")
    kernel = None
    if mode == "sockmap":
        try:
            kernel = KernelRelay(512)
        except SockmapError as exc:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"no BPF sockmap here: {exc}")
    try:
        async with _proxy(spec, mode == "splice", kernel, grace, route_opts) as p:
            yield p
    finally:
        if kernel is not None:
            kernel.close()


@contextlib.asynccontextmanager
async def _proxy(spec, use_splice, kernel, grace, route_opts):
    sockets = bind_listeners([ListenAddress("127.0.0.1", 0)])
    port = sockets[0].getsockname()[1]
    routes = []
    if spec is not None:
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        routes.append(Route(RouteConfig(port=port, spec=spec, origin="test", **route_opts)))
    srv = Server(RouteTable(routes), sockets, grace=grace, use_splice=use_splice, kernel=kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield Proxy(srv, port)
        srv.abort()


async def recv_all(stream, limit=1 << 30) -> bytes:
    data = bytearray()
    async for chunk in stream:
        data += chunk
        if len(data) > limit:
            raise AssertionError("too much data")
    return bytes(data)


def describe_difference(got: bytes, want: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    found = want.find(got[at:at + 64]) if at < len(got) else -1
    return (f"got {len(got)} bytes, expected {len(want)}; first difference at byte {at}; "
            f"the 64 bytes received there were sent at byte {found}")


def conn_records(caplog):
    return [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "connection"]


async def wait_for_records(caplog, n, timeout=5):
    with trio.fail_after(timeout):
        while len(conn_records(caplog)) < n:
            await trio.sleep(0.01)
    return conn_records(caplog)


@pytest.fixture(autouse=True)
def _capture_logs(caplog):
    caplog.set_level(logging.DEBUG)


# ---- the intended port -------------------------------------------------------------------


@pytest.mark.parametrize("original, listen_port, port", [
    (("10.99.0.1", 6379), 10000, 6379),  # redirected: the port it was meant for
    (("127.0.0.1", 6379), 10000, 6379),
    (("::1", 6379), 10000, 6379),
    (None, 10000, 10000),  # no conntrack entry: not redirected, the port it arrived on
    (("127.0.0.1", 10000), 10000, 10000),  # tracked, not redirected: reads back its own address
    (("10.99.0.1", 10000), 10000, 10000),  # redirected from another address's port 10000
    (("127.0.0.1", 10001), 10000, 10001),  # a mapped port that is another listener's
])
def test_intended_port(original, listen_port, port):
    assert intended_port(original, listen_port) == port


# ---- relay ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
async def test_large_payload_round_trips_intact(use_splice, caplog):
    payload = os.urandom(8 * 1024 * 1024 + 123)
    async with tcp_server(echo) as bport, proxy(f"127.0.0.1:{bport}", use_splice=use_splice) as p:
        stream = await p.connect()
        got = bytearray()

        async def sender():
            await stream.send_all(payload)
            await stream.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(sender)
            got = await recv_all(stream)
        await stream.aclose()
        assert len(got) == len(payload) and got == payload, describe_difference(bytes(got), payload)
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["up"] == rec["down"] == len(payload) and rec["outcome"] == "ok"
        assert rec["backend"] == f"127.0.0.1:{bport}" and rec["port"] == p.port


@pytest.mark.parametrize("use_splice", MODES)
async def test_client_half_close_still_gets_whole_reply(use_splice):
    request = os.urandom(3 * 1024 * 1024)

    async def digest_after_eof(stream):
        data = await recv_all(stream)  # only returns once the client's EOF came through
        await stream.send_all(hashlib.sha256(data).digest() * 40000)  # a big reply (1.28 MB)
        await stream.aclose()

    async with tcp_server(digest_after_eof) as bport, proxy(f"127.0.0.1:{bport}", use_splice=use_splice) as p:
        stream = await p.connect()
        await stream.send_all(request)
        await stream.send_eof()
        reply = await recv_all(stream)
        assert reply == hashlib.sha256(request).digest() * 40000


@pytest.mark.parametrize("use_splice", MODES)
async def test_backend_half_close_lets_client_keep_sending(use_splice):
    received = trio.Event()
    counted = []

    async def greet_then_listen(stream):
        await stream.send_all(b"hello")
        await stream.send_eof()
        counted.append(len(await recv_all(stream)))
        received.set()

    async with tcp_server(greet_then_listen) as bport, proxy(f"127.0.0.1:{bport}", use_splice=use_splice) as p:
        stream = await p.connect()
        assert await recv_all(stream) == b"hello"  # the backend's EOF reached us
        await stream.send_all(b"x" * 500_000)  # ... and our direction still works
        await stream.send_eof()
        with trio.fail_after(5):
            await received.wait()
        assert counted == [500_000]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback, non-blocking, as the relay gets them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def _fill(sock: socket.socket) -> None:
    """Send until nothing more fits anywhere: ``sock``'s buffers, the relay's and its peer's."""
    chunk = b"x" * 65536
    for _ in range(2):  # until the relay's down direction is blocked sending, twice over
        while True:
            try:
                sock.send(chunk)
            except BlockingIOError:
                break
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("use_splice", [False, True], ids=["copy", "splice"])
@pytest.mark.parametrize("resetting", ["client", "backend"])
async def test_a_reset_reaches_the_other_side_as_a_reset_with_no_eof_before_it(resetting, use_splice):
    """A reset side wakes both directions at once. The one sending to it takes the reset
    (a socket reports it once); the one reading from it then reads 0. That 0 is no FIN,
    and must not reach the other side as one: a server that sees its input end cleanly may
    act on a request that was cut short. Each order of the two wake-ups is met (trio
    shuffles them), so 20 rounds meet both."""
    seen = []
    for _ in range(20):
        client_peer, client = _tcp_pair()
        backend, backend_peer = _tcp_pair()
        resets, other = (client_peer, backend_peer) if resetting == "client" else (backend_peer, client_peer)
        result = RelayResult()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_user, client, backend, None, use_splice, result)
            await _fill(other)  # the other side streams; the resetting side reads none of it
            resets.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            resets.close()
        pass_reset(result, client, backend)  # what the server does with a finished relay
        client.close()
        backend.close()
        other.setblocking(True)
        other.settimeout(5)
        try:
            seen.append("eof" if other.recv(1) == b"" else "data")
        except ConnectionResetError:
            seen.append("reset")
        other.close()
        assert result.outcome == f"{resetting}-reset"
    assert seen == ["reset"] * 20, collections.Counter(seen)


# ---- failover, ejection, refusals ---------------------------------------------------------


async def test_failover_skips_dead_backend_and_ejects_it(caplog):
    dead = dead_port()
    async with tcp_server(echo) as live, proxy(f"127.0.0.1:{dead},127.0.0.1:{live}", balance="round-robin") as p:
        for i in range(4):
            stream = await p.connect()
            await stream.send_all(b"ping%d" % i)
            assert await stream.receive_some(100) == b"ping%d" % i
            await stream.aclose()
        recs = await wait_for_records(caplog, 4)
        assert all(r["backend"] == f"127.0.0.1:{live}" and r["outcome"] == "ok" for r in recs)
        failures = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "backend-failed"]
        # Round-robin would put the dead backend first every other time; ejection keeps it
        # last, so it is tried exactly once.
        assert len(failures) == 1 and failures[0].fields["backend"] == f"127.0.0.1:{dead}"
        assert Backend("127.0.0.1", dead) in p.route().pick.ejections.until


async def test_connect_timeout_moves_on_to_next_backend(autojump_clock, caplog):
    with black_hole() as hole:
        async with tcp_server(echo) as live, proxy(
            f"127.0.0.1:{hole},127.0.0.1:{live}", balance="round-robin", connect_timeout=0.3
        ) as p:
            t0 = trio.current_time()
            stream = await p.connect()
            await stream.send_all(b"x")
            assert await stream.receive_some(10) == b"x"
            assert trio.current_time() - t0 >= 0.3  # it did wait for the first attempt
            (fail,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "backend-failed"]
            assert fail.fields["backend"] == f"127.0.0.1:{hole}" and fail.fields["error"] == "timeout"


async def test_all_backends_failing_closes_client_and_logs(caplog):
    a, b = dead_port(), dead_port()
    async with proxy(f"127.0.0.1:{a},127.0.0.1:{b}") as p:
        stream = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "all-backends-failed"
        assert f"127.0.0.1:{a}" in rec["error"] and f"127.0.0.1:{b}" in rec["error"]


async def test_port_without_route_is_refused_and_logged(caplog):
    async with proxy(None) as p:
        stream = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "no-route" and rec["port"] == p.port and rec["src"].startswith("127.0.0.1:")
        assert rec["backend"] is None


async def test_route_to_own_listener_is_a_loop(caplog):
    sockets = bind_listeners([ListenAddress("127.0.0.1", 0)])
    port = sockets[0].getsockname()[1]
    route = Route(RouteConfig(port=port, spec=parse_spec(f"127.0.0.1:{port}"), origin="test"))
    srv = Server(RouteTable([route]), sockets)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "all-backends-failed" and "loop" in rec["error"]
        assert srv.total == 1  # no second, looped connection was ever accepted
        srv.abort()


async def test_one_connection_crashing_does_not_stop_the_server(caplog, monkeypatch):
    real = server_mod.pick_order
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected bug")
        return real(*args, **kw)

    monkeypatch.setattr(server_mod, "pick_order", flaky)
    async with tcp_server(echo) as bport, proxy(f"127.0.0.1:{bport}") as p:
        first = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(first) == b""
        second = await p.connect()
        await second.send_all(b"still here")
        assert await second.receive_some(100) == b"still here"
        recs = await wait_for_records(caplog, 1)
        assert recs[0]["outcome"] == "error" and "injected bug" in recs[0]["error"]


# ---- limits -------------------------------------------------------------------------------


async def echo_once(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == data


async def test_route_at_max_connections_closes_new_ones_at_once(caplog):
    async with tcp_server(echo) as bport, proxy(f"127.0.0.1:{bport}", max_connections=2) as p:
        held = [await p.connect() for _ in range(2)]
        for s in held:
            await echo_once(s, b"held")
        extra = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(extra) == b""  # closed at once, nothing relayed
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "limit" and rec["backend"] is None and "max_connections 2" in rec["error"]
        assert p.route().stats.outcomes == {"limit": 1}
        (line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "limit"]
        assert "max_connections" in line.getMessage()
        await held[0].aclose()
        with trio.fail_after(5):  # a slot is free again
            while p.route().stats.active > 1:
                await trio.sleep(0.01)
        again = await p.connect()
        await echo_once(again, b"room again")


async def test_backend_at_max_backend_connections_is_passed_over(caplog):
    async with tcp_server(echo) as b1, tcp_server(echo) as b2, proxy(
        f"127.0.0.1:{b1},127.0.0.1:{b2}", max_backend_connections=1
    ) as p:
        held = [await p.connect() for _ in range(2)]
        for s in held:
            await echo_once(s, b"x")
        recs_backends = {b.backend.port: b.active for b in p.route().stats.backends.values()}
        assert recs_backends == {b1: 1, b2: 1}  # the second went to the backend with room
        third = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(third) == b""
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "limit" and "max_backend_connections" in rec["error"]
        assert p.route().stats.failures == 0 and not p.route().pick.ejections.until


async def test_rate_limited_log_says_how_many_lines_it_held_back(caplog):
    throttled = Throttled(every=60)
    for i in range(5):
        throttled.log("k", logging.WARNING, "odd thing %d", i)
    throttled._next["k"] = 0  # the minute is over
    throttled.log("k", logging.WARNING, "odd thing %d", 5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("odd thing")]
    assert lines == ["odd thing 0", "odd thing 5 (and 4 more since the last such line)"]


# ---- TCP keepalive ----------------------------------------------------------------------


def keepalive_timers(port: int, bport: int) -> tuple[str | None, str | None]:
    """The keepalive timer (``ss -o``, e.g. ``59sec``) of the daemon's accepted socket (local
    port ``port``) and of its upstream socket (peer port ``bport``); None: no such timer."""
    out = subprocess.run(["ss", "-tnoH", "state", "established"], capture_output=True, text=True, check=True).stdout
    found: dict[str, str | None] = {}
    for line in out.splitlines():
        cols = line.split()
        timer = next((c.split(",")[1] for c in cols[4:] if c.startswith("timer:(keepalive,")), None)
        if cols[2] == f"127.0.0.1:{port}":
            found["accepted"] = timer
        elif cols[3] == f"127.0.0.1:{bport}":
            found["upstream"] = timer
    return found["accepted"], found["upstream"]


@pytest.mark.parametrize("case", ["inherited from the listener", "set per connection", "off"])
async def test_keepalive_is_on_both_sockets_of_a_connection(case):
    """The listener carries the first route's keepalive (accepted sockets inherit it); a route
    with other settings sets its own on the accepted socket; the upstream socket always gets
    the route's."""
    mine_ka = Keepalive.parse("off") if case == "off" else Keepalive(600, 5, 3)
    other_ka = Keepalive(600, 5, 3) if case == "inherited from the listener" else Keepalive()
    async with tcp_server(echo) as bport:
        sockets = bind_listeners([ListenAddress("127.0.0.1", 0)])
        port = sockets[0].getsockname()[1]
        mine = Route(RouteConfig(port=port, spec=parse_spec(f"127.0.0.1:{bport}"), keepalive=mine_ka))
        other = Route(RouteConfig(port=1, spec=parse_spec("127.0.0.1:1"), keepalive=other_ka))
        srv = Server(RouteTable([other, mine]), sockets)
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await echo_once(stream, b"hello")
            accepted, upstream = keepalive_timers(port, bport)
            if case == "off":
                assert (accepted, upstream) == (None, None)
            else:  # 600 s, not the default 60: ss shows 9min59sec or so
                assert "min" in accepted and "min" in upstream, (accepted, upstream)
            srv.abort()


# ---- idle timeout and shutdown -----------------------------------------------------------


async def test_idle_timeout_closes_quiet_connections(autojump_clock, caplog):
    async with tcp_server(echo) as bport, proxy(f"127.0.0.1:{bport}", idle_timeout=0.3) as p:
        stream = await p.connect()
        t0 = trio.current_time()
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        assert trio.current_time() - t0 >= 0.29
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "idle-timeout"


async def test_shutdown_lets_open_connections_finish(caplog):
    async with tcp_server(echo) as bport:
        sockets = bind_listeners([ListenAddress("127.0.0.1", 0)])
        port = sockets[0].getsockname()[1]
        srv = Server(RouteTable([Route(RouteConfig(port=port, spec=parse_spec(f"127.0.0.1:{bport}")))]), sockets, grace=30)
        done = trio.Event()

        async def run():
            await srv.run()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(5):
                while srv._accept_scope is None:
                    await trio.sleep(0.01)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            srv.shutdown()
            with trio.fail_after(5):  # the listener goes away: new connections are refused
                while True:
                    try:
                        (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    except OSError:
                        break
                    await trio.sleep(0.01)
            await stream.send_all(b"still open")  # the established one keeps working
            assert await stream.receive_some(100) == b"still open"
            assert not done.is_set()
            await stream.aclose()
            with trio.fail_after(5):  # ... and the server exits as soon as it is done, not after 30 s
                await done.wait()
        recs = await wait_for_records(caplog, 1)
        assert recs[-1]["outcome"] == "ok"


async def test_grace_period_expiry_closes_stragglers(autojump_clock, caplog):
    async with tcp_server(echo) as bport:
        sockets = bind_listeners([ListenAddress("127.0.0.1", 0)])
        port = sockets[0].getsockname()[1]
        srv = Server(RouteTable([Route(RouteConfig(port=port, spec=parse_spec(f"127.0.0.1:{bport}")))]), sockets, grace=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            t0 = trio.current_time()
            srv.shutdown()
        # the nursery exited: run() returned after the grace period, not before
        elapsed = trio.current_time() - t0
        assert 0.45 <= elapsed < 5, elapsed
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        recs = await wait_for_records(caplog, 1)
        assert recs[-1]["outcome"] == "shutdown"


# ---- resolvers feeding routes ----------------------------------------------------------------


class ScriptedResolver(Resolver):
    """Publishes the sets sent into its channel: a test seam, not a fake of any real source."""

    def __init__(self, receive):
        self.receive = receive

    async def resolve(self):
        raise NotImplementedError

    async def watch(self, publish):
        async for backends in self.receive:
            publish(BackendSet(tuple(backends), source="scripted"))
        await trio.sleep_forever()


@dataclass(frozen=True)
class ScriptedSpec(Spec):
    text: str
    receive: object

    def resolver(self, options):
        return ScriptedResolver(self.receive)


async def test_first_connection_waits_for_first_answer_then_follows_updates(autojump_clock, caplog):
    send, receive = trio.open_memory_channel(10)
    async with tcp_server(echo) as b1, tcp_server(echo) as b2, proxy(ScriptedSpec("scripted", receive)) as p:
        stream = await p.connect()  # accepted before the resolver has answered
        await stream.send_all(b"1")
        await trio.sleep(0.05)  # give the handler a chance to (wrongly) give up early
        await send.send([Backend("127.0.0.1", b1)])
        assert await stream.receive_some(10) == b"1"
        await send.send([Backend("127.0.0.1", b2)])
        with trio.fail_after(5):
            while p.route().backends.backends != (Backend("127.0.0.1", b2),):
                await trio.sleep(0.01)
        second = await p.connect()
        await second.send_all(b"2")
        assert await second.receive_some(10) == b"2"
        await stream.send_all(b"old")  # the established connection stays on its backend
        assert await stream.receive_some(10) == b"old"
        await stream.aclose()
        await second.aclose()
        recs = await wait_for_records(caplog, 2)
        assert {r["backend"] for r in recs} == {f"127.0.0.1:{b1}", f"127.0.0.1:{b2}"}


async def test_route_that_never_resolves_refuses_after_connect_timeout(autojump_clock, caplog):
    _, receive = trio.open_memory_channel(1)
    async with proxy(ScriptedSpec("scripted", receive), connect_timeout=0.2) as p:
        stream = await p.connect()
        with trio.fail_after(5):
            assert await recv_all(stream) == b""
        (rec,) = await wait_for_records(caplog, 1)
        assert rec["outcome"] == "no-backends"


class CrashingResolver(ScriptedResolver):
    """Publishes one set, then crashes: a resolver bug, as a test seam."""

    async def watch(self, publish):
        async for backends in self.receive:
            publish(BackendSet(tuple(backends), source="scripted"))
            raise RuntimeError("boom")


@dataclass(frozen=True)
class CrashingSpec(ScriptedSpec):
    def resolver(self, options):
        return CrashingResolver(self.receive)


async def test_a_crashing_resolver_marks_its_route_stale_and_keeps_serving(caplog):
    # Issue 12, item 6: a resolver that died left its route frozen and shown healthy.
    send, receive = trio.open_memory_channel(10)
    async with tcp_server(echo) as b1, proxy(CrashingSpec("crashing", receive)) as p:
        await send.send([Backend("127.0.0.1", b1)])
        with trio.fail_after(5):
            while not p.route().backends.stale:
                await trio.sleep(0.01)
        assert "resolver crashed: RuntimeError: boom" in p.route().backends.error
        assert p.route().backends.backends == (Backend("127.0.0.1", b1),)  # the last set still serves
        stream = await p.connect()
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
        await stream.aclose()


async def test_a_client_that_shares_a_local_port_with_an_upstream_is_not_a_loop(caplog):
    # Linux gives one local port to several connections with different destinations, so a
    # client on 127.0.0.1 may come from the port that one of our upstream sockets uses
    # toward another backend port. Before, the loop guard keyed on (ip, port) alone and
    # refused such a client as "loop"; a looped-back upstream also has the port it dialled.
    async with tcp_server(echo) as b1, proxy(f"127.0.0.1:{b1}") as p:
        for port in range(1024, 65536):  # as if an upstream to port 1 held every local port
            p.server.upstreams.own[("127.0.0.1", port, 1)] = 1
        stream = await p.connect()
        await stream.send_all(b"x")
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b"x"
        await stream.aclose()
        p.server.upstreams.own.clear()
