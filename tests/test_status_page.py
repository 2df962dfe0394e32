"""The status page at ``/`` (ambassadord/static/status.html), in real headless Chromium.

A real daemon (``python -m ambassadord run --admin ...``) with real ``redis-server``
backends behind it, and Debian's ``/usr/bin/chromium`` driven by Playwright (its Python
package only: no browser download, ``executable_path`` points at the system one). The
page polls ``/routes`` every second; every check waits for the page to show something
with a deadline (Playwright's ``expect``), never with a fixed sleep. Everything talks
over loopback only.

The page's hooks: ``section[data-route=NAME]`` per route, ``tr[data-backend=ADDR]`` per
backend row (with ``data-state``), ``#summary tr[data-route=NAME]`` per route in the summary,
``data-health`` (ok, degraded, down) on both, ``[data-field=KEY]`` cells named after the
JSON keys or the page's own figures (``health``, ``conn_rate``, ``up_rate``, ``down_rate``
and their ``peak_`` forms; raw numbers in ``data-value``), ``#daemon`` for the header,
``[data-banner=...]`` and ``#filter``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.daemon import REPO_ROOT, Daemon, RedisProcess, connect, free_port, ping, wait_until

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test extra is missing: the browser fixture fails and says so
    expect = sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
# --no-proxy-server: loopback only, even where a proxy is configured in the environment.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server"]
PAGE = REPO_ROOT / "ambassadord" / "static" / "status.html"
WAIT_MS = 10_000  # how long the page gets to show something (it polls every second)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"Debian's chromium is not installed ({CHROMIUM} missing)")

if expect is not None:
    expect.set_options(timeout=WAIT_MS)


# ---- browser, daemon, configuration ------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.fail("the Python package 'playwright' is needed (test extra); it drives /usr/bin/chromium, "
                    "no browser is downloaded")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh page; fails the test on any uncaught JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the status page: {errors}"


def write_config(path: Path, routes: dict[int, str | dict]) -> Path:
    """Write a ``[routes]`` TOML file atomically (temporary file + rename), as an editor
    or a config manager would: the daemon never reads half a file."""
    lines = ["[routes]"]
    for port, spec in routes.items():
        if isinstance(spec, dict):
            spec = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in spec.items()) + " }"
        else:
            spec = json.dumps(spec)
        lines.append(f"{port} = {spec}")
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy


def get_routes(admin: int) -> dict:
    with _DIRECT.open(f"http://127.0.0.1:{admin}/routes", timeout=5) as res:
        return json.load(res)


@contextlib.contextmanager
def running_daemon(tmp_path: Path, config: Path, listen: int | Sequence[int], admin: int,
                   extra: Sequence[str] = ()) -> Iterator[Daemon]:
    """The daemon on 127.0.0.1:``listen`` (one port or several: with no iptables, a
    connection to one of them takes the route of that port), admin API on
    127.0.0.1:``admin``, reading ``config`` (polled every 0.2 s). Killed on the way out,
    whatever happens; its log is printed (shown by pytest) if the test fails inside."""
    ports = [listen] if isinstance(listen, int) else list(listen)
    args = [*(a for p in ports for a in ("--listen", f"127.0.0.1:{p}")), "--config", str(config),
            "--config-poll", "0.2", "--admin", f"127.0.0.1:{admin}", *extra]
    # listen=None: no readiness probe through the listener, which would count as a
    # connection of the route whose port is the listen port. Ready: /routes answers.
    with Daemon(args, listen=None, workdir=tmp_path) as daemon:
        try:
            wait_until(lambda: get_routes(admin), timeout=10, what=daemon.describe)
            yield daemon
        except BaseException:
            print(daemon.describe())
            raise


# The tests make the page ask every 0.25 s instead of every second (?refresh): they wait for
# what it shows, and so wait less.
REFRESH = 0.25


def page_url(admin: int, **query: str) -> str:
    return f"http://127.0.0.1:{admin}/?" + urllib.parse.urlencode({"refresh": REFRESH, **query})


def route_field(page, route: int | str, field: str):
    """A route-level cell (title, info or total row) of the route's table."""
    return page.locator(f'section[data-route="{route}"] tr:not([data-backend]) [data-field="{field}"]')


def backend_row(page, route: int | str, backend: str):
    return page.locator(f'section[data-route="{route}"] tr[data-backend="{backend}"]')


def backend_field(page, route: int | str, backend: str, field: str):
    return backend_row(page, route, backend).locator(f'[data-field="{field}"]')


def header(page, field: str):
    return page.locator(f'#daemon [data-field="{field}"]')


def summary_row(page, route: int | str):
    return page.locator(f'#summary tr[data-route="{route}"]')


