"""The admin API of the real daemon: /healthz, /routes, /metrics, ``ambassadord status``,
the --admin flag, and sd_notify.

Every test runs ``python -m ambassadord run ...`` as a subprocess (tests/daemon.py) with a
real ``redis-server`` behind it, and talks HTTP to the admin API with http.client. Tests
that need the default admin port 127.0.0.1:10001 or iptables run in a fresh network
namespace of their own (tests/netns.py), so nothing collides with the host. Readiness is
the admin API answering /healthz, never the listen port: a probe connection there would
be counted, and the counts are checked exactly.

Nothing sleeps to synchronise: every wait polls a condition with a deadline (wait_until).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from tests.redis_wire import read_bulk, read_line, resp
from tests.admin_client import (
    Samples,
    admin_daemon,
    backend,
    cli,
    get_routes,
    healthz,
    http_get,
    metric,
    route,
    scrape,
    shown,
)
from tests.daemon import (
    REPO_ROOT,
    Daemon,
    RedisProcess,
    connect,
    free_port,
    is_closed,
    ping,
    refused,
    require,
    tail,
    wait_until,
    web_page,
)
from tests.netns import Netns

PONG = b"+PONG\r\n"


# ---- fixtures ----------------------------------------------------------------------


# ---- /healthz ----------------------------------------------------------------------


def test_healthz_ok_then_503_stopping_during_grace(redis, tmp_path):
    port, admin = free_port(), free_port()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                       "--grace", "30"], admin, tmp_path) as d:
        status, headers, body = http_get(admin, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert headers["content-type"].startswith("text/plain"), headers
        status, headers, body = http_get(admin, "/")  # the status page
        assert status == 200 and headers["content-type"].startswith("text/html"), (status, headers)
        assert http_get(admin, "/nonexistent")[0] == 404
        snap = get_routes(admin)
        assert snap["listening"] is True and snap["stopping"] is False

        held = connect("127.0.0.1", port)
        with held:
            assert ping(held) == PONG
            d.signal(signal.SIGTERM)
            # The admin API stays up for the grace period and says the daemon is stopping.
            wait_until(lambda: healthz(admin)[0] == 503, timeout=10, what=d.describe)
            assert healthz(admin) == (503, b"stopping\n")
            snap = get_routes(admin)
            assert snap["stopping"] is True and snap["listening"] is False, snap
            assert snap["connections"]["active"] == 1, snap["connections"]
            wait_until(lambda: refused("127.0.0.1", port), timeout=5, what="still accepting after SIGTERM")
            assert d.alive(), d.describe()
            assert ping(held) == PONG  # the open connection is served through the grace period
        assert d.wait_exit(10) == 0, d.describe()
        assert refused("127.0.0.1", admin), "the admin API outlived the daemon"


# ---- /routes -----------------------------------------------------------------------


def test_admin_connections_closed_by_their_clients_free_their_fds_at_once(redis, tmp_path):
    """A scraper or `status` opens a connection per request and closes it: the daemon lets
    go of each socket then, not after the 5 s keep-alive timeout (hypercorn's trio server
    waited it out: 250 requests in a row left ~240 sockets open in CLOSE_WAIT, fds a
    client polling in a loop could take from the proxy). One keep-alive connection making
    many requests still works."""
    port, admin = free_port(), free_port()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                       "--workers", "2"], admin, tmp_path) as d:
        fds = lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd"))  # noqa: E731
        get_routes(admin)
        before = fds()
        for _ in range(100):
            get_routes(admin)  # a new connection each, closed by the client
            healthz(admin)
        start = time.monotonic()
        wait_until(lambda: fds() <= before, timeout=1.5, what=lambda: f"{fds()} fds, {before} before the requests")
        took = time.monotonic() - start
        assert took < 1.5
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        try:
            for _ in range(20):  # one connection, kept alive between requests
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"ok\n")
        finally:
            conn.close()
        d.stop()


def test_routes_show_specs_sources_and_ejected_backend(redis, tmp_path):
    port, unrouted, admin, dead = free_port(), free_port(), free_port(), free_port()
    spec = f"127.0.0.1:{dead},127.0.0.1:{redis.port}"
    live_name, dead_name = f"127.0.0.1:{redis.port}", f"127.0.0.1:{dead}"
    started = time.time()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{unrouted}",
                       "--map", f"{port}={spec}", "--map", f"{port}@10.99.0.0/16=127.0.0.1:{redis.port}",
                       "--eject-for", "60"], admin, tmp_path) as d:
        snap = get_routes(admin)
        assert [r["name"] for r in snap["routes"]] == [str(port), f"{port} from 10.99.0.0/16"]
        main = route(snap, str(port))
        assert (main["port"], main["source"], main["spec"], main["origin"]) == (port, None, spec, f"--map {port}={spec}")
        assert main["eject_for"] == 60 and main["balance"] == "random"
        assert main["resolved"] is True and main["stale"] is False and main["error"] is None
        assert main["updates"] == 1 and main["errors"] == 0
        assert started - 1 <= main["updated_at"] <= time.time()
        assert [b["name"] for b in main["backends"]] == [dead_name, live_name]
        for b in main["backends"]:
            assert (b["state"], b["failures"], b["connections"], b["last_error"]) == ("up", 0, 0, None), b
        limited = route(snap, f"{port} from 10.99.0.0/16")
        assert (limited["port"], limited["source"], limited["spec"]) == (port, "10.99.0.0/16", f"127.0.0.1:{redis.port}")

        # Random order: connect until the dead backend has been tried (and failed over).
        tries = 0

        def dead_tried() -> bool:
            nonlocal tries
            with contextlib.closing(connect("127.0.0.1", port)) as c:
                assert ping(c) == PONG
            tries += 1
            # The connection's stats are final once it has been counted.
            wait_until(lambda: route(get_routes(admin), str(port))["outcomes"].get("ok") == tries, timeout=5,
                       what=d.describe)
            return backend(route(get_routes(admin), str(port)), dead_name)["failures"] > 0

        wait_until(dead_tried, timeout=20, what=lambda: f"dead backend never tried in {tries} connections")
        main = route(get_routes(admin), str(port))
        bad, good = backend(main, dead_name), backend(main, live_name)
        assert bad["state"] == "ejected" and 0 < bad["ejected_for"] <= 60, bad
        assert bad["failures"] == 1 and bad["connections"] == 0, bad  # ejected: tried last, never again
        assert bad["last_error"] == "Connection refused", bad
        assert started <= bad["last_failure"] <= time.time()
        assert (good["state"], good["connections"], good["failures"]) == ("up", tries, 0), good
        assert main["outcomes"] == {"ok": tries} and main["connections"] == tries and main["active"] == 0
        assert main["connect_seconds"]["count"] == tries
        assert route(get_routes(admin), f"{port} from 10.99.0.0/16")["connections"] == 0

        # A port with no route: closed at once, counted apart from the routes.
        with contextlib.closing(connect("127.0.0.1", unrouted)) as c:
            assert is_closed(c, 5)
        wait_until(lambda: get_routes(admin)["connections"]["unrouted"] == {"no-route": 1}, timeout=5,
                   what=lambda: json.dumps(get_routes(admin)["connections"]))
        assert get_routes(admin)["connections"]["total"] == tries + 1

        # ambassadord status: the same, as a table and as JSON.
        table = cli("status", "--admin", f"127.0.0.1:{admin}")
        assert table.returncode == 0, shown(table)
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["ROUTE", "SPEC", "BACKEND", "STATE", "ACTIVE", "CONNS", "FAILS", "UP", "DOWN",
                                    "UPDATED"], table.stdout
        dead_line = next(line for line in lines if dead_name in line)
        live_line = next(line for line in lines if live_name in line and dead_name not in line)
        assert dead_line.split()[:3] == [str(port), spec, dead_name], dead_line
        assert dead_line.split()[3] == "ejected", dead_line
        assert live_line.split()[:2] == [live_name, "up"], live_line
        assert f"{port} from 10.99.0.0/16" in table.stdout
        assert "2 route(s), 0 open connection(s)" in table.stdout, table.stdout

        as_json = cli("status", "--admin", f"127.0.0.1:{admin}", "--json")
        assert as_json.returncode == 0, shown(as_json)
        data = json.loads(as_json.stdout)
        assert route(data, str(port))["spec"] == spec
        assert backend(route(data, str(port)), dead_name)["state"] == "ejected"
        d.stop()


def test_open_connection_is_active_and_closed_ones_count_exact_bytes(redis, tmp_path):
    port, admin = free_port(), free_port()
    name, bname = str(port), f"127.0.0.1:{redis.port}"
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"],
                      admin, tmp_path) as d:
        sent = received = 0
        c = connect("127.0.0.1", port)
        with c:
            c.sendall(b"PING\r\n")
            assert read_line(c) == PONG
            sent, received = sent + 6, received + len(PONG)
            snap = get_routes(admin)
            view = route(snap, name)
            assert snap["connections"]["active"] == 1
            assert view["active"] == 1 and backend(view, bname)["active"] == 1, view
            assert view["outcomes"] == {}, view
            m = scrape(admin)
            assert metric(m, "ambassadord_connections_active", route=name) == 1
            assert metric(m, "ambassadord_backend_connections_active", route=name, backend=bname) == 1

            value = os.urandom(256 * 1024)
            cmd = resp(b"SET", b"big", value)
            c.sendall(cmd)
            assert read_line(c) == b"+OK\r\n"
            sent, received = sent + len(cmd), received + 5
            cmd = resp(b"GET", b"big")
            c.sendall(cmd)
            reply = read_bulk(c)
            assert reply.endswith(value + b"\r\n")
            sent, received = sent + len(cmd), received + len(reply)
        wait_until(lambda: route(get_routes(admin), name)["outcomes"] == {"ok": 1}, timeout=5, what=d.describe)
        view = route(get_routes(admin), name)
        assert (view["active"], view["bytes_up"], view["bytes_down"]) == (0, sent, received), view
        b = backend(view, bname)
        assert (b["active"], b["connections"], b["bytes_up"], b["bytes_down"]) == (0, 1, sent, received), b
        m = scrape(admin)
        assert metric(m, "ambassadord_connections_active", route=name) == 0
        assert metric(m, "ambassadord_bytes_total", route=name, direction="up") == sent
        assert metric(m, "ambassadord_bytes_total", route=name, direction="down") == received
        d.stop()


@pytest.mark.parametrize("splice", ["on", "off"])
def test_bytes_grow_while_the_connection_is_still_open(redis, tmp_path, splice):
    """Regression: bytes used to be added to the connection's counters only when it ended
    (both relay pumps), so a long-lived connection's traffic did not show while it flowed."""
    port, admin = free_port(), free_port()
    name, bname = str(port), f"127.0.0.1:{redis.port}"
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                       "--splice", splice], admin, tmp_path) as d:
        with connect("127.0.0.1", port) as c:
            cmd = resp(b"SET", b"big", os.urandom(1 << 20))
            c.sendall(cmd)
            assert read_line(c) == b"+OK\r\n"
            # Still open: the megabyte that went up must show, on the route and its backend.
            wait_until(lambda: route(get_routes(admin), name)["bytes_up"] >= len(cmd), timeout=3,
                       what=lambda: f"bytes_up of the open connection: {route(get_routes(admin), name)}")
            view = route(get_routes(admin), name)
            assert view["active"] == 1
            assert (view["bytes_up"], view["bytes_down"]) == (len(cmd), 5), view
            assert (backend(view, bname)["bytes_up"], backend(view, bname)["bytes_down"]) == (len(cmd), 5)
            m = scrape(admin)
            assert metric(m, "ambassadord_bytes_total", route=name, direction="up") == len(cmd)
        d.stop()


