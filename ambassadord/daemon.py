"""``ambassadord run``: the daemon's life, from a checked start to a clean exit.

Start (:func:`run`). The routes are read and every setting was checked before anything
starts. Then each step's undo goes on one ``ExitStack``, so that a failed step, or the
end, undoes everything started before it, in reverse order:

1. the kernel relay (``--sockmap``), made just before, goes on the stack first;
2. SIGTERM, SIGINT and SIGHUP are blocked: one that comes while the rules go in waits
   (it is not lost, and SIGHUP does not kill) until the event loop's receiver takes it;
3. with ``--workers``, the instance guard (one daemon per port);
4. the listeners, then the admin listener;
5. with ``--iptables``, the REDIRECT rules (:class:`RedirectRules`).

Then the event loop runs :meth:`_Daemon.serve`: the server, the admin API, the signals,
reloads (SIGHUP, a changed ``--config``) and the container bridges.

Stopping (SIGTERM, SIGINT), in order:

1. a reload in progress is cancelled (reading a file may block: a FIFO, a hung network
   file system), so nothing the stop needs waits on it for longer than the grace;
2. under ``--iptables``, the jumps to our chains go: no new connection is redirected,
   while established ones keep their translation (netfilter.py says why);
3. the server stops accepting and gives open connections the grace period;
4. only then, as the stack unwinds, the chains go, and the sockets close.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from dataclasses import replace

import trio

from . import logs, netfilter, sdnotify
from .connect import start as connect_start
from .config_state import ConfigState
from .config import ConfigError
from .routes import Route, RouteTable
from .peers import fanout
from .server import ListenAddress, Server, StartupError, bind_listeners
from .settings import NO_ROUTES, RouteSources, RunSettings, UsageError

log = logging.getLogger("ambassadord")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How often --iptables looks for new container bridges (a netlink dump: cheap).
BRIDGE_POLL = 1.0


def run(settings: RunSettings) -> int:
    """Serve until stopped, then undo every step of the start.

    Returns:
        The exit status: 0 after a stop, 1 if a step of the start failed (logged).
    Raises:
        UsageError: the routes cannot be read, or there are none.
    """
    logs.setup(settings.log_format, settings.log_level, connections=settings.log_connections)
    try:
        configs = _routes(settings.routes)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not configs and settings.docker is None:
        raise UsageError(NO_ROUTES)
    plan = None
    if settings.iptables is not None:
        try:
            plan = _redirect_plan(settings, configs)
        except netfilter.NetfilterError as exc:
            log.error("iptables: %s", exc)
            return 1

    if settings.iptables is None:
        _warn_without_redirect(settings, configs)
    kernel = None
    if settings.sockmap != "off":
        from .relay import KernelRelay, SockmapError

        try:
            kernel = KernelRelay(settings.sockmap_size)
            log.info("sockmap: established connections are relayed in the kernel")
        except SockmapError as exc:
            if settings.sockmap == "on":
                log.error("--sockmap on: %s", exc)
                return 1
            log.info("sockmap not available (%s); relaying in user space", exc)
    plane = None
    if connect_start.wanted(settings.routes.flags.mode, configs):
        try:
            plane = connect_start.open_plane(settings.cgroup)
        except connect_start.ConnectStartError as exc:
            if kernel is not None:
                kernel.close()
            log.error("connect mode: %s", exc)
            return 1
        log.info("connect mode: connects in cgroup %s are balanced in the kernel", plane.cgroup_dir)
    return _serve(settings, configs, plan, kernel, plane)


def _serve(settings: RunSettings, configs, plan, kernel, plane=None) -> int:
    """Start, step by step, each undone by the stack; serve until stopped; the exit status."""
    with contextlib.ExitStack() as stack:
        if kernel is not None:
            stack.enter_context(kernel)
        if plane is not None:
            stack.enter_context(plane)
        # Until the event loop's receiver is up, signals wait (the module's docstring says why).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        stack.callback(signal.pthread_sigmask, signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        try:
            sockets, admin_sock = _bind(stack, settings)
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        server = Server(RouteTable([Route(c) for c in configs]), sockets,
                        options=settings.resolver, grace=settings.grace, kernel=kernel,
                        mark=settings.mark, use_splice=settings.use_splice)
        server.passthrough = settings.passthrough
        pool = _pool(settings, server, sockets, kernel) if settings.workers > 1 else None
        feed = _feed(settings, server, configs, plane) if plane is not None else None
        server.peers = fanout(pool, feed)  # what the server tells: the helpers, the kernel's maps
        rules = None
        if plan is not None:
            try:
                rules = stack.enter_context(RedirectRules(plan))
            except netfilter.NetfilterError as exc:
                log.error("iptables: %s", exc)
                return 1
        try:
            trio.run(_Daemon(settings, server, rules, admin_sock, pool, feed).serve)
        except KeyboardInterrupt:
            pass
        except BaseExceptionGroup as group:
            from .workers import WorkerStartError

            failed = group.subgroup(WorkerStartError)
            if failed is None:
                raise
            for exc in _leaves(failed):
                log.error("%s", exc)
            return 1
    log.info("stopped")
    return 0


def _pool(settings: RunSettings, server: Server, sockets, kernel):
    """--workers: the helpers, which reach the server only through the two callables."""
    from .workers import Settings, WorkerPool

    bound = tuple(ListenAddress(*s.getsockname()[:2]) for s in sockets)
    return WorkerPool(
        settings.workers, Settings(listen=bound, grace=settings.grace, mark=settings.mark,
                                   use_splice=settings.use_splice, sockmap="on" if kernel is not None else "off",
                                   sockmap_size=settings.sockmap_size, log_format=settings.log_format,
                                   log_level=settings.log_level, docker=settings.docker is not None,
                                   passthrough=settings.passthrough, log_connections=settings.log_connections),
        table=lambda: server.table, apply_ejection=server.apply_ejection)


def _feed(settings: RunSettings, server: Server, configs, plane):
    """Connect mode: the plane told the addresses it catches, and the feed of its maps."""
    from .connect.feed import ConnectFeed
    from .connect.layout import MAX_BACKENDS, Backend

    caught = connect_start.catch_addresses(settings.catch)
    plane.set_catch_addresses(caught)
    _log_catch(caught)
    return ConnectFeed(plane, configs, lambda: server.table, backend=Backend, limit=MAX_BACKENDS)


def _log_catch(addresses: list[str]) -> None:
    log.info("connect mode: rewriting connects to loopback (this namespace's)%s",
             "".join(f", {a}" for a in addresses))


def _routes(sources: RouteSources, containers: tuple | None = None) -> list:
    """The routes as the sources say now (with ``--docker``, what ``containers`` declare
    too); their warnings logged. Raises ConfigError."""
    loaded = sources.load(os.environ, containers)
    for w in loaded.warnings:
        log.warning("%s", w)
    return loaded.routes


def _bind(stack: contextlib.ExitStack, settings: RunSettings) -> tuple[list[socket.socket], socket.socket | None]:
    """The instance guard, the listeners and the admin listener, each closed by ``stack``
    (a socket that the server or the admin API took over is closed already: a no-op).

    Raises:
        StartupError: naming the address and the reason.
    """
    if settings.workers > 1:
        _hold_ports(stack, settings.listen)
    sockets = bind_listeners(list(settings.listen), reuseport=settings.workers > 1)
    for s in sockets:
        stack.enter_context(s)
    if settings.admin is None:
        return sockets, None
    from .admin import bind_admin  # (Starlette, prometheus_client: only with the admin API on)

    return sockets, stack.enter_context(bind_admin(settings.admin))


def _hold_ports(stack: contextlib.ExitStack, listen: tuple[ListenAddress, ...]) -> None:
    """With SO_REUSEPORT a second daemon on the same port would not fail: it would share
    the connections. An abstract unix socket per listen port (per network namespace, like
    the port) is held while running, and makes a second one fail instead."""
    for port in sorted({a.port for a in listen}):
        guard = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            guard.bind(f"\0ambassadord port {port}")
        except OSError as exc:
            raise StartupError(f"cannot listen on port {port}: another ambassadord --workers is serving it "
                               f"({exc.strerror})") from None


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# ---- iptables --------------------------------------------------------------------------


def _redirect_plan(settings: RunSettings, configs) -> netfilter.RedirectPlan:
    """The rules for ``configs``: their ports, except the listen ports, go to the first
    listen port. Raises NetfilterError (the container bridges cannot be listed)."""
    listen_ports = sorted({a.port for a in settings.listen})
    if len(listen_ports) > 1:
        log.warning("listeners use ports %s; REDIRECT goes to the first, %d", listen_ports, listen_ports[0])
    bridges = tuple(netfilter.container_bridges())
    return netfilter.RedirectPlan(to_port=listen_ports[0], ports=_redirect_ports(configs, settings.listen),
                                  dests=settings.iptables.dests, mark=settings.mark,
                                  families=_families_for(settings.listen), from_interfaces=bridges,
                                  allow_from=settings.iptables.allow_from, bridge_all=settings.passthrough)


def _redirect_ports(configs, listen) -> tuple[int, ...]:
    """The ports of the host's proxy-mode routes (connect mode's connects never reach the
    rules; a container's own routes are redirected from the bridges only: _bridge_ports)."""
    return tuple(sorted({c.port for c in configs if c.mode == "proxy" and not c.container}
                        - {a.port for a in listen}))