def summary_field(page, route: int | str, field: str):
    return summary_row(page, route).locator(f'[data-field="{field}"]')


def value(locator) -> float:
    """A cell's raw number (data-value); 0 while it has none yet."""
    return float(locator.get_attribute("data-value") or 0)


def measure(locator, js: str):
    """``js`` (a function of an element) on the one element ``locator`` finds, found and
    measured in one call into the page. The page builds its rows anew at every refresh, and
    ``Locator.evaluate`` finds first and evaluates after: in between, the element it found may
    have been replaced, and a detached element measures 0 and has no computed colour."""
    values = locator.evaluate_all(f"(elements) => elements.map({js})")
    assert len(values) == 1, f"{locator} found {len(values)} elements"
    return values[0]


BACKGROUND = "(e) => getComputedStyle(e).backgroundColor"  # for measure()


def json_backend(admin: int, route: int, backend: str) -> dict | None:
    r = next(r for r in get_routes(admin)["routes"] if r["name"] == str(route))
    return next((b for b in r["backends"] if b["name"] == backend), None)


PONG = b"+PONG\r\n"


# ---- the tests -----------------------------------------------------------------


def test_page_is_self_contained_and_never_parses_text_as_html():
    html = PAGE.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html, f"status.html uses {sink}: daemon text must go in as text"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "status.html loads something external"


def test_page_shows_routes_backends_and_live_counts(page, tmp_path):
    listen, admin, other = free_port(), free_port(), free_port()
    with RedisProcess(free_port()) as r1, RedisProcess(free_port()) as r2:
        b1, b2 = f"127.0.0.1:{r1.port}", f"127.0.0.1:{r2.port}"
        nowhere = f"127.0.0.1:{free_port()}"  # a second route, never used
        config = write_config(tmp_path / "routes.toml", {
            listen: f"{b1},{b2}", other: {"backend": nowhere, "balance": "round-robin"}})
        with running_daemon(tmp_path, config, listen, admin):
            snapshot = get_routes(admin)
            page.goto(page_url(admin))

            # the route, its settings and both backends, up
            expect(page.locator(f'section[data-route="{listen}"] tr[data-backend]')).to_have_count(2)
            for b in (b1, b2):
                expect(backend_field(page, listen, b, "state")).to_have_text("up")
                expect(backend_row(page, listen, b)).to_have_attribute("data-state", "up")
                expect(backend_field(page, listen, b, "active")).to_have_text("0")
            expect(route_field(page, listen, "name")).to_have_text(str(listen))
            expect(route_field(page, listen, "state")).to_have_text("resolved")
            expect(route_field(page, listen, "health")).to_have_attribute("data-health", "ok")
            expect(summary_field(page, listen, "backends")).to_have_text("2/2")
            expect(route_field(page, listen, "spec")).to_have_text(f"{b1},{b2}")
            expect(route_field(page, listen, "balance")).to_have_text("random")
            expect(route_field(page, listen, "source")).to_have_text("any")
            expect(route_field(page, listen, "backends")).to_have_text("2 backends")
            expect(route_field(page, other, "balance")).to_have_text("round-robin")
            expect(backend_row(page, other, nowhere)).to_have_count(1)
            # the header
            expect(header(page, "version")).to_have_text(snapshot["version"])
            expect(header(page, "listen")).to_have_text(f"127.0.0.1:{listen}")
            expect(header(page, "routes")).to_have_text("2")
            expect(header(page, "config")).to_have_text(str(config))
            expect(header(page, "last_reload")).to_have_text("none")
            expect(page.locator('footer [data-field="refresh_every"]')).to_have_text(f"{REFRESH} s")
            expect(page.locator("[data-banner]:visible")).to_have_count(0)

            # One connection held open: active 1, and its bytes show while it is open.
            with contextlib.closing(connect("127.0.0.1", listen)) as held:
                assert ping(held) == PONG
                expect(route_field(page, listen, "active")).to_have_text("1")
                expect(header(page, "active")).to_have_text("1")
                served = next(b for b in (b1, b2) if json_backend(admin, listen, b)["active"] == 1)
                expect(backend_field(page, listen, served, "active")).to_have_text("1")
                expect(backend_field(page, listen, served, "connections")).to_have_text("1")
                expect(route_field(page, listen, "bytes_up")).to_have_text("6 B")  # PING\r\n, still open
                expect(route_field(page, listen, "bytes_down")).to_have_attribute("data-value", "7")  # +PONG\r\n
                expect(backend_field(page, listen, served, "bytes_down")).to_have_attribute("data-value", "7")
                expect(route_field(page, listen, "outcomes")).not_to_contain_text("ok")

                with contextlib.closing(connect("127.0.0.1", listen)) as second:
                    assert ping(second) == PONG
                expect(route_field(page, listen, "outcomes")).to_have_text("closed: ok 1")
                expect(route_field(page, listen, "connections")).to_have_text("2")
                expect(route_field(page, listen, "active")).to_have_text("1")
                expect(route_field(page, listen, "bytes_up")).to_have_text("12 B")
                expect(route_field(page, listen, "bytes_down")).to_have_attribute("data-value", "14")
                backend_bytes = sum(int(backend_field(page, listen, b, "bytes_down").get_attribute("data-value"))
                                    for b in (b1, b2))
                assert backend_bytes == 14

            # both closed: nothing active, two connections closed ok, all their bytes counted
            expect(route_field(page, listen, "active")).to_have_text("0")
            expect(route_field(page, listen, "outcomes")).to_have_text("closed: ok 2")
            expect(route_field(page, listen, "bytes_up")).to_have_text("12 B")
            expect(route_field(page, listen, "bytes_down")).to_have_attribute("data-value", "14")
            expect(backend_field(page, listen, served, "active")).to_have_text("0")
            expect(header(page, "total")).to_have_text("2")
            expect(header(page, "active")).to_have_text("0")


