"""Fault injection: the daemon's life cycle under load (issue 12, items 1 and 5, SIGKILL).

Each test runs the real daemon with ``--iptables`` in a network namespace of its own, real
Redis behind it, real consumers that connect to ``127.0.0.1:6379`` and are redirected, and
counts: requests in flight that failed out of all, the nat table after the stop.

What they pin down (netfilter.py's docstring has the mechanism): the kernel translates the
packets of an established redirected connection only while the namespace holds a REDIRECT
rule, so a stop must take away the jumps first (no new redirects), wait for open
connections, and remove the chains last; a reload must never leave the chain without a
REDIRECT rule. Before these fixes, 50 of 50 BLPOPs in flight broke within 2 s of SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time

import pytest

from tests.daemon import Daemon, RedisProcess, connect, free_port, ping, refused, wait_until
from tests.netns import Netns, namespaces, require_prerequisites

pytestmark = pytest.mark.netns

CLIENTS = 20  # BLPOPs in flight when the stop comes
IDLE = 10  # keep-alive connections that are quiet when it comes, and used after


def nat(ns: Netns) -> str:
    return ns.exec(["iptables-save", "-t", "nat"]) + ns.exec(["ip6tables-save", "-t", "nat"])


def read_reply(sock: socket.socket, end: bytes, timeout: float) -> bytes:
    """Read until the reply ends with ``end``; what came (maybe short) on EOF, error or timeout."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(end):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def blpop(sock: socket.socket, key: str) -> None:
    sock.sendall(f"BLPOP {key} 30\r\n".encode())


def lpush(redis: RedisProcess, key: str, value: str) -> None:
    with contextlib.closing(connect(redis.host, redis.port, ns=redis.ns)) as s:
        s.sendall(f"LPUSH {key} {value}\r\n".encode())
        assert read_reply(s, b"\r\n", 5).startswith(b":")


