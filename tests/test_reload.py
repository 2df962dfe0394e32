"""Reloading the routes of the real daemon: a --config file that changes, SIGHUP, bad files,
and --iptables following the ports.

Two throw-away Redis servers, A and B, each answer ``GET whoami`` with their own name, so
every connection shows which backend it reached. Without iptables the daemon routes a
connection by the port it arrived on, so the routes' ports are listen ports of the daemon
(a port with no route is closed at once). The iptables tests run the daemon, Redis and
the clients inside a fresh network namespace (tests/netns.py) and read its nat table.

The admin API (/routes, /metrics) says when a reload happened and what it did; the test
waits on that, never on a sleep. The one negative wait (``--config-poll 0`` must not
notice a change) polls for the change with a deadline and expects none.

Races with signals are made deterministic with a wrapper around ``ip6tables-restore`` put
first in the daemon's PATH (the real tool does the work): it sends the signal, or refuses,
at exactly the install the test names (see :func:`restore_wrapper`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, RedisProcess, connect, free_port, is_closed, refused, wait_until
from tests.netns import Netns
from tests.admin_client import admin_daemon, backend, get_routes, metric, route, scrape
from tests.daemon import require
from tests.redis_wire import read_bulk, read_line, resp
from tests.reload_harness import reload_records, reloading_daemon, routes_toml, write_config


# ---- helpers -----------------------------------------------------------------------


def whoami(sock: socket.socket) -> bytes:
    """GET whoami on an open Redis connection: which Redis this connection reaches."""
    sock.sendall(resp(b"GET", b"whoami"))
    reply = read_bulk(sock)
    return reply.split(b"\r\n")[1]


def who(port: int, *, ns: Netns | None = None, host: str = "127.0.0.1") -> bytes:
    """A new connection to ``host:port``: which Redis it reaches."""
    with contextlib.closing(connect(host, port, ns=ns)) as c:
        return whoami(c)


def reloads(admin: int, **kw) -> tuple[int, int]:
    cfg = get_routes(admin, **kw)["config"]
    return cfg["reloads"], cfg["reloads_failed"]


def wait_reloads(admin: int, ok: int, failed: int, daemon, **kw) -> dict:
    """Wait until the daemon has done ``ok`` good and ``failed`` rejected reloads; its /routes."""
    wait_until(lambda: reloads(admin, **kw) == (ok, failed), timeout=10,
               what=lambda: f"reloads (ok, failed) = {(ok, failed)}; now {reloads(admin, **kw)}; {daemon.describe()}")
    return get_routes(admin, **kw)


class Redis(RedisProcess):
    """redis-server whose ``whoami`` key holds its name."""

    def __init__(self, name: bytes, port: int, **kw):
        super().__init__(port, **kw)
        self.name = name
        try:
            with contextlib.closing(connect(self.host, port, ns=self.ns)) as c:
                c.sendall(resp(b"SET", b"whoami", name))
                assert read_line(c) == b"+OK\r\n"
        except BaseException:
            self.stop()
            raise

    def get(self, key: bytes) -> bytes | None:
        with contextlib.closing(connect(self.host, self.port, ns=self.ns)) as c:
            c.sendall(resp(b"GET", key))
            head = read_line(c)
            if head == b"$-1\r\n":
                return None
            n = int(head[1:-2])
            data = b""
            while len(data) < n + 2:
                data += c.recv(n + 2 - len(data))
            return data[:-2]


@pytest.fixture
def redis_a(tmp_path) -> Iterator[Redis]:
    require("redis-server")
    with Redis(b"A", free_port(), workdir=tmp_path) as r:
        yield r


@pytest.fixture
def redis_b(tmp_path) -> Iterator[Redis]:
    require("redis-server")
    with Redis(b"B", free_port(), workdir=tmp_path) as r:
        yield r


@pytest.fixture
def ports() -> list[int]:
    """Three listen ports for the daemon; routes are added to and removed from them."""
    return [free_port() for _ in range(3)]


# ---- the file changes --------------------------------------------------------------


def test_added_route_is_served_and_the_existing_one_untouched(redis_a, redis_b, ports, tmp_path):
    p1, p2, _ = ports
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: a}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1") as d:
        with contextlib.closing(connect("127.0.0.1", p2)) as c:
            assert is_closed(c, 5)  # no route yet
        held = connect("127.0.0.1", p1)
        with held:
            assert whoami(held) == b"A"
            write_config(config, routes_toml({p1: a, p2: b}))
            snap = wait_reloads(admin, 1, 0, d)
            assert snap["config"]["last_reload"]["ok"] is True
            assert snap["config"]["last_reload"]["summary"] == f"added {p2}"
            assert [r["name"] for r in snap["routes"]] == sorted([str(p1), str(p2)], key=int)
            assert route(snap, str(p1))["updates"] == 1  # the kept route was not re-resolved
            assert route(snap, str(p2))["spec"] == b
            assert who(p2) == b"B"
            assert who(p1) == b"A"
            assert whoami(held) == b"A"  # the connection opened before the reload goes on
        rec = reload_records(d)
        assert len(rec) == 1 and rec[0]["ok"] is True, rec
        assert (rec[0]["added"], rec[0]["removed"], rec[0]["changed"]) == ([str(p2)], [], [])
        assert rec[0]["msg"] == f"reloaded ({config} changed): added {p2}"
        m = scrape(admin)
        assert metric(m, "ambassadord_config_reloads_total", result="ok") == 1
        assert metric(m, "ambassadord_routes") == 2
        d.stop()


def test_removed_route_is_no_longer_served_and_others_keep_working(redis_a, redis_b, ports, tmp_path):
    p1, p2, _ = ports
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: a, p2: b}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1") as d:
        held = connect("127.0.0.1", p2)
        with held:
            assert whoami(held) == b"B"
            write_config(config, routes_toml({p1: a}))
            snap = wait_reloads(admin, 1, 0, d)
            assert snap["config"]["last_reload"]["summary"] == f"removed {p2}"
            assert [r["name"] for r in snap["routes"]] == [str(p1)]
            with contextlib.closing(connect("127.0.0.1", p2)) as c:
                assert is_closed(c, 5)
            wait_until(lambda: get_routes(admin)["connections"]["unrouted"] == {"no-route": 1}, timeout=5,
                       what=d.describe)
            assert who(p1) == b"A"
            assert whoami(held) == b"B"  # established on the removed route: goes on
        d.stop()


def test_changed_backend_new_connections_move_open_ones_stay(redis_a, redis_b, ports, tmp_path):
    p1 = ports[0]
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: a}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1") as d:
        assert who(p1) == b"A"
        held = connect("127.0.0.1", p1)
        with held:
            assert whoami(held) == b"A"
            write_config(config, routes_toml({p1: b}))
            snap = wait_reloads(admin, 1, 0, d)
            assert snap["config"]["last_reload"]["summary"] == f"changed {p1}"
            assert who(p1) == b"B"
            assert who(p1) == b"B"
            # The connection opened before the reload still talks to A: read and write.
            assert whoami(held) == b"A"
            held.sendall(resp(b"SET", b"written-after-reload", b"yes"))
            assert read_line(held) == b"+OK\r\n"
            assert redis_a.get(b"written-after-reload") == b"yes"
            assert redis_b.get(b"written-after-reload") is None
            # /routes: the new backend, and the old one still open on the connection.
            view = route(get_routes(admin), str(p1))
            assert view["spec"] == b
            assert backend(view, b)["state"] == "up" and backend(view, b)["in_set"] is True
            old = backend(view, a)
            assert (old["state"], old["in_set"], old["active"]) == ("gone", False, 1), old
            assert view["active"] == 1
            # Counters are the route's, kept across the change: 1 before, 2 after, 1 open.
            wait_until(lambda: route(get_routes(admin), str(p1))["outcomes"] == {"ok": 3}, timeout=5,
                       what=d.describe)
            assert route(get_routes(admin), str(p1))["connections"] == 4
        wait_until(lambda: route(get_routes(admin), str(p1))["outcomes"] == {"ok": 4}, timeout=5, what=d.describe)
        view = route(get_routes(admin), str(p1))
        assert [x["name"] for x in view["backends"]] == [b]  # the old backend, closed, leaves the view
        d.stop()


def backend_series(samples, backend_name: str) -> list:
    return sorted(k for k in samples if ("backend", backend_name) in k[1])


def test_gone_backend_series_go_away_once_its_last_connection_closes(redis_a, redis_b, ports, tmp_path):
    p1 = ports[0]
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: a}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1") as d:
        with contextlib.closing(connect("127.0.0.1", p1)) as held:
            assert whoami(held) == b"A"
            write_config(config, routes_toml({p1: b}))
            wait_reloads(admin, 1, 0, d)
            assert who(p1) == b"B"
            m = scrape(admin)
            assert metric(m, "ambassadord_backend_connections_active", route=str(p1), backend=a) == 1
        wait_until(lambda: route(get_routes(admin), str(p1))["outcomes"] == {"ok": 2}, timeout=5, what=d.describe)
        assert [x["name"] for x in route(get_routes(admin), str(p1))["backends"]] == [b]  # /routes: gone
        assert backend_series(scrape(admin), a) == [], "series of a backend that left the set, nothing open"
        d.stop()


def test_configmap_style_symlink_swap_is_a_change(redis_a, redis_b, ports, tmp_path):
    """A Kubernetes ConfigMap volume: routes.toml -> ..data/routes.toml, and an update swaps
    the ..data symlink to a new directory at once."""
    p1 = ports[0]
    volume, admin = tmp_path / "configmap", free_port()
    (volume / "..2026_01").mkdir(parents=True)
    (volume / "..2026_01" / "routes.toml").write_text(routes_toml({p1: f"127.0.0.1:{redis_a.port}"}))
    (volume / "..data").symlink_to("..2026_01")
    (volume / "routes.toml").symlink_to("..data/routes.toml")
    with reloading_daemon(volume / "routes.toml", ports, admin, tmp_path, "--config-poll", "0.1") as d:
        assert who(p1) == b"A"
        (volume / "..2026_02").mkdir()
        (volume / "..2026_02" / "routes.toml").write_text(routes_toml({p1: f"127.0.0.1:{redis_b.port}"}))
        (volume / "..data_tmp").symlink_to("..2026_02")
        os.replace(volume / "..data_tmp", volume / "..data")
        shutil.rmtree(volume / "..2026_01")
        snap = wait_reloads(admin, 1, 0, d)
        assert snap["config"]["last_reload"]["summary"] == f"changed {p1}"
        assert who(p1) == b"B"
        d.stop()


def test_map_flags_stay_across_reloads_and_clash_with_the_file(redis_a, redis_b, ports, tmp_path):
    p1, p2, _ = ports
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: a}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1", "--map", f"{p2}={b}") as d:
        assert (who(p1), who(p2)) == (b"A", b"B")
        write_config(config, routes_toml({p1: b}))
        snap = wait_reloads(admin, 1, 0, d)
        assert snap["config"]["last_reload"]["summary"] == f"changed {p1}"  # the --map route: kept
        assert route(snap, str(p2))["origin"] == f"--map {p2}={b}"
        assert (who(p1), who(p2)) == (b"B", b"B")
        # The file may not take a port that --map has.
        write_config(config, routes_toml({p1: b, p2: a}))
        snap = wait_reloads(admin, 1, 1, d)
        error = snap["config"]["last_reload"]["error"]
        assert f"port {p2} is mapped twice" in error and f"{config}:3: [routes] {p2}" in error \
            and f"--map {p2}={b}" in error, error
        assert (who(p1), who(p2)) == (b"B", b"B")
        d.stop()


# ---- bad files ---------------------------------------------------------------------


def test_bad_configs_are_rejected_and_the_old_routes_keep_serving(redis_a, redis_b, ports, tmp_path):
    p1 = ports[0]
    a, b = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}"
    config, admin = tmp_path / "routes.toml", free_port()
    head = "# routes for the reload test\n"
    write_config(config, routes_toml({p1: a}, head=head))
    path = str(config)
    # (what, new file content or None to delete it, substrings of the error)
    bad = [
        ("invalid TOML", f'{head}[routes]\n{p1} = "{a}\n', [f"{path}: not valid TOML", "line 3"]),
        ("bad spec", f'{head}[routes]\n{p1} = "10.0.0.5"\n', [f"{path}:3: [routes] {p1}", "10.0.0.5"]),
        ("bad port", f'{head}[routes]\n{p1} = "{a}"\n99999 = "{a}"\n', [f"{path}:4: [routes] 99999", "99999"]),
        ("unknown option", f'{head}[routes]\n{p1} = {{ backend = "{a}", bogus = 1 }}\n',
         [f"{path}:3: [routes] {p1}", "bogus"]),
        ("empty [routes]", f"{head}[routes]\n", ["no routes"]),
        ("file deleted", None, [f"cannot read config file {path}", "No such file or directory"]),
    ]
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1") as d:
        good = 0
        serving = b"A"
        for failed, (what, text, needles) in enumerate(bad, 1):
            if text is None:
                config.unlink()
            else:
                write_config(config, text)
            snap = wait_reloads(admin, good, failed, d)
            last = snap["config"]["last_reload"]
            assert last["ok"] is False and last["summary"] is None, (what, last)
            for needle in needles:
                assert needle in last["error"], (what, needle, last["error"])
            # The error is logged, with the file (it is in the reason for the reload, too).
            rec = [r for r in reload_records(d) if r["ok"] is False]
            assert len(rec) == failed, (what, rec)
            assert rec[-1]["level"] == "error" and rec[-1]["error"] == last["error"], (what, rec[-1])
            assert path in rec[-1]["msg"] and "still serving the previous configuration" in rec[-1]["msg"], rec[-1]
            # The old routes keep serving, unchanged.
            assert who(p1) == serving, what
            assert route(snap, str(p1))["spec"] == (a if serving == b"A" else b), what
            m = scrape(admin)
            assert metric(m, "ambassadord_config_reloads_total", result="error") == failed, what
            assert metric(m, "ambassadord_config_reloads_total", result="ok") == good, what
            assert metric(m, "ambassadord_config_last_reload_successful") == 0, what
            assert metric(m, "ambassadord_routes") == 1, what

            # A good file is accepted again (alternating A and B, so that it shows).
            serving = b"B" if serving == b"A" else b"A"
            good += 1
            write_config(config, routes_toml({p1: b if serving == b"B" else a}, head=head))
            snap = wait_reloads(admin, good, failed, d)
            last = snap["config"]["last_reload"]
            assert (last["ok"], last["error"], last["summary"]) == (True, None, f"changed {p1}"), (what, last)
            assert who(p1) == serving, what
            assert metric(scrape(admin), "ambassadord_config_last_reload_successful") == 1, what
        assert d.alive()
        d.stop()


def test_sighup_without_a_change_drops_nothing(redis_a, ports, tmp_path):
    p1 = ports[0]
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: f"127.0.0.1:{redis_a.port}"}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0") as d:
        held = connect("127.0.0.1", p1)
        with held:
            assert whoami(held) == b"A"
            d.signal(signal.SIGHUP)
            snap = wait_reloads(admin, 1, 0, d)
            assert snap["config"]["last_reload"]["summary"] == "no route changed"
            rec = reload_records(d)
            assert [r["msg"] for r in rec] == ["reloaded (SIGHUP): no route changed"]
            assert (rec[0]["added"], rec[0]["removed"], rec[0]["changed"]) == ([], [], [])
            view = route(snap, str(p1))
            assert view["updates"] == 1 and view["active"] == 1, view  # same route, same resolver
            assert snap["connections"]["active"] == 1
            assert whoami(held) == b"A"
            assert who(p1) == b"A"
        assert not [r for r in d._records_so_far() if r.get("event") == "connection" and r["outcome"] != "ok"]
        d.stop()


def test_kept_route_keeps_ejection_and_round_robin_position(redis_a, redis_b, ports, tmp_path):
    p1, p2, p3 = ports
    a, b, dead = f"127.0.0.1:{redis_a.port}", f"127.0.0.1:{redis_b.port}", f"127.0.0.1:{free_port()}"
    config, admin = tmp_path / "routes.toml", free_port()
    routes = {
        p1: f'{{ backend = "{dead},{a}", eject_for = 60 }}',
        p2: f'{{ backend = "{a},{b}", balance = "round-robin" }}',
        p3: a,
    }
    write_config(config, routes_toml(routes))
    # --workers 1: the round-robin position is per process.
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0.1", "--workers", "1") as d:
        # p1: connect until the dead backend has been tried (random order) and ejected.
        def dead_ejected() -> bool:
            assert who(p1) == b"A"
            return backend(route(get_routes(admin), str(p1)), dead)["state"] == "ejected"

        wait_until(dead_ejected, timeout=20, what=d.describe)
        before = backend(route(get_routes(admin), str(p1)), dead)
        # p2: round-robin from the first backend: A, B, A; B is next.
        assert [who(p2) for _ in range(3)] == [b"A", b"B", b"A"]

        # Change only p3, and move every line down by one (so every route's origin moves).
        write_config(config, routes_toml({**routes, p3: b}, head="# moved down a line\n"))
        snap = wait_reloads(admin, 1, 0, d)
        assert snap["config"]["last_reload"]["summary"] == f"changed {p3}"
        view = route(snap, str(p1))
        assert view["origin"] == f"{config}:3: [routes] {p1}"  # where it is read now ...
        after = backend(view, dead)
        # ... but the same route: still ejected (not reset to "up", nor to a fresh 60 s) ...
        assert after["state"] == "ejected", after
        assert after["failures"] == before["failures"] and after["last_failure"] == before["last_failure"]
        assert 0 < after["ejected_for"] <= before["ejected_for"], (before, after)
        assert view["updates"] == 1
        # ... and p2 goes on where it was.
        assert [who(p2) for _ in range(2)] == [b"B", b"A"]
        assert who(p3) == b"B"
        d.stop()


def test_config_poll_0_waits_for_sighup(redis_a, redis_b, ports, tmp_path):
    p1 = ports[0]
    config, admin = tmp_path / "routes.toml", free_port()
    write_config(config, routes_toml({p1: f"127.0.0.1:{redis_a.port}"}))
    with reloading_daemon(config, ports, admin, tmp_path, "--config-poll", "0") as d:
        write_config(config, routes_toml({p1: f"127.0.0.1:{redis_b.port}"}))
        # The default poll (1 s, plus a settle look) would have seen it well within 2.5 s.
        with pytest.raises(TimeoutError):
            wait_until(lambda: reloads(admin) != (0, 0) or who(p1) != b"A", timeout=2.5, what="no reload")
        assert who(p1) == b"A"
        d.signal(signal.SIGHUP)
        snap = wait_reloads(admin, 1, 0, d)
        assert snap["config"]["last_reload"]["summary"] == f"changed {p1}"
        assert who(p1) == b"B"
        d.stop()


# ---- iptables follows the ports ------------------------------------------------------

CHAIN = "AMBASSADORD-10000"
_REDIRECT = re.compile(rf"^-A {CHAIN} -p tcp -m tcp --dport (\d+) -m addrtype --dst-type LOCAL "
                       r"-j REDIRECT --to-ports 10000$")


def redirected_ports(ns: Netns, tool: str) -> set[int]:
    """The ports the daemon's chain redirects, from ``iptables-save -t nat`` in ``ns``."""
    ports = set()
    for line in ns.exec([tool, "-t", "nat"]).splitlines():
        m = _REDIRECT.match(line)
        if m:
            ports.add(int(m.group(1)))
        elif (line.startswith("-A " + CHAIN + " ") and "RETURN" not in line
              and line != f"-A {CHAIN} -p tcp -m mark --mark 0x1a3b -j REDIRECT --to-ports 10000"):  # the anchor
            raise AssertionError(f"unexpected rule in {CHAIN}: {line}")
    return ports


