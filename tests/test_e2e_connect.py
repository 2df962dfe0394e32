"""Connect mode end to end: the real daemon, its BPF programs on a cgroup of the test's own,
real Redis servers, consumers in network namespaces.

    host A (ns a)  10.77.0.1, fd77::1      redis-server :6390 (the backend)
       | veth
    host B (ns b)  10.77.0.2, fd77::2      ambassadord run --mode connect --cgroup CG
       | bridge ambbr<pid> 172.31.77.1, fd31:77::1  (a container bridge: veth ports only)
    "container" (ns c) 172.31.77.2, fd31:77::2  its own redis-server on 127.0.0.1:6379

Consumers are sockets created in CG (tests/cgroups.py) inside ns b or c; a socket outside
CG is the control. Nothing here is attached to the machine's root cgroup.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.admin_client import http_get
from tests.cgroups import attached, child_cgroup, dial
from tests.consul import ConsulAgent, consul_binary
from tests.daemon import Daemon, DaemonExited, RedisProcess, wait_until
from tests.netns import link, namespaces, require_prerequisites
from tests.redis_wire import read_line, resp, served_by

ROUTE_PORT, ROUTE6_PORT, REDIS_PORT, DEAD_PORT, ADMIN = 6379, 6380, 6390, 6391, 10001


def _require_bpf() -> None:
    require_prerequisites()
    if os.geteuid() != 0:
        pytest.skip("connect mode needs root (CAP_BPF, CAP_NET_ADMIN)")


def ask(sock: socket.socket, *parts: bytes) -> bytes:
    """One Redis command on ``sock``; its one-line reply (+PONG, +OK)."""
    sock.sendall(resp(*parts))
    return read_line(sock)


@pytest.fixture
def world(tmp_path: Path):
    _require_bpf()
    with namespaces("cm-a", "cm-b", "cm-c") as (a, b, c), child_cgroup("e2e-connect") as cg:
        link(a, ["10.77.0.1/24", "fd77::1/64"], b, ["10.77.0.2/24", "fd77::2/64"], tag=f"cm{os.getpid() % 10000}")
        bridge = f"ambbr{os.getpid() % 100000}"
        b.exec(["ip", "link", "add", bridge, "type", "bridge"])
        b.exec(["ip", "addr", "add", "172.31.77.1/24", "dev", bridge])
        b.exec(["ip", "addr", "add", "fd31:77::1/64", "dev", bridge, "nodad"])
        b.exec(["ip", "link", "set", bridge, "up"])
        vb, vc = f"vcb{os.getpid() % 100000}", f"vcc{os.getpid() % 100000}"
        b.exec(["ip", "link", "add", vb, "type", "veth", "peer", "name", vc, "netns", c.name])
        b.exec(["ip", "link", "set", vb, "master", bridge, "up"])
        c.exec(["ip", "addr", "add", "172.31.77.2/24", "dev", vc])
        c.exec(["ip", "addr", "add", "fd31:77::2/64", "dev", vc, "nodad"])
        c.exec(["ip", "link", "set", vc, "up"])
        c.exec(["ip", "route", "add", "default", "via", "172.31.77.1"])
        c.exec(["ip", "-6", "route", "add", "default", "via", "fd31:77::1"])
        # b's own namespace (never the machine's): a router for c
        b.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        b.exec(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        a.exec(["ip", "route", "add", "172.31.77.0/24", "via", "10.77.0.2"])
        a.exec(["ip", "-6", "route", "add", "fd31:77::/64", "via", "fd77::2"])
        with RedisProcess(REDIS_PORT, host="10.77.0.1", ns=a) as backend, \
             RedisProcess(REDIS_PORT, host="fd77::1", ns=a), \
             RedisProcess(ROUTE_PORT, host="127.0.0.1", ns=c) as own:
            yield {"a": a, "b": b, "c": c, "cg": cg, "tmp": tmp_path, "backend": backend, "own": own}


def start(world, *routes: str, extra=()) -> Daemon:
    b = world["b"]
    args = [*(x for r in routes for x in ("--map", r)), "--mode", "connect", "--cgroup", world["cg"],
            "--listen", "127.0.0.1:10000", "--admin", f"127.0.0.1:{ADMIN}", "--workers", "1", *extra]
    # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup2 mount.
    d = Daemon(args, listen=None, prefix=["nsenter", f"--net=/run/netns/{b.name}", "--"], workdir=world["tmp"],
               wait=False)
    def ready() -> bool:  # the admin API answers (at any --log-level), from b's namespace
        if not d.alive():
            raise DaemonExited(d.describe())
        return http_get(ADMIN, "/healthz", ns=b, timeout=1)[0] == 200

    try:
        wait_until(ready, timeout=15, what=d.describe)
    except BaseException:
        d.kill()
        raise
    return d


def test_consumers_reach_the_backend_with_no_proxy_and_nothing_else_is_touched(world):
    b, c, cg = world["b"], world["c"], world["cg"]
    d = start(world, f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}", f"{ROUTE6_PORT}=[fd77::1]:{REDIS_PORT}")
    try:
        # a host process in the cgroup: loopback, rewritten; it sees what it dialled
        with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
            assert served_by(s) == REDIS_PORT
            assert s.getpeername() == ("127.0.0.1", ROUTE_PORT)
        with dial(cg, b, "::1", ROUTE6_PORT) as s:
            assert served_by(s) == REDIS_PORT
            assert s.getpeername()[:2] == ("::1", ROUTE6_PORT)
        # a "container" on the bridge, dialling the bridge's address
        with dial(cg, c, "172.31.77.1", ROUTE_PORT) as s:
            assert served_by(s) == REDIS_PORT
            assert s.getpeername() == ("172.31.77.1", ROUTE_PORT)
        with dial(cg, c, "fd31:77::1", ROUTE6_PORT) as s:  # and over IPv6
            assert served_by(s) == REDIS_PORT
            assert s.getpeername()[:2] == ("fd31:77::1", ROUTE6_PORT)
        # the container's own loopback Redis is its own
        with dial(cg, c, "127.0.0.1", ROUTE_PORT) as s:
            assert served_by(s) == ROUTE_PORT
        # a process outside the cgroup: untouched (nothing listens on b's 127.0.0.1:6379)
        with pytest.raises(ConnectionRefusedError):
            dial(None, b, "127.0.0.1", ROUTE_PORT).close()
    finally:
        assert d.stop() == 0
    assert attached(cg) == "", "programs left attached after SIGTERM"
    with pytest.raises(ConnectionRefusedError):  # and the rewrite is gone with them
        dial(cg, b, "127.0.0.1", ROUTE_PORT).close()


def test_a_dead_backend_fails_one_connect_per_ejection_and_bytes_are_counted(world):
    b, cg = world["b"], world["cg"]
    d = start(world, f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT},10.77.0.1:{DEAD_PORT}", extra=["--eject-for", "60"])
    try:
        failed = 0
        for _ in range(40):
            try:
                with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
                    assert ask(s, b"PING") == b"+PONG\r\n"
            except ConnectionRefusedError:
                failed += 1
        # Picked at random, the dead one comes up at once (40 picks miss it with p = 2**-40),
        # fails that connect, and is ejected in the kernel for the rest of the test.
        assert failed == 1, f"{failed}/40 connects failed; expected exactly the first one to the dead backend"
        value = os.urandom(50_000).hex().encode()  # 100,000 bytes up
        with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
            s.settimeout(10)
            assert ask(s, b"SET", b"k", value) == b"+OK\r\n"

        def logged():
            return [r for r in d.connection_records() if r.get("up", 0) >= 100_000]
        wait_until(logged, timeout=10, what=lambda: f"no connection line with the upload's bytes:\n{d.describe()}")
        line = logged()[0]
        assert line["mode"] == "connect" and line["backend"] == f"10.77.0.1:{REDIS_PORT}" and line["outcome"] == "ok"
        def route_counted():  # the kernel's counts are read every second
            route = json.loads(http_get(ADMIN, "/routes", ns=b)[2])["routes"][0]
            return route if route["bytes_up"] >= 100_000 else None
        route = wait_until(route_counted, timeout=10, what=lambda: f"/routes never counted the upload:\n{d.describe()}")
        assert route["mode"] == "connect"
        assert route["connections"] == 41  # 39 PINGs and the upload, counted by the kernel; the failed connect
        metrics = http_get(ADMIN, "/metrics", ns=b)[2].decode()
        up = next(float(x.split()[-1]) for x in metrics.splitlines()
                  if x.startswith('ambassadord_bytes_total{direction="up",route="6379"}')
                  or x.startswith('ambassadord_bytes_total{route="6379",direction="up"}'))
        assert up >= 100_000
        dead = next(x for x in route["backends"] if x["name"] == f"10.77.0.1:{DEAD_PORT}")
        assert dead["failures"] == failed
    finally:
        assert d.stop() == 0
    assert attached(cg) == ""


def test_a_route_cannot_start_without_privilege_or_cgroup(world, tmp_path):
    not_cgroup = tmp_path / "plain"
    not_cgroup.mkdir()
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{world['b'].name}", "--", sys.executable, "-m", "ambassadord", "run",
         "--map", f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}", "--mode", "connect", "--cgroup", str(not_cgroup),
         "--listen", "127.0.0.1:10000", "--admin", "off"],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 1
    assert f"connect mode: --cgroup {not_cgroup}: {not_cgroup} is not a cgroup v2 directory" in out.stderr


def test_a_consul_deregistration_reaches_new_connects_within_a_second(world):
    consul_binary()  # skip (or fail under CI) before starting anything
    a, b, cg = world["a"], world["b"], world["cg"]
    other = REDIS_PORT + 2
    with RedisProcess(other, host="10.77.0.1", ns=a), ConsulAgent(node="amb-cm-b", ns=b) as agent:
        for sid, port in (("r1", REDIS_PORT), ("r2", other)):
            agent.register("redis", sid, "10.77.0.1", port, ttl_check=True)
        agent.wait_for_health("redis", lambda entries: {"r1", "r2"} <= {e["Service"]["ID"] for e in entries})
        d = start(world, f"{ROUTE_PORT}=consul:///redis", extra=["--consul", agent.http_addr])
        try:
            def answered_by() -> int:
                with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
                    return served_by(s)

            seen: set[int] = set()
            wait_until(lambda: seen.add(answered_by()) or seen == {REDIS_PORT, other}, timeout=15,
                       what=lambda: f"both instances never answered (seen {seen}):\n{d.describe()}")
            since = time.monotonic()
            agent.deregister("r2")
            last_other = since
            in_a_row = 0
            while in_a_row < 30:  # 30 in a row avoid r2: it is out of the kernel's map
                assert time.monotonic() - since < 10, f"r2 still reached 10 s after its deregistration:\n{d.describe()}"
                if answered_by() == other:
                    last_other, in_a_row = time.monotonic(), 0
                else:
                    in_a_row += 1
            assert last_other - since < 1.0, f"r2 reached {last_other - since:.2f} s after its deregistration"
        finally:
            assert d.stop() == 0


def test_a_route_limited_to_the_containers_network_serves_only_them(world):
    a, b, c, cg = world["a"], world["b"], world["c"], world["cg"]
    other = REDIS_PORT + 3
    with RedisProcess(other, host="10.77.0.1", ns=a):
        d = start(world, f"{ROUTE_PORT}@172.31.77.0/24=10.77.0.1:{other}", f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}")
        try:
            def container_gets_its_route() -> bool:
                with dial(cg, c, "172.31.77.1", ROUTE_PORT) as s:
                    return served_by(s) == other
            # the namespace scan runs every second: the container's route follows within a few
            wait_until(container_gets_its_route, timeout=10, what=lambda: f"the container never got its route:\n{d.describe()}")
            for _ in range(10):
                with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:  # the host's processes keep the host-wide one
                    assert served_by(s) == REDIS_PORT
                assert container_gets_its_route()
        finally:
            assert d.stop() == 0


def test_without_the_right_to_enter_namespaces_a_source_limited_route_says_so(world):
    # util-linux's setpriv (always there): the daemon keeps CAP_BPF and CAP_NET_ADMIN, not CAP_SYS_ADMIN
    b = world["b"]
    args = ["--map", f"{ROUTE_PORT}@172.31.77.0/24=10.77.0.1:{REDIS_PORT}", "--mode", "connect",
            "--cgroup", world["cg"], "--listen", "127.0.0.1:10000", "--workers", "1"]
    d = Daemon(args, listen=None, workdir=world["tmp"],
               prefix=["nsenter", f"--net=/run/netns/{b.name}", "--",
                       "setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"])
    try:
        line = d.wait_for(lambda r: "may not enter" in r.get("msg", ""), timeout=10)
        assert "routes limited to a source network cover none of them" in line["msg"]
        assert "Operation not permitted" in line["msg"]
    finally:
        assert d.stop() == 0


def test_at_log_level_warning_the_kernels_counts_still_reach_routes_and_metrics(world):
    b, cg = world["b"], world["cg"]
    d = start(world, f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}", extra=["--log-level", "warning"])
    try:
        for _ in range(5):
            with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
                assert ask(s, b"PING") == b"+PONG\r\n"

        def counted():
            route = json.loads(http_get(ADMIN, "/routes", ns=b)[2])["routes"][0]
            return route if route["connections"] == 5 else None
        route = wait_until(counted, timeout=10, what=lambda: f"/routes never counted 5 connections:\n{d.describe()}")
        assert (route["bytes_up"], route["bytes_down"]) == (5 * len(b"*1\r\n$4\r\nPING\r\n"), 5 * len(b"+PONG\r\n"))
        assert d.connection_records() == []  # no connection lines at warning

        def active(n):
            route = json.loads(http_get(ADMIN, "/routes", ns=b)[2])["routes"][0]
            return route if route["active"] == n else None
        held = [dial(cg, b, "127.0.0.1", ROUTE_PORT) for _ in range(3)]  # open connections count while open
        try:
            route = wait_until(lambda: active(3), timeout=10, what="3 open connections in /routes")
            assert [x["active"] for x in route["backends"]] == [3]
            metrics = http_get(ADMIN, "/metrics", ns=b)[2].decode()
            assert 'ambassadord_connections_active{route="6379"} 3.0' in metrics
        finally:
            for s in held:
                s.close()
        wait_until(lambda: active(0), timeout=10, what="no open connection in /routes after they closed")
    finally:
        assert d.stop() == 0


def test_a_bridge_made_after_start_is_caught_within_seconds(world):
    b, c, cg = world["b"], world["c"], world["cg"]
    d = start(world, f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}")
    try:
        tag = os.getpid() % 100000
        bridge, vb, vc = f"ambnb{tag}", f"vnb{tag}", f"vnc{tag}"  # `docker network create`, as it were
        b.exec(["ip", "link", "add", bridge, "type", "bridge"])
        b.exec(["ip", "addr", "add", "172.31.88.1/24", "dev", bridge])
        b.exec(["ip", "link", "set", bridge, "up"])
        b.exec(["ip", "link", "add", vb, "type", "veth", "peer", "name", vc, "netns", c.name])
        b.exec(["ip", "link", "set", vb, "master", bridge, "up"])
        c.exec(["ip", "addr", "add", "172.31.88.2/24", "dev", vc])
        c.exec(["ip", "link", "set", vc, "up"])

        def caught() -> bool:
            with dial(cg, c, "172.31.88.1", ROUTE_PORT, timeout=2) as s:
                return served_by(s) == REDIS_PORT
        wait_until(caught, timeout=10, what=lambda: f"connects to the new bridge never rewritten:\n{d.describe()}")
        assert any("connect mode: rewriting connects to" in r.get("msg", "") and "172.31.88.1" in r["msg"]
                   for r in d.records())
    finally:
        assert d.stop() == 0


def test_a_restart_leaves_established_connections_alone(world):
    b, cg = world["b"], world["cg"]
    route = f"{ROUTE_PORT}=10.77.0.1:{REDIS_PORT}"
    d = start(world, route)
    held = [dial(cg, b, "127.0.0.1", ROUTE_PORT) for _ in range(10)]
    try:
        assert d.stop() == 0  # no proxy in their path: the daemon's exit does not touch them
        assert attached(cg) == ""
        assert [ask(s, b"PING") for s in held] == [b"+PONG\r\n"] * 10
        d = start(world, route)  # and back, under the same 10 connections
        assert [ask(s, b"PING") for s in held] == [b"+PONG\r\n"] * 10
        with dial(cg, b, "127.0.0.1", ROUTE_PORT) as s:
            assert ask(s, b"PING") == b"+PONG\r\n"
    finally:
        for s in held:
            s.close()
        if d.alive():
            assert d.stop() == 0