@contextlib.contextmanager
def scenario(label: str, *flags: str, other_nat_rule: bool = False, config=None, env=None):
    """A namespace with Redis on a port of its own and the daemon redirecting 6379 to it
    (a --map, or with ``config``, a path, that file; ``env``: the daemon's extra env)."""
    require_prerequisites()
    with namespaces(label) as (ns,):
        if other_nat_rule:
            # Somebody else's nat rule (a Docker host has many): the fix must not depend on it.
            ns.exec(["iptables", "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "--dport", "9", "-j", "RETURN"])
        port = free_port(ns=ns)
        with RedisProcess(port, ns=ns) as redis:
            routes = ["--map", f"6379=127.0.0.1:{port}"]
            if config is not None:
                config.write_text(f'[routes]\n6379 = "127.0.0.1:{port}"\n')
                routes = ["--config", str(config), "--config-poll", "0.1"]
            args = ["--iptables", "--listen", "127.0.0.1:10000", *routes, *flags]
            with Daemon(args, ns=ns, env=env) as daemon:
                yield ns, redis, daemon


@pytest.mark.parametrize("other_nat_rule", [False, True], ids=["alone", "other-nat-rule"])
@pytest.mark.parametrize("relay", ["--sockmap=on", "--sockmap=off"], ids=["kernel", "user-space"])
def test_sigterm_keeps_every_redirected_connection_until_it_ends(relay: str, other_nat_rule: bool) -> None:
    with scenario("life-term", relay, "--grace", "20", other_nat_rule=other_nat_rule) as (ns, redis, daemon):
        waiting = [daemon.connect("127.0.0.1", 6379) for _ in range(CLIENTS)]
        idle = [daemon.connect("127.0.0.1", 6379) for _ in range(IDLE)]
        try:
            for s in idle:
                assert ping(s) == b"+PONG\r\n"
            for i, s in enumerate(waiting):
                blpop(s, f"q{i}")
            # Every BLPOP has reached Redis (it counts blocked clients) before the stop.
            wait_until(lambda: f"blocked_clients:{CLIENTS}" in redis_info(redis), timeout=10,
                       what="every BLPOP blocked in Redis")

            daemon.signal(signal.SIGTERM)
            daemon.wait_for("no longer redirecting new connections")
            # New connections are not redirected any more (nothing listens on 6379 itself) ...
            assert refused("127.0.0.1", 6379, ns=ns)
            # ... while every established one keeps working, in both directions.
            for i in range(CLIENTS):
                lpush(redis, f"q{i}", f"v{i}")
            failed = sum(not read_reply(s, f"v{i}\r\n".encode(), 10).endswith(f"v{i}\r\n".encode())
                         for i, s in enumerate(waiting))
            failed += sum(ping(s) != b"+PONG\r\n" for s in idle)
            assert failed == 0, f"{failed} of {CLIENTS + IDLE} connections broke after SIGTERM: {daemon.describe()}"
        finally:
            for s in waiting + idle:
                s.close()
        # Their end lets the daemon go well before the grace period is over, rules and all.
        started = time.monotonic()
        assert daemon.wait_exit(15) == 0, daemon.describe()
        assert time.monotonic() - started < 10, "the daemon waited for the grace period though nothing was open"
        assert "AMBASSADORD" not in nat(ns)


def redis_info(redis: RedisProcess) -> str:
    with contextlib.closing(connect(redis.host, redis.port, ns=redis.ns)) as s:
        s.sendall(b"INFO clients\r\n")
        return read_reply(s, b"\r\n\r\n", 5).decode(errors="replace") + read_reply(s, b"\r\n", 0.2).decode()


def test_grace_period_over_closes_what_is_left_and_removes_the_rules() -> None:
    with scenario("life-grace", "--grace", "1") as (ns, _redis, daemon):
        with contextlib.closing(daemon.connect("127.0.0.1", 6379)) as s:
            assert ping(s) == b"+PONG\r\n"
            daemon.signal(signal.SIGTERM)
            assert daemon.wait_exit(10) == 0, daemon.describe()
            assert read_reply(s, b"\r\n", 5) == b""  # closed by the daemon at the end of the grace
        assert "AMBASSADORD" not in nat(ns)


def test_reload_that_leaves_no_redirected_port_keeps_open_connections(tmp_path) -> None:
    # Before the anchor rule, a reload whose new routes redirect no port emptied the chain:
    # the namespace lost its last REDIRECT rule and the open connection broke.
    config = tmp_path / "routes.toml"
    with scenario("life-reload", config=config) as (ns, redis, daemon):
        with contextlib.closing(daemon.connect("127.0.0.1", 6379)) as s:
            assert ping(s) == b"+PONG\r\n"
            # Only a route on the listen port itself is left: nothing to redirect.
            new = tmp_path / "new.toml"
            new.write_text(f'[routes]\n10000 = "127.0.0.1:{redis.port}"\n')
            os.replace(new, config)
            daemon.wait_for(lambda r: r.get("event") == "reload" and r.get("ok"))
            assert refused("127.0.0.1", 6379, ns=ns)
            assert ping(s) == b"+PONG\r\n", "the open connection broke when its port was dropped"
        daemon.stop()
        assert "AMBASSADORD" not in nat(ns)


def test_sigkill_leaves_the_rules_and_a_restart_cleans_them_up() -> None:
    # Documented in README: after SIGKILL the mapped ports are refused until the daemon
    # runs again (the rules send them to a port nobody listens on); a restart takes over.
    with scenario("life-kill") as (ns, redis, daemon):
        daemon.proc.kill()
        daemon.proc.wait()
        assert "AMBASSADORD-10000" in nat(ns)
        assert refused("127.0.0.1", 6379, ns=ns)
        args = ["--iptables", "--listen", "127.0.0.1:10000", "--map", f"6379=127.0.0.1:{redis.port}"]
        with Daemon(args, ns=ns) as again:
            with contextlib.closing(again.connect("127.0.0.1", 6379)) as s:
                assert ping(s) == b"+PONG\r\n"
            rules = nat(ns)
            assert rules.count("-A OUTPUT -p tcp -j AMBASSADORD-10000") == 1, rules
            again.stop()
        assert "AMBASSADORD" not in nat(ns)


def test_a_daemon_that_drains_leaves_the_rules_of_the_one_that_replaced_it() -> None:
    # A restart that does not wait for the old process: the new one installs the rules
    # while the old one still drains; the old one's exit must not take them away.
    # --workers 1: with more, the second daemon refuses to start until the first one has
    # exited (the instance guard against two daemons sharing a port through SO_REUSEPORT).
    with scenario("life-over", "--grace", "20", "--workers", "1") as (ns, redis, old):
        held = old.connect("127.0.0.1", 6379)
        try:
            old.signal(signal.SIGTERM)
            old.wait_for("no longer redirecting new connections")
            args = ["--iptables", "--listen", "127.0.0.1:10000", "--map", f"6379=127.0.0.1:{redis.port}",
                    "--workers", "1"]
            with Daemon(args, ns=ns) as new:
                assert ping(held) == b"+PONG\r\n"  # still the old daemon's connection
                held.close()
                assert old.wait_exit(15) == 0, old.describe()
                with contextlib.closing(new.connect("127.0.0.1", 6379)) as s:
                    assert ping(s) == b"+PONG\r\n", f"the old daemon removed the new one's rules: {nat(ns)}"
                new.stop()
        finally:
            held.close()
        assert "AMBASSADORD" not in nat(ns)


def test_sigterm_stops_the_daemon_while_a_reload_reads_a_fifo(tmp_path) -> None:
    # Item 5: the config path became a FIFO; the reload that read it blocked and held a
    # lock that SIGTERM then waited on forever. Now the reload refuses or abandons it, and
    # the stop takes at most the grace period.
    config = tmp_path / "routes.toml"
    with scenario("life-fifo", "--grace", "2", config=config) as (ns, _redis, daemon):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, config)
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reloading (")
        with contextlib.closing(daemon.connect("127.0.0.1", 6379)) as s:
            assert ping(s) == b"+PONG\r\n"  # the old routes still serve
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0, daemon.describe()
        assert time.monotonic() - started < 6
        assert "AMBASSADORD" not in nat(ns)


def refusing_jump_removal(tmp_path) -> dict[str, str]:
    """An iptables-restore wrapper for the daemon's PATH that refuses the first step of a
    stop, the removal of the jumps alone (``-D`` without ``-X``), and runs the real tool
    for everything else. Returns the daemon's env."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    wrapper = wrappers / "iptables-restore"
    wrapper.write_text(
        "#!/bin/sh\n"
        "input=$(cat)\n"
        'case "$input" in *"-X "*) ;; *"-D "*) echo "iptables-restore: simulated refusal" >&2; exit 2 ;; esac\n'
        f'printf "%s\\n" "$input" | {shutil.which("iptables-restore")} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{wrappers}:{os.environ['PATH']}"}


def test_a_stop_whose_jump_removal_fails_still_removes_every_rule(tmp_path) -> None:
    # The jumps still lead to our chains, and they are ours: the exit removes them all.
    # Before, any stop made the exit leave rules that a jump leads to (taking them for
    # the rules of a daemon that replaced this one), and the mapped ports were refused
    # until the next start.
    with scenario("life-jumps", "--grace", "1", env=refusing_jump_removal(tmp_path)) as (ns, _redis, daemon):
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("could not remove the jumps to our chains")
        assert daemon.wait_exit(10) == 0, daemon.describe()
        assert "iptables: rules removed" in daemon.text(), daemon.describe()
        assert "AMBASSADORD" not in nat(ns)
