"""The real daemon process: capacity errors, graceful shutdown, loop guards, no route, logs.

Each test starts ``python -m ambassadord run ...`` as a subprocess (tests/daemon.py) and
talks to it over real sockets, with a real ``redis-server`` as the backend where one is
needed. Tests that involve iptables run in a fresh network namespace (marked ``netns``);
the others use loopback in the current namespace, on free ports. Nothing waits by
sleeping: every wait polls a condition (a port that accepts or refuses, a log record, a
process exit) with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.daemon import (
    REPO_ROOT,
    Daemon,
    RedisProcess,
    connect,
    free_port,
    is_closed,
    ping,
    read_to_eof,
    refused,
    wait_until,
)
from tests.netns import Netns

PONG = b"+PONG\r\n"
CONNECTION_KEYS = {"src", "port", "backend", "up", "down", "duration", "outcome"}


def proxy(redis: RedisProcess, tmp_path, *extra: str, **kw) -> Daemon:
    """A daemon on 127.0.0.1:<free port> whose one route sends that port to ``redis``."""
    port = free_port()
    return Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}", *extra],
                  listen=("127.0.0.1", port), workdir=tmp_path, **kw)


def src_of(client: socket.socket) -> str:
    """How the daemon's log names ``client``: its address as the daemon sees the source."""
    host, port = client.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def record_for(daemon: Daemon, src: str, *, timeout: float = 10) -> dict:
    """The connection record of the client whose address is ``src`` (see src_of)."""
    return daemon.wait_for(lambda r: r.get("event") == "connection" and r.get("src") == src, timeout=timeout)


def redis_cli_ping(port: int, *, ns: Netns | None = None, host: str = "127.0.0.1") -> str:
    cmd = ["redis-cli", "-h", host, "-p", str(port), "ping"]
    if ns is not None:
        return ns.exec(cmd, timeout=10).strip()
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()


def ambassadord(ns: Netns, *args: str) -> str:
    """``python -m ambassadord ARGS...`` inside ``ns``; its stdout (raises on failure)."""
    return ns.exec(["env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "ambassadord", *args])


# ---- capacity errors --------------------------------------------------------------------
#
# The fd limit is set on the running daemon (prlimit(2)) to exactly the number of fds it
# holds at that moment, or one more. Starting it under a fixed `prlimit --nofile=40` would
# leave the number of free fds, and so which call hits EMFILE (accept(), the upstream
# socket(), a splice pipe), to the interpreter's start-up and the relay mode.

HOLDERS = 5
CLIENTS = 60


def fds(daemon: Daemon) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{daemon.proc.pid}/fd")]


def limit_free_fds(daemon: Daemon, free: int) -> None:
    """Set the daemon's RLIMIT_NOFILE so that exactly ``free`` more fds can be opened."""
    open_fds = fds(daemon)
    limit = len(open_fds) + free
    assert limit > max(open_fds), f"fd numbers have gaps: {sorted(open_fds)}"
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))


def idle_fd_count(daemon: Daemon) -> int:
    """Wait until the readiness probe's connection is over (its sockets closed); the
    daemon's fd count then."""
    daemon.wait_for(lambda r: r.get("event") == "connection")
    return len(fds(daemon))


def open_holders(port: int, n: int) -> list[socket.socket]:
    """``n`` relayed connections that have moved data both ways (so hold every fd a
    connection needs: sockets, and pipes when splicing)."""
    holders = []
    try:
        for _ in range(n):
            holders.append(connect("127.0.0.1", port))
            assert ping(holders[-1]) == PONG
    except BaseException:
        for h in holders:
            h.close()
        raise
    return holders


