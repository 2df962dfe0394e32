"""--workers N: N processes share the listen port (SO_REUSEPORT); only the main one resolves.

Real daemons, real Redis servers and a real Consul agent. Which process served a
connection is read from its log record (a helper's records carry ``worker``: its index;
the main process's have none: 0 here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest

from tests.admin_client import admin_daemon, backend, cli, get_routes, http_get, route
from tests.consul import ConsulAgent
from tests.daemon import Daemon, RedisProcess, connect, free_port, ping, wait_until
from tests.worker_processes import alive, helpers_of, worker_of

PONG = b"+PONG\r\n"


def served(daemon: Daemon, port: int) -> list[dict]:
    return [r for r in daemon.connection_records() if r["port"] == port]


def ping_once(port: int) -> None:
    with contextlib.closing(connect("127.0.0.1", port)) as c:
        assert ping(c) == PONG


@pytest.fixture
def two_redis(tmp_path):
    with RedisProcess(free_port(), workdir=tmp_path) as a, RedisProcess(free_port(), workdir=tmp_path) as b:
        yield a, b


def test_connections_are_spread_over_every_process(redis, tmp_path):
    port, admin = free_port(), free_port()
    with (admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                                          "--workers", "3"], admin, tmp_path)) as d:
        wait_until(lambda: len(helpers_of(d.proc.pid)) == 2, timeout=10, what=d.describe)
        for _ in range(60):
            ping_once(port)
        wait_until(lambda: len(served(d, port)) == 60, timeout=10, what=d.describe)
        by_worker = {worker_of(r) for r in served(d, port)}
        # SO_REUSEPORT hashes each connection's addresses: 60 connections miss one of three
        # processes with a probability of about 3 * (2/3)**60, 1e-10.
        assert by_worker == {0, 1, 2}, by_worker
        assert all(r["outcome"] == "ok" for r in served(d, port))

        # The admin API sums every process's counters.
        snap = get_routes(admin)
        assert snap["workers"]["count"] == 3 and snap["workers"]["answered"] == 3, snap["workers"]
        assert set(snap["workers"]["pids"]) == {d.proc.pid, *helpers_of(d.proc.pid)}
        view = route(snap, str(port))
        assert view["connections"] == 60 and view["outcomes"] == {"ok": 60}, view
        assert view["bytes_up"] == 60 * len(b"PING\r\n") and view["bytes_down"] == 60 * len(PONG), view
        assert backend(view, f"127.0.0.1:{redis.port}")["connections"] == 60
        _, _, body = http_get(admin, "/metrics")
        assert f'ambassadord_connections_total{{outcome="ok",route="{port}"}} 60.0'.encode() in body, body[:2000]
        assert b'ambassadord_workers{state="answered"} 3.0' in body

        # Open connections count where they are, wherever they are.
        clients = [connect("127.0.0.1", port) for _ in range(12)]
        try:
            for c in clients:
                assert ping(c) == PONG
            view = route(get_routes(admin), str(port))
            assert view["active"] == 12 and view["connections"] == 72, view
        finally:
            for c in clients:
                c.close()
        d.stop()


def test_one_watch_per_route_and_every_process_follows_it(redis, tmp_path):
    """Only the main process talks to Consul; a registration change reaches every process."""
    port, admin = free_port(), free_port()
    with ConsulAgent(node="amb-workers") as agent, RedisProcess(free_port(), workdir=tmp_path) as other:
        agent.register("cache", "cache-1", "127.0.0.1", redis.port)
        d = admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=consul://{agent.http_addr}/cache",
                          "--workers", "3"], admin, tmp_path)
        try:
            wait_until(lambda: route(get_routes(admin), str(port))["resolved"], timeout=10, what=d.describe)
            helpers = helpers_of(d.proc.pid)
            assert len(helpers) == 2

            def talking_to_consul() -> set[int]:
                out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{agent.http_port}"],
                                     capture_output=True, text=True, check=True).stdout
                return {int(p.split("=")[1]) for p in out.replace(",", " ").replace(")", " ").split() if p.startswith("pid=")}

            # The watch is a blocking query, so the main process holds a connection to the agent.
            pids = wait_until(talking_to_consul, timeout=10, what=d.describe)
            assert pids == {d.proc.pid}, (pids, d.proc.pid, helpers)

            agent.register("cache", "cache-2", "127.0.0.1", other.port)
            agent.deregister("cache-1")
            wait_until(lambda: [b["name"] for b in route(get_routes(admin), str(port))["backends"]
                                if b["in_set"]] == [f"127.0.0.1:{other.port}"], timeout=10, what=d.describe)
            before = len(served(d, port))
            for _ in range(45):
                ping_once(port)
            wait_until(lambda: len(served(d, port)) == before + 45, timeout=10, what=d.describe)
            recs = served(d, port)[before:]
            assert {r["backend"] for r in recs} == {f"127.0.0.1:{other.port}"}, recs
            assert {worker_of(r) for r in recs} == {0, 1, 2}
            assert talking_to_consul() == {d.proc.pid}
            d.stop()
        finally:
            d.kill()


def test_a_backend_that_fails_in_one_process_is_ejected_in_all(redis, tmp_path):
    port, admin, dead = free_port(), free_port(), free_port()
    d = admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{dead},127.0.0.1:{redis.port}",
                      "--eject-for", "60", "--workers", "3"], admin, tmp_path)
    try:
        for _ in range(60):
            ping_once(port)
        wait_until(lambda: len(served(d, port)) == 60, timeout=10, what=d.describe)
        assert {worker_of(r) for r in served(d, port)} == {0, 1, 2}
        failed = [r for r in d.records() if r.get("event") == "backend-failed"]
        # Random order: each process alone would try the dead backend first about every
        # other connection until it fails there itself, so three processes that did not
        # share ejections fail three times (all but surely). Shared, it is once; twice if a
        # connection reached another process before the news did (a race of microseconds).
        assert len(failed) < 3, failed
        view = route(get_routes(admin), str(port))
        assert backend(view, f"127.0.0.1:{dead}")["state"] == "ejected", view
        d.stop()
    finally:
        d.kill()


def test_a_reload_reaches_every_process(two_redis, tmp_path):
    a, b = two_redis
    p1, p2, admin = free_port(), free_port(), free_port()
    config = tmp_path / "routes.toml"
    config.write_text(f'[routes]\n{p1} = "127.0.0.1:{a.port}"\n')
    d = admin_daemon(["--listen", f"127.0.0.1:{p1}", "--listen", f"127.0.0.1:{p2}", "--config", str(config),
                      "--config-poll", "0.1", "--workers", "2"], admin, tmp_path)
    try:
        config.write_text(f'[routes]\n{p1} = "127.0.0.1:{a.port}"\n{p2} = "127.0.0.1:{b.port}"\n')
        wait_until(lambda: get_routes(admin)["config"]["reloads"] == 1, timeout=10, what=d.describe)
        for _ in range(40):
            ping_once(p2)
        wait_until(lambda: len(served(d, p2)) == 40, timeout=10, what=d.describe)
        recs = served(d, p2)
        assert {r["outcome"] for r in recs} == {"ok"}, recs
        assert {r["backend"] for r in recs} == {f"127.0.0.1:{b.port}"}
        assert {worker_of(r) for r in recs} == {0, 1}
        d.stop()
    finally:
        d.kill()


def test_a_helper_that_dies_is_restarted(redis, tmp_path):
    port, admin = free_port(), free_port()
    d = admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}", "--workers", "2"],
                     admin, tmp_path)
    try:
        (first,) = helpers_of(d.proc.pid)
        os.kill(first, signal.SIGKILL)
        d.wait_for(lambda r: r.get("event") == "worker-exit", timeout=10)
        assert "worker 1 (pid %d) was killed by SIGKILL; restarting it" % first in d.text()

        def replaced():
            pids = helpers_of(d.proc.pid)
            return pids if pids and pids != [first] and get_routes(admin)["workers"]["answered"] == 2 else None

        (second,) = wait_until(replaced, timeout=15, what=d.describe)
        assert get_routes(admin)["workers"]["restarts"] == 1
        for _ in range(30):
            ping_once(port)
        wait_until(lambda: len(served(d, port)) == 30, timeout=10, what=d.describe)
        assert {worker_of(r) for r in served(d, port)} == {0, 1}
        d.stop()
        assert not alive(second)
    finally:
        d.kill()


def test_sigterm_lets_every_process_finish_its_connections(redis, tmp_path):
    port = free_port()
    d = Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}", "--workers", "2",
                "--grace", "20"], listen=None, workdir=tmp_path)
    try:
        helper = helpers_of(d.proc.pid)[0]
        # Connections until each process holds one open.
        clients, where = [], {}
        while set(where.values()) != {0, 1}:
            assert len(clients) < 50, where
            c = connect("127.0.0.1", port)
            assert ping(c) == PONG
            clients.append(c)
            where = _open_by_worker(d, port, clients)
        d.signal(signal.SIGTERM)
        wait_until(lambda: _refused(port), timeout=10, what=d.describe)
        for c in clients:  # still served both ways, in both processes
            assert ping(c) == PONG
        assert d.alive() and alive(helper)
        for c in clients:
            c.close()
        assert d.wait_exit(10) == 0, d.describe()
        wait_until(lambda: not alive(helper), timeout=5, what=d.describe)
        assert {r["outcome"] for r in served(d, port)} == {"ok"}
    finally:
        d.kill()


def _refused(port: int) -> bool:
    try:
        connect("127.0.0.1", port, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _open_by_worker(d: Daemon, port: int, clients) -> dict:
    """Which process serves each open client: the log has no line until a connection
    closes, so ask each process for its open connections' sources via /proc."""
    out = {}
    procs = [d.proc.pid, *helpers_of(d.proc.pid)]
    for index, pid in enumerate(procs):
        ss = subprocess.run(["ss", "-Htnp", "state", "established", "src", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, check=True).stdout
        for line in ss.splitlines():
            if f"pid={pid}," in line:
                peer = line.split()[3]
                for i, c in enumerate(clients):
                    if peer == "127.0.0.1:%d" % c.getsockname()[1]:
                        out[i] = 0 if index == 0 else 1
    return out


def test_a_second_daemon_on_the_same_port_fails(redis, tmp_path):
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"]
    with (Daemon([*args, "--workers", "2"], listen=("127.0.0.1", port), workdir=tmp_path)) as d:
        again = cli("run", *args, "--workers", "2", "--admin", "off", timeout=20)
        assert again.returncode == 1, again
        assert f"cannot listen on port {port}: another ambassadord --workers is serving it" in again.stderr
        single = cli("run", *args, "--workers", "1", "--admin", "off", timeout=20)
        assert single.returncode == 1, single
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in single.stderr
        ping_once(port)
        d.stop()


def test_helpers_stop_when_the_main_process_is_killed(redis, tmp_path):
    port = free_port()
    d = Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}", "--workers", "3"],
               listen=("127.0.0.1", port), workdir=tmp_path)
    try:
        # Ready may mean the first helper's "listening on" line: the second may still be starting.
        wait_until(lambda: len(helpers_of(d.proc.pid)) == 2, timeout=10, what=d.describe)
        helpers = helpers_of(d.proc.pid)
        d.proc.kill()
        d.proc.wait(5)
        wait_until(lambda: not any(alive(p) for p in helpers), timeout=10, what=d.describe)
    finally:
        d.kill()


