"""The admin HTTP API: /healthz, /routes (JSON), /metrics (Prometheus) and the status page.

Served under trio, in the daemon's own event loop, by hypercorn (HTTP/1.1 on h11) with a
small Starlette app: no hand-written HTTP. Every endpoint is ``async`` so it runs on the
trio thread and reads the live state (route table, counters) without locks, exactly as
the connection handlers see it. None of this is on the relay path: the relay only bumps
integers (see stats.py), and the numbers are assembled here when someone asks.

Metric names (all prefixed ``ambassadord_``) are listed in README, "Operations".

Only requests whose Host header names this machine are answered (``host_allowed``): a web
page that an attacker's DNS name points at 127.0.0.1 (DNS rebinding) could otherwise read
/routes from a browser on this host. Every other Host gets 421 and a one-line reason.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import time
from importlib import resources
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HTTPRoute

from . import __version__, health
from .server import ListenAddress, Server, StartupError, parse_listen
from .stats import merged
from .config_state import ConfigState  # noqa: F401 (its home for the daemon, which need not load this module)

if TYPE_CHECKING:
    from .workers import WorkerPool

log = logging.getLogger("ambassadord.admin")

DEFAULT_ADMIN = "127.0.0.1:10001"


def parse_admin(text: str) -> ListenAddress | None:
    """``--admin`` value: ``ADDR:PORT``, ``[V6]:PORT`` or ``off`` (None)."""
    if text.strip().lower() == "off":
        return None
    try:
        return parse_listen(text)
    except ValueError as exc:
        message = str(exc).replace("listen address", "admin address").replace(
            "e.g. 0.0.0.0:10000", f"e.g. {DEFAULT_ADMIN}, or off")
        if message.endswith("is not an IP address"):
            # A name is refused, not looked up: it may have several addresses, of both
            # families, or none yet at boot; which one the API listens on must not depend on it.
            message += f": the admin API listens on an IP address, e.g. {DEFAULT_ADMIN} (status --admin takes a host name)"
        raise ValueError(message) from None


def bind_admin(addr: ListenAddress) -> socket.socket:
    """Bind the admin listener now (so a busy port fails startup with a clear message)."""
    try:
        s = socket.socket(addr.family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if addr.family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr.host, addr.port))
            s.listen(128)
        except BaseException:
            s.close()
            raise
    except OSError as exc:
        hint = " (use --admin ADDR:PORT for another, or --admin off)" if exc.errno == errno.EADDRINUSE else ""
        raise StartupError(f"cannot listen on admin address {addr}: {exc.strerror}{hint}") from None
    return s


# ---- which Host headers are ours -------------------------------------------------------


def host_allowed(host: str | None, local_ip: str | None, *, bound: str, hostname: str) -> bool:
    """Is ``host`` (a Host header, with or without port) a name of this admin listener?

    Accepted: no Host at all (not a browser: browsers always send one); ``localhost`` and
    ``*.localhost`` (RFC 6761: they never leave the machine); an IP literal that is a
    loopback address, the address the listener is bound to (``bound``, also 0.0.0.0), or
    the local address the request came in on (``local_ip``: with a wildcard bind, the
    address the client used); and, unless the listener is bound to a loopback address,
    the machine's host name (``hostname``, exactly: not its subdomains). A DNS-rebinding
    page always sends its own DNS name, which is none of these.
    """
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        end = name.find("]")
        rest = name[end + 1:] if end > 0 else "x"
        if rest and not (rest[:1] == ":" and rest[1:].isdigit()):
            return False
        name = name[1:end]
    elif ":" in name:
        name, _, port = name.partition(":")
        if not port.isdigit():
            return False
    if name.endswith("."):  # the absolute form of a DNS name
        name = name[:-1]
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip, bound_ip = _ip(name), _ip(bound)
    if ip is None:
        return name == hostname.lower() and not (bound_ip is not None and bound_ip.is_loopback)
    return ip.is_loopback or ip in {bound_ip, _ip(local_ip)}


def _ip(text: str | None):
    """``text`` as an IP address (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text) if text else None
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


REFUSED_LOG_EVERY = 10.0  # seconds