def test_page_follows_a_change_of_backends(page, tmp_path):
    listen, admin = free_port(), free_port()
    with RedisProcess(free_port()) as r1, RedisProcess(free_port()) as r2:
        b1, b2 = f"127.0.0.1:{r1.port}", f"127.0.0.1:{r2.port}"
        config = write_config(tmp_path / "routes.toml", {listen: b1})
        with running_daemon(tmp_path, config, listen, admin):
            page.goto(page_url(admin))
            expect(backend_field(page, listen, b1, "state")).to_have_text("up")
            expect(backend_row(page, listen, b2)).to_have_count(0)

            with contextlib.closing(connect("127.0.0.1", listen)) as held:
                assert ping(held) == PONG
                expect(backend_field(page, listen, b1, "active")).to_have_text("1")

                write_config(config, {listen: b2})
                expect(backend_field(page, listen, b2, "state")).to_have_text("up")
                expect(route_field(page, listen, "spec")).to_have_text(b2)
                # b1 left the set but still carries the held connection: shown as gone
                expect(backend_row(page, listen, b1)).to_have_attribute("data-state", "gone")
                expect(backend_field(page, listen, b1, "state")).to_have_text("gone")
                expect(backend_field(page, listen, b1, "active")).to_have_text("1")
                expect(route_field(page, listen, "backends")).to_have_text("1 backend")
                expect(header(page, "reloads")).to_have_text("1 / 0")
                expect(header(page, "last_reload")).to_contain_text("ok")
                expect(header(page, "last_reload")).to_contain_text(f"changed {listen}")

            # the held connection closed: b1's row goes; new connections count on b2
            expect(backend_row(page, listen, b1)).to_have_count(0)
            with contextlib.closing(connect("127.0.0.1", listen)) as s:
                assert ping(s) == PONG
            expect(backend_field(page, listen, b2, "connections")).to_have_text("1")
            expect(page.locator(f'section[data-route="{listen}"] tr[data-backend]')).to_have_count(1)


def test_page_shows_an_ejected_backend(page, tmp_path):
    listen, admin = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        r1 = stack.enter_context(RedisProcess(free_port()))
        r2 = stack.enter_context(RedisProcess(free_port()))
        b1, b2 = f"127.0.0.1:{r1.port}", f"127.0.0.1:{r2.port}"
        config = write_config(tmp_path / "routes.toml", {
            listen: {"backend": f"{b1},{b2}", "balance": "round-robin", "eject_for": 60}})
        stack.enter_context(running_daemon(tmp_path, config, listen, admin))
        page.goto(page_url(admin))
        expect(backend_field(page, listen, b2, "state")).to_have_text("up")

        r2.stop()
        # Round-robin: within two connections one tries b2 first. Its connect is refused,
        # b2 is ejected and the client is served by b1 all the same.
        for _ in range(4):
            with contextlib.closing(connect("127.0.0.1", listen)) as s:
                assert ping(s) == PONG
            if json_backend(admin, listen, b2)["failures"]:
                break
        else:
            pytest.fail(f"no connection tried {b2}: {get_routes(admin)}")

        expect(backend_row(page, listen, b2)).to_have_attribute("data-state", "ejected")
        expect(backend_field(page, listen, b2, "state")).to_have_text(re.compile(r"^ejected \d+s$"))
        expect(backend_field(page, listen, b2, "failures")).to_have_text("1")
        expect(backend_field(page, listen, b2, "last_error")).to_contain_text(re.compile("refused", re.I))
        expect(backend_field(page, listen, b1, "state")).to_have_text("up")
        expect(route_field(page, listen, "failures")).to_have_text("1")
        expect(route_field(page, listen, "outcomes")).to_contain_text("ok")
        expect(route_field(page, listen, "health")).to_have_attribute("data-health", "degraded")
        expect(route_field(page, listen, "state")).to_have_text("resolved")  # discovery is fine
        # and it is coloured apart from an up backend
        assert (measure(backend_field(page, listen, b2, "state"), BACKGROUND)
                != measure(backend_field(page, listen, b1, "state"), BACKGROUND))