@pytest.mark.parametrize("value, message", [
    ("0", "'0': expected auto or a whole number from 1 to 256"),
    ("many", "'many': expected auto or a whole number from 1 to 256"),
    ("300", "'300': expected auto or a whole number from 1 to 256"),
])
def test_bad_workers_flag(value, message):
    proc = cli("run", "--map", "6379=127.0.0.1:6379", "--workers", value)
    assert proc.returncode == 2, proc
    assert f"--workers: {message}" in proc.stderr, proc.stderr


def test_workers_auto_is_one_per_core(redis, tmp_path):
    port = free_port()
    with (Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"],
                                   listen=("127.0.0.1", port), workdir=tmp_path)) as d:
        wait_until(lambda: len(helpers_of(d.proc.pid)) == len(os.sched_getaffinity(0)) - 1, timeout=10,
                   what=d.describe)
        d.stop()


# ---- --workers auto under a CPU quota (pure: files made here) ----------------------------


def _cgroup(tmp_path, path: str, limits: dict[str, str]):
    for where, value in limits.items():
        d = tmp_path / "fs" / where.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    (tmp_path / "cgroup").write_text(f"4:memory:/x\n0::{path}\n")
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("limits, expected", [
    ({}, None),
    ({"/a/b": "max 100000"}, None),
    ({"/a/b": "150000 100000"}, 2),  # 1.5 CPUs: 2 workers
    ({"/a/b": "100000 100000", "/a": "max 100000"}, 1),
    ({"/a/b": "400000 100000", "/a": "200000 100000"}, 2),  # a parent's limit is lower
    ({"/a/b": "garbage"}, None),
])
def test_auto_is_capped_by_the_cgroup_cpu_quota(tmp_path, limits, expected):
    from ambassadord.workers.count import _cgroup_cpus, default_count

    root, proc = _cgroup(tmp_path, "/a/b", limits)
    assert _cgroup_cpus(root, proc) == expected
    cores = len(os.sched_getaffinity(0))
    assert default_count(root, proc) == min(cores, expected or cores)