# ---- /metrics ----------------------------------------------------------------------


def test_metrics_exact_counts(redis, tmp_path):
    port, dead_port, unrouted, admin, dead = (free_port() for _ in range(5))
    ok_route, dead_route = str(port), str(dead_port)
    bname, dead_name = f"127.0.0.1:{redis.port}", f"127.0.0.1:{dead}"
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{dead_port}",
                       "--listen", f"127.0.0.1:{unrouted}", "--map", f"{port}=127.0.0.1:{redis.port}",
                       "--map", f"{dead_port}=127.0.0.1:{dead}"], admin, tmp_path) as d:
        m = scrape(admin)
        assert metric(m, "ambassadord_routes") == 2
        assert metric(m, "ambassadord_resolver_updates_total", route=ok_route) == 1  # static: publishes once
        assert metric(m, "ambassadord_resolver_errors_total", route=ok_route) == 0
        assert metric(m, "ambassadord_route_stale", route=ok_route) == 0
        assert metric(m, "ambassadord_route_backends", route=ok_route) == 1
        assert 0 <= metric(m, "ambassadord_route_last_update_age_seconds", route=ok_route) < 60
        assert metric(m, "ambassadord_config_reloads_total", result="ok") == 0
        assert metric(m, "ambassadord_config_reloads_total", result="error") == 0
        assert metric(m, "ambassadord_config_last_reload_successful") == 1
        assert metric(m, "process_resident_memory_bytes") > 1 << 20
        assert [k for k in m if k[0] == "ambassadord_build_info"], "no ambassadord_build_info"
        assert metric(m, "ambassadord_connections_total", route=ok_route, outcome="ok") is None  # nothing yet

        n, sent, received = 5, 0, 0
        for i in range(n):
            with connect("127.0.0.1", port) as c:
                cmd = resp(b"SET", b"k%d" % i, b"v" * (1000 * i + 1))
                c.sendall(cmd)
                assert read_line(c) == b"+OK\r\n"
                sent, received = sent + len(cmd), received + 5
        m_failed = 3
        for _ in range(m_failed):
            with connect("127.0.0.1", dead_port) as c:
                assert is_closed(c, 5)
        for _ in range(2):
            with connect("127.0.0.1", unrouted) as c:
                assert is_closed(c, 5)

        def all_counted() -> Samples | None:
            s = scrape(admin)
            closed = "ambassadord_connections_total"
            done = (metric(s, closed, route=ok_route, outcome="ok") == n
                    and metric(s, closed, route=dead_route, outcome="all-backends-failed") == m_failed
                    and metric(s, closed, route="", outcome="no-route") == 2)
            return s if done else None

        m = wait_until(all_counted, timeout=10, what=lambda: "connection counts; " + d.describe())
        # Only the outcomes that happened are there.
        assert sorted(k for k in m if k[0] == "ambassadord_connections_total") == sorted([
            ("ambassadord_connections_total", (("outcome", "ok"), ("route", ok_route))),
            ("ambassadord_connections_total", (("outcome", "all-backends-failed"), ("route", dead_route))),
            ("ambassadord_connections_total", (("outcome", "no-route"), ("route", ""))),
        ])
        assert metric(m, "ambassadord_connections_active", route=ok_route) == 0
        assert metric(m, "ambassadord_bytes_total", route=ok_route, direction="up") == sent
        assert metric(m, "ambassadord_bytes_total", route=ok_route, direction="down") == received
        assert metric(m, "ambassadord_bytes_total", route=dead_route, direction="up") == 0
        # The connect histogram counts successful connects only.
        assert metric(m, "ambassadord_connect_seconds_count", route=ok_route) == n
        assert metric(m, "ambassadord_connect_seconds_bucket", route=ok_route, le="+Inf") == n
        assert 0 < metric(m, "ambassadord_connect_seconds_sum", route=ok_route) < n * 2
        buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in m.items()
                          if k[0] == "ambassadord_connect_seconds_bucket" and dict(k[1])["route"] == ok_route))
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), buckets  # cumulative
        assert metric(m, "ambassadord_connect_seconds_count", route=dead_route) == 0
        assert metric(m, "ambassadord_backend_connections_total", route=ok_route, backend=bname) == n
        assert metric(m, "ambassadord_backend_failures_total", route=ok_route, backend=bname) == 0
        # The dead backend: every attempt failed (ejected backends are still tried as a last resort).
        assert metric(m, "ambassadord_backend_failures_total", route=dead_route, backend=dead_name) == m_failed
        assert metric(m, "ambassadord_backend_connections_total", route=dead_route, backend=dead_name) == 0
        assert metric(m, "ambassadord_backend_ejected", route=dead_route, backend=dead_name) == 1
        assert metric(m, "ambassadord_backend_ejected", route=ok_route, backend=bname) == 0

        # One open connection shows as active, on the route and on its backend.
        with connect("127.0.0.1", port) as c:
            assert ping(c) == PONG
            m = scrape(admin)
            assert metric(m, "ambassadord_connections_active", route=ok_route) == 1
            assert metric(m, "ambassadord_backend_connections_active", route=ok_route, backend=bname) == 1
        wait_until(lambda: metric(scrape(admin), "ambassadord_connections_active", route=ok_route) == 0, timeout=5,
                   what=d.describe)
        d.stop()