def test_page_shows_health_checks(page, tmp_path):
    listen, admin, b2_port = free_port(), free_port(), free_port()
    with contextlib.ExitStack() as stack:
        r1 = stack.enter_context(RedisProcess(free_port()))
        b1, b2 = f"127.0.0.1:{r1.port}", f"127.0.0.1:{b2_port}"
        config = write_config(tmp_path / "routes.toml", {
            listen: {"backend": f"{b1},{b2}", "check_interval": 0.2, "check_rise": 2, "check_fall": 3}})
        stack.enter_context(running_daemon(tmp_path, config, listen, admin))
        page.goto(page_url(admin))
        expect(route_field(page, listen, "check")).to_have_text("every 0.2s, rise 2, fall 3")
        # Nothing listens on b2: its first check takes it down.
        expect(backend_row(page, listen, b2)).to_have_attribute("data-state", "down")
        expect(backend_field(page, listen, b2, "state")).to_have_text("down")
        expect(backend_field(page, listen, b2, "check")).to_have_text(re.compile(r"^down · Connection refused \d+s ago$"))
        expect(backend_field(page, listen, b1, "check")).to_have_text(re.compile(r"^up · ok \d+s ago$"))
        expect(route_field(page, listen, "health")).to_have_attribute("data-health", "degraded")
        expect(route_field(page, listen, "health_why")).to_contain_text("1 down by health checks")
        assert (measure(backend_field(page, listen, b2, "state"), BACKGROUND)
                != measure(backend_field(page, listen, b1, "state"), BACKGROUND))

        r2 = stack.enter_context(RedisProcess(b2_port))  # up after two checks
        expect(backend_row(page, listen, b2)).to_have_attribute("data-state", "up")
        expect(backend_field(page, listen, b2, "check")).to_have_text(re.compile(r"^up · ok \d+s ago$"))
        expect(route_field(page, listen, "state")).to_have_text("resolved")
        expect(route_field(page, listen, "health")).to_have_attribute("data-health", "ok")

        r1.stop()
        r2.stop()  # every backend down: the route says it picks as if there were no checks
        expect(route_field(page, listen, "state")).to_have_text("all down")
        expect(route_field(page, listen, "error")).to_contain_text("health checks")
        expect(route_field(page, listen, "health")).to_have_attribute("data-health", "down")
        expect(summary_row(page, listen)).to_have_attribute("data-health", "down")


def test_page_shows_a_rejected_reload_and_a_daemon_that_stops_answering(page, tmp_path):
    # The config file's name comes back in the header and in the reload error: markup in
    # it must show as text, not become an element.
    folder = tmp_path / '<img src=x onerror="window.pwned=1">'
    folder.mkdir()
    route, backend = free_port(), f"127.0.0.1:{free_port()}"
    listen, admin = free_port(), free_port()
    config = write_config(folder / "routes.toml", {route: backend})
    with running_daemon(tmp_path, config, listen, admin) as daemon:
        page.goto(page_url(admin))
        expect(backend_field(page, route, backend, "state")).to_have_text("up")
        expect(header(page, "config")).to_have_text(str(config))
        reload_banner = page.locator('[data-banner="reload"]')
        expect(reload_banner).to_be_hidden()

        write_text(config, f'[routes]\n{route} = "127.0.0.1:1\n')  # unterminated string
        expect(reload_banner).to_be_visible()
        expect(reload_banner).to_contain_text("reload rejected")
        expect(reload_banner).to_contain_text("not valid TOML")
        expect(reload_banner).to_contain_text(str(config))
        expect(header(page, "reloads")).to_have_text("0 / 1")
        expect(header(page, "last_reload")).to_contain_text("REJECTED")
        expect(backend_row(page, route, backend)).to_have_count(1)  # still serving the old one
        assert page.locator("img").count() == 0
        assert page.evaluate("window.pwned") is None

        write_config(config, {route: backend})
        expect(reload_banner).to_be_hidden()
        expect(header(page, "reloads")).to_have_text("1 / 1")

        # the daemon goes away: a banner says so, the last answer stays on the page
        down_banner = page.locator('[data-banner="down"]')
        expect(down_banner).to_be_hidden()
        daemon.stop()
        expect(down_banner).to_be_visible()
        expect(down_banner).to_contain_text("not answering")
        expect(backend_row(page, route, backend)).to_have_count(1)

    # a daemon on the same admin address again: the page recovers by itself
    write_config(config, {route: backend, listen: backend})
    with running_daemon(tmp_path, config, free_port(), admin):
        expect(down_banner).to_be_hidden()
        expect(header(page, "reloads")).to_have_text("0 / 0")
        expect(route_field(page, listen, "spec")).to_have_text(backend)