def test_fd_exhaustion_in_accept_backs_off_and_recovers(redis, tmp_path):
    # One process (--workers 1): the test counts and limits that process's descriptors.
    with proxy(redis, tmp_path, "--workers", "1") as daemon:
        port = daemon.listen[1]
        baseline = idle_fd_count(daemon)
        holders = open_holders(port, HOLDERS)
        clients = []
        try:
            limit_free_fds(daemon, 0)
            for _ in range(CLIENTS):  # accept() has no fd to give them: EMFILE
                clients.append(connect("127.0.0.1", port))
            line = daemon.wait_for("backing off", timeout=10)
            assert "Too many open files" in line, line
            assert daemon.alive(), daemon.describe()
            for h in holders:  # the connections already open carry on
                assert ping(h) == PONG
        finally:
            for c in holders + clients:
                c.close()
        # The daemon goes on: once the clients are gone, a new one is served ...
        wait_until(lambda: redis_cli_ping(port) == "PONG", timeout=20, what=daemon.describe)
        assert daemon.alive()
        # ... and every socket (and pipe) of every connection was closed again.
        wait_until(lambda: len(fds(daemon)) == baseline, timeout=10,
                   what=lambda: f"daemon holds {len(fds(daemon))} fds, had {baseline} when idle")
        daemon.stop()


def test_fd_exhaustion_in_upstream_socket_drops_no_client(redis, tmp_path):
    # One fd free: the next client can be accepted, but no upstream socket can be opened
    # for it until an fd is freed. It must wait for one, not be dropped.
    with proxy(redis, tmp_path, "--connect-timeout", "30", "--workers", "1") as daemon:
        port = daemon.listen[1]
        idle_fd_count(daemon)
        holders = open_holders(port, HOLDERS)
        try:
            limit_free_fds(daemon, 1)
            client = connect("127.0.0.1", port)
            holders.append(client)
            client.sendall(b"PING\r\n")
            while True:
                client.settimeout(1)
                try:
                    reply = client.recv(64)
                    break
                except TimeoutError:  # waiting for an fd: free some
                    assert len(holders) > 1, "no answer although nothing else is open"
                    holders.pop(0).close()
                except OSError as exc:
                    reply = repr(exc).encode()
                    break
        finally:
            for c in holders:
                c.close()
        unexpected = [r for r in daemon.records() if "unexpected error" in r.get("msg", "")]
        assert reply == PONG and not unexpected, (reply, unexpected[:1])
        daemon.stop()


@pytest.mark.skipif(not hasattr(os, "splice"), reason="no os.splice")
def test_fd_exhaustion_in_splice_pipe_keeps_connection(redis, tmp_path):
    # One process (--workers 1): the test counts and limits that process's descriptors.
    with proxy(redis, tmp_path, "--splice", "on", "--workers", "1") as daemon:
        port = daemon.listen[1]
        baseline = idle_fd_count(daemon)
        with contextlib.closing(connect("127.0.0.1", port)) as client:
            src = src_of(client)
            # Accepted and connected upstream (two sockets), no data yet, so no pipe yet.
            wait_until(lambda: len(fds(daemon)) == baseline + 2, timeout=10, what=daemon.describe)
            limit_free_fds(daemon, 0)
            assert ping(client) == PONG
        rec = record_for(daemon, src)
        assert rec["outcome"] == "ok", rec
        daemon.stop()


# ---- graceful shutdown -----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_open_connection_survives_shutdown_signal(redis, tmp_path, sig):
    with proxy(redis, tmp_path, "--grace", "20") as daemon:
        host, port = daemon.listen
        with contextlib.closing(connect(host, port)) as client:
            assert ping(client) == PONG
            daemon.signal(sig)
            # Stops accepting: new connections are refused ...
            wait_until(lambda: refused(host, port), timeout=10, what=daemon.describe)
            assert daemon.alive(), daemon.describe()
            # ... while the open one still works both ways.
            assert ping(client) == PONG
            assert daemon.alive(), daemon.describe()
            closed_at = time.monotonic()
        # The last connection is done: exit 0 at once, not when the 20 s grace is over.
        code = daemon.wait_exit(10)
        assert code == 0, daemon.describe()
        assert time.monotonic() - closed_at < 5, "waited for the grace period although no connection was open"
        rec = next(r for r in daemon.connection_records() if r["port"] == port and r["up"] == 12)
        assert rec["outcome"] == "ok" and rec["down"] == 2 * len(PONG), rec


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_grace_period_ends_a_connection_that_never_closes(redis, tmp_path, sig):
    with proxy(redis, tmp_path, "--grace", "1") as daemon:
        host, port = daemon.listen
        with contextlib.closing(connect(host, port)) as client:
            assert ping(client) == PONG
            signalled = time.monotonic()
            daemon.signal(sig)
            code = daemon.wait_exit(8)
            assert code == 0, daemon.describe()
            assert time.monotonic() - signalled >= 0.9, "exited before the grace period was over"
            # The daemon closed the client's connection on its way out.
            assert is_closed(client, 5)
        assert "grace period over" in daemon.text(), daemon.describe()
        rec = next(r for r in daemon.connection_records() if r["up"] == len(b"PING\r\n"))
        assert rec["outcome"] == "shutdown", rec