def test_metrics_openmetrics_negotiation(redis, tmp_path):
    port, admin = free_port(), free_port()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"],
                      admin, tmp_path) as d:
        status, headers, body = http_get(admin, "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics-text"), headers
        text = body.decode()
        assert text.endswith("# EOF\n"), text[-200:]
        names = {f.name for f in parse_openmetrics(text)}  # valid OpenMetrics, or this raises
        assert {"ambassadord_connections", "ambassadord_bytes", "ambassadord_connect_seconds",
                "ambassadord_config_reloads"} <= names, names

        status, headers, body = http_get(admin, "/metrics")  # no Accept: the classic text format
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
        assert "# EOF" not in body.decode()
        d.stop()


def test_metrics_dns_route_errors_and_staleness(redis, tmp_path):
    from tests.dns_server import Dnsmasq

    port, admin = free_port(), free_port()
    name = str(port)
    with Dnsmasq(hosts={"svc.test": ["127.0.0.1"]}, ttl=1) as dns:
        with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=dns://svc.test:{redis.port}",
                           "--dns-server", dns.server, "--dns-timeout", "1"], admin, tmp_path) as d:
            m = scrape(admin)
            # The resolver publishes its first answer, then only changes and failures.
            assert metric(m, "ambassadord_resolver_updates_total", route=name) == 1
            assert metric(m, "ambassadord_resolver_errors_total", route=name) == 0
            assert metric(m, "ambassadord_route_stale", route=name) == 0
            assert metric(m, "ambassadord_route_backends", route=name) == 1
            with connect("127.0.0.1", port) as c:
                assert ping(c) == PONG

            dns.stop()  # DNS fails (TTL 1: the next refresh is due within a second)
            wait_until(lambda: metric(scrape(admin), "ambassadord_route_stale", route=name) == 1, timeout=10,
                       what=d.describe)
            m = scrape(admin)
            errors = metric(m, "ambassadord_resolver_errors_total", route=name)
            assert errors >= 1
            assert metric(m, "ambassadord_resolver_updates_total", route=name) == 1 + errors  # failures are published
            assert metric(m, "ambassadord_route_backends", route=name) == 1  # the last good answer
            view = route(get_routes(admin), name)
            assert view["stale"] is True and "svc.test" in view["error"], view
            assert view["errors"] >= 1 and backend(view, f"127.0.0.1:{redis.port}")["in_set"] is True
            with connect("127.0.0.1", port) as c:
                assert ping(c) == PONG  # still served, from the stale answer
            status = cli("status", "--admin", f"127.0.0.1:{admin}")
            assert status.returncode == 0, shown(status)
            assert "up (stale)" in status.stdout and f"route {name}: stale: " in status.stdout, shown(status)

            dns.start(hosts={"svc.test": ["127.0.0.1"]})  # DNS is back: fresh again
            wait_until(lambda: metric(scrape(admin), "ambassadord_route_stale", route=name) == 0, timeout=20,
                       what=d.describe)
            assert route(get_routes(admin), name)["error"] is None
            d.stop()