def nat_dump(ns: Netns) -> list[str]:
    """Both nat tables, without comments and counters: comparable before and after."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in ns.exec([tool, "-t", "nat"]).splitlines():
            if not line.startswith("#"):
                out.append(re.sub(r"\[\d+:\d+\]", "", line).strip())
    return out


def assert_redirects(ns: Netns, ports: set[int]) -> None:
    for tool in ("iptables-save", "ip6tables-save"):
        assert redirected_ports(ns, tool) == ports, tool


BACKEND_PORT = 7000  # Redis in the namespace; route ports 6379, 6380 point at it


@pytest.mark.netns
def test_iptables_rules_follow_added_and_removed_ports(ns, tmp_path):
    with Redis(b"ns-redis", BACKEND_PORT, ns=ns, workdir=tmp_path):
        backend_addr = f"127.0.0.1:{BACKEND_PORT}"
        baseline = nat_dump(ns)
        config = tmp_path / "routes.toml"
        write_config(config, routes_toml({6379: backend_addr}))
        with admin_daemon(["--iptables", "--config", str(config), "--config-poll", "0.1"], 10001, tmp_path,
                          ns=ns) as d:
            assert_redirects(ns, {6379})
            assert who(6379, ns=ns) == b"ns-redis"
            assert who(6379, ns=ns, host="::1") == b"ns-redis"
            assert refused("127.0.0.1", 6380, ns=ns)

            # Add 6380: redirected (both families) and served.
            write_config(config, routes_toml({6379: backend_addr, 6380: backend_addr}))
            snap = wait_reloads(10001, 1, 0, d, ns=ns)
            assert snap["config"]["last_reload"]["summary"] == "added 6380"
            assert_redirects(ns, {6379, 6380})
            assert who(6380, ns=ns) == b"ns-redis"
            assert who(6380, ns=ns, host="::1") == b"ns-redis"

            # A bad file changes nothing, rules included.
            write_config(config, routes_toml({6379: backend_addr, 6381: "10.0.0.5"}))
            wait_reloads(10001, 1, 1, d, ns=ns)
            assert_redirects(ns, {6379, 6380})
            assert refused("127.0.0.1", 6381, ns=ns)

            # Remove 6379: its REDIRECT goes; an established connection on it goes on.
            held = connect("127.0.0.1", 6379, ns=ns)
            with held:
                assert whoami(held) == b"ns-redis"
                write_config(config, routes_toml({6380: backend_addr}))
                snap = wait_reloads(10001, 2, 1, d, ns=ns)
                assert snap["config"]["last_reload"]["summary"] == "removed 6379"
                assert_redirects(ns, {6380})
                assert refused("127.0.0.1", 6379, ns=ns)
                assert refused("::1", 6379, ns=ns)
                assert who(6380, ns=ns) == b"ns-redis"
                assert whoami(held) == b"ns-redis"
            d.stop()
        # On exit every rule is gone: the nat tables are as they were.
        assert nat_dump(ns) == baseline
        assert "iptables: could not remove rules" not in d.text()


@pytest.mark.parametrize("order", ["hup-term", "term-hup"])
@pytest.mark.netns
def test_reload_racing_with_sigterm_leaves_no_rules(ns, tmp_path, order):
    with Redis(b"ns-redis", BACKEND_PORT, ns=ns, workdir=tmp_path):
        backend_addr = f"127.0.0.1:{BACKEND_PORT}"
        baseline = nat_dump(ns)
        config = tmp_path / "routes.toml"
        first, second = (signal.SIGHUP, signal.SIGTERM) if order == "hup-term" else (signal.SIGTERM, signal.SIGHUP)
        for round_ in range(3):
            write_config(config, routes_toml({6379: backend_addr}))
            with admin_daemon(["--iptables", "--config", str(config), "--config-poll", "0"], 10001, tmp_path,
                              ns=ns) as d:
                assert_redirects(ns, {6379})
                # The reload has rules to install (one more port) when SIGTERM comes.
                write_config(config, routes_toml({6379: backend_addr, 6380 + round_: backend_addr}))
                d.signal(first)
                d.signal(second)
                code = d.wait_exit(15)
                assert code == 0, f"round {round_}: exit {code}; {d.describe()}"
            assert nat_dump(ns) == baseline, f"round {round_}: rules left behind; {d.describe()}"
            assert "could not remove rules" not in d.text()


def restore_wrapper(tmp_path: Path, nth_install: int, *, send: str | None = None, fail: bool = False) -> dict[str, str]:
    """An ip6tables-restore wrapper (ip6tables is the last family installed) for the daemon's
    PATH. It counts installs (a removal, with -X, is not one). On the ``nth_install``-th it
    either refuses (``fail``: exit 2 with a message, nothing changed) or runs the real tool
    and then sends signal ``send`` to the daemon, its parent. Returns the daemon's env."""
    real = shutil.which("ip6tables-restore")
    wrappers = tmp_path / "bin"
    wrappers.mkdir(exist_ok=True)
    wrapper = wrappers / "ip6tables-restore"
    count = tmp_path / "installs"
    refuse = 'echo "ip6tables-restore: simulated refusal" >&2; exit 2' if fail else ":"
    signal_it = f"kill -{send.removeprefix('SIG')} $PPID" if send else ":"
    wrapper.write_text(
        "#!/bin/sh\n"
        "input=$(cat)\n"
        'case "$input" in *"-X "*) n=0 ;; *"--mark"*) '
        f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count} ;; *) n=0 ;; esac\n'
        f'[ $n -eq {nth_install} ] && {{ {refuse}; }}\n'
        f'printf "%s\\n" "$input" | {real} "$@"\n'
        "status=$?\n"
        f'[ $status -eq 0 ] && [ $n -eq {nth_install} ] && {signal_it}\n'
        "exit $status\n")
    wrapper.chmod(0o755)
    return {"PATH": f"{wrappers}:{os.environ['PATH']}"}