def test_second_signal_stops_at_once(redis, tmp_path):
    with proxy(redis, tmp_path, "--grace", "30") as daemon:
        host, port = daemon.listen
        with contextlib.closing(connect(host, port)) as client:
            assert ping(client) == PONG
            daemon.signal(signal.SIGTERM)
            daemon.wait_for("stopping")
            assert daemon.alive()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit(5) == 0, daemon.describe()
            assert is_closed(client, 5)


# ---- loop guards -----------------------------------------------------------------------


@pytest.mark.netns
def test_loop_guard_redirected_upstream_then_mark_fix(ns, tmp_path):
    # A real Redis on 127.0.0.1:6379 in the namespace, reachable directly (no rules yet).
    with RedisProcess(6379, ns=ns, workdir=tmp_path):
        # Rules whose mark the daemon does not set: its own upstream connection to
        # 127.0.0.1:6379 is itself redirected back to its listener.
        ambassadord(ns, "iptables", "install", "--to-port", "10000", "--port", "6379", "--mark", "0x1", "--ipv4-only")
        with Daemon(["--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:6379"], ns=ns,
                    workdir=tmp_path) as daemon:
            with contextlib.closing(daemon.connect("127.0.0.1", 6379)) as client:
                started = time.monotonic()
                client.sendall(b"PING\r\n")
                # Closed promptly, without an answer from Redis, instead of hanging.
                assert read_to_eof(client, 5) == b"", daemon.describe()
                assert time.monotonic() - started < 5
            loop = daemon.wait_for(lambda r: r.get("event") == "connection" and r.get("outcome") == "loop")
            assert loop["port"] == 6379, loop
            assert daemon.alive(), daemon.describe()
            # It still accepts: a second client gets the same prompt close.
            with contextlib.closing(daemon.connect("127.0.0.1", 6379)) as again:
                assert read_to_eof(again, 5) == b"", daemon.describe()
            assert daemon.alive(), daemon.describe()
            daemon.stop()

        # The fix: --iptables marks the daemon's upstream sockets, and its rules exempt the mark.
        with Daemon(["--iptables", "--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:6379"], ns=ns,
                    workdir=tmp_path) as daemon:
            assert redis_cli_ping(6379, ns=ns) == "PONG"
            rec = daemon.wait_for(lambda r: r.get("event") == "connection" and r.get("port") == 6379)
            assert rec["outcome"] == "ok", rec
            assert rec["backend"] == "127.0.0.1:6379", rec
            assert not [r for r in daemon.connection_records() if r.get("outcome") == "loop"]
            daemon.stop()
        assert "AMBASSADORD" not in ns.exec(["iptables-save", "-t", "nat"])


@pytest.mark.netns
@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0"])
def test_loop_guard_route_to_own_listener(ns, tmp_path, listen):
    with Daemon(["--listen", f"{listen}:10000", "--map", "10000=127.0.0.1:10000"], ns=ns,
                workdir=tmp_path) as daemon:
        with contextlib.closing(daemon.connect("127.0.0.1", 10000)) as client:
            assert is_closed(client, 5), "the client's connection hangs: " + daemon.describe()
            rec = record_for(daemon, src_of(client))
        assert rec["outcome"] == "all-backends-failed", rec
        assert "loop" in rec["error"], rec
        assert daemon.alive(), daemon.describe()
        daemon.stop()