def test_route_age_follows_refreshes_of_an_unchanged_answer(redis, tmp_path):
    from tests.dns_server import Dnsmasq

    port, admin = free_port(), free_port()
    name = str(port)
    with Dnsmasq(hosts={"svc.test": ["127.0.0.1"]}, ttl=1) as dns:
        with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=dns://svc.test:{redis.port}",
                           "--dns-server", dns.server], admin, tmp_path) as d:
            first = route(get_routes(admin), name)["updated_at"]
            # TTL 1 (clamped to --dns-min-ttl 1): refreshed every 0.8 s. After 3 s the last
            # answer is at most ~1 s old.
            wait_until(lambda: time.time() - first > 3, timeout=10, what="time to pass")
            assert metric(scrape(admin), "ambassadord_route_stale", route=name) == 0
            age = metric(scrape(admin), "ambassadord_route_last_update_age_seconds", route=name)
            assert age < 2, f"last answer {age:.1f}s old with DNS answering every 0.8 s"
            assert time.time() - route(get_routes(admin), name)["updated_at"] < 2
            d.stop()


# ---- --admin -----------------------------------------------------------------------


@pytest.mark.netns
def test_admin_default_address_and_off_in_a_fresh_namespace(ns, tmp_path):
    require("redis-server")
    with RedisProcess(7000, ns=ns, workdir=tmp_path):
        route_args = ["--listen", "127.0.0.1:10000", "--map", "10000=127.0.0.1:7000"]

        # Without --admin: the admin API is on 127.0.0.1:10001.
        log = tmp_path / "default.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_")}
        with open(log, "wb") as out:
            proc = ns.popen([sys.executable, "-m", "ambassadord", "run", *route_args], cwd=REPO_ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"exited {proc.returncode}: {tail(log)}")
                return healthz(10001, ns=ns) == (200, b"ok\n")

            wait_until(up, timeout=15, what=lambda: tail(log))
            listening = ns.listening()
            assert listening == {"127.0.0.1:10000", "127.0.0.1:10001", "127.0.0.1:7000"}, listening
            assert "admin API on http://127.0.0.1:10001" in log.read_text()
            # `status` defaults to the same address.
            out = ns.exec(["env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m", "ambassadord", "status"])
            assert "10000" in out and "127.0.0.1:7000" in out, out
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, tail(log)

        # --admin off: nothing listens but the relay.
        with Daemon([*route_args, "--admin", "off"], ns=ns, workdir=tmp_path) as d:
            listening = ns.listening()
            assert listening == {"127.0.0.1:10000", "127.0.0.1:7000"}, listening
            assert refused("127.0.0.1", 10001, ns=ns)
            assert "admin API" not in d.text()
            d.stop()

        # An IPv6 admin address.
        with admin_daemon(route_args, 10002, tmp_path, ns=ns, admin_host="::1") as d:
            assert get_routes(10002, host="::1", ns=ns)["routes"][0]["name"] == "10000"
            assert refused("127.0.0.1", 10002, ns=ns)
            d.stop()