@pytest.mark.netns
def test_reload_refused_by_iptables_changes_nothing(ns, tmp_path):
    env = restore_wrapper(tmp_path, 2, fail=True)  # 1: start-up, 2: the reload: refused
    with Redis(b"ns-redis", BACKEND_PORT, ns=ns, workdir=tmp_path):
        baseline = nat_dump(ns)
        config = tmp_path / "routes.toml"
        write_config(config, routes_toml({6379: f"127.0.0.1:{BACKEND_PORT}"}))
        with admin_daemon(["--iptables", "--config", str(config), "--config-poll", "0.1"], 10001, tmp_path, ns=ns,
                          env=env) as d:
            before = nat_dump(ns)
            write_config(config, routes_toml({6379: f"127.0.0.1:{BACKEND_PORT}", 6380: f"127.0.0.1:{BACKEND_PORT}"}))
            snap = wait_reloads(10001, 0, 1, d, ns=ns)
            last = snap["config"]["last_reload"]
            assert last["ok"] is False and "iptables" in last["error"] and "simulated refusal" in last["error"], last
            assert [r["name"] for r in snap["routes"]] == ["6379"]  # the table did not change
            assert refused("127.0.0.1", 6380, ns=ns)
            assert who(6379, ns=ns, host="::1") == b"ns-redis"
            # ... and neither did the rules, of either family.
            assert nat_dump(ns) == before, "\n".join(nat_dump(ns))
            assert who(6379, ns=ns) == b"ns-redis"
            d.stop()
        assert nat_dump(ns) == baseline