def test_page_shows_whose_route_it_is_and_the_docker_engine(page, tmp_path):
    # --docker's fields (tests/test_e2e_docker.py checks that a real daemon serves them):
    # the daemon's own /routes, with a route marked as a container's and the engine's
    # state added on the way to the page, as a --docker daemon would send them.
    listen, admin = free_port(), free_port()
    config = write_config(tmp_path / "routes.toml", {listen: f"127.0.0.1:{free_port()}"})
    with running_daemon(tmp_path, config, listen, admin):
        docker = {"url": "unix:///var/run/docker.sock", "connected": True, "engine": "20.10.24 (API 1.41)",
                  "error": None, "lost_at": None, "containers": 3, "declaring": 1}

        def as_docker_daemon(route):
            data = get_routes(admin)
            data["routes"][0]["container"] = "web-1 (3f2a9c1d0e4b)"
            data["docker"] = docker
            route.fulfill(status=200, content_type="application/json", body=json.dumps(data))

        page.route("**/routes", as_docker_daemon)
        page.goto(page_url(admin))
        expect(route_field(page, listen, "container")).to_have_text("web-1 (3f2a9c1d0e4b)")
        page.fill("#filter", "WEB-1")  # the filter finds a route by its container
        expect(page.locator(f'section[data-route="{listen}"]')).to_be_visible()
        page.fill("#filter", "web-2")
        expect(page.locator(f'section[data-route="{listen}"]')).to_be_hidden()
        page.fill("#filter", "")
        expect(header(page, "docker")).to_contain_text("3 container(s), 1 declaring routes")
        docker.update(connected=False, error="cannot connect to unix:///var/run/docker.sock: refused")
        expect(header(page, "docker")).to_contain_text("NOT CONNECTED (cannot connect")
        expect(header(page, "docker")).to_have_class(re.compile(r"\bbad\b"))


def test_page_shows_what_consul_says_of_each_instance(page, tmp_path):
    """A real Consul agent: each backend's row names its instance and node with its checks'
    status and output; an instance Consul leaves out (a critical check) has a row of its
    own saying why, and makes the route "degraded"; the filter finds a route by an
    instance's ID; the row goes when the check passes again."""
    from tests.consul import ConsulAgent, consul_binary

    consul_binary()  # skip (or fail under CI) before starting anything
    listen, admin = free_port(), free_port()
    with ConsulAgent(node="amb-page-node") as agent:
        check1 = agent.register("pg", "pg-1", "127.0.0.2", 7981, ttl_check=True)
        check2 = agent.register("pg", "pg-2", "127.0.0.3", 7982, ttl_check=True)
        # (Consul syncs a check's new output to the catalog at once only with a new status)
        agent.check_fail(check1)
        agent.check_pass(check1, "PONG in 0.4 ms")
        agent.check_fail(check2, "dial tcp 127.0.0.3:7982: connect: connection refused")
        config = write_config(tmp_path / "routes.toml", {listen: {"backend": "consul:///pg", "name": "pg"}})
        with running_daemon(tmp_path, config, listen, admin, ["--consul", agent.http_addr]):
            page.goto(page_url(admin))
            instance = backend_field(page, "pg", "127.0.0.2:7981", "instance")
            expect(instance).to_have_attribute("data-id", "pg-1")
            expect(instance).to_contain_text("pg-1 on amb-page-node · passing · ")
            expect(instance).to_contain_text("PONG in 0.4 ms")
            expect(instance).not_to_contain_text("Agent alive")  # a passing node check: in the tooltip only
            expect(instance).to_have_attribute("title", re.compile(r"Serf Health Status: passing · Agent alive"))
            expect(instance.locator('[data-field="instance_status"]')).to_have_text("passing")
            failing = page.locator('section[data-route="pg"] tr[data-failing="pg-2"]')
            expect(failing).to_have_attribute("data-state", "critical")
            expect(failing.locator('[data-field="name"]')).to_contain_text("127.0.0.3:7982")
            expect(failing.locator('[data-field="name"]')).to_contain_text("pg-2 on amb-page-node · critical")
            expect(failing.locator('[data-field="state"]')).to_have_text("not offered")
            expect(failing.locator('[data-field="checks"]')).to_have_text(
                "pg pg-2 TTL: critical · dial tcp 127.0.0.3:7982: connect: connection refused")
            expect(route_field(page, "pg", "health")).to_have_attribute("data-health", "degraded")
            expect(route_field(page, "pg", "health_why")).to_have_text("1 instance failing in the registry, not offered")
            expect(summary_field(page, "pg", "backends")).to_have_text("1/1")
            page.fill("#filter", "PG-2")
            expect(page.locator('section[data-route="pg"]')).to_be_visible()
            page.fill("#filter", "pg-9")
            expect(page.locator('section[data-route="pg"]')).to_be_hidden()
            page.fill("#filter", "")

            agent.check_pass(check2, "PONG again")
            expect(failing).to_have_count(0)
            expect(backend_field(page, "pg", "127.0.0.3:7982", "instance")).to_contain_text("PONG again")
            expect(route_field(page, "pg", "health")).to_have_attribute("data-health", "ok")