def _bridge_ports(watch, listen) -> tuple[int, ...]:
    """--docker: the ports that containers declare (running or about to run), redirected
    for the container bridges only. In connect mode the rule is never reached: harmless."""
    return tuple(sorted(watch.declared_ports() - {a.port for a in listen})) if watch is not None else ()


def _warn_without_redirect(settings: RunSettings, configs) -> None:
    """Without --iptables, a proxy route works only if something else redirects its port to
    the listener: say so at the start when nothing in this namespace's nat table does, or
    the first sign would be a consumer's "connection refused" and a silent log."""
    ports = _redirect_ports(configs, settings.listen)
    if not ports:
        return
    to = sorted({a.port for a in settings.listen})[0]
    if netfilter.redirects_to(to) is False:
        shown = ",".join(map(str, ports[:8])) + (",..." if len(ports) > 8 else "")
        log.warning("no iptables rule redirects connections to the listener (port %d): consumers dialling "
                    "port(s) %s here will get 'connection refused'. Run with --iptables, or install the rules: "
                    "ambassadord iptables install --to-port %d %s", to, shown, to,
                    " ".join(f"--port {p}" for p in ports[:8]))


def _families_for(listen) -> tuple[int, ...]:
    fams = []
    if any(a.family == socket.AF_INET for a in listen):
        fams.append(4)
    if any(a.family != socket.AF_INET for a in listen):
        fams.append(6)
    return tuple(fams)


