"""Connect mode's kernel half against the real kernel: ConnectPlane on a cgroup of our own,
consumers in network namespaces, real Redis servers.

Topology (namespaces made here, no route out):

    container 10.78.0.2, fd78::2 ── bridge-ish veth ── host 10.78.0.1, fd78::1
                                                       host 10.77.0.1, fd77::1 ── remote 10.77.0.2, fd77::2
                                                                                  Redis :6390, :6391 (IPv4)
    container: its own Redis on 127.0.0.1:MAPPED                                  Redis [fd77::2]:6392

"host" plays the daemon's network namespace (ConnectPlane's netns_cookie); consumers are
sockets made in the test cgroup (tests/cgroups.py) inside these namespaces, and a real
redis-cli started in the cgroup. Which Redis answered is told by ``CONFIG GET port``.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import trio
import trio.testing

from ambassadord.connect import (
    Backend,
    BackendEjected,
    ConnectionEnded,
    ConnectPlane,
    ConnectPlaneError,
    netns_cookie,
    netns_cookie_at,
)
from ambassadord.connect.plane import OBJECT_PATH
from tests import netns as nslib
from tests.cgroups import attached, child_cgroup, dial, run_in, socket_in, sockets_in
from tests.daemon import REPO_ROOT, RedisProcess, read_to_eof, require, wait_until
from tests.redis_wire import served_by

pytestmark = pytest.mark.netns

MAPPED = 16379  # the service port consumers dial
A, B, V6 = 6390, 6391, 6392  # remote Redis servers
DEAD = 6399  # nothing listens: refused
DROPPED = 6398  # SYNs dropped: timeout
SO_COOKIE = 57


def _skip_or_fail(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: a failure, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def net():
    nslib.require_prerequisites()
    require("bpftool", "nsenter")
    with nslib.namespaces("cnhost", "cnremote", "cnbox") as (host, remote, box):
        nslib.link(host, ["10.77.0.1/24", "fd77::1/64"], remote, ["10.77.0.2/24", "fd77::2/64"], tag=f"cr{os.getpid()}")
        nslib.link(host, ["10.78.0.1/24", "fd78::1/64"], box, ["10.78.0.2/24", "fd78::2/64"], tag=f"cb{os.getpid()}")
        host.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        box.exec(["ip", "route", "add", "10.77.0.0/24", "via", "10.78.0.1"])
        box.exec(["ip", "-6", "route", "add", "fd77::/64", "via", "fd78::1"])
        remote.exec(["ip", "route", "add", "10.78.0.0/24", "via", "10.77.0.1"])
        remote.exec(["ip", "-6", "route", "add", "fd78::/64", "via", "fd77::1"])
        remote.exec(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED), "-j", "DROP"])
        servers = []
        try:
            servers.append(RedisProcess(A, host="10.77.0.2", ns=remote))
            servers.append(RedisProcess(B, host="10.77.0.2", ns=remote))
            servers.append(RedisProcess(V6, host="fd77::2", ns=remote))
            servers.append(RedisProcess(MAPPED, host="127.0.0.1", ns=box))  # the container's own
            yield {"host": host, "remote": remote, "box": box,
                   "host_cookie": _ns_cookie(host), "box_cookie": _ns_cookie(box)}
        finally:
            for server in servers:
                server.stop()


def _ns_cookie(ns) -> int:
    with contextlib.closing(ns.socket()) as s:
        return netns_cookie(s)


@pytest.fixture
def cgroup():
    try:
        with child_cgroup("connect") as path:
            yield path
    except PermissionError as exc:
        _skip_or_fail(f"cannot make a cgroup: {exc}")


@pytest.fixture
def plane(net, cgroup):
    try:
        p = ConnectPlane(cgroup, netns_cookie=net["host_cookie"])
    except ConnectPlaneError as exc:
        _skip_or_fail(f"connect mode cannot load here: {exc}")
    try:
        p.set_connection_events(True)  # these tests read every connection's end
        yield p
    finally:
        p.close()
        assert attached(cgroup) == "", "programs still attached after close()"


def answer(cgroup, ns, host, port) -> int:
    with contextlib.closing(dial(cgroup, ns, host, port)) as s:
        return served_by(s)


def route(plane, *backends, **kw):
    kw.setdefault("eject_for", 30)
    kw.setdefault("connect_timeout", 2)
    plane.set_route(MAPPED, list(backends), **kw)


# ---------------------------------------------------------------------------- the build


def test_committed_object_is_built_from_the_source(tmp_path):
    require("clang", "llvm-strip")
    out = tmp_path / "connect.bpf.o"
    subprocess.run([str(REPO_ROOT / "scripts" / "build-bpf"), str(out)], check=True, capture_output=True)
    assert filecmp.cmp(out, OBJECT_PATH, shallow=False), "ambassadord/connect/connect.bpf.o is stale: run scripts/build-bpf"


# ---------------------------------------------------------------------------- rewrites


def test_loopback_connect_reaches_the_backend_and_sees_what_it_dialled(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    # A real client, in the cgroup and the host's namespace.
    done = run_in(cgroup, ["redis-cli", "-h", "127.0.0.1", "-p", str(MAPPED), "ping"], ns=net["host"])
    assert (done.returncode, done.stdout.strip()) == (0, "PONG"), done.stderr
    with contextlib.closing(dial(cgroup, net["host"], "127.0.0.1", MAPPED)) as s:
        assert s.getpeername() == ("127.0.0.1", MAPPED)
        assert served_by(s) == A
    assert plane.counters()["rewritten"] == 2


def test_outside_the_cgroup_nothing_changes(net, plane):
    route(plane, Backend("10.77.0.2", A))
    with pytest.raises(ConnectionRefusedError):
        dial(None, net["host"], "127.0.0.1", MAPPED)
    assert plane.counters()["rewritten"] == 0


def test_another_namespaces_loopback_is_its_own(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    assert answer(cgroup, net["box"], "127.0.0.1", MAPPED) == MAPPED  # the container's own Redis
    assert answer(cgroup, net["host"], "127.0.0.1", MAPPED) == A


def test_catch_address_from_another_namespace(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    with pytest.raises(ConnectionRefusedError):  # not in the catch set: untouched
        dial(cgroup, net["box"], "10.78.0.1", MAPPED)
    plane.set_catch_addresses(["10.78.0.1", "fd78::1"])
    assert plane.catch_addresses() == {"10.78.0.1", "fd78::1"}
    with contextlib.closing(dial(cgroup, net["box"], "10.78.0.1", MAPPED)) as s:
        assert s.getpeername() == ("10.78.0.1", MAPPED)
        assert served_by(s) == A
    plane.set_catch_addresses([])
    with pytest.raises(ConnectionRefusedError):
        dial(cgroup, net["box"], "10.78.0.1", MAPPED)


def test_ipv6(net, cgroup, plane):
    route(plane, Backend("fd77::2", V6))
    plane.set_catch_addresses(["fd78::1"])
    with contextlib.closing(dial(cgroup, net["host"], "::1", MAPPED)) as s:
        assert s.getpeername()[:2] == ("::1", MAPPED)
        assert served_by(s) == V6
    with contextlib.closing(dial(cgroup, net["box"], "fd78::1", MAPPED)) as s:
        assert s.getpeername()[:2] == ("fd78::1", MAPPED)
        assert served_by(s) == V6
    # An IPv4 socket cannot reach an IPv6 backend: the connect passes untouched.
    with pytest.raises(ConnectionRefusedError):
        dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    assert plane.counters()["no_backend"] == 1
    # An IPv6 socket dialling v4-mapped loopback, to an IPv4 backend.
    route(plane, Backend("10.77.0.2", A))
    with contextlib.closing(dial(cgroup, net["host"], "::ffff:127.0.0.1", MAPPED)) as s:
        assert s.getpeername()[:2] == ("::ffff:127.0.0.1", MAPPED)
        assert served_by(s) == A


def test_a_new_backend_set_takes_effect_for_the_next_connect(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    kept = dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    with contextlib.closing(kept):
        route(plane, Backend("10.77.0.2", B))
        assert answer(cgroup, net["host"], "127.0.0.1", MAPPED) == B
        assert served_by(kept) == A  # established connections are not touched
    assert plane.remove_route(MAPPED) is True
    with pytest.raises(ConnectionRefusedError):
        dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    assert plane.remove_route(MAPPED) is False


def test_a_backend_set_changes_atomically_under_connects(net, cgroup, plane):
    """Sets of different sizes, swapped all the time while connects go on: every connect
    lands on a backend of one set or the other, none finds a half-written set."""
    small = [Backend("10.77.0.2", A)]
    large = [Backend("fd77::2", V6)] * 31 + [Backend("10.77.0.2", B)]  # IPv4 sockets can only take B
    route(plane, *small)
    stop = threading.Event()
    swaps = []

    # The connects go in bursts of 10. Each burst starts on a set the swapper holds for its
    # first connect, large and small in turn; the other 9 race the swaps. Left to themselves
    # the two threads take turns at the GIL in lockstep, and 200 connects may all meet the
    # same set.
    wanted: list[bool] = []  # the set the next burst starts on: large (True) or small
    reached, resume = threading.Event(), threading.Event()

    def swap():
        while not stop.is_set():
            to_large = len(swaps) % 2 == 0
            route(plane, *(large if to_large else small))
            swaps.append(1)
            if wanted == [to_large]:
                wanted.clear()
                reached.set()
                resume.wait(10)  # held for the burst's first connect
                resume.clear()
            time.sleep(0)  # let the connect loop have the GIL back: it waited 5 ms for it each time

    socks = sockets_in(cgroup, net["host"], 200)  # made first: moving into the cgroup per connect took most of the time
    swapper = threading.Thread(target=swap)
    swapper.start()
    ok, failed, firsts = [], [], []
    try:
        for i, s in enumerate(socks):
            if i % 10 == 0:
                wanted.append(i // 10 % 2 == 1)
                assert reached.wait(10), "the swapper stopped swapping"
                reached.clear()
            got = None
            with contextlib.closing(s):
                s.settimeout(5)
                try:
                    s.connect(("127.0.0.1", MAPPED))
                    got = served_by(s)
                    ok.append(got)
                except OSError as exc:
                    failed.append(type(exc).__name__)
            if i % 10 == 0:
                firsts.append(got)  # None: it failed
                resume.set()
    finally:
        stop.set()
        resume.set()
        swapper.join()
        for s in socks:
            s.close()
    # No connect met a half-written set: that would fail, or find no backend in the kernel.
    assert failed == [] and set(ok) == {A, B} and firsts == [A, B] * 10
    assert plane.counters()["no_backend"] == 0


def test_a_child_cgroup_is_covered(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    child = os.path.join(cgroup, "container")
    os.mkdir(child)
    try:
        assert answer(child, net["host"], "127.0.0.1", MAPPED) == A
    finally:
        os.rmdir(child)


def test_a_route_scoped_to_a_namespace_wins_there(net, cgroup, plane):
    assert netns_cookie_at(f"/run/netns/{net['box'].name}") == net["box_cookie"] != net["host_cookie"]
    plane.set_catch_addresses(["10.78.0.1"])
    route(plane, Backend("10.77.0.2", A))
    route(plane, Backend("10.77.0.2", B), scope=net["box_cookie"])
    assert answer(cgroup, net["box"], "10.78.0.1", MAPPED) == B
    assert answer(cgroup, net["host"], "127.0.0.1", MAPPED) == A
    assert set(plane.routes()) == {(MAPPED, 0), (MAPPED, net["box_cookie"])}


def test_priority_weight_and_round_robin(net, cgroup, plane):
    def tally(n=40):
        seen = {}
        for _ in range(n):
            port = answer(cgroup, net["host"], "127.0.0.1", MAPPED)
            seen[port] = seen.get(port, 0) + 1
        return seen

    route(plane, Backend("10.77.0.2", A, priority=1), Backend("10.77.0.2", B, priority=0))
    assert tally(10) == {B: 10}
    route(plane, Backend("10.77.0.2", A, weight=1), Backend("10.77.0.2", B, weight=0))
    assert tally(10) == {A: 10}
    route(plane, Backend("10.77.0.2", A), Backend("10.77.0.2", B), balance="round-robin")
    assert tally(10) == {A: 5, B: 5}
    route(plane, Backend("10.77.0.2", A, weight=3), Backend("10.77.0.2", B, weight=1))
    seen = tally(200)
    assert seen[A] > seen[B] > 0, seen  # 150:50 expected; 4 standard deviations is ~120:80


# ---------------------------------------------------------------------------- failures


def _attempts(cgroup, ns, n, *, timeout=5):
    """How n connects went: the answering ports, and the failures by exception name."""
    ok, failed = [], []
    for _ in range(n):
        try:
            ok.append(answer(cgroup, ns, "127.0.0.1", MAPPED))
        except OSError as exc:
            failed.append(type(exc).__name__)
    return ok, failed


def test_a_refusing_backend_fails_one_connect_per_ejection(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", DEAD, priority=0), Backend("10.77.0.2", A, priority=1), eject_for=30)
    ok, failed = _attempts(cgroup, net["host"], 20)
    assert failed == ["ConnectionRefusedError"] and ok == [A] * 19
    left = plane.ejected()
    assert list(left) == [("10.77.0.2", DEAD)] and 25 < left[("10.77.0.2", DEAD)] <= 30
    events = plane.read_events()
    ejections = [e for e in events if isinstance(e, BackendEjected)]
    assert [(e.backend, e.dialled, e.route_port) for e in ejections] == [(("10.77.0.2", DEAD), ("127.0.0.1", MAPPED), MAPPED)]
    refused = [e for e in events if isinstance(e, ConnectionEnded) and e.outcome != "ok"]
    assert [(e.outcome, e.backend) for e in refused] == [("refused", ("10.77.0.2", DEAD))]

    # When the ejection ends, the backend is tried again: one more failure, no more.
    route(plane, Backend("10.77.0.2", DEAD, priority=0), Backend("10.77.0.2", A, priority=1), eject_for=2)
    assert plane.clear_ejection("10.77.0.2", DEAD)
    ok, failed = _attempts(cgroup, net["host"], 5)
    assert failed == ["ConnectionRefusedError"] and ok == [A] * 4
    wait_until(lambda: not plane.ejected(), timeout=10, what="the 2 s ejection to end")
    ok, failed = _attempts(cgroup, net["host"], 5)
    assert failed == ["ConnectionRefusedError"] and ok == [A] * 4


def test_when_every_backend_is_ejected_they_are_tried_anyway(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", DEAD), eject_for=30)
    ok, failed = _attempts(cgroup, net["host"], 3)
    assert (ok, failed) == ([], ["ConnectionRefusedError"] * 3)
    assert plane.counters()["all_ejected"] == 2
    route(plane, Backend("10.77.0.2", DEAD), Backend("10.77.0.2", A, priority=9), eject_for=30)
    assert _attempts(cgroup, net["host"], 3) == ([A] * 3, [])  # a live backend wins, whatever its priority


def test_a_silent_backend_times_out_within_the_connect_timeout(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", DROPPED, priority=0), Backend("10.77.0.2", A, priority=1),
          connect_timeout=0.5, eject_for=30)
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        dial(cgroup, net["host"], "127.0.0.1", MAPPED, timeout=20)
    took = time.monotonic() - started
    assert isinstance(failure.value, TimeoutError) or failure.value.errno == 110, failure.value  # ETIMEDOUT
    assert 0.4 < took < 2.5, f"connect failed after {took:.2f}s, connect_timeout 0.5s"
    assert list(plane.ejected()) == [("10.77.0.2", DROPPED)]
    ok, failed = _attempts(cgroup, net["host"], 5)
    assert (ok, failed) == ([A] * 5, [])
    ends = [e for e in plane.read_events() if isinstance(e, ConnectionEnded) and e.backend[1] == DROPPED]
    assert [e.outcome for e in ends] == ["timeout"]


def test_the_connect_timeout_does_not_outlive_the_connect(net, cgroup, plane):
    """TCP_USER_TIMEOUT bounds the connect only: established, the consumer's own value is back."""
    route(plane, Backend("10.77.0.2", A), connect_timeout=0.5)
    sock = socket_in(cgroup, net["host"])
    with contextlib.closing(sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 12345)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", MAPPED))
        assert served_by(sock) == A
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12345