@pytest.mark.parametrize("value", ["nonsense", "1.2.3.4", "127.0.0.1:99999", "::1:8080", "127.0.0.1:"])
def test_bad_admin_value_is_a_usage_error(value):
    port = free_port()
    proc = cli("run", "--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:1", "--admin", value, timeout=15)
    assert proc.returncode == 2, shown(proc)
    assert f"--admin: bad admin address {value!r}" in proc.stderr, shown(proc)
    assert "Traceback" not in proc.stderr, shown(proc)
    assert refused("127.0.0.1", port)


def test_admin_port_equal_to_a_listen_port_is_a_usage_error():
    port, other = free_port(), free_port()
    proc = cli("run", "--listen", f"127.0.0.1:{other}", "--listen", f"127.0.0.1:{port}",
               "--map", f"{port}=127.0.0.1:1", "--admin", f"127.0.0.1:{port}", timeout=15)
    assert proc.returncode == 2, shown(proc)
    assert f"--admin 127.0.0.1:{port}: the same address and port as a --listen address" in proc.stderr, shown(proc)
    assert refused("127.0.0.1", port) and refused("127.0.0.1", other)


@pytest.mark.parametrize("listen", ["0.0.0.0", "127.0.0.1"])
def test_admin_overlapping_a_wildcard_listener_is_a_usage_error_but_another_address_is_not(listen):
    port = free_port()
    proc = cli("run", "--listen", f"{listen}:{port}", "--map", f"{port}=127.0.0.1:1", "--admin", f"127.0.0.1:{port}",
               timeout=15)
    assert proc.returncode == 2 and "same address and port" in proc.stderr, shown(proc)
    # Another address (127.0.0.2 is loopback too) or another family: both can be bound.
    from ambassadord.settings import _overlap
    from ambassadord.server import ListenAddress
    assert not _overlap(ListenAddress("127.0.0.1", port), ListenAddress("127.0.0.2", port))
    assert not _overlap(ListenAddress("0.0.0.0", port), ListenAddress("::1", port))
    assert _overlap(ListenAddress("::", port), ListenAddress("::1", port))