def test_auto_without_cgroup_v2_is_the_affinity(tmp_path):
    from ambassadord.workers.count import default_count

    (tmp_path / "cgroup").write_text("4:memory:/x\n")
    assert default_count(str(tmp_path), str(tmp_path / "cgroup")) == len(os.sched_getaffinity(0))
    assert default_count(str(tmp_path), str(tmp_path / "missing")) == len(os.sched_getaffinity(0))


def test_a_reload_is_over_only_when_every_process_serves_the_new_table(two_redis, tmp_path):
    """The log line "reloaded" (and READY=1) come once every helper confirmed the table:
    from then on no connection reaches the old backend, in any process. A helper that
    cannot confirm (stopped here) holds the reload up to 5 s, and is named."""
    a, b = two_redis
    port = free_port()
    config = tmp_path / "routes.toml"
    config.write_text(f'[routes]\n{port} = "127.0.0.1:{a.port}"\n')
    d = Daemon(["--listen", f"127.0.0.1:{port}", "--config", str(config), "--config-poll", "0", "--workers", "3"],
               listen=("127.0.0.1", port), workdir=tmp_path)

    def reloads() -> list[dict]:
        return [r for r in d._records_so_far() if r.get("event") == "reload"]

    try:
        for round_, new in enumerate([b, a], 1):
            config.write_text(f'[routes]\n{port} = "127.0.0.1:{new.port}"\n')
            d.signal(signal.SIGHUP)
            wait_until(lambda n=round_: len(reloads()) == n, timeout=10, what=d.describe)
            assert reloads()[-1]["ok"], reloads()
            before = len(served(d, port))
            for _ in range(30):
                ping_once(port)
            wait_until(lambda n=before + 30: len(served(d, port)) >= n, timeout=10, what=d.describe)
            recs = served(d, port)[before:]
            assert {r["backend"] for r in recs} == {f"127.0.0.1:{new.port}"}, (round_, recs)

        late = helpers_of(d.proc.pid)[0]
        os.kill(late, signal.SIGSTOP)
        try:
            config.write_text(f'[routes]\n{port} = "127.0.0.1:{b.port}"\n')
            d.signal(signal.SIGHUP)
            wait_until(lambda: len(reloads()) == 3, timeout=15, what=d.describe)
        finally:
            os.kill(late, signal.SIGCONT)
        lines = d.lines()
        warned = next(i for i, line in enumerate(lines) if "did not confirm the new routes within 5s" in line)
        reloaded = max(i for i, line in enumerate(lines) if '"event": "reload"' in line)
        assert warned < reloaded, lines[-10:]
        d.stop()
    finally:
        d.kill()