# ---------------------------------------------------------------------------- events


def _cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def test_connection_end_events_carry_addresses_bytes_and_outcome(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    sock = dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    cookie, source = _cookie(sock), sock.getsockname()
    sock.sendall(b"PING\r\n")
    assert sock.recv(64) == b"+PONG\r\n"
    sock.close()
    sock = dial(cgroup, net["host"], "127.0.0.1", MAPPED)  # the backend closes first
    quit_cookie = _cookie(sock)
    sock.sendall(b"QUIT\r\n")
    assert read_to_eof(sock, 5) == b"+OK\r\n"
    sock.close()
    sock = dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    reset_cookie = _cookie(sock)
    sock.sendall(b"PING\r\n")
    assert sock.recv(64) == b"+PONG\r\n"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
    sock.close()

    def ended():
        return {e.cookie: e for e in plane.read_events() if isinstance(e, ConnectionEnded)} or None

    events = {}
    wait_until(lambda: events.update(ended() or {}) or {cookie, quit_cookie, reset_cookie} <= set(events),
               timeout=10, what=lambda: f"the connections' end events, got {events}")
    e = events[cookie]
    assert (e.outcome, e.dialled, e.backend, e.route_port, e.scope) == ("ok", ("127.0.0.1", MAPPED), ("10.77.0.2", A), MAPPED, 0)
    assert e.source == ("10.77.0.1", source[1])
    assert (e.bytes_acked, e.bytes_received) == (len(b"PING\r\n"), len(b"+PONG\r\n")), e  # payload only
    assert 0 < e.duration < 10
    quit = events[quit_cookie]
    assert (quit.outcome, quit.bytes_acked, quit.bytes_received) == ("ok", len(b"QUIT\r\n"), len(b"+OK\r\n"))
    reset = events[reset_cookie]
    assert (reset.outcome, reset.bytes_acked, reset.bytes_received) == ("reset", 6, 7)


def test_bytes_of_a_bulk_transfer(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))
    value = b"x" * 3_000_000
    command = b"*3\r\n$3\r\nSET\r\n$4\r\nbulk\r\n$%d\r\n%s\r\n*2\r\n$3\r\nGET\r\n$4\r\nbulk\r\n" % (len(value), value)
    reply = b"+OK\r\n$%d\r\n%s\r\n" % (len(value), value)
    sock = dial(cgroup, net["host"], "127.0.0.1", MAPPED)
    cookie = _cookie(sock)
    sock.sendall(command)
    got = b""
    while len(got) < len(reply):
        got += sock.recv(1 << 20)
    sock.close()
    assert got == reply
    found = []
    wait_until(lambda: found.extend(e for e in plane.read_events() if getattr(e, "cookie", None) == cookie) or found,
               timeout=10, what="the connection's end event")
    assert (found[0].bytes_acked, found[0].bytes_received) == (len(command), len(reply))