class RedirectRules:
    """``run --iptables``' rules, from install (entering) to removal (exiting).

    Reloads and new container bridges replace the plan (:meth:`change`). A stop removes
    the jumps first (:meth:`remove_jumps`) and the chains only at the exit, after the
    grace period: netfilter.py says why.

    Raises:
        NetfilterError: from entering or :meth:`change` (nothing changed then); removal
            logs its errors instead, since it runs on the way out.
    """

    def __init__(self, plan: netfilter.RedirectPlan):
        self.plan = plan
        self._jumps_removed = False

    def __enter__(self) -> RedirectRules:
        netfilter.install(self.plan)
        _log_redirect(self.plan)
        _log_exposure(self.plan)
        return self

    def change(self, plan: netfilter.RedirectPlan) -> None:
        netfilter.install(plan, previous=self.plan)
        self.plan = plan

    def remove_jumps(self) -> None:
        """The first step of a stop: no new connection is redirected; established ones
        keep working until the chains go."""
        try:
            netfilter.remove_jumps(self.plan.to_port, self.plan.families)
        except netfilter.NetfilterError as exc:
            log.error("iptables: could not remove the jumps to our chains: %s", exc)
            return
        self._jumps_removed = True
        log.info("iptables: no longer redirecting new connections; the rules go once open ones are over")

    def __exit__(self, *exc_info) -> None:
        # If the jumps went at the stop and are back, a new daemon installed the rules
        # while this one was draining: they are left to it.
        try:
            netfilter.remove(self.plan.to_port, self.plan.families, if_unused=self._jumps_removed)
            log.info("iptables: rules removed")
        except netfilter.NetfilterError as exc:
            log.error("iptables: could not remove rules: %s", exc)