# ---- health, summary, rates, filter, narrow screens -----------------------------------


def eject_by_connecting(admin: int, route: int, backend: str) -> None:
    """Connect to ``route`` (a listen port of the daemon) until its connect to ``backend``
    (a closed port) has failed, which ejects it. A connection that finds no backend is
    closed by the daemon: that is expected here."""
    for _ in range(6):
        with contextlib.suppress(OSError), contextlib.closing(connect("127.0.0.1", route)) as s:
            ping(s)
        if json_backend(admin, route, backend)["state"] == "ejected":
            return
    pytest.fail(f"{backend} of route {route} was not ejected: {get_routes(admin)}")


def test_health_rolls_up_from_the_backends_and_the_summary_has_a_line_per_route(page, tmp_path):
    ok, degraded, down, admin = free_port(), free_port(), free_port(), free_port()
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with contextlib.ExitStack() as stack:
        r1, r2, r3 = (stack.enter_context(RedisProcess(free_port())) for _ in range(3))
        config = write_config(tmp_path / "routes.toml", {
            ok: f"127.0.0.1:{r1.port},127.0.0.1:{r2.port}",
            degraded: {"backend": f"127.0.0.1:{r3.port},{closed}", "balance": "round-robin", "eject_for": 120},
            down: {"backend": closed, "eject_for": 120},
        })
        stack.enter_context(running_daemon(tmp_path, config, [ok, degraded, down], admin))
        page.goto(page_url(admin))
        expect(page.locator("#summary tr[data-route]")).to_have_count(3)
        for route in (ok, degraded, down):  # before any connection: every backend counts as up
            expect(summary_row(page, route)).to_have_attribute("data-health", "ok")

        eject_by_connecting(admin, degraded, closed)
        eject_by_connecting(admin, down, closed)

        # The route whose only backend is ejected is down, although discovery resolved it.
        section = page.locator(f'section[data-route="{down}"]')
        expect(section).to_have_attribute("data-health", "down")
        expect(route_field(page, down, "health")).to_have_text("down")
        expect(route_field(page, down, "health_why")).to_have_text("no usable backend: 1 ejected")
        expect(route_field(page, down, "state")).to_have_text("resolved")
        expect(route_field(page, degraded, "health")).to_have_text("degraded")
        expect(route_field(page, degraded, "health_why")).to_have_text("1 of 2 up (1 ejected)")
        expect(route_field(page, ok, "health")).to_have_text("ok")
        badges = {route: measure(route_field(page, route, "health"), BACKGROUND) for route in (ok, degraded, down)}
        assert len(set(badges.values())) == 3, badges

        # The summary: one line per route, in the daemon's order, with the same health.
        rows = page.locator("#summary tr[data-route]")
        expect(rows).to_have_count(3)
        order = [r["name"] for r in get_routes(admin)["routes"]]
        assert [rows.nth(i).get_attribute("data-route") for i in range(3)] == order
        for route, health, backends, spec in ((ok, "ok", "2/2", f"127.0.0.1:{r1.port},127.0.0.1:{r2.port}"),
                                              (degraded, "degraded", "1/2", f"127.0.0.1:{r3.port},{closed}"),
                                              (down, "down", "0/1", closed)):
            expect(summary_row(page, route)).to_have_attribute("data-health", health)
            expect(summary_field(page, route, "health")).to_have_text(health)
            expect(summary_field(page, route, "backends")).to_have_text(backends)
            expect(summary_field(page, route, "spec")).to_have_text(spec)
            expect(summary_field(page, route, "active")).to_have_text("0")
        expect(page.locator('[data-field="health_counts"]')).to_have_text("3 routes: 1 down, 1 degraded, 1 ok")

        # A route's name in the summary jumps to its section.
        page.set_viewport_size({"width": 1280, "height": 400})  # so that the last section starts below
        page.evaluate("window.scrollTo(0, 0)")  # from the top, whatever an earlier check scrolled
        summary_field(page, down, "name").click()
        expect(section).to_be_in_viewport()
        wait_until(lambda: page.evaluate("window.scrollY") > 0, timeout=5, what="the page scrolled to the route")
        assert page.evaluate("decodeURIComponent(location.hash)") == f"#route-{down}"


