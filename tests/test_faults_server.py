"""Fault injection against the server: faults of this host, of the network and of the
topology that must not crash the daemon, blame a healthy backend, or leak connections.

* accept(2) errors (a listener whose accept() raises, in process: a seam);
* running out of local ports (EADDRNOTAVAIL) toward a backend, in a namespace whose
  ``net.ipv4.ip_local_port_range`` is a handful of ports;
* two daemons on two hosts whose routes point at each other (a routing loop);
* a peer that vanishes without FIN or RST (its packets dropped), noticed by TCP keepalive.

The namespace tests run real daemons (tests/daemon.py) against a real redis-server, change
sysctls and iptables only inside the namespaces they create, and poll with deadlines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket

import pytest
import trio

from ambassadord.routes import Route, RouteConfig, RouteTable
from ambassadord.server import ListenAddress, Server, bind_listeners
from ambassadord.backends import parse_spec
from tests.daemon import Daemon, RedisProcess, connect, ping, wait_until
from tests.netns import link, namespaces, require_prerequisites
from tests.admin_client import backend, get_routes, route
from tests.trio_servers import echo, tcp_server

PONG = b"+PONG\r\n"
ADMIN = 10001

# ---- accept(2) errors ----------------------------------------------------------------------


class FlakyListener(socket.socket):
    """A real listening socket whose next accept() calls raise the given errnos first."""

    errors: list[int]

    def accept(self):
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


def flaky_listener(errors: list[int]) -> FlakyListener:
    (real,) = bind_listeners([ListenAddress("127.0.0.1", 0)])
    sock = FlakyListener(real.family, real.type, fileno=real.detach())
    sock.errors = list(errors)
    return sock


# The Linux TCP list of accept(2) ("pending network errors ... should be treated like
# EAGAIN"), ECONNABORTED, and errnos accept(2) does not name at all: none may stop the daemon.
GO_ON_ERRNOS = [errno.ENETDOWN, errno.EPROTO, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ECONNABORTED, errno.EPERM, errno.ETIMEDOUT,
                errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EIO, errno.ERANGE]


async def test_accept_errors_are_logged_and_the_loop_goes_on(autojump_clock, caplog):
    # Virtual time: the loop backs off (CAPACITY_SLEEP) after each of the four "short of
    # something" errors; the clock jumps over those sleeps instead of waiting them out.
    caplog.set_level(logging.DEBUG)
    async with tcp_server(echo) as bport:
        lsock = flaky_listener(GO_ON_ERRNOS)
        port = lsock.getsockname()[1]
        srv = Server(RouteTable([Route(RouteConfig(port=port, spec=parse_spec(f"127.0.0.1:{bport}")))]), [lsock])
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            # The first readiness makes the loop go through every injected error in turn.
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(b"after the errors")
                assert await stream.receive_some(100) == b"after the errors"
            assert lsock.errors == [] and srv.listening
            srv.abort()
    unexpected = [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()]
    assert any("EIO" in m for m in unexpected) and any("ERANGE" in m for m in unexpected), unexpected


@pytest.mark.parametrize("code", [errno.EBADF, errno.EINVAL, errno.ENOTSOCK])
async def test_accept_error_that_means_a_bug_surfaces(code):
    lsock = flaky_listener([code])
    port = lsock.getsockname()[1]
    srv = Server(RouteTable([Route(RouteConfig(port=port, spec=parse_spec("127.0.0.1:1")))]), [lsock])
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            # A connection makes the listener readable: the loop calls accept() and raises.
            with contextlib.closing(socket.create_connection(("127.0.0.1", port))):
                await trio.sleep_forever()
    assert any(isinstance(e, OSError) and e.errno == code for e in leaves(info.value)), repr(info.value)


def leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from leaves(e)
    else:
        yield exc


# ---- out of local ports --------------------------------------------------------------------

PORT_RANGE = (40000, 40003)  # four ephemeral ports in the test's namespace


def client(ns, port: int, source_port: int) -> socket.socket:
    """A client from a fixed source port (outside PORT_RANGE: clients must not take the
    ports the daemon's upstream connections need)."""
    sock = ns.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", source_port))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def test_out_of_local_ports_is_capacity_and_never_ejects(ns, tmp_path):
    """EADDRNOTAVAIL at connect() is this host's shortage: outcome capacity, the backend
    neither ejected nor charged with a failure, and served again once ports are free."""
    with RedisProcess(6390, ns=ns, workdir=tmp_path) as redis, Daemon(
        ["--listen", "127.0.0.1:7000", "--map", f"7000=127.0.0.1:{redis.port}", "--workers", "1",
         "--admin", f"127.0.0.1:{ADMIN}"], listen=("127.0.0.1", 7000), ns=ns, workdir=tmp_path,
    ) as daemon:
        # Only inside the test's namespace: the machine's own range is never touched.
        ns.exec(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={PORT_RANGE[0]} {PORT_RANGE[1]}"])
        holders: list[socket.socket] = []
        outcome_of_extra = None
        try:
            for i in range(PORT_RANGE[1] - PORT_RANGE[0] + 2):
                c = client(ns, 7000, 50000 + i)
                try:
                    reply = ping(c)
                except ConnectionResetError:  # closed with the PING unread
                    reply = b""
                if reply == PONG:
                    holders.append(c)
                    continue
                c.close()  # closed at once: no port left for its upstream connection
                outcome_of_extra = daemon.wait_for(lambda r: r.get("event") == "connection"
                                                   and r.get("src") == f"127.0.0.1:{50000 + i}")["outcome"]
                break
            # (The kernel may keep one port of so small a range back.)
            assert 1 <= len(holders) <= PORT_RANGE[1] - PORT_RANGE[0] + 1, f"{len(holders)} connections held"
            assert outcome_of_extra == "capacity"
            view = route(get_routes(ADMIN, ns=ns), "7000")
            b = backend(view, f"127.0.0.1:{redis.port}")
            assert (b["state"], b["failures"], view["failures"]) == ("up", 0, 0), view
            assert view["outcomes"].get("capacity") == 1 and "all-backends-failed" not in view["outcomes"], view
            assert not [r for r in daemon.records() if r.get("event") == "backend-failed"]
            assert any(r.get("event") == "capacity" and "ip_local_port_range" in r["msg"]
                       for r in daemon.records())
        finally:
            for c in holders:
                c.close()
        # Ports free up (TIME_WAIT on loopback is reused after a second): served again.
        attempt = iter(range(60000, 61000))

        def served() -> bool:
            with contextlib.closing(client(ns, 7000, next(attempt))) as c:
                try:
                    return ping(c) == PONG
                except ConnectionResetError:
                    return False

        wait_until(served, timeout=10, what=daemon.describe)
        view = route(get_routes(ADMIN, ns=ns), "7000")
        assert backend(view, f"127.0.0.1:{redis.port}")["failures"] == 0 and view["failures"] == 0, view
        assert "all-backends-failed" not in view["outcomes"], view
        daemon.stop()


# ---- a routing loop between two hosts ------------------------------------------------------

HOST_A, HOST_B = "10.252.0.1", "10.252.0.2"  # each host's first address: the source of its connections
ALIAS_A, ALIAS_B = "10.252.0.11", "10.252.0.12"  # a second address of each, that the loop check cannot tie back
LOOP_PORT = 7000
LIMIT = 5


@contextlib.contextmanager
def two_hosts():
    require_prerequisites()
    with namespaces("loopa", "loopb") as (a, b):
        link(a, [f"{HOST_A}/24", f"{ALIAS_A}/24"], b, [f"{HOST_B}/24", f"{ALIAS_B}/24"], tag="lp")
        yield a, b


def loop_daemon(ns, to: str, tmp_path) -> Daemon:
    # A low fd limit keeps an unbounded loop (the fault this guards against) short.
    return Daemon(["--listen", f"0.0.0.0:{LOOP_PORT}", "--map", f"{LOOP_PORT}={to}:{LOOP_PORT}", "--workers", "1",
                   "--max-connections", str(LIMIT), "--admin", f"127.0.0.1:{ADMIN}"],
                  listen=("127.0.0.1", LOOP_PORT), ns=ns, workdir=tmp_path, prefix=["prlimit", "--nofile=256", "--"])


def counts(daemon: Daemon) -> tuple[int, int, dict[str, int]]:
    """(connections so far, open fds, the loop route's closed connections by outcome)."""
    snapshot = get_routes(ADMIN, ns=daemon.ns)
    return snapshot["connections"]["total"], fd_count(daemon), route(snapshot, str(LOOP_PORT))["outcomes"]


def fd_count(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


@pytest.mark.parametrize("via", ["first-address", "alias"])
def test_routes_pointing_at_each_other_end_in_few_hops(via, tmp_path):
    """Host A's route for 7000 points at host B, and B's at A. By the hosts' first addresses
    the loop is seen at B's first hop (the connection comes from the backend it would go
    to); by aliases it is not, and max_connections bounds it. Either way one connection
    makes a bounded number of hops, and everything is closed again afterwards."""
    to_b, to_a = (HOST_B, HOST_A) if via == "first-address" else (ALIAS_B, ALIAS_A)
    with two_hosts() as (a, b), loop_daemon(a, to_b, tmp_path) as da, loop_daemon(b, to_a, tmp_path) as db:
        daemons = (da, db)
        # Baseline: the readiness probes are over, every connection closed. (B's probe
        # already went round the loop once: A was up.)
        wait_until(lambda: all(get_routes(ADMIN, ns=d.ns)["connections"]["active"] == 0 for d in daemons),
                   timeout=10, what="idle daemons")
        before = {d: counts(d) for d in daemons}
        with contextlib.closing(connect("127.0.0.1", LOOP_PORT, ns=a)) as c:
            c.sendall(b"PING\r\n")
            c.settimeout(10)
            try:
                assert c.recv(100) == b""  # the loop ends; nothing ever answers
            except ConnectionResetError:
                pass
        wait_until(lambda: all(get_routes(ADMIN, ns=d.ns)["connections"]["active"] == 0 for d in daemons),
                   timeout=10, what=lambda: "; ".join(d.describe() for d in daemons))
        hops, outcomes = {}, {}
        for d in daemons:
            assert d.alive(), d.describe()
            total, fds, by_outcome = counts(d)
            hops[d] = total - before[d][0]
            outcomes[d] = {k: n - before[d][2].get(k, 0) for k, n in by_outcome.items() if n != before[d][2].get(k, 0)}
            # Each hop holds one connection of the route on each daemon: at most LIMIT, and
            # one more refused with outcome limit.
            assert 1 <= hops[d] <= LIMIT + 1, f"{hops[d]} connections on {d.ns.name}: {outcomes[d]}"
            wait_until(lambda: fd_count(d) <= before[d][1], timeout=10,
                       what=lambda: f"{fd_count(d)} fds, {before[d][1]} before: {d.describe()}")
        if via == "first-address":
            assert (hops[da], hops[db]) == (1, 1) and outcomes[db] == {"loop": 1}, outcomes
        else:
            assert outcomes[da].get("limit", 0) + outcomes[db].get("limit", 0) == 1, outcomes
        for d in daemons:
            d.stop()


# ---- a peer that vanishes without FIN or RST -----------------------------------------------

DAEMON_HOST, PEER_HOST = "10.253.0.1", "10.253.0.2"
KEEPALIVE = "1,1,2"  # probe after 1 s of silence, every 1 s, give up after 2: dead in about 3 s


@pytest.mark.parametrize("relay", ["kernel", "user"])
@pytest.mark.parametrize("gone", ["client", "backend"])
def test_keepalive_notices_a_peer_that_vanished(gone, relay, tmp_path):
    """The client (or the backend) of an idle relayed connection stops answering: its
    packets are dropped, as after a power cut or a NAT that forgot the flow. Keepalive
    probes go unanswered, the kernel fails the socket, and the daemon closes the connection:
    nothing is held open forever."""
    require_prerequisites()
    with namespaces("kad", "kap") as (d, peer):
        link(d, [f"{DAEMON_HOST}/24"], peer, [f"{PEER_HOST}/24"], tag="ka")
        redis_ns, redis_host = (d, "127.0.0.1") if gone == "client" else (peer, PEER_HOST)
        client_ns, to_host = (peer, DAEMON_HOST) if gone == "client" else (d, "127.0.0.1")
        with RedisProcess(6390, host=redis_host, ns=redis_ns, workdir=tmp_path), Daemon(
            ["--listen", "0.0.0.0:7000", "--map", f"7000={redis_host}:6390", "--workers", "1",
             "--keepalive", KEEPALIVE, "--admin", f"127.0.0.1:{ADMIN}",
             *(["--sockmap", "off"] if relay == "user" else [])],
            listen=("127.0.0.1", 7000), ns=d, workdir=tmp_path,
        ) as daemon:
            def active() -> int:
                return get_routes(ADMIN, ns=d)["connections"]["active"]

            wait_until(lambda: active() == 0, timeout=10, what=daemon.describe)
            with contextlib.closing(connect(to_host, 7000, ns=client_ns)) as c:
                assert ping(c) == PONG
                assert active() == 1
                # Gone without a word: every packet in or out of the peer's namespace dropped.
                for chain in ("INPUT", "OUTPUT"):
                    peer.exec(["iptables", "-I", chain, "-j", "DROP"])
                wait_until(lambda: active() == 0, timeout=10,
                           what=lambda: f"connection still open 10 s after the {gone} vanished: {daemon.describe()}")
            rec = daemon.wait_for(lambda r: r.get("event") == "connection" and r.get("src", "").startswith(
                PEER_HOST if gone == "client" else "127.0.0.1:") and r.get("up"))
            assert rec["outcome"] == f"{gone}-reset", rec
            assert daemon.alive()
            daemon.stop()


# ---- the options, as input ------------------------------------------------------------------


def test_limit_and_keepalive_options_from_file_and_flags(tmp_path):
    from ambassadord.sources import load_routes
    from ambassadord.routes import Keepalive

    path = tmp_path / "routes.toml"
    path.write_text('[defaults]\nmax_connections = 100\nkeepalive = "30"\n\n[routes]\n'
                    '6379 = "10.0.0.5:6379"\n'
                    '5432 = { backend = "10.0.0.6:5432", max_backend_connections = 3, keepalive = "off", '
                    'max_connections = 0 }\n')
    by_port = {r.port: r for r in load_routes(config_file=str(path), flag_defaults={"max_connections": 50}).routes}
    # Flags beat [defaults], a route's own options beat flags.
    assert (by_port[6379].max_connections, by_port[6379].max_backend_connections) == (50, 0)
    assert by_port[6379].keepalive == Keepalive(30, 10, 6)
    assert (by_port[5432].max_connections, by_port[5432].max_backend_connections) == (0, 3)
    assert not by_port[5432].keepalive and str(by_port[5432].keepalive) == "off"
    (plain,) = load_routes(maps=["6379=10.0.0.5:6379"]).routes
    assert (plain.max_connections, plain.max_backend_connections, str(plain.keepalive)) == (10000, 0, "60,10,6")


@pytest.mark.parametrize("line, fragment", [
    ('max_connections = -1', "[defaults] max_connections: bad limit -1"),
    ('max_connections = "100"', "[defaults] max_connections: bad limit '100'"),
    ('max_backend_connections = 1.5', "[defaults] max_backend_connections: bad limit 1.5"),
    ('keepalive = "0,10,6"', "[defaults] keepalive: bad keepalive '0,10,6'"),
    ('keepalive = "60,10,200"', "bad keepalive '60,10,200'"),
    ('keepalive = "６０"', "bad keepalive '６０'"),
    ('keepalive = true', "[defaults] keepalive: bad keepalive True"),
])
def test_bad_limit_or_keepalive_in_file_names_file_line_and_value(tmp_path, line, fragment):
    from ambassadord.config import ConfigError
    from ambassadord.sources import load_routes

    path = tmp_path / "routes.toml"
    path.write_text(f'[defaults]\n{line}\n\n[routes]\n6379 = "10.0.0.5:6379"\n')
    with pytest.raises(ConfigError) as err:
        load_routes(config_file=str(path))
    assert f"{path}:2: " in str(err.value) and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--max-connections", "-1"], "'-1': expected a whole number of connections (0 = no limit)"),
    (["--max-backend-connections", "x"], "'x': expected a whole number of connections (0 = no limit)"),
    (["--keepalive", "60,0"], "bad keepalive '60,0'"),
    (["--keepalive", "of"], "bad keepalive 'of'"),
])
def test_bad_limit_or_keepalive_flag_is_named(argv, fragment, capsys):
    from ambassadord.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--map", "6379=10.0.0.5:6379", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err and fragment in err, err