def test_without_connection_events_every_connection_is_still_counted(net, cgroup, plane):
    plane.set_connection_events(False)  # the daemon's default unless it logs connections
    route(plane, Backend("10.77.0.2", A), Backend("10.77.0.2", DEAD))
    ok = failed = 0
    for _ in range(20):
        try:
            with dial(cgroup, net["host"], "127.0.0.1", MAPPED) as sock:
                sock.sendall(b"PING\r\n")
                assert sock.recv(64) == b"+PONG\r\n"
                ok += 1
        except ConnectionRefusedError:
            failed += 1
    assert failed == 1 and ok == 19

    def counted():
        stats = plane.connection_stats().get((MAPPED, 0, ("10.77.0.2", A)))
        return stats if stats is not None and stats.ok + stats.reset == ok else None
    stats = wait_until(counted, timeout=10, what=lambda: f"19 connections in conn_stats: {plane.connection_stats()}")
    assert (stats.bytes_acked, stats.bytes_received) == (ok * 6, ok * 7)
    events = plane.read_events()
    # only the failed connect and its ejection are events
    assert sorted(type(e).__name__ for e in events) == ["BackendEjected", "ConnectionEnded"], events
    assert [e.outcome for e in events if isinstance(e, ConnectionEnded)] == ["refused"]


