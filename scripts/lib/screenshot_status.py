"""Make docs/status-page.png, README's picture of the status page, again.

    .venv/bin/python scripts/lib/screenshot_status.py [--out docs/status-page.png]

(the venv that scripts/test makes). It runs what tests/test_status_page.py runs: the real
daemon with real ``redis-server`` backends, everything on loopback, and Debian's
/usr/bin/chromium driven by Playwright, and a real Consul agent (tests/consul.py) whose
TCP checks probe the Redis servers. Three routes, one per health: ``ok``
(``consul:///redis``: two Redis instances passing their checks, with traffic flowing
while the picture is taken, so the rates are not 0), ``degraded`` (``consul:///cache``:
one instance passing, one that Consul leaves out because its check fails against a
closed port) and ``down`` (a static route whose only backend is a closed port). The
picture is the browser's 1280x900 viewport: the header, the summary table and the first
routes. Everything it starts is stopped again, also when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.consul import ConsulAgent  # noqa: E402
from tests.daemon import RedisProcess, connect, free_port, ping, wait_until  # noqa: E402
from tests.test_status_page import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    get_routes,
    running_daemon,
    write_config,
)

# Ports a reader recognises, if free here (the daemon listens on its routes' ports).
NICE_PORTS = (6379, 6380, 6381)


def port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def traffic(port: int, stop: threading.Event, pings: int) -> None:
    """Connections of ``pings`` PINGs each to ``port``, one after the other, until ``stop``."""
    while not stop.is_set():
        with contextlib.closing(connect("127.0.0.1", port)) as s:
            for _ in range(pings):
                ping(s)


def register(agent: ConsulAgent, service: str, sid: str, port: int) -> None:
    """An instance at 127.0.0.1:``port`` with a TCP check every second, as an operator's
    service definition would have it. The check starts at "warning", so that its first
    result is a change of status: Consul sends a check's output on to the catalog at once
    only with a new status (else after check_update_interval, 5 minutes)."""
    agent.put("/v1/agent/service/register", body={
        "Name": service, "ID": sid, "Address": "127.0.0.1", "Port": port,
        "Check": {"Name": f"{service} TCP", "TCP": f"127.0.0.1:{port}", "Interval": "1s", "Timeout": "1s",
                  "Status": "warning"}})


def settled(admin: int, want: dict[str, tuple[int, int]], timeout: float = 20) -> None:
    """Wait until each route named in ``want`` has (backends, failing instances) as given."""
    def have() -> dict[str, tuple[int, int]]:
        routes = {r["name"]: r for r in get_routes(admin)["routes"]}
        return {n: (len(routes[n]["backends"]), len(routes[n]["failing_instances"] or [])) for n in want}

    wait_until(lambda: have() == want, timeout=timeout,
               what=lambda: f"the Consul routes to settle: {have()}, expected {want}")


def eject(admin: int, route: int, backend: str) -> None:
    """Connect to ``route`` until its connect to ``backend`` failed (then it is ejected)."""
    for _ in range(20):
        with contextlib.suppress(OSError), contextlib.closing(connect("127.0.0.1", route)) as s:
            ping(s)
        r = next(r for r in get_routes(admin)["routes"] if r["port"] == route)
        if any(b["name"] == backend and b["state"] == "ejected" for b in r["backends"]):
            return
    raise RuntimeError(f"{backend} of route {route} was never ejected")


def screenshot(out: Path, *, width: int = 1280, height: int = 900) -> None:
    from playwright.sync_api import expect, sync_playwright

    ok, degraded, down = (port(p) for p in NICE_PORTS)
    admin = free_port()
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amb-shot-")))
        r1, r2, r3 = (stack.enter_context(RedisProcess(free_port(), workdir=tmp)) for _ in range(3))
        agent = stack.enter_context(ConsulAgent(node="node-a"))
        register(agent, "redis", "redis-1", r1.port)
        register(agent, "redis", "redis-2", r2.port)
        register(agent, "cache", "cache-1", r3.port)
        register(agent, "cache", "cache-2", int(closed.rsplit(":", 1)[1]))
        config = write_config(tmp / "routes.toml", {
            ok: {"backend": "consul:///redis", "balance": "round-robin", "name": "redis"},
            degraded: {"backend": "consul:///cache", "name": "cache"},
            down: {"backend": closed, "eject_for": 600, "name": "legacy"},
        })
        stack.enter_context(running_daemon(tmp, config, [ok, degraded, down], admin, ["--consul", agent.http_addr]))
        eject(admin, down, closed)
        settled(admin, {"redis": (2, 0), "cache": (1, 1)})  # Consul's first checks have run

        stop = threading.Event()
        workers = [threading.Thread(target=traffic, args=(p, stop, n), daemon=True)
                   for p, n in ((ok, 200), (ok, 5), (degraded, 50))]
        stack.callback(lambda: [w.join(10) for w in workers])
        stack.callback(stop.set)
        for w in workers:
            w.start()
        held = stack.enter_context(contextlib.closing(connect("127.0.0.1", ok)))
        ping(held)  # one connection open: "active 1"

        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        stack.callback(browser.close)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"http://127.0.0.1:{admin}/")
        for route in ("redis", "cache"):
            expect(page.locator(f'#summary tr[data-route="{route}"] [data-field="up_rate"]')).not_to_have_attribute(
                "data-value", "", timeout=15_000)
        expect(page.locator('#summary tr[data-route="redis"]')).to_have_attribute("data-health", "ok", timeout=15_000)
        expect(page.locator('#summary tr[data-route="redis"] [data-field="backends"]')).to_have_text("2/2")
        expect(page.locator('#summary tr[data-route="legacy"]')).to_have_attribute("data-health", "down")
        expect(page.locator('#summary tr[data-route="cache"]')).to_have_attribute("data-health", "degraded")
        expect(page.locator('section[data-route="cache"] tr[data-failing="cache-2"] [data-field="checks"]')
               ).to_contain_text("connection refused", timeout=15_000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": width, "height": height})
    print(f"wrote {out} ({width}x{height})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "status-page.png", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    screenshot(args.out.resolve(), width=args.width, height=args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