@pytest.mark.netns
def test_admin_port_in_use_exits_1_and_leaves_nothing(ns):
    """In a namespace: the default admin address, taken, with --iptables: exit 1 naming the
    address; no listener and no nat rule left behind."""
    squatter = ns.socket(socket.AF_INET)
    with squatter:
        squatter.bind(("127.0.0.1", 10001))
        squatter.listen(1)
        before = ns.exec(["iptables-save", "-t", "nat"]) + ns.exec(["ip6tables-save", "-t", "nat"])
        proc = cli("run", "--iptables", "--map", "6379=127.0.0.1:7000", ns=ns, timeout=20)
        assert proc.returncode == 1, shown(proc)
        assert "cannot listen on admin address 127.0.0.1:10001: Address already in use" in proc.stderr, shown(proc)
        assert "--admin off" in proc.stderr, shown(proc)  # the hint
        assert "Traceback" not in proc.stderr, shown(proc)
        listening = ns.listening()
        assert listening == {"127.0.0.1:10001"}, listening  # only the squatter
        after = ns.exec(["iptables-save", "-t", "nat"]) + ns.exec(["ip6tables-save", "-t", "nat"])
        assert "AMBASSADORD" not in after, after
        assert [x for x in after.splitlines() if not x.startswith("#")] == \
            [x for x in before.splitlines() if not x.startswith("#")]


# ---- ambassadord status ------------------------------------------------------------


def test_status_cannot_reach_the_admin_api():
    port = free_port()
    proc = cli("status", "--admin", f"127.0.0.1:{port}", "--timeout", "2")
    assert proc.returncode == 1, shown(proc)
    assert f"cannot reach the admin API at http://127.0.0.1:{port}/routes" in proc.stderr, shown(proc)
    assert "Connection refused" in proc.stderr, shown(proc)
    assert "Traceback" not in proc.stderr and proc.stdout == "", shown(proc)

    proc = cli("status", "--admin", "off")
    assert proc.returncode == 2, shown(proc)
    assert "status needs the daemon's admin address" in proc.stderr, shown(proc)


def test_status_against_something_that_is_not_ambassadord(tmp_path):
    """An HTTP server that is not ambassadord's admin API: exit 1 with a message, not a traceback."""
    with web_page(b"<html>hello</html>") as port:
        proc = cli("status", "--admin", f"127.0.0.1:{port}")
    assert proc.returncode == 1, shown(proc)
    assert "did not answer with ambassadord's /routes JSON" in proc.stderr, shown(proc)
    assert "Traceback" not in proc.stderr, shown(proc)