async def test_events_under_trio(net, cgroup, plane):
    route(plane, Backend("10.77.0.2", A))

    def client() -> int:
        with contextlib.closing(dial(cgroup, net["host"], "127.0.0.1", MAPPED)) as s:
            assert served_by(s) == A
            return _cookie(s)

    cookie = await trio.to_thread.run_sync(client)
    with trio.fail_after(10):
        async for event in plane.events():
            if isinstance(event, ConnectionEnded) and event.cookie == cookie:
                break
    assert event.outcome == "ok" and event.bytes_received > 0


async def test_close_wakes_a_task_waiting_for_events(plane):
    ended = []

    async def reader():
        with pytest.raises(trio.ClosedResourceError):
            async for event in plane.events():
                ended.append(event)
        ended.append("closed")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            plane.close()
    assert ended == ["closed"]


# ---------------------------------------------------------------------------- life cycle


def test_close_detaches_only_its_own_programs(net, cgroup, plane):
    listed = attached(cgroup)
    assert all(name in listed for name in ("connect4", "connect6", "getpeername4", "getpeername6", "sock_ops"))
    with ConnectPlane(cgroup, netns_cookie=net["host_cookie"]) as other:
        assert len(attached(cgroup).splitlines()) == 10  # two sets, side by side (multi)
        other.set_route(MAPPED, [Backend("10.77.0.2", B)], eject_for=1, connect_timeout=1)
    assert attached(cgroup) == listed
    route(plane, Backend("10.77.0.2", A))
    assert answer(cgroup, net["host"], "127.0.0.1", MAPPED) == A
    plane.close()
    plane.close()  # idempotent
    assert attached(cgroup) == ""
    with pytest.raises(ConnectPlaneError):
        route(plane, Backend("10.77.0.2", A))