@pytest.mark.netns
def test_loop_guard_route_to_own_listener_by_another_local_address(ns, tmp_path):
    # The backend is the listener, under a local address that is not loopback: the
    # connection comes back to the daemon, which must recognise its own upstream.
    ns.exec(["ip", "addr", "add", "10.77.0.1/32", "dev", "lo"])
    with Daemon(["--listen", "0.0.0.0:10000", "--map", "10000=10.77.0.1:10000"], ns=ns,
                workdir=tmp_path) as daemon:
        with contextlib.closing(daemon.connect("127.0.0.1", 10000)) as client:
            client.sendall(b"PING\r\n")
            assert read_to_eof(client, 5) == b"", daemon.describe()
        daemon.wait_for(lambda r: r.get("event") == "connection" and r.get("outcome") == "loop")
        assert daemon.alive(), daemon.describe()
        daemon.stop()


# ---- no route --------------------------------------------------------------------------


@pytest.mark.netns
def test_redirected_port_without_route_is_refused_and_logged(ns, tmp_path):
    ambassadord(ns, "iptables", "install", "--port", "6380", "--ipv4-only")
    with Daemon(["--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:1"], ns=ns, workdir=tmp_path) as daemon:
        with contextlib.closing(daemon.connect("127.0.0.1", 6380)) as client:
            started = time.monotonic()
            assert is_closed(client, 5), "a connection to a port without a route stays open"
            assert time.monotonic() - started < 1, "not closed at once"
            rec = record_for(daemon, src_of(client))
        assert rec["outcome"] == "no-route", rec
        assert rec["port"] == 6380, rec
        assert rec["src"].startswith("127.0.0.1:"), rec
        assert rec["backend"] is None and rec["up"] == 0 and rec["down"] == 0, rec
        assert daemon.alive(), daemon.describe()
        daemon.stop()


# ---- log formats -----------------------------------------------------------------------


def test_json_log_every_line_is_json_with_connection_records(redis, tmp_path):
    with proxy(redis, tmp_path) as daemon:
        host, port = daemon.listen
        with contextlib.closing(connect(host, port)) as client:
            src = src_of(client)
            assert ping(client) == PONG
        rec = record_for(daemon, src)
        daemon.stop()
    records = daemon.records()  # raises on any line that is not a JSON object
    assert len(records) >= 4, records  # listening, backends, connection(s), stopping, stopped
    assert all({"ts", "level", "msg"} <= r.keys() for r in records), records
    assert CONNECTION_KEYS <= rec.keys(), rec
    assert rec["src"] == src
    assert rec["port"] == port
    assert rec["backend"] == f"127.0.0.1:{redis.port}"
    assert (rec["up"], rec["down"]) == (len(b"PING\r\n"), len(PONG))
    assert isinstance(rec["duration"], float) and rec["duration"] >= 0
    assert rec["outcome"] == "ok"
    assert any("stopped" in r["msg"] for r in records)


def test_text_log_has_key_value_connection_line(redis, tmp_path):
    with proxy(redis, tmp_path, log_format="text") as daemon:
        host, port = daemon.listen
        with contextlib.closing(connect(host, port)) as client:
            src = src_of(client)
            assert ping(client) == PONG
        line = daemon.wait_for(f"src={src} ")
        daemon.stop()
    assert not line.lstrip().startswith("{")
    for field in (f"port={port}", "up=6", "down=7", "outcome=ok", "src=127.0.0.1:"):
        assert field in line, line


# ---- forgetting --iptables -------------------------------------------------------------