@pytest.mark.netns
def test_sigterm_while_a_reload_installs_rules_leaves_none(ns, tmp_path):
    """Deterministically in the middle: SIGTERM arrives while the reload's ip6tables-restore
    has just installed the new port list (the reload holds its lock)."""
    env = restore_wrapper(tmp_path, 2, send="SIGTERM")  # 1: start-up, 2: the reload
    with Redis(b"ns-redis", BACKEND_PORT, ns=ns, workdir=tmp_path):
        baseline = nat_dump(ns)
        config = tmp_path / "routes.toml"
        write_config(config, routes_toml({6379: f"127.0.0.1:{BACKEND_PORT}"}))
        with admin_daemon(["--iptables", "--config", str(config), "--config-poll", "0"], 10001, tmp_path, ns=ns,
                          env=env) as d:
            assert_redirects(ns, {6379})
            write_config(config, routes_toml({6379: f"127.0.0.1:{BACKEND_PORT}", 6380: f"127.0.0.1:{BACKEND_PORT}"}))
            d.signal(signal.SIGHUP)
            code = d.wait_exit(15)
            assert code == 0, d.describe()
        assert (tmp_path / "installs").read_text().strip() == "2"  # the reload did install
        assert nat_dump(ns) == baseline, d.describe()
        assert "could not remove rules" not in d.text()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