# ---- sd_notify ---------------------------------------------------------------------


class NotifySocket:
    """The systemd end of sd_notify: an AF_UNIX datagram socket; collects the messages."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def expect(self, key: str, *, timeout: float = 15, daemon: Daemon | None = None) -> dict[str, str]:
        """The next message; it must carry ``key`` (``KEY=VALUE``), or fail naming what came."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no sd_notify message within {timeout:g}s (wanted {key}; had {self.messages}); "
                                   f"{daemon.describe() if daemon else ''}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if daemon is not None:
                    daemon._check_alive()
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(msg)
            k, _, v = key.partition("=")
            assert msg.get(k) == v, f"expected {key}, got {msg} (all: {self.messages})"
            return msg

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_ready_reloading_stopping(redis, tmp_path, kind):
    if kind == "path":
        address = str(tmp_path / "notify.sock")
        env_value = address
    else:
        name = f"amb-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        address, env_value = "\0" + name, "@" + name
    notify = NotifySocket(address)
    port, admin = free_port(), free_port()
    try:
        with Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                     "--admin", f"127.0.0.1:{admin}"], listen=None, workdir=tmp_path,
                    env={"NOTIFY_SOCKET": env_value}, wait=False) as d:
            ready = notify.expect("READY=1", daemon=d)
            assert ready["READY"] == "1" and ready["STATUS"] == "serving 1 route(s)", ready
            # Ready means ready: the relay and the admin API answer at once, without waiting.
            with connect("127.0.0.1", port) as c:
                assert ping(c) == PONG
            assert healthz(admin) == (200, b"ok\n")

            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            reloading = notify.expect("RELOADING=1", daemon=d)
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert reloading["RELOADING"] == "1"
            assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
            again = notify.expect("READY=1", daemon=d)
            assert again["READY"] == "1"
            assert "reloaded (SIGHUP): no route changed" in d.text(), d.describe()

            d.signal(signal.SIGTERM)
            stopping = notify.expect("STOPPING=1", daemon=d)
            assert stopping == {"STOPPING": "1"}
            assert d.wait_exit(10) == 0, d.describe()
            # Nothing after STOPPING=1 (it has exited: anything it sent is queued by now).
            notify.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                notify.sock.recv(4096)
            assert [next(iter(m)) for m in notify.messages] == ["READY", "RELOADING", "READY", "STOPPING"]
    finally:
        notify.close()


def test_sd_notify_to_a_dead_socket_does_not_stop_the_daemon(redis, tmp_path):
    """NOTIFY_SOCKET naming nothing: one warning, and the daemon serves and stops as usual."""
    port = free_port()
    missing = tmp_path / "nobody-listens.sock"
    with Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"], listen=None,
                workdir=tmp_path, env={"NOTIFY_SOCKET": str(missing)}) as d:
        d.wait_for(lambda r: "sd_notify" in r.get("msg", ""), timeout=10)
        with connect("127.0.0.1", port) as c:
            assert ping(c) == PONG
        d.signal(signal.SIGHUP)
        d.wait_for(lambda r: r.get("event") == "reload", timeout=10)
        d.stop()
        assert sum("sd_notify" in r.get("msg", "") for r in d.records()) == 1, d.text()


# ---- the Host header (DNS rebinding) ---------------------------------------------------


@pytest.mark.parametrize("host, local, bound, ok", [
    (None, "127.0.0.1", "127.0.0.1", True),  # no Host: not a browser
    ("localhost", "127.0.0.1", "127.0.0.1", True),
    ("LocalHost:10001", "127.0.0.1", "127.0.0.1", True),
    ("admin.localhost:10001", "127.0.0.1", "127.0.0.1", True),
    ("localhost.:10001", "127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1:10001", "127.0.0.1", "127.0.0.1", True),
    ("127.0.0.2", "127.0.0.1", "127.0.0.1", True),  # any loopback address
    ("[::1]:10001", "::1", "::1", True),
    ("[::1]", "127.0.0.1", "127.0.0.1", True),
    ("0.0.0.0:10001", "127.0.0.1", "0.0.0.0", True),  # the bind address
    ("0.0.0.0:10001", "127.0.0.1", "127.0.0.1", False),
    ("10.0.0.5:10001", "10.0.0.5", "0.0.0.0", True),  # the address the request came in on
    ("10.0.0.5:10001", "10.0.0.5", "10.0.0.5", True),
    ("10.0.0.6:10001", "10.0.0.5", "0.0.0.0", False),
    ("10.0.0.5", "::ffff:10.0.0.5", "::", True),
    ("myhost:10001", "10.0.0.5", "0.0.0.0", True),  # the host name, if not bound to loopback
    ("MYHOST", "127.0.0.1", "0.0.0.0", True),
    ("myhost:10001", "127.0.0.1", "127.0.0.1", False),
    ("myhost", "::1", "::1", False),
    ("myhost.evil.example", "10.0.0.5", "0.0.0.0", False),
    ("evil.example", "127.0.0.1", "127.0.0.1", False),
    ("evil.example:10001", "10.0.0.5", "0.0.0.0", False),
    ("localhost.evil.example", "127.0.0.1", "127.0.0.1", False),
    ("127.0.0.1.nip.io", "127.0.0.1", "127.0.0.1", False),
    ("127.0.0.1:x", "127.0.0.1", "127.0.0.1", False),
    ("[::1]x", "::1", "::1", False),
    ("[::1", "::1", "::1", False),
    ("", "127.0.0.1", "127.0.0.1", False),
    (":10001", "127.0.0.1", "127.0.0.1", False),
])
def test_host_allowed(host, local, bound, ok):
    from ambassadord.admin import host_allowed

    assert host_allowed(host, local, bound=bound, hostname="myhost") is ok