def test_without_a_redirect_the_start_warns_and_a_direct_connection_says_what_to_do(ns, tmp_path):
    # A new namespace: nothing redirects to port 10000. The start says so, with the command
    # that would; a consumer that dials the listener itself is told what it should dial.
    with Daemon(["--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:1", "--workers", "1"], ns=ns,
                workdir=tmp_path) as daemon:
        warning = daemon.wait_for(lambda r: "no iptables rule redirects" in r.get("msg", ""))
        assert "--iptables" in warning["msg"] and "iptables install --to-port 10000 --port 6379" in warning["msg"]
        for _ in range(3):  # the harness's readiness probe came first: one line for all
            with contextlib.closing(daemon.connect("127.0.0.1", 10000)) as client:
                assert is_closed(client, 5)
        hint = daemon.wait_for(lambda r: r.get("event") == "not-redirected")
        assert "127.0.0.1:6379" in hint["msg"] and "--iptables" in hint["msg"], hint
        assert len([r for r in daemon.records() if r.get("event") == "not-redirected"]) == 1
        daemon.stop()
    # With the rules in place (here, installed by hand), no warning.
    ambassadord(ns, "iptables", "install", "--port", "6379", "--ipv4-only")
    with Daemon(["--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:1"], ns=ns, workdir=tmp_path) as daemon:
        daemon.stop()
        assert "no iptables rule redirects" not in daemon.text()


# ---- log volume ------------------------------------------------------------------------


@pytest.mark.parametrize("which, logged", [("all", {"ok", "all-backends-failed"}), ("errors", {"all-backends-failed"}),
                                           ("none", set())])
def test_log_connections_chooses_which_connections_get_a_line(redis, tmp_path, which, logged):
    good, dead = free_port(), free_port()
    with Daemon(["--listen", f"127.0.0.1:{good}", "--listen", f"127.0.0.1:{dead}", "--map", f"{good}=127.0.0.1:{redis.port}",
                 "--map", f"{dead}=127.0.0.1:{free_port()}", "--log-connections", which, "--workers", "1"],
                listen=("127.0.0.1", good), workdir=tmp_path) as d:
        with contextlib.closing(d.connect("127.0.0.1", good)) as client:
            assert ping(client) == b"+PONG\r\n"
        with contextlib.closing(d.connect("127.0.0.1", dead)) as client:
            assert is_closed(client, 5)
        d.stop()
        assert {r["outcome"] for r in d.connection_records()} == logged


def test_a_flood_of_unrouted_connections_is_one_line_a_second_per_port(ns, tmp_path):
    ambassadord(ns, "iptables", "install", "--port", "6390", "--ipv4-only")
    from tests.admin_client import get_routes

    with Daemon(["--listen", "127.0.0.1:10000", "--map", "6379=127.0.0.1:1", "--workers", "1",
                 "--admin", "127.0.0.1:10001"], ns=ns, workdir=tmp_path) as d:
        for _ in range(200):
            with contextlib.closing(d.connect("127.0.0.1", 6390)) as client:
                assert is_closed(client, 5)
        counted = get_routes(10001, ns=ns)["connections"]["unrouted"]["no-route"]
        d.stop()
        lines = [r for r in d.connection_records() if r.get("port") == 6390]
    assert counted >= 200  # every one counted (and the readiness probe's, on the listen port)
    assert 1 <= len(lines) <= 10, len(lines)  # 200 in a second or two: a line or a few
    assert lines[0]["outcome"] == "no-route"
    if len(lines) > 1:  # a later line says how many were left out before it
        assert re.search(r"and \d+ more", lines[1]["msg"]), lines[1]


# ---- on_down: connections to a backend that is gone ------------------------------------