def test_rates_come_from_successive_answers_and_peaks_stay(page, tmp_path):
    listen, admin = free_port(), free_port()
    with RedisProcess(free_port()) as r1:
        config = write_config(tmp_path / "routes.toml", {listen: f"127.0.0.1:{r1.port}"})
        with running_daemon(tmp_path, config, listen, admin):
            page.goto(page_url(admin))
            # the second answer gives the first rates: nothing flows, so 0
            expect(route_field(page, listen, "conn_rate")).to_have_attribute("data-value", "0")
            expect(route_field(page, listen, "up_rate")).to_have_text("0 B/s")
            expect(summary_field(page, listen, "conn_rate")).to_have_text("0")

            # Traffic, in rounds of 20 connections of 10 PINGs, until the page shows a rate.
            deadline, connections, pings = time.monotonic() + WAIT_MS / 1000, 0, 0
            while value(route_field(page, listen, "conn_rate")) == 0:
                assert time.monotonic() < deadline, f"no rate after {connections} connections: {get_routes(admin)}"
                for _ in range(20):
                    with contextlib.closing(connect("127.0.0.1", listen)) as s:
                        for _ in range(10):
                            assert ping(s) == PONG
                    connections, pings = connections + 1, pings + 10
            for field in ("up_rate", "down_rate"):
                assert value(route_field(page, listen, field)) > 0
            assert value(header(page, "conn_rate")) > 0

            # Quiet again: every rate goes back to 0; the peaks stay, and they are per second:
            # never more than what was sent in all over the shortest time between two answers
            # (REFRESH, at least).
            for field in ("conn_rate", "up_rate", "down_rate"):
                expect(route_field(page, listen, field)).to_have_attribute("data-value", "0")
                expect(summary_field(page, listen, field)).to_have_attribute("data-value", "0")
                expect(header(page, field)).to_have_attribute("data-value", "0")
            peak_conn = value(route_field(page, listen, "peak_conn_rate"))
            peak_up = value(route_field(page, listen, "peak_up_rate"))
            assert 0 < peak_conn <= connections / REFRESH
            assert 0 < peak_up <= 6 * pings / REFRESH  # PING\r\n
            assert value(header(page, "peak_conn_rate")) > 0  # the daemon's: its own total, not quite the route's
            expect(summary_field(page, listen, "conn_rate")).to_have_attribute("title", re.compile(r"peak \d"))
            totals = get_routes(admin)["routes"][0]
            assert (totals["connections"], totals["bytes_up"]) == (connections, 6 * pings)


def test_filter_hides_and_shows_routes(page, tmp_path):
    a, b, c, admin = free_port(), free_port(), free_port(), free_port()
    backend_a, backend_b, backend_c = (f"127.0.0.1:{free_port()}" for _ in range(3))
    config = write_config(tmp_path / "routes.toml", {a: backend_a, b: backend_b, c: f"{backend_c},{backend_a}"})
    with running_daemon(tmp_path, config, a, admin):
        page.goto(page_url(admin, filter=backend_b))  # set by the address too
        expect(page.locator("#filter")).to_have_value(backend_b)

        def shown(*routes):
            for route in (a, b, c):
                for where in (page.locator(f'section[data-route="{route}"]'), summary_row(page, route)):
                    if route in routes:
                        expect(where).to_be_visible()
                    else:
                        expect(where).to_be_hidden()

        shown(b)
        expect(page.locator('[data-field="health_counts"]')).to_contain_text("1 shown")
        # it holds across the next answers (the page redraws every second)
        before = page.locator('footer [data-field="refreshed"]').text_content()
        expect(page.locator('footer [data-field="refreshed"]')).not_to_have_text(before)
        shown(b)

        page.fill("#filter", backend_a)  # a backend of two routes
        shown(a, c)
        page.fill("#filter", str(c))  # a route's name
        shown(c)
        page.fill("#filter", "no such route")
        shown()
        expect(page.locator('[data-field="no_match"]')).to_be_visible()
        page.fill("#filter", "")
        shown(a, b, c)
        assert "filter=" not in page.url


NUMERIC_CELLS_OVERFLOWING = """() => [...document.querySelectorAll("td.num, th.num, #daemon [data-field]")]
    .filter((e) => e.offsetParent !== null && e.scrollWidth > e.clientWidth + (e.tagName === "SPAN" ? 1 : 0))
    .map((e) => `${e.closest("[data-route]")?.dataset.route ?? "header"} ${e.dataset.field}: ${e.textContent}`
                + ` (${e.scrollWidth} > ${e.clientWidth})`)"""