def _log_redirect(plan: netfilter.RedirectPlan) -> None:
    if plan.bridge_all:
        also = "; from the container bridges every port (--docker-redirect all)"
    elif plan.bridge_ports:
        also = f"; from the container bridges also {','.join(map(str, plan.bridge_ports))} (declared by containers)"
    else:
        also = ""
    log.info("iptables: redirecting ports %s to %d%s", ",".join(map(str, plan.ports)) or "(none)", plan.to_port, also)


def _log_exposure(plan: netfilter.RedirectPlan) -> None:
    """Say plainly who can use the mapped ports: a relay open to the LAN is a finding."""
    who = ["this host's processes"]
    if plan.from_interfaces:
        who.append(f"containers on {', '.join(plan.from_interfaces)}")
    for network, port in plan.allow_from:
        who.append(f"{'everyone' if network.prefixlen == 0 else network}{f' (port {port})' if port else ''}")
    log.info("iptables: mapped ports are open to %s", "; ".join(dict.fromkeys(who)))


# ---- the running daemon ----------------------------------------------------------------


class _Rejected(Exception):
    """A reload that changes nothing: the message says why."""


class _Daemon:
    """``run`` once everything is bound: the server, the admin API, signals and reloads
    (the module's docstring says in which order a stop goes)."""

    def __init__(self, settings: RunSettings, server: Server, rules: RedirectRules | None,
                 admin_sock: socket.socket | None, pool=None, feed=None):
        self.settings = settings
        self.server = server
        self.pool = pool  # the WorkerPool (--workers N > 1), or None
        self.feed = feed  # connect mode's ConnectFeed (connect/feed.py), or None
        self.plane = feed.plane if feed is not None else None
        self.rules = rules
        self.admin_sock = admin_sock
        config = settings.routes.config
        self.config = ConfigState(file=os.path.abspath(config) if config else None)
        # Held by whatever changes the rules or the table (a reload, a bridge change).
        self._reload_lock = trio.Lock()
        self._reload_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.stopping = False
        self.watch = None  # --docker: the ContainerWatch (docker_watch.py)
        if settings.docker is not None:
            from .docker_watch import ContainerWatch

            self.watch = ContainerWatch(settings.docker, self.reload)
            self.config.docker = self.watch.status

    async def serve(self) -> None:
        server = self.server
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._on_signals)
            await nursery.start(self._run_server)
            if self.watch is not None:
                # Before the admin API answers and READY=1: the containers' routes are
                # served (or the engine is known to be away, logged) by then.
                server.first_seen = self.watch.first_seen
                if self.pool is not None:
                    self.pool.first_seen = self.watch.first_seen  # the helpers' Lookups
                await nursery.start(self.watch.run)
            if self.settings.routes.config and self.settings.config_poll > 0:
                # Before the admin API answers: a change made once it does is noticed.
                await nursery.start(self._watch_config_file)
            if self.admin_sock is not None:
                sock, self.admin_sock = self.admin_sock, None
                from .admin import admin_url, make_app, serve_admin

                await nursery.start(serve_admin, make_app(server, self.config, self.pool), sock)
                log.info("admin API on %s", admin_url(self.settings.admin))
            if self.rules is not None or self.plane is not None:
                nursery.start_soon(self._watch_bridges)
            if self.plane is not None:
                nursery.start_soon(self._watch_scopes)
            sdnotify.ready(f"serving {len(server.table)} route(s)")

    async def _run_server(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Returns once shutdown() was called and the grace period is over; then the admin
        # API, the file watch and the signal handler go too.
        await self.server.run(task_status=task_status)
        self._nursery.cancel_scope.cancel()

    async def _on_signals(self) -> None:
        server = self.server
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            # Blocked since before the rules went in (run): any that came meanwhile are
            # delivered now, to this receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            first = True
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if first:
                        self._nursery.start_soon(self.reload, "SIGHUP")
                    continue
                if first:
                    first = False
                    log.info("%s: stopping (grace %gs; send again to stop at once)", name, server.grace)
                    sdnotify.stopping()
                    self.stopping = True
                    if self._reload_scope is not None:
                        self._reload_scope.cancel()
                    if self.rules is not None:
                        # After a rules change in progress (a subprocess with its own time
                        # limit), but never for longer than the grace period.
                        with trio.move_on_after(server.grace):
                            async with self._reload_lock:
                                await trio.to_thread.run_sync(self.rules.remove_jumps)
                    server.shutdown()
                else:
                    log.warning("%s again: closing open connections now", name)
                    server.abort()

    async def _watch_config_file(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Reload when --config changes: (device, inode, size, mtime) is polled, and a change
        must hold still for one more poll (a file being written is not read half-way).
        stat() runs in a thread: on a hung network file system it blocks."""
        path, interval = self.settings.routes.config, self.settings.config_poll

        async def signature():
            return await trio.to_thread.run_sync(_file_signature, path, abandon_on_cancel=True)

        seen = await signature()
        task_status.started()
        while True:
            await trio.sleep(interval)
            now = await signature()
            if now == seen:
                continue
            while True:  # settle: wait until two looks agree
                await trio.sleep(min(interval, 0.25))
                again = await signature()
                if again == now:
                    break
                now = again
            seen = now
            await self.reload(f"{path} changed")

    async def _watch_bridges(self) -> None:
        """Follow this host's container bridges (a ``docker network create`` after start),
        listed once a poll for both users: under --iptables their containers' connections
        are redirected, other hosts' are not (netfilter.py); in connect mode, connects to
        their addresses are rewritten."""
        caught = sorted(self.plane.catch_addresses()) if self.plane is not None else None
        while True:
            await trio.sleep(BRIDGE_POLL)
            try:
                bridges = tuple(await trio.to_thread.run_sync(netfilter.container_bridges, abandon_on_cancel=True))
            except netfilter.NetfilterError as exc:
                log.warning("%s: cannot list the container bridges: %s",
                            "iptables" if self.rules is not None else "connect mode", exc)
                continue
            if self.plane is not None:
                caught = await self._follow_catch_addresses(bridges, caught)
            if self.rules is not None and bridges != self.rules.plan.from_interfaces:
                if not await self._follow_rules(bridges):
                    return

    async def _follow_rules(self, bridges: tuple[str, ...]) -> bool:
        """The rules for these bridges; False once stopping."""
        async with self._reload_lock:
            if self.stopping:
                return False
            new_plan = replace(self.rules.plan, from_interfaces=bridges)
            try:
                await trio.to_thread.run_sync(self.rules.change, new_plan)
            except netfilter.NetfilterError as exc:
                log.error("iptables: could not follow the container bridges (%s): %s",
                          ", ".join(bridges) or "none", exc)
                return True
            _log_exposure(new_plan)
        return True

    async def _follow_catch_addresses(self, bridges: tuple[str, ...], before: list) -> list:
        """Connect mode's catch set for these bridges (their addresses may change while
        the bridges stay); what it is now."""
        found = await trio.to_thread.run_sync(connect_start.catch_addresses, self.settings.catch, bridges,
                                              abandon_on_cancel=True)
        if found != before:
            self.plane.set_catch_addresses(found)
            _log_catch(found)
        return found

    async def _watch_scopes(self) -> None:
        """Connect-mode routes limited to a source network follow the host's network
        namespaces and their addresses (connect/scopes.py says why and how)."""
        from .connect import scopes
        from .connect.cgroup import netns_cookie

        own, said = netns_cookie(), False
        while True:
            keys = self.feed.scoped_keys
            if keys:
                denied: list = []
                try:
                    found = await trio.to_thread.run_sync(scopes.scan, own, denied, abandon_on_cancel=True)
                except Exception as exc:  # netlink, /proc: the last scopes stay; try again
                    log.warning("connect mode: cannot list the network namespaces: %s", exc)
                else:
                    self.feed.set_scopes(scopes.assign(found, keys))
                    if denied and not said:  # once: it will not get better by itself
                        said = True
                        log.warning("connect mode: may not enter %d network namespace(s) (%s): routes limited to a "
                                    "source network cover none of them; that needs CAP_SYS_ADMIN and the host's "
                                    "processes (--pid=host in a container)", len(denied), denied[0].strerror)
            await trio.sleep(BRIDGE_POLL)

    async def reload(self, why: str) -> None:
        """Re-read the routes; apply them all, or none if anything is wrong."""
        async with self._reload_lock:
            if self.stopping:
                return
            sdnotify.reloading()
            log.info("reloading (%s)", why)
            try:
                configs = await self._read_routes(why)
                if configs is None:
                    return
                if self.plane is None and connect_start.wanted(None, configs):
                    raise _Rejected("a route has mode connect, but this daemon started without connect mode "
                                    "(restart it with --mode connect or with such a route)")
                await self._redirect_new_ports(configs)
                if self.stopping:  # SIGTERM came while the rules were changing
                    return
                summary = self.server.reload(configs)
                if self.pool is not None:
                    # Over (and READY=1) only once every process serves the new table.
                    await self.pool.synced()
            except _Rejected as exc:
                self.config.failed(str(exc))
                log.error("reload (%s) rejected: %s; still serving the previous configuration", why, exc,
                          extra={"fields": {"event": "reload", "ok": False, "error": str(exc)}})
            else:
                self.config.succeeded(str(summary))
                log.info("reloaded (%s): %s", why, summary,
                         extra={"fields": {"event": "reload", "ok": True, "added": summary.added,
                                           "removed": summary.removed, "changed": summary.changed}})
            finally:
                self._reload_scope = None
                if not self.stopping:
                    sdnotify.ready(f"serving {len(self.server.table)} route(s)")

    async def _read_routes(self, why: str) -> list | None:
        """The new routes; None if a stop came meanwhile. Raises _Rejected."""
        source = self.settings.routes.config or "the configuration"
        with trio.CancelScope() as self._reload_scope:
            try:
                # Abandoned if a stop cancels it: a file that blocks (a FIFO, a hung NFS
                # mount) holds a thread, never the daemon.
                containers = self.watch.snapshot() if self.watch is not None else None
                configs = await trio.to_thread.run_sync(_routes, self.settings.routes, containers,
                                                        abandon_on_cancel=True)
            except ConfigError as exc:
                raise _Rejected(str(exc)) from None
            except Exception as exc:  # a bug of ours or a library's: the old routes stay
                log.exception("reload (%s): reading the configuration failed", why)
                raise _Rejected(f"{source}: cannot be read: {type(exc).__name__}: {exc}") from None
        if self._reload_scope.cancelled_caught or self.stopping:
            return None
        if not configs and self.watch is None:
            raise _Rejected(f"{source}: no routes in the new configuration")
        return configs

    async def _redirect_new_ports(self, configs) -> None:
        """Under --iptables, make the rules follow the new routes' ports, before the table
        changes: if iptables refuses, the reload is rejected. Raises _Rejected."""
        if self.rules is None:
            return
        new_plan = replace(self.rules.plan, ports=_redirect_ports(configs, self.settings.listen),
                           bridge_ports=_bridge_ports(self.watch, self.settings.listen))
        if new_plan == self.rules.plan:
            return
        # A port that goes keeps its established connections: the chain always holds a
        # REDIRECT rule (netfilter.py, "the anchor").
        try:
            await trio.to_thread.run_sync(self.rules.change, new_plan)
        except netfilter.NetfilterError as exc:
            raise _Rejected(f"iptables: {exc}") from None
        _log_redirect(new_plan)


def _file_signature(path: str):
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