def _served_by(sock: socket.socket) -> int:
    sock.sendall(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nport\r\n")
    data = b""
    while data.count(b"\r\n") < 5:
        chunk = sock.recv(1024)
        assert chunk, "closed while asking its port"
        data += chunk
    return int(data.split(b"\r\n")[4])


@pytest.mark.parametrize("on_down", ["keep", "shutdown"])
def test_on_down_shutdown_closes_connections_to_a_backend_that_left_the_set(tmp_path, on_down):
    with RedisProcess(free_port(), workdir=tmp_path) as r1, RedisProcess(free_port(), workdir=tmp_path) as r2:
        port, config = free_port(), tmp_path / "routes.toml"
        both = f"127.0.0.1:{r1.port},127.0.0.1:{r2.port}"
        config.write_text(f'[routes]\n{port} = {{ backend = "{both}", balance = "round-robin", '
                          f'on_down = "{on_down}", drain = 1 }}\n')
        with Daemon(["--listen", f"127.0.0.1:{port}", "--config", str(config), "--config-poll", "0.2",
                     "--workers", "1"], listen=None, workdir=tmp_path) as d:
            wait_until(lambda: "listening on" in d.text(), timeout=10, what=d.describe)
            socks = [connect("127.0.0.1", port) for _ in range(4)]
            try:
                by = {s: _served_by(s) for s in socks}
                assert set(by.values()) == {r1.port, r2.port}, by
                # r1 leaves the set (deregistered, deleted: here, the file no longer names it)
                tmp = config.with_suffix(".new")
                tmp.write_text(f'[routes]\n{port} = {{ backend = "127.0.0.1:{r2.port}", balance = "round-robin", '
                               f'on_down = "{on_down}", drain = 1 }}\n')
                os.replace(tmp, config)
                d.wait_for(lambda r: r.get("event") == "reload" and r.get("ok"), timeout=10)
                started = time.monotonic()
                gone = [s for s in socks if by[s] == r1.port]
                kept = [s for s in socks if by[s] == r2.port]
                if on_down == "shutdown":
                    for s in gone:
                        assert is_closed(s, 5), "a connection to the backend that left stays open"
                    assert time.monotonic() - started >= 0.9, "closed before the drain time"
                    wait_until(lambda: len([r for r in d.connection_records() if r["outcome"] == "backend-down"])
                               == len(gone), timeout=5, what=lambda: str(d.connection_records()))
                else:
                    for s in gone:  # still served, well past drain + a sweep
                        assert not is_closed(s, 2.5)
                        assert _served_by(s) == r1.port
                for s in kept:
                    assert _served_by(s) == r2.port
            finally:
                for s in socks:
                    s.close()
            d.stop()


# ---- named routes ----------------------------------------------------------------------


def test_a_named_route_is_called_by_its_name_in_logs_metrics_routes_and_status(redis, tmp_path):
    from tests.admin_client import get_routes, http_get

    port, admin = free_port(), free_port()
    config = tmp_path / "routes.toml"
    config.write_text(f'[routes]\n{port} = {{ backend = "127.0.0.1:{redis.port}", name = "redis-primary" }}\n')
    with Daemon(["--listen", f"127.0.0.1:{port}", "--config", str(config), "--admin", f"127.0.0.1:{admin}",
                 "--workers", "1"], listen=("127.0.0.1", port), workdir=tmp_path) as d:
        with contextlib.closing(d.connect("127.0.0.1", port)) as client:
            assert ping(client) == b"+PONG\r\n"
        wait_until(lambda: any(r.get("route") == "redis-primary" for r in d.connection_records()), timeout=5,
                   what=lambda: str(d.connection_records()))
        (route,) = get_routes(admin)["routes"]
        assert route["name"] == "redis-primary" and route["port"] == port
        _, _, body = http_get(admin, "/metrics")
        text = body.decode()
        assert f'ambassadord_route_info{{mode="proxy",port="{port}",route="redis-primary",source=""}} 1.0' in text
        assert 'ambassadord_connections_active{route="redis-primary"} 0.0' in text
        status = subprocess.run([sys.executable, "-m", "ambassadord", "status", "--admin", f"127.0.0.1:{admin}"],
                                capture_output=True, text=True, timeout=30)
        assert status.stdout.splitlines()[1].startswith("redis-primary"), status.stdout
        d.stop()


@pytest.mark.parametrize("bad, says", [
    ('{ backend = "127.0.0.1:1", name = "6379" }', "bad route name '6379'"),
    ('{ backend = "127.0.0.1:1", name = "a b" }', "bad route name 'a b'"),
])
def test_a_bad_route_name_is_refused_with_its_place(tmp_path, bad, says):
    config = tmp_path / "routes.toml"
    config.write_text(f"[routes]\n6379 = {bad}\n")
    proc = subprocess.run([sys.executable, "-m", "ambassadord", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and says in proc.stderr and "routes.toml:2: [routes] 6379.name" in proc.stderr, \
        proc.stderr