def test_numbers_are_not_cut_at_900px_and_the_layout_wraps(page, tmp_path):
    listen, admin = free_port(), free_port()
    long_name = "redis-primary-0.redis-headless.production.svc.cluster.local"
    # what Consul may say of an instance: long IDs and node names, an HTTP check quoting a body
    check = {"name": "Service 'redis' check", "status": "passing", "scope": "service",
             "output": "HTTP GET http://10.0.0.1:8080/health: 200 OK Output: " + "{\"status\":\"UP\"}" * 30}
    instance = {"id": "redis-primary-0-" + "9f1c2e7a" * 4, "node": "ip-10-0-0-1.eu-west-1.compute.internal",
                "status": "passing", "checks": [check]}
    with RedisProcess(free_port()) as r1:
        b1 = f"127.0.0.1:{r1.port}"
        config = write_config(tmp_path / "routes.toml", {listen: f"{b1},127.0.0.1:{free_port()}"})
        with running_daemon(tmp_path, config, listen, admin):
            page.set_viewport_size({"width": 900, "height": 900})
            answers = []

            def busy_host(route):
                # The daemon's own answer with a busy host's figures, growing between answers
                # so that the rates are as large: the widest numbers the page can get.
                data = get_routes(admin)
                n = len(answers)
                answers.append(n)
                big = 10 ** 11 + n * 10 ** 9
                for r in data["routes"]:
                    r.update(active=987654, connections=big, bytes_up=big * 40_000, bytes_down=big * 50_000)
                    for bk in r["backends"]:
                        bk.update(active=987654, connections=big, failures=12345678, priority=65535, weight=65535,
                                  bytes_up=big * 40_000, bytes_down=big * 50_000, host=long_name,
                                  last_error="Connection refused " * 5, instance=instance)
                    r.update(failing_instances=[{"address": "fd00:1234:5678::99", "port": 6379, **instance,
                                                 "status": "critical", "checks": [{**check, "status": "critical"}]}],
                             failing_instances_more=7)
                data["connections"]["total"] = big
                route.fulfill(status=200, content_type="application/json", body=json.dumps(data))

            page.goto(page_url(admin))
            expect(backend_row(page, listen, b1)).to_have_count(1)
            assert page.evaluate(NUMERIC_CELLS_OVERFLOWING) == []

            page.route("**/routes", busy_host)
            expect(route_field(page, listen, "connections")).to_have_text(re.compile(r"^1\d{11}$"))
            expect(page.locator(f'section[data-route="{listen}"] tr[data-failing]')).to_have_count(1)
            expect(backend_field(page, listen, b1, "instance")).to_contain_text("eu-west-1")
            expect(route_field(page, listen, "peak_up_rate")).to_have_text(re.compile(r"[TP]iB/s$"))
            expect(summary_field(page, listen, "down_rate")).to_have_text(re.compile(r"[TP]iB/s$"))
            assert page.evaluate(NUMERIC_CELLS_OVERFLOWING) == []
            # nothing wider than the window: the text wraps instead
            assert page.evaluate("document.documentElement.scrollWidth") <= 900
            name = backend_field(page, listen, b1, "name")
            height, line = measure(name, "(e) => [e.clientHeight, parseFloat(getComputedStyle(e).lineHeight)]")
            assert height > 2 * line, "the long host name should wrap"
            tops = page.evaluate("() => new Set([...document.querySelectorAll('#daemon .stats > div')]"
                                 ".filter((e) => e.offsetParent).map((e) => e.offsetTop)).size")
            assert tops >= 2, "the header's figures should wrap onto more lines"
            # the columns of every route's table line up
            lefts = page.evaluate("""() => [...document.querySelectorAll("section[data-route] tr.cols")]
                .map((tr) => [...tr.children].map((th) => Math.round(th.getBoundingClientRect().left)).join(","))""")
            assert len(set(lefts)) == 1, lefts


def test_the_screenshot_script_makes_readmes_picture(tmp_path):
    """scripts/lib/screenshot_status.py redoes docs/status-page.png; README shows it."""
    from tests.consul import consul_binary

    consul_binary()  # the picture's routes follow a real agent: skip (or fail under CI) without one
    readme = (REPO_ROOT / "README.md").read_text()
    assert "](docs/status-page.png)" in readme
    committed = REPO_ROOT / "docs" / "status-page.png"
    assert png_size(committed) == (1280, 900)
    assert committed.stat().st_size < 400_000

    out = tmp_path / "status.png"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "lib" / "screenshot_status.py"),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert png_size(out) == (1280, 900)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