@pytest.mark.netns
def test_signal_right_after_the_rules_are_installed(ns, tmp_path, sig):
    """The signal arrives the moment the rules are in: sent by a wrapper around
    ip6tables-restore (the last install step) once the real one has installed them.
    Deterministic, unlike polling for the rules from outside. SIGTERM must stop the daemon
    cleanly (exit 0, no rules); SIGHUP must not kill it."""
    env = restore_wrapper(tmp_path, 1, send=sig)
    with Redis(b"ns-redis", BACKEND_PORT, ns=ns, workdir=tmp_path):
        baseline = nat_dump(ns)
        with Daemon(["--iptables", "--map", f"6379=127.0.0.1:{BACKEND_PORT}", "--admin", "off"], ns=ns,
                    listen=None, workdir=tmp_path, wait=False, env=env) as d:
            if sig == "SIGHUP":
                d.wait_ready(15)  # DaemonExited if the SIGHUP killed it
                assert who(6379, ns=ns) == b"ns-redis"
                d.signal(signal.SIGTERM)
            code = d.wait_exit(15)
            log = d.text()
        left = nat_dump(ns)
        assert "iptables: redirecting ports 6379" in log or left != baseline, f"the rules were never installed: {log}"
        assert (code, left) == (0, baseline), f"exit status {code}; nat tables now:\n" + "\n".join(left)