def raw_get(port: int, request: bytes, *, host: str = "127.0.0.1", ns: Netns | None = None) -> bytes:
    """Send ``request`` as it is; the whole answer (HTTP/1.0: the server closes)."""
    with contextlib.closing(connect(host, port, ns=ns)) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_forged_host_headers_are_refused_with_421(redis, tmp_path):
    port, admin = free_port(), free_port()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}"], admin,
                      tmp_path) as d:
        for host in ("evil.example", f"evil.example:{admin}", f"localhost.evil.example:{admin}",
                     socket.gethostname(), "10.1.2.3"):
            for path in ("/routes", "/metrics", "/", "/healthz"):
                status, headers, body = http_get(admin, path, headers={"Host": host})
                assert status == 421, (host, path, status, body)
                assert headers["content-type"].startswith("text/plain"), headers
                assert f"Host {host!r} is not accepted" in body.decode(), body
                assert b"routes" not in body and str(redis.port).encode() not in body
        for host in (f"localhost:{admin}", "localhost", f"127.0.0.1:{admin}", f"127.0.0.9:{admin}", f"[::1]:{admin}",
                     f"status.localhost:{admin}"):
            assert get_routes(admin, headers={"Host": host})["routes"], host
        # No Host at all (HTTP/1.0, as curl -0 or a health checker sends it): answered.
        assert raw_get(admin, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
        # Two Host headers: refused.
        both = raw_get(admin, b"GET /routes HTTP/1.0\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
        assert both.split(b"\r\n")[0] in (b"HTTP/1.1 421 ", b"HTTP/1.1 400 "), both[:200]
        # `ambassadord status` keeps working, and the refusals were logged (once: rate-limited).
        proc = cli("status", "--admin", f"127.0.0.1:{admin}")
        assert proc.returncode == 0 and str(port) in proc.stdout, shown(proc)
        refusals = [line for line in d.lines() if "admin API: refused a request for Host" in line]
        assert len(refusals) == 1, refusals
        d.stop()


@pytest.mark.netns
def test_a_wildcard_admin_answers_its_own_addresses_and_the_host_name_only(ns, tmp_path):
    """Bound to 0.0.0.0: an IP literal must be the address the request came in on (or
    loopback); the machine's host name is accepted too (a browser on another machine may
    use it); any other name is refused."""
    require("redis-server")
    ns.exec(["ip", "addr", "add", "10.252.0.1/32", "dev", "lo"])  # a local address that is not loopback
    hostname = socket.gethostname()  # a network namespace shares the UTS name of the machine
    with RedisProcess(7000, ns=ns, workdir=tmp_path):
        with admin_daemon(["--listen", "127.0.0.1:10000", "--map", "10000=127.0.0.1:7000"], 10001, tmp_path, ns=ns,
                          admin_host="0.0.0.0") as d:
            def status(host: str, via: str) -> int:
                return http_get(10001, "/routes", host=via, ns=ns, headers={"Host": host})[0]

            assert status("10.252.0.1:10001", "10.252.0.1") == 200
            assert status(f"{hostname}:10001", "10.252.0.1") == 200
            assert status("localhost:10001", "10.252.0.1") == 200
            assert status("127.0.0.1:10001", "127.0.0.1") == 200
            assert status("10.252.0.7:10001", "10.252.0.1") == 421  # not the address it came in on
            assert status("10.252.0.1:10001", "127.0.0.1") == 421
            assert status("evil.example:10001", "10.252.0.1") == 421
            assert status(f"{hostname}.evil.example", "10.252.0.1") == 421
            d.stop()
