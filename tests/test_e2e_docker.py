"""``run --docker``: routes that consumer containers declare for themselves, with a real
Docker engine (tests/docker_engine.py) and real containers.

The engine's namespace is host B: the daemon runs there (as ``--net=host`` would put it),
with ``--iptables`` and ``--docker`` pointed at the engine's socket. Host A is another
namespace, linked to B by a veth, with the Redis servers the consumers want. Consumers are
containers of the locally made tools image on the engine's bridge; they dial the bridge's
gateway, ``172.17.0.1``, and the service's usual port, as README says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import docker_engine as engines
from tests import netns
from tests.admin_client import get_routes
from tests.daemon import Daemon, RedisProcess, wait_until
from tests.docker_images import TOOLS_IMAGE
from tests.netns import link, namespaces

ENGINE_SIDE, HOST_A = "10.254.1.1", "10.254.1.2"
ADMIN = 10001


@pytest.fixture(autouse=True)
def prerequisites():
    netns.require_prerequisites()
    engines.require_prerequisites()


@pytest.fixture(scope="module")
def host_a(docker_engine, tmp_path_factory):
    """Host A: two Redis servers (6379 and 6380), reachable from host B only."""
    workdir = tmp_path_factory.mktemp("host-a")
    with namespaces("dka") as (a,):
        link(docker_engine.ns, [f"{ENGINE_SIDE}/24"], a, [f"{HOST_A}/24"], tag="dka")
        with RedisProcess(6379, host=HOST_A, ns=a, workdir=workdir), \
                RedisProcess(6380, host=HOST_A, ns=a, workdir=workdir):
            yield a


@pytest.fixture(scope="module")
def gateway(docker_engine) -> str:
    out = docker_engine.docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}").strip()
    return out or "172.17.0.1"


def ambassadord(engine, *args: str, docker: str | None = None, tmp_path: Path) -> Daemon:
    """The daemon on host B, following ``engine`` (or the API at ``docker``)."""
    d = Daemon(["--iptables", "--docker", docker or engine.host, "--listen", "0.0.0.0:10000",
                "--admin", f"127.0.0.1:{ADMIN}", *args], ns=engine.ns, workdir=tmp_path)
    d.wait_for(lambda r: "docker:" in r.get("msg", "") and ("following" in r["msg"]
                                                                    or "lost the engine" in r["msg"]))
    return d


def redis_cli(engine, gateway: str, port: int, *command: str, options=(), timeout: int = 10) -> tuple[int, str]:
    """``redis-cli -h GATEWAY -p PORT COMMAND`` as a fresh container's first and only
    process: its very first connection. (exit status, output)."""
    proc = engine._cli("run", "--rm", *options, TOOLS_IMAGE, "timeout", str(timeout), "redis-cli",
                       "-h", gateway, "-p", str(port), *command, timeout=timeout + 30)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def served_port(out: str) -> str:
    """The port of the Redis that answered ``CONFIG GET port`` (its second line)."""
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == "port", out
    return lines[1]


def routes_of(d: Daemon) -> list[dict]:
    return get_routes(ADMIN, ns=d.ns)["routes"]


def test_a_labelled_containers_first_command_is_relayed(docker_engine, host_a, gateway, tmp_path):
    with ambassadord(docker_engine, tmp_path=tmp_path) as d:
        unrouted = get_routes(ADMIN, ns=d.ns)["connections"]["unrouted"]  # the harness's readiness probe
        results = [redis_cli(docker_engine, gateway, 6379, "ping", options=["--label", f"connect.6379={HOST_A}:6379"])
                   for _ in range(5)]
        assert results == [(0, "PONG")] * 5, f"{results}\n{d.describe()}"
        # Race-free because every port of the host's addresses is redirected from the bridge
        # (--docker-redirect all, the default), and the source is looked up in Docker.
        assert "-A AMBASSADORD-10000-IN -i docker0 -p tcp -m addrtype --dst-type LOCAL -j REDIRECT" in d.nat_rules()
        # Each was a container the daemon had never seen: looked up on its first connection
        # or known from its events, never unrouted.
        assert get_routes(ADMIN, ns=d.ns)["connections"]["unrouted"] == unrouted


def test_a_container_without_the_label_gets_no_relay(docker_engine, host_a, gateway, tmp_path):
    with docker_engine.container(TOOLS_IMAGE, "sleep", "300", options=["--label", f"connect.6379={HOST_A}:6379"]):
        with ambassadord(docker_engine, tmp_path=tmp_path) as d:
            wait_until(lambda: routes_of(d), timeout=10, what="the labelled container's route")
            status, out = redis_cli(docker_engine, gateway, 6379, "ping", timeout=5)
            assert status != 0 and "PONG" not in out, out
    # ... unless there is a host-wide route for the port.
    with ambassadord(docker_engine, "--map", f"6379={HOST_A}:6379", tmp_path=tmp_path):
        assert redis_cli(docker_engine, gateway, 6379, "ping") == (0, "PONG")


def test_backend_env_declares_a_route(docker_engine, host_a, gateway, tmp_path):
    with ambassadord(docker_engine, tmp_path=tmp_path):
        assert redis_cli(docker_engine, gateway, 6380, "ping", options=["-e", f"BACKEND_6380={HOST_A}:6379"]) == (0, "PONG")
        status, out = redis_cli(docker_engine, gateway, 6380, "ping", timeout=5)  # no env: nothing
        assert status != 0 and "PONG" not in out, out


def test_a_containers_own_route_wins_over_the_hosts(docker_engine, host_a, gateway, tmp_path):
    with ambassadord(docker_engine, "--map", f"6379={HOST_A}:6379", tmp_path=tmp_path):
        status, out = redis_cli(docker_engine, gateway, 6379, "config", "get", "port",
                                options=["--label", f"connect.6379={HOST_A}:6380"])
        assert status == 0 and served_port(out) == "6380", out
        status, out = redis_cli(docker_engine, gateway, 6379, "config", "get", "port")
        assert status == 0 and served_port(out) == "6379", out


def test_routes_follow_networks_and_stops_and_say_whose_they_are(docker_engine, host_a, tmp_path):
    # --docker-redirect declared: the redirected ports are the declared ones, and follow them.
    with ambassadord(docker_engine, "--docker-redirect", "declared", tmp_path=tmp_path) as d:
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300", name="amb-consumer",
                                     options=["--label", f"connect.6379={HOST_A}:6379"]) as box:
            short = box.id[:12]
            wait_until(lambda: [r["source"] for r in routes_of(d)] == [f"{box.ip}/32"], timeout=10,
                       what=lambda: f"one route from {box.ip}: {routes_of(d)}")
            route = routes_of(d)[0]
            assert route["container"] == f"amb-consumer ({short})"
            assert route["origin"] == f"container amb-consumer ({short}): label connect.6379"
            # The ports that containers declare are redirected from the bridges, and only there.
            nat = d.nat_rules()
            assert "-i docker0 -p tcp -m tcp --dport 6379 -m addrtype --dst-type LOCAL -j REDIRECT" in nat, nat
            assert "-A AMBASSADORD-10000 -p tcp -m tcp --dport 6379" not in nat, nat
            status = subprocess.run(["ip", "netns", "exec", d.ns.name, sys.executable, "-m", "ambassadord", "status",
                                     "--admin", f"127.0.0.1:{ADMIN}"], capture_output=True, text=True, timeout=30,
                                    cwd=str(Path(__file__).resolve().parent.parent))
            assert f"(container amb-consumer ({short}))" in status.stdout, status.stdout + status.stderr

            net = f"amb-net-{os.getpid()}"
            docker_engine.docker("network", "create", net)
            try:
                docker_engine.docker("network", "connect", net, box.id)
                second = [a for a in docker_engine.ipv4_addresses(box.id) if a != box.ip][0]
                wait_until(lambda: sorted(r["source"] for r in routes_of(d)) == sorted([f"{box.ip}/32", f"{second}/32"]),
                           timeout=10, what=lambda: f"routes from both networks: {routes_of(d)}")
                docker_engine.docker("network", "disconnect", net, box.id)
                wait_until(lambda: [r["source"] for r in routes_of(d)] == [f"{box.ip}/32"], timeout=10,
                           what=lambda: f"the second network's route gone: {routes_of(d)}")
            finally:
                docker_engine.docker("network", "rm", net, check=False)
            docker_engine.docker("stop", "-t", "0", box.id)
            wait_until(lambda: routes_of(d) == [], timeout=10, what=lambda: f"no routes after stop: {routes_of(d)}")
        # Removed: its port is no longer redirected.
        wait_until(lambda: "--dport 6379" not in d.nat_rules(), timeout=10, what=d.nat_rules)


def test_a_bad_declaration_is_logged_once_and_the_rest_works(docker_engine, host_a, gateway, tmp_path):
    with ambassadord(docker_engine, tmp_path=tmp_path) as d:
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300", name="amb-sloppy",
                                     options=["--label", "connect.6379=consul//redis",
                                              "--label", "connect.99999=x:1",
                                              "-e", f"BACKEND_6380={HOST_A}:6379"]) as box:
            wait_until(lambda: [r["port"] for r in routes_of(d)] == [6380], timeout=10,
                       what=lambda: f"the good route only: {routes_of(d)}")
            assert docker_engine.docker("exec", box.id, "timeout", "10", "redis-cli", "-h", gateway, "-p", "6380",
                                        "ping").strip() == "PONG"
            bad = [r["msg"] for r in d.records() if r.get("event") == "docker-bad-declaration"]
            assert len(bad) == 2, bad
            assert any("amb-sloppy" in m and "label connect.6379" in m for m in bad), bad
            assert any("amb-sloppy" in m and "connect.99999" in m for m in bad), bad
            docker_engine.docker("network", "connect", "host", box.id, check=False)  # an event: no new warning
            d.signal(signal.SIGHUP)  # a reload re-reads every route: no new warning either
            d.wait_for(lambda r: r.get("event") == "reload" and r.get("ok") is not None and "SIGHUP" in r["msg"])
            assert len([r for r in d.records() if r.get("event") == "docker-bad-declaration"]) == 2


def test_losing_the_engine_keeps_the_routes_and_a_reconnect_resyncs(docker_engine, host_a, gateway, tmp_path):
    # The engine's API through a proxy that the test can take away and bring back, as an
    # engine restart would (the shared engine itself keeps running).
    sock = tmp_path / "proxy.sock"

    def proxy() -> subprocess.Popen:
        p = subprocess.Popen(["socat", f"UNIX-LISTEN:{sock},fork,unlink-early",
                              f"UNIX-CONNECT:{docker_engine.host.removeprefix('unix://')}"], start_new_session=True)
        wait_until(sock.exists, timeout=5, what="the proxy's socket")
        return p

    def kill(p: subprocess.Popen) -> None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    p = proxy()
    try:
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300", options=["--label", f"connect.6379={HOST_A}:6379"]) \
                as kept, ambassadord(docker_engine, docker=f"unix://{sock}", tmp_path=tmp_path) as d:
            wait_until(lambda: len(routes_of(d)) == 1, timeout=10, what=lambda: str(routes_of(d)))
            kill(p)
            d.wait_for(lambda r: r.get("event") == "docker-lost")
            assert get_routes(ADMIN, ns=d.ns)["docker"]["connected"] is False
            # Meanwhile: the kept container's route still works, and the world changes.
            assert docker_engine.docker("exec", kept.id, "timeout", "10", "redis-cli", "-h", gateway, "ping").strip() \
                == "PONG"
            with docker_engine.container(TOOLS_IMAGE, "sleep", "300",
                                         options=["-e", f"BACKEND_6380={HOST_A}:6379"]) as new:
                docker_engine.docker("rm", "-f", kept.id)
                p = proxy()
                wait_until(lambda: [(r["port"], r["source"]) for r in routes_of(d)] == [(6380, f"{new.ip}/32")],
                           timeout=20, what=lambda: f"resynced: {routes_of(d)}")
                assert get_routes(ADMIN, ns=d.ns)["docker"]["connected"] is True
                lost = [r for r in d.records() if r.get("event") == "docker-lost"]
                assert len(lost) == 1, lost  # logged once, however many retries
    finally:
        if p.poll() is None:
            kill(p)


def test_an_unreachable_engine_at_start_is_logged_and_the_host_routes_serve(docker_engine, host_a, gateway, tmp_path):
    with ambassadord(docker_engine, "--map", f"6379={HOST_A}:6379", docker=f"unix://{tmp_path}/nothing.sock",
                     tmp_path=tmp_path) as d:
        lost = d.wait_for(lambda r: r.get("event") == "docker-lost")
        assert f"{tmp_path}/nothing.sock" in lost["msg"]
        assert redis_cli(docker_engine, gateway, 6379, "ping") == (0, "PONG")
        assert d.alive()


def test_time_to_first_route(docker_engine, host_a, gateway, tmp_path):
    """Not a timed assertion: how long a labelled container's route takes to appear after
    ``docker run -d`` returns, printed for the closing note."""
    with ambassadord(docker_engine, "--map", f"6380={HOST_A}:6379", tmp_path=tmp_path) as d:
        # A new container's first connection: by its own label (looked up in Docker when its
        # events come late) and by a host-wide route (no lookup), durations from the log.
        for _ in range(3):
            redis_cli(docker_engine, gateway, 6379, "ping", options=["--label", f"connect.6379={HOST_A}:6379"])
            redis_cli(docker_engine, gateway, 6380, "ping")
        lines = [r for r in d.connection_records() if r.get("outcome") == "ok"]
        for port, what in ((6379, "own label"), (6380, "host route")):
            ms = sorted(r["duration"] * 1000 for r in lines if r["port"] == port)
            print(f"first connection of a new container, {what}: median {ms[len(ms) // 2]:.1f} ms "
                  f"(min {ms[0]:.1f}, max {ms[-1]:.1f}, n={len(ms)})")
        took = []
        for _ in range(2):
            with docker_engine.container(TOOLS_IMAGE, "sleep", "300",
                                         options=["--label", f"connect.6379={HOST_A}:6379"]):
                t0 = time.monotonic()
                wait_until(lambda: [r for r in routes_of(d) if r["container"]], timeout=10, what="the route")
                took.append(time.monotonic() - t0)
            wait_until(lambda: not [r for r in routes_of(d) if r["container"]], timeout=10, what="no route")
        print(f"route after docker run -d returned: {', '.join(f'{t * 1000:.0f} ms' for t in took)}")


def test_what_no_route_takes_goes_where_it_was_headed(docker_engine, host_a, gateway, tmp_path):
    # --docker-redirect all takes every port of the host's addresses from the bridge: a
    # service the host itself runs stays reachable (passthrough), a closed port stays closed.
    with RedisProcess(7777, host=gateway, ns=docker_engine.ns, workdir=tmp_path), \
            ambassadord(docker_engine, tmp_path=tmp_path) as d:
        assert redis_cli(docker_engine, gateway, 7777, "config", "get", "port")[1].splitlines()[-1] == "7777"
        status, out = redis_cli(docker_engine, gateway, 7778, "ping", timeout=5)
        assert status != 0 and "PONG" not in out, out
        lines = {r["port"]: r for r in d.connection_records() if r.get("route") == "passthrough"}
        assert lines[7777]["outcome"] == "ok" and lines[7777]["backend"] == f"{gateway}:7777", lines
        assert lines[7778]["outcome"] == "all-backends-failed" and lines[7778]["level"] == "info", lines
        # The host's own processes are not redirected for ports no route has.
        assert "-A AMBASSADORD-10000 -p tcp -m tcp --dport 7777" not in d.nat_rules()


def test_helper_processes_route_a_containers_first_connection_too(docker_engine, host_a, gateway, tmp_path):
    # With --workers 3 the kernel spreads connections over three processes; two of them
    # learn of a new container by asking the first one.
    with ambassadord(docker_engine, "--workers", "3", tmp_path=tmp_path) as d:
        results = [redis_cli(docker_engine, gateway, 6379, "ping", options=["--label", f"connect.6379={HOST_A}:6379"])
                   for _ in range(8)]
        assert results == [(0, "PONG")] * 8, results
        served = [r.get("worker", 0) for r in d.connection_records() if r.get("port") == 6379]
        assert len(served) == 8 and all(r["outcome"] == "ok" for r in d.connection_records() if r.get("port") == 6379)
        assert set(served) - {0}, f"every connection went to the first process: {served}"


def test_connect_mode_balances_a_containers_own_route_in_the_kernel(docker_engine, host_a, gateway, tmp_path):
    # --mode connect: a container's declared route is a source-limited connect route; the
    # cgroup program rewrites the container's connect() to 172.17.0.1:6379 to host A, with
    # no proxy in the path. The engine's containers live under its cgroup parent.
    from ambassadord.connect.cgroup import cgroup2_mount

    cgroup = os.path.join(cgroup2_mount(), docker_engine.dir.name)  # the engine's --cgroup-parent
    os.makedirs(cgroup, exist_ok=True)  # runc makes it at the first container; the engine's teardown removes it
    d = Daemon(["--mode", "connect", "--cgroup", cgroup, "--docker", docker_engine.host, "--listen", "127.0.0.1:10000",
                "--admin", f"127.0.0.1:{ADMIN}"], listen=None, workdir=tmp_path,
               prefix=["nsenter", f"--net=/run/netns/{docker_engine.ns.name}", "--"])
    with d:
        d.ns = docker_engine.ns  # for get_routes and nat_rules: the namespace it runs in
        d.wait_for(lambda r: "docker: following" in r.get("msg", ""))
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300",
                                     options=["--label", f"connect.6379={HOST_A}:6379"]) as box:
            def pong() -> bool:
                out = docker_engine.docker("exec", box.id, "timeout", "5", "redis-cli", "-h", gateway, "ping",
                                           check=False)
                return out.strip() == "PONG"

            wait_until(pong, timeout=15, what=lambda: f"PONG through connect mode: {routes_of(d)}")
            (route,) = routes_of(d)
            assert route["mode"] == "connect" and route["container"].startswith(box.name), route
            # The connection went straight to host A: Redis saw the container's own address
            # (masqueraded by dockerd's rule as the engine's), not the daemon's.
            clients = docker_engine.docker("exec", box.id, "redis-cli", "-h", gateway, "client", "list")
            assert f"addr={ENGINE_SIDE}:" in clients, clients
            assert not [r for r in d.connection_records() if r.get("mode") != "connect"]


def test_a_restart_of_the_engine_keeps_the_routes_and_follows_it_back(docker_engine, host_a, gateway, tmp_path):
    # Last in the module: the shared engine restarts. dockerd stops its containers on the
    # way down; one with a restart policy comes back, maybe with another address.
    with docker_engine.container(TOOLS_IMAGE, "sleep", "600", name="amb-survivor",
                                 options=["--restart", "always", "--label", f"connect.6379={HOST_A}:6379"]) as box, \
            ambassadord(docker_engine, tmp_path=tmp_path) as d:
        wait_until(lambda: len(routes_of(d)) == 1, timeout=10, what=lambda: str(routes_of(d)))
        docker_engine.restart()
        lost = d.wait_for(lambda r: r.get("event") == "docker-lost")
        assert "keeping the routes of" in lost["msg"]
        d.wait_for(lambda r: "docker: reconnected" in r.get("msg", ""), timeout=30)
        ip = docker_engine.ipv4_addresses(box.id)[0]
        wait_until(lambda: [r["source"] for r in routes_of(d)] == [f"{ip}/32"], timeout=15,
                   what=lambda: f"the survivor's route after the restart: {routes_of(d)}")
        assert docker_engine.docker("exec", box.id, "timeout", "10", "redis-cli", "-h", gateway, "ping").strip() \
            == "PONG"
        assert len([r for r in d.records() if r.get("event") == "docker-lost"]) == 1