def test_a_directory_that_is_not_a_cgroup_is_named(tmp_path):
    with pytest.raises(ConnectPlaneError, match=str(tmp_path)):
        ConnectPlane(str(tmp_path))


def test_a_killed_owner_leaves_nothing_attached(net, cgroup):
    """The attachments are BPF links: they end with the process, also on SIGKILL, so a
    restarted daemon never finds a second copy of itself."""
    code = ("import sys; from ambassadord.connect import ConnectPlane; p = ConnectPlane(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, cgroup], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            _skip_or_fail(f"connect mode cannot load here: {proc.stderr.read()}")
        assert "connect4" in attached(cgroup)
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: attached(cgroup) == "", timeout=10, what=lambda: f"detached after SIGKILL: {attached(cgroup)}")


def test_a_refused_program_shows_the_verifiers_log(tmp_path, cgroup):
    require("clang")
    source = tmp_path / "bad.bpf.c"
    source.write_text('#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n'
                      'SEC("cgroup/connect4") int connect4(struct bpf_sock_addr *ctx)\n'
                      '{ return *(int *)(long)ctx->user_ip4; }\n'
                      'char LICENSE[] SEC("license") = "GPL";\n')
    multiarch = subprocess.run(["clang", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-idirafter", f"/usr/include/{multiarch}",
                    "-c", str(source), "-o", str(tmp_path / "bad.bpf.o")], check=True)
    with pytest.raises(ConnectPlaneError) as refused:
        ConnectPlane(cgroup, object_path=tmp_path / "bad.bpf.o")
    assert "BEGIN PROG LOAD LOG" in str(refused.value) and "invalid mem access" in str(refused.value)
    assert attached(cgroup) == ""