class HostCheck:
    """ASGI middleware: answer 421 to a request whose Host is not ours (see host_allowed)."""

    def __init__(self, app, *, bound: str):
        self.app = app
        self.bound = bound
        self.hostname = socket.gethostname()
        self._logged_at = -math.inf

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            hosts = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"]
            server = scope.get("server")
            local = server[0] if server else None
            if len(hosts) > 1 or not host_allowed(hosts[0] if hosts else None, local, bound=self.bound,
                                                  hostname=self.hostname):
                shown = hosts[0][:100] if len(hosts) == 1 else f"{len(hosts)} Host headers"
                now = time.monotonic()
                if now - self._logged_at >= REFUSED_LOG_EVERY:  # a page may retry in a loop
                    self._logged_at = now
                    log.warning("admin API: refused a request for Host %r from %s (logged at most every %gs)",
                                shown, (scope.get("client") or ("?",))[0], REFUSED_LOG_EVERY)
                response = PlainTextResponse(
                    f"ambassadord admin API: Host {shown!r} is not accepted (protection against DNS rebinding); "
                    "use localhost, a loopback address or the address it listens on\n", status_code=421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the view of the live state ---------------------------------------------------------


def own_totals(server: Server) -> dict:
    """This process's connection totals, as live_view gives them for a single process."""
    return {"active": server.active, "total": server.total, "unrouted": dict(server.unrouted),
            "workers": {"count": 1, "answered": 1, "pids": [os.getpid()], "restarts": 0}}


async def live_view(server: Server, pool: WorkerPool | None = None) -> tuple[dict, dict]:
    """Each route's RouteStats and the connection totals, summed over every process of
    --workers (``pool``'s helpers are asked now; see workers/). Without helpers, the route's own."""
    totals = own_totals(server)
    routes = server.table.routes
    if pool is None:
        return {r: r.stats for r in routes}, totals
    snaps = await pool.collect()
    totals["workers"] = {"count": pool.count, "answered": 1 + len(snaps), "pids": [os.getpid(), *(s["pid"] for s in snaps)],
                         "restarts": pool.restarts}
    for snap in snaps:
        totals["active"] += snap["active"]
        totals["total"] += snap["total"]
        for outcome, n in snap["unrouted"].items():
            totals["unrouted"][outcome] = totals["unrouted"].get(outcome, 0) + n
    views = {r: merged(r.stats, [s["routes"][r.name] for s in snaps if r.name in s["routes"]]) for r in routes}
    return views, totals


def _backend_view(route, st, key: str, backend, now_mono: float, registry: dict | None = None) -> dict:
    b = st.backends.get(key)
    up, down = st.backend_bytes(key)
    known = backend or (b.backend if b else None)  # a backend gone from the set: as it was
    view = {
        "name": key,
        "address": known.address if known else None,
        "port": known.port if known else None,
        "host": known.name if known else None,
        "priority": known.priority if known else None,
        "weight": known.weight if known else None,
        "in_set": backend is not None,
        "state": "up",
        "ejected_for": None,
        "active": b.active if b else 0,
        "connections": b.connections if b else 0,
        "failures": b.failures if b else 0,
        "last_connect": b.last_connect if b else None,
        "bytes_up": up,
        "bytes_down": down,
        "last_error": b.last_error if b else None,
        "last_failure": b.last_failure if b else None,
    }
    view["check"] = _check_view(route, backend)
    # what the registry says of it (Consul: instance ID, node, checks); None: nothing more
    view["instance"] = (registry or {}).get("backends", {}).get(key)
    if backend is None:
        view["state"] = "gone"  # left the set; connections still open on it
    elif backend in route.pick.down:
        view["state"] = "down"  # by its health checks (picked all the same if all are down)
    else:
        left = _ejected_for(route, st, backend, now_mono)
        if left > 0 or _on_trial(route, backend, now_mono):
            view["state"] = "ejected"  # a trial (see balancer.py) in flight: ejected for 0 more seconds
            view["ejected_for"] = round(left, 3)
    return view


def _on_trial(route, backend, now_mono: float) -> bool:
    return route.pick.ejections.trials.get(backend, 0.0) > now_mono


def _check_view(route, backend) -> dict | None:
    """What the route's health checks know of ``backend`` (None: the route has none)."""
    if not route.config.check_interval or backend is None:
        return None
    c = route.pick.checks.get(backend)
    if c is None:
        return {"state": "up", "successes": 0, "failures": 0, "checks": 0, "failed": 0, "last_result": None,
                "last_at": None, "changed_at": None}
    return {"state": "up" if c.up else "down", "successes": c.successes, "failures": c.failures, "checks": c.checks,
            "failed": c.failed, "last_result": c.last_result, "last_at": c.last_at, "changed_at": c.changed_at}


def _ejected_for(route, st, backend, now_mono: float) -> float:
    """Seconds ``backend`` stays ejected (in any process of --workers); 0 if it is not."""
    until = route.pick.ejections.until.get(backend)
    return max(until - now_mono if until is not None else 0.0, st.ejected.get(str(backend), 0.0))


def route_view(route, st=None) -> dict:
    """``st``: the route's stats to show (default its own; see live_view)."""
    cfg, bset = route.config, route.backends
    st = st or route.stats
    now_mono = time.monotonic()
    registry = _registry_view(route)
    backends = [_backend_view(route, st, str(b), b, now_mono, registry) for b in bset.backends]
    in_set = {str(b) for b in bset.backends}
    backends += [_backend_view(route, st, k, None, now_mono, registry) for k, b in st.backends.items()
                 if k not in in_set and b.active > 0]
    up, down = st.bytes()
    hist, total = st.connect_histogram()
    return {
        "name": route.name,
        "port": cfg.port,
        "source": str(cfg.source) if cfg.source else None,
        "spec": cfg.spec.text,
        "origin": cfg.origin,
        "container": cfg.container or None,
        "balance": cfg.balance,
        "mode": cfg.mode,
        "on_down": cfg.on_down,
        "drain": cfg.drain,
        "connect_timeout": cfg.connect_timeout,
        "idle_timeout": cfg.idle_timeout,
        "eject_for": cfg.eject_for,
        "check": None if not cfg.check_interval else {
            "interval": cfg.check_interval, "rise": cfg.check_rise, "fall": cfg.check_fall,
            "all_down": health.all_down(route)},
        "resolved": route.resolved,
        "stale": bset.stale,
        "error": bset.error,
        "answered_by": bset.source,
        "updated_at": route.answered_at,
        "changed_at": route.changed_at,
        "updates": route.updates,
        "errors": route.errors,
        "active": st.active,
        "connections": st.total(),
        "failures": st.failures,
        "outcomes": dict(sorted(st.outcomes.items())),
        "bytes_up": up,
        "bytes_down": down,
        "connect_seconds": {"count": hist[-1][1], "sum": round(total, 6)},
        "backends": backends,
        # instances the registry lists but does not offer (their checks fail); None: the
        # source has no such notion
        "failing_instances": registry.get("failing") if registry else None,
        "failing_instances_more": registry.get("failing_more", 0) if registry else 0,
    }


def _registry_view(route) -> dict | None:
    view = getattr(route.resolver, "registry_view", None)
    if view is None:
        return None
    try:
        return view()
    except Exception:  # a view of the registry must never take /routes down
        log.exception("route %s: reading its registry's details failed", route.name)
        return None


def snapshot(server: Server, config: ConfigState, views: dict | None = None, totals: dict | None = None) -> dict:
    """Everything /routes shows: the daemon, its configuration, and every route.
    ``views`` and ``totals``: from live_view (default: this process's own counters)."""
    views = views or {}
    totals = totals or own_totals(server)
    return {
        "version": __version__,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": server.started_at,
        "now": time.time(),
        "listening": server.listening,
        "stopping": server.stopping,
        "listen": [str(ListenAddress(*s.getsockname()[:2])) for s in server.listeners if s.fileno() >= 0],
        "workers": totals["workers"],
        "connections": {"active": totals["active"], "total": totals["total"],
                        "unrouted": dict(sorted(totals["unrouted"].items()))},
        "config": {
            "file": config.file,
            "loaded_at": config.loaded_at,
            "reloads": config.reloads_ok,
            "reloads_failed": config.reloads_failed,
            "last_reload": None if config.last_reload_at is None else {
                "at": config.last_reload_at, "ok": config.last_reload_ok,
                "error": config.last_reload_error, "summary": config.last_reload_summary},
        },
        "docker": config.docker() if config.docker is not None else None,
        "routes": [route_view(r, views.get(r)) for r in sorted(server.table.routes, key=_route_order)],
    }


def _route_order(route):
    src = route.config.source
    return (route.port, src is not None, str(src) if src else "")


# ---- Prometheus ---------------------------------------------------------------------


class DaemonCollector:
    """Reads the live counters at scrape time (no per-connection cost; see stats.py)."""

    def __init__(self, server: Server, config: ConfigState):
        self.server = server
        self.config = config
        # Set from live_view just before each scrape (collect() itself cannot await).
        self.views: dict = {}
        self.totals: dict | None = None

    def collect(self):
        fams = {key: kind(name, text, labels=labels) for key, kind, name, text, labels in _ROUTE_FAMILIES}
        now, now_mono = time.time(), time.monotonic()
        for route in self.server.table.routes:
            self._add_route(fams, route, self.views.get(route) or route.stats, now, now_mono)
        totals = self.totals or own_totals(self.server)
        for outcome, n in sorted(totals["unrouted"].items()):
            fams["conns"].add_metric(["", outcome], n)
        yield from fams.values()
        yield from self._daemon_families(totals)

    @staticmethod
    def _add_route(fams: dict, route, st, now: float, now_mono: float) -> None:
        """One route's samples in the per-route families."""
        name = route.name
        fams["info"].add_metric([name, str(route.port), str(route.config.source or ""), route.config.mode], 1)
        for outcome, n in sorted(st.outcomes.items()):
            fams["conns"].add_metric([name, outcome], n)
        fams["active"].add_metric([name], st.active)
        up, down = st.bytes()
        fams["bytes"].add_metric([name, "up"], up)
        fams["bytes"].add_metric([name, "down"], down)
        hist, total = st.connect_histogram()
        fams["connect"].add_metric([name], hist, total)
        for key, b in st.backends.items():
            fams["bconns"].add_metric([name, key], b.connections)
            fams["bactive"].add_metric([name, key], b.active)
            fams["bfail"].add_metric([name, key], b.failures)
        for b in route.backends.backends:
            fams["ejected"].add_metric([name, str(b)], 1 if _ejected_for(route, st, b, now_mono) > 0 else 0)
        if route.config.check_interval:
            for b in route.backends.backends:
                c = route.pick.checks.get(b)
                fams["check_up"].add_metric([name, str(b)], 0 if b in route.pick.down else 1)
                fams["checks"].add_metric([name, str(b), "ok"], c.checks - c.failed if c else 0)
                fams["checks"].add_metric([name, str(b), "failed"], c.failed if c else 0)
        fams["nback"].add_metric([name], len(route.backends.backends))
        fams["updates"].add_metric([name], route.updates)
        fams["errors"].add_metric([name], route.errors)
        fams["stale"].add_metric([name], 1 if route.backends.stale else 0)
        answered = route.answered_at
        fams["age"].add_metric([name], now - answered if answered else math.nan)

    def _daemon_families(self, totals: dict):
        """The daemon-wide families: reloads, routes, build, workers."""
        reloads = CounterMetricFamily("ambassadord_config_reloads", "Configuration reloads, by result.",
                                      labels=["result"])
        reloads.add_metric(["ok"], self.config.reloads_ok)
        reloads.add_metric(["error"], self.config.reloads_failed)
        last_ok = GaugeMetricFamily("ambassadord_config_last_reload_successful",
                                    "1 if the last reload (or the start) loaded its configuration.")
        last_ok.add_metric([], 1 if self.config.last_reload_ok else 0)
        loaded = GaugeMetricFamily("ambassadord_config_loaded_timestamp_seconds",
                                   "When the configuration now serving was loaded (Unix time).")
        loaded.add_metric([], self.config.loaded_at)
        routes = GaugeMetricFamily("ambassadord_routes", "Routes configured.")
        routes.add_metric([], len(self.server.table.routes))
        info = GaugeMetricFamily("ambassadord_build_info", "Always 1; the version in a label.", labels=["version"])
        info.add_metric([__version__], 1)
        workers = GaugeMetricFamily("ambassadord_workers", "Processes serving connections (--workers), and how many "
                                    "answered for this scrape.", labels=["state"])
        wt = totals["workers"]
        workers.add_metric(["configured"], wt["count"])
        workers.add_metric(["answered"], wt["answered"])
        return reloads, last_ok, loaded, routes, info, workers


C, G, H = CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
# The per-route families, in exposition order: (key, kind, name, help, labels).
_ROUTE_FAMILIES = (
    ("conns", C, "ambassadord_connections", "Connections closed, by route and outcome "
     "(route is empty for connections that found no route).", ["route", "outcome"]),
    ("active", G, "ambassadord_connections_active", "Connections open now, by route.", ["route"]),
    ("bytes", C, "ambassadord_bytes", "Bytes relayed, by route and direction "
     "(up: client to backend, down: backend to client), open connections included.", ["route", "direction"]),
    ("connect", H, "ambassadord_connect_seconds", "Time to connect to a backend (successful "
     "connects), by route.", ["route"]),
    ("bconns", C, "ambassadord_backend_connections", "Successful connects, by route and backend.",
     ["route", "backend"]),
    ("bactive", G, "ambassadord_backend_connections_active", "Connections open now, by route and "
     "backend.", ["route", "backend"]),
    ("bfail", C, "ambassadord_backend_failures", "Failed connects (refused, timeout, ...), by route "
     "and backend.", ["route", "backend"]),
    ("ejected", G, "ambassadord_backend_ejected", "1 while a backend is ejected after a failure.",
     ["route", "backend"]),
    ("check_up", G, "ambassadord_backend_check_up", "1 while a backend passes its route's health "
     "checks, 0 while it is down by them (routes with checks only).", ["route", "backend"]),
    ("checks", C, "ambassadord_backend_checks", "Health checks of a backend, by result (ok or "
     "failed).", ["route", "backend", "result"]),
    ("nback", G, "ambassadord_route_backends", "Backends in the route's current set.", ["route"]),
    ("updates", C, "ambassadord_resolver_updates", "Answers published by the route's resolver.", ["route"]),
    ("errors", C, "ambassadord_resolver_errors", "Failed look-ups of the route's resolver.", ["route"]),
    ("stale", G, "ambassadord_route_stale", "1 while the route serves a stale set (its source "
     "fails).", ["route"]),
    ("age", G, "ambassadord_route_last_update_age_seconds", "Seconds since the route's source last "
     "gave a good answer, changed or not (NaN before the first).", ["route"]),
    ("info", G, "ambassadord_route_info", "1 per route: its port, source network (\"\" for any) and mode, "
     "to join with the other families on route (a route's name, or its port and source).",
     ["route", "port", "source", "mode"]),
)
del C, G, H


def make_registry(server: Server, config: ConfigState, collector: DaemonCollector | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or DaemonCollector(server, config))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_open_fds, ...
    PlatformCollector(registry=registry)
    return registry


# ---- the HTTP app -------------------------------------------------------------------


def make_app(server: Server, config: ConfigState, pool: WorkerPool | None = None) -> Starlette:
    collector = DaemonCollector(server, config)
    registry = make_registry(server, config, collector)
    page = resources.files("ambassadord").joinpath("static/status.html").read_text(encoding="utf-8")

    async def healthz(request: Request) -> Response:
        if server.stopping:
            return PlainTextResponse("stopping\n", status_code=503)
        if not server.listening:
            return PlainTextResponse("not listening yet\n", status_code=503)
        if not server.table.routes and config.docker is None:  # --docker: containers may come later
            return PlainTextResponse("no routes loaded\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def routes(request: Request) -> Response:
        views, totals = await live_view(server, pool)
        return JSONResponse(snapshot(server, config, views, totals), headers={"cache-control": "no-store"})

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        collector.views, collector.totals = await live_view(server, pool)
        return Response(encoder(registry), media_type=content_type)

    async def status_page(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    return Starlette(routes=[
        HTTPRoute("/", status_page, methods=["GET", "HEAD"]),
        HTTPRoute("/healthz", healthz, methods=["GET", "HEAD"]),
        HTTPRoute("/routes", routes, methods=["GET", "HEAD"]),
        HTTPRoute("/metrics", metrics, methods=["GET", "HEAD"]),
    ])


def _close_connections_at_eof() -> None:
    """hypercorn's trio server (0.18) keeps a connection's socket open for the whole
    keep-alive timeout (5 s) after the client has closed it: its idle timer runs in the
    connection's own task group, which waits for it, and only a new request stops it.
    Each scrape or ``status`` on a new connection left an fd (in CLOSE_WAIT) for 5 s, so
    a client polling in a loop could spend the proxy's fds (measured: 250 quick /routes
    requests, 240 sockets still open 0.3 s later). The connection now stops its idle
    timer once its reading ends. (Private names of hypercorn's, with constraints.txt
    pinning its version; tests/test_admin.py counts the fds, so a change shows.)"""
    from hypercorn.trio import run, tcp_server

    base = tcp_server.TCPServer
    if getattr(run.TCPServer, "closes_at_eof", False):
        return
    if not hasattr(base, "_read_data") or "idle_task" not in base.__init__.__code__.co_names:
        log.debug("hypercorn's TCPServer is not the one expected: idle connections close after its keep-alive timeout")
        return

    class TCPServer(base):
        closes_at_eof = True

        async def _read_data(self) -> None:
            await super()._read_data()
            await self.idle_task.stop()

    run.TCPServer = TCPServer


async def serve_admin(app: Starlette, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on the bound socket ``sock`` (which it takes over) until cancelled,
    answering only requests whose Host names this listener (HostCheck)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    app = HostCheck(app, bound=sock.getsockname()[0])
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    # hypercorn's own info lines ("Running on ...") would duplicate ours: warnings only.
    http_log = logging.getLogger("ambassadord.admin.http")
    http_log.setLevel(logging.WARNING)
    config.errorlog = http_log
    config.include_server_header = False
    config.graceful_timeout = 1.0
    _close_connections_at_eof()
    await serve(app, config, task_status=task_status, mode="asgi")


def admin_url(addr: ListenAddress) -> str:
    """Where a local client reaches the admin API bound at ``addr``."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    return f"http://[{host}]:{addr.port}" if ":" in host else f"http://{host}:{addr.port}"
