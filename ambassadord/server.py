"""The I/O server: listeners, accept loops, one task per connection, resolver tasks.

One connection, in order (see DESIGN.md, "Data flow"):

    accept -> original destination -> route lookup -> pick order -> connect with failover
           -> relay -> one log line

Concurrency layout (structured, outermost first)::

    resolvers nursery       one watch task per route, for the daemon's lifetime
      connections nursery   one task per connection; on shutdown it gets a deadline of
                            now + grace instead of being cancelled at once (as hypercorn does)
        accept nursery      one accept loop per listener; cancelled first on shutdown

Sockets are plain non-blocking stdlib sockets driven with trio.lowlevel.wait_readable /
wait_writable (see relay/user.py for why).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from ambassadord.backends.interface import Backend, BackendSet, ResolverOptions, failed_set

from . import health, original_dst
from .balancer import pick_order
from .peers import NO_PEERS, Peers
from .relay import KernelRelay, RelayResult, relay
from .routes import Keepalive, Route, RouteConfig, RouteTable

log = logging.getLogger("ambassadord")
conn_log = logging.getLogger("ambassadord.conn")

SO_MARK = getattr(socket, "SO_MARK", 36)
# IP_BIND_ADDRESS_NO_PORT is not needed: upstream sockets never bind explicitly.

# accept() errors that mean "out of a resource", not "bug": back off and go on, as
# trio's serve_listeners does.
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors that concern only the one connection being accepted: ECONNABORTED, and
# the "pending network errors" that accept(2) says Linux passes on for TCP (ENETDOWN,
# EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH). Go on.
TRANSIENT_ACCEPT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH,
                           errno.ENONET, errno.ENETUNREACH, errno.EOPNOTSUPP, errno.ETIMEDOUT, errno.EHOSTDOWN,
                           errno.ENOPROTOOPT}
# accept() errors that can only be our bug (the listener is not a listening socket, or
# is closed): they surface. Any other, unforeseen errno is logged and the loop goes on:
# one odd error must not stop a daemon that serves every route of the host.
BUG_ACCEPT_ERRNOS = {errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT}
# connect() errors that say this host is short of something, not that the backend is
# unwell: EADDRNOTAVAIL is "no free local port toward this backend" (tens of thousands of
# TIME_WAIT sockets at sustained churn; also no usable source address), EAGAIN its older
# spelling, ENOBUFS/ENOMEM memory. Outcome capacity: no ejection, no backend failure.
LOCAL_CONNECT_ERRNOS = {errno.EADDRNOTAVAIL, errno.EAGAIN, *CAPACITY_ERRNOS}
CAPACITY_SLEEP = 0.1
LISTEN_BACKLOG = 4096
# Connections accepted in a row (without waiting) before the accept loop lets others run.
ACCEPT_BURST = 8


@dataclass(slots=True)
class ReloadSummary:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if names]
        return "; ".join(parts) or "no route changed"


class Throttled:
    """Log lines of one kind at most once per ``every`` seconds each: a flood of refused
    connections must not become a flood of log lines too. A line says how many like it
    were left out since the last one."""

    def __init__(self, logger: logging.Logger = log, every: float = 1.0):
        self.logger, self.every = logger, every
        self._next: dict = {}  # key -> monotonic time before which lines are held back
        self._held: dict = {}  # key -> lines held back since the last one logged

    def log(self, key, level: int, msg: str, *args, fields: dict | None = None) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._next[key] = now + self.every
        held = self._held.pop(key, 0)
        if held:
            msg, args = msg + " (and %d more since the last such line)", (*args, held)
        self.logger.log(level, msg, *args, extra={"fields": fields} if fields else None)


def set_keepalive(sock: socket.socket, keepalive: Keepalive) -> None:
    """TCP keepalive on ``sock`` as ``keepalive`` says (off: SO_KEEPALIVE 0)."""
    if not keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)


class OutOfResources(Exception):
    """No file descriptor (or memory) for a new socket, for longer than we can wait."""


class StartupError(Exception):
    """The server cannot start (a listener cannot be bound, ...): message for the user."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int
    # Added by default rather than asked for: a failure to bind it (no IPv6) is a warning.
    optional: bool = False

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> ListenAddress; ValueError with the text otherwise."""
    t = text.strip()
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
    else:
        host, sep, port = t.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad listen address {text!r}: expected ADDR:PORT or [IPV6]:PORT, e.g. 0.0.0.0:10000")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad listen address {text!r}: {host!r} is not an IP address") from None
    if ip.version == 6 and not t.startswith("["):
        raise ValueError(f"bad listen address {text!r}: IPv6 addresses go in brackets, e.g. [{host}]:{port}")
    return ListenAddress(str(ip), int(port))


def bind_listeners(addresses: list[ListenAddress], *, reuseport: bool = False) -> list[socket.socket]:
    """Bind and listen on every address, or none: on failure, close what was bound.
    With ``reuseport``, SO_REUSEPORT (--workers: every process binds the same addresses).

    Raises:
        StartupError: naming the address and the reason.
    """
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            try:
                s = socket.socket(addr.family, socket.SOCK_STREAM)
            except OSError as exc:
                if addr.optional:
                    log.warning("not listening on %s: %s", addr, exc.strerror)
                    continue
                raise StartupError(f"cannot listen on {addr}: {exc.strerror}") from None
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuseport:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if addr.family == socket.AF_INET6:
                    # Separate v4 and v6 listeners: no v4-mapped addresses to untangle.
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr.host, addr.port))
                s.listen(LISTEN_BACKLOG)
                s.setblocking(False)
            except OSError as exc:
                s.close()
                if addr.optional and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.warning("not listening on %s: %s", addr, exc.strerror)
                    continue
                raise StartupError(f"cannot listen on {addr}: {exc.strerror}") from None
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise StartupError("no listener could be bound")
    return socks


def _addr_str(sockaddr) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """Accepts redirected connections and relays them to the routes' backends.

    Args:
        table: the routes.
        listeners: bound, listening, non-blocking sockets (see bind_listeners); the server
            closes them when it stops accepting.
        options: handed to every resolver.
        grace: seconds open connections may take to finish after shutdown() is called.
        mark: SO_MARK for upstream sockets (so the iptables chain skips them), or None.
        use_splice: in user space, switch bulky directions to splice(2).
        kernel: a relay.KernelRelay: relay established connections in the kernel (its
            Watcher task runs here; the caller made it and closes it after run()).
        resolve: run the routes' resolvers (False in a --workers helper: the main process
            sends the sets, see install()).
        peers: the other processes of this daemon (--workers; peers.py), told about new
            sets, reloads, ejections, health checks' verdicts, stop and abort; none by default.
    """

    def __init__(
        self,
        table: RouteTable,
        listeners: list[socket.socket],
        *,
        options: ResolverOptions | None = None,
        grace: float = 10.0,
        mark: int | None = None,
        use_splice: bool = False,
        kernel: KernelRelay | None = None,
        rng: random.Random | None = None,
        resolve: bool = True,
        peers: Peers | None = None,
    ):
        self.table = table
        self.listeners = listeners
        self.options = options or ResolverOptions()
        self.grace = grace
        self.mark = mark
        self.use_splice = use_splice
        self.kernel = kernel
        self.rng = rng or random.Random()
        self.resolve = resolve
        self.peers = peers if peers is not None else NO_PEERS
        self.active = 0
        self.total = 0
        self.unrouted: dict[str, int] = {}  # connections closed before a route was found, by outcome
        self.started_at = time.time()
        self.listening = False  # True from the first accept loop's start until shutdown
        # Local (ip, port) and dialled port of every upstream socket of ours now connecting
        # or connected: a connection arriving *from* one of them *for* that port is our
        # own, looped back (loop guard).
        # A count, not a set: Linux may reuse one local port for connections to different
        # destinations, and closing one of them must not forget the other.
        self._own_upstreams: dict[tuple[str, int, int], int] = {}
        self._first_answer: dict[Route, trio.Event] = {r: trio.Event() for r in table.routes}
        self._listen_addrs = {(s.getsockname()[0], s.getsockname()[1]) for s in listeners}
        self._accept_scope: trio.CancelScope | None = None
        self._short_of_fds = 0.0  # until when (monotonic) the accept loop yields after every accept
        self._resolvers: trio.Nursery | None = None
        self._resolver_scopes: dict[Route, trio.CancelScope] = {}
        self._conn_scope: trio.CancelScope | None = None
        self.stopping = False
        self._aborted = False
        self._throttled = Throttled()
        # Accepted sockets inherit their listener's keepalive settings (Linux copies them at
        # accept): set once here, they cost nothing per connection. Only a route whose
        # keepalive differs pays four setsockopt calls for each client socket.
        self._listener_keepalive = table.routes[0].config.keepalive if table.routes else Keepalive()
        for sock in listeners:
            set_keepalive(sock, self._listener_keepalive)

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until shutdown() and the grace period are over."""
        try:
            async with trio.open_nursery() as resolvers:
                self._resolvers = resolvers
                if self.kernel is not None:
                    resolvers.start_soon(self.kernel.run, name="sockmap watcher")
                for route in self.table.routes:
                    self._start_resolver(route)
                await resolvers.start(self.peers.run)
                with trio.CancelScope() as self._conn_scope:
                    if self._aborted:
                        self._conn_scope.cancel()
                    async with trio.open_nursery() as connections:
                        with trio.CancelScope() as self._accept_scope:
                            if self.stopping:  # shutdown() came before we got here
                                self._accept_scope.cancel()
                            async with trio.open_nursery() as acceptors:
                                for sock in self.listeners:
                                    acceptors.start_soon(self._accept_loop, sock, connections)
                                for sock in self.listeners:
                                    log.info("listening on %s", _addr_str(sock.getsockname()))
                                self.listening = True
                                task_status.started()
                        self.listening = False
                        self._close_listeners()
                        if self.active:
                            log.info("stopped accepting; waiting up to %gs for %d open connection(s)", self.grace, self.active)
                        self._conn_scope.deadline = trio.current_time() + self.grace
                if self._conn_scope.cancelled_caught:
                    log.warning("grace period over: closed the connections still open")
                # The other processes had the same grace period, from about the same moment.
                await self.peers.wait_closed(self.grace + 5.0)
                resolvers.cancel_scope.cancel()
        finally:
            self._close_listeners()

    def shutdown(self) -> None:
        """Stop accepting; let open connections finish within the grace period."""
        self.stopping = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self.peers.stop()

    def abort(self) -> None:
        """Stop at once: cancel open connections too."""
        self.shutdown()
        self._aborted = True
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        self.peers.abort()

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            sock.close()

    # ---- reload --------------------------------------------------------------------

    def reload(self, configs: list[RouteConfig]) -> ReloadSummary:
        """Serve ``configs`` from now on, without dropping anything.

        A route whose configuration did not change keeps its Route object, its resolver and
        its state (ejections, round-robin position). A changed route gets a new resolver;
        one that is gone has its resolver cancelled. Established connections hold their own
        sockets and are not touched: they go on with the backend they have. Counters are
        kept per route name, so a changed route keeps its history.

        Synchronous and atomic as seen from the connections: they see the old table or the
        new one, never a mix. Call only while run() is running.
        """
        if self._resolvers is None or self.stopping:
            raise RuntimeError("reload() while the server is not running")
        old_by_key = {r.config.key: r for r in self.table.routes}
        routes: list[Route] = []
        summary = ReloadSummary()
        retired: list[Route] = []
        for cfg in configs:
            old = old_by_key.pop(cfg.key, None)
            if old is not None and old.config.same_route(cfg):
                old.config = cfg  # where it was read may have moved
                routes.append(old)
                summary.kept.append(old.name)
                continue
            route = Route(cfg)
            if old is not None:
                # Counters and ejections carry over: a backend that just failed and is
                # still in the new set stays at the back of the order.
                route.stats = old.stats
                route.pick.ejections = old.pick.ejections
                if cfg.check_interval:  # and what the checks know, unless they are off now
                    route.pick.checks, route.pick.down = old.pick.checks, old.pick.down
                retired.append(old)
                summary.changed.append(route.name)
            else:
                summary.added.append(route.name)
            self._first_answer[route] = trio.Event()
            routes.append(route)
        retired.extend(old_by_key.values())
        summary.removed.extend(r.name for r in old_by_key.values())
        self.table = RouteTable(routes)
        for route in routes:
            if route not in self._resolver_scopes:
                self._start_resolver(route)
        for route in retired:
            scope = self._resolver_scopes.pop(route, None)
            if scope is not None:
                scope.cancel()
            self._first_answer.pop(route, None)
        self.peers.routes(configs)
        return summary

    # ---- resolvers -----------------------------------------------------------------

    def _start_resolver(self, route: Route) -> None:
        if not self.resolve:
            return
        # The scope exists before the task starts, so reload() can cancel a resolver that
        # has not run yet.
        scope = self._resolver_scopes[route] = trio.CancelScope()
        self._resolvers.start_soon(self._watch, route, scope, name=f"resolver {route.name}")

    async def _watch(self, route: Route, scope: trio.CancelScope) -> None:
        with scope:
            if not route.config.check_interval:
                await self._watch_route(route)
                return
            async with trio.open_nursery() as nursery:  # the route's health checks, beside its resolver
                nursery.start_soon(health.check_route, route, self._check_connect, self._checks_changed,
                                   name=f"health checks {route.name}")
                await self._watch_route(route)

    async def _check_connect(self, backend: Backend, timeout: float) -> None:
        """One health check's connect (health.py): our own upstream socket (SO_MARK, loop
        guard), closed with a reset at once, so that checks leave no TIME_WAIT behind."""
        if self._is_own_listener(backend):  # it would be accepted, and counted, as a client
            raise OSError(errno.ELOOP, "is ambassadord's own listener (loop)")
        try:
            sock = await self._new_upstream(backend, timeout)
        except OutOfResources as exc:
            raise health.NoResult(str(exc)) from None
        try:
            self._forget_upstream(await self._connect(sock, backend, timeout))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as exc:
            if exc.errno in LOCAL_CONNECT_ERRNOS:  # this host's capacity, not the backend's health
                raise health.NoResult(exc.strerror or str(exc)) from None
            raise
        finally:
            sock.close()

    def _checks_changed(self, route: Route) -> None:
        """The set of backends that route's checks say are down changed."""
        self.peers.down(route.config.key, route.pick.down)
        if health.all_down(route):
            log.warning("route %s: every backend is down by its health checks; picking as if it had none", route.name,
                        extra={"fields": {"event": "check-all-down", "route": route.name}})

    def apply_down(self, key, down: frozenset) -> None:
        """A --workers helper: the main process's checks of route ``key`` say ``down`` are down."""
        for route in self.table.routes:
            if route.config.key == key:
                route.pick.down = down

    async def _watch_route(self, route: Route) -> None:
        resolver = route.resolver = route.config.spec.resolver(self.options)
        event = self._first_answer.get(route)
        if event is None:
            event = trio.Event()

        def publish(new: BackendSet) -> None:
            old = route.backends
            route.update(new)
            event.set()
            self.peers.backends(route.config.key, new)
            if new.backends != old.backends or new.stale != old.stale or new.error != old.error:
                log.log(
                    logging.WARNING if new.stale or not new.backends else logging.INFO, "route %s backends", route.name,
                    extra={"fields": {"event": "backends", "route": route.name, "spec": route.config.spec.text,
                                      "backends": [str(b) for b in new.backends], "stale": new.stale,
                                      "error": new.error}},
                )

        delay = 1.0
        while True:
            try:
                await resolver.watch(publish)
                return
            except Exception as exc:  # a resolver bug must not take the route down: retry
                log.exception("route %s: resolver crashed; keeping the last set, retrying in %.0fs", route.name, delay)
                # ... and say so: /routes and the metrics show the route stale with the error,
                # not healthy on a set that nobody follows any more.
                publish(failed_set(route.backends if route.resolved else None, route.config.spec.text,
                                   f"resolver crashed: {type(exc).__name__}: {exc}"))
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def install(self, key, new: BackendSet) -> None:
        """A --workers helper: the main process's resolver for route ``key`` published ``new``."""
        for route in self.table.routes:
            if route.config.key == key:
                route.update(new)
                event = self._first_answer.get(route)
                if event is not None:
                    event.set()

    def apply_ejection(self, key, backend: Backend, duration: float) -> None:
        """Another process of this daemon (--workers) saw ``backend`` of route ``key`` fail."""
        for route in self.table.routes:
            if route.config.key == key and backend in route.backends.backends:
                route.pick.ejections.adopt(backend, time.monotonic(), duration)

    def stats_snapshot(self) -> dict:
        """This process's counters, for the main process's admin API (--workers)."""
        from .stats import snapshot

        now = time.monotonic()
        routes = {}
        for route in self.table.routes:
            snap = snapshot(route.stats)
            snap["ejected"] = {str(b): until - now for b, until in route.pick.ejections.until.items() if until > now}
            routes[route.name] = snap
        return {"pid": os.getpid(), "active": self.active, "total": self.total, "unrouted": dict(self.unrouted),
                "routes": routes}

    # ---- accepting -----------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket, nursery: trio.Nursery) -> None:
        accept = lsock.accept
        handle = self._handle
        listen_port = lsock.getsockname()[1]
        burst = 0
        while True:
            try:
                conn, peer = accept()
            except BlockingIOError:
                burst = 0
                await wait_readable(lsock)
                continue
            except OSError as exc:
                if exc.errno in CAPACITY_ERRNOS:
                    self._short_of_fds = time.monotonic() + 1.0
                    self._throttled.log(("accept", lsock), logging.ERROR, "accept on %s: %s; backing off",
                                        _addr_str(lsock.getsockname()), exc.strerror)
                    await trio.sleep(CAPACITY_SLEEP)
                    continue
                if exc.errno in TRANSIENT_ACCEPT_ERRNOS:
                    continue
                if exc.errno in BUG_ACCEPT_ERRNOS:
                    raise
                self._throttled.log(("accept", lsock, exc.errno), logging.WARNING,
                                    "accept on %s: unexpected error %s (%s); going on",
                                    _addr_str(lsock.getsockname()), errno.errorcode.get(exc.errno, exc.errno),
                                    exc.strerror)
                burst = 0
                await checkpoint()  # should it repeat at once, it must not starve the relays
                continue
            conn.setblocking(False)
            nursery.start_soon(handle, conn, peer, listen_port)
            burst += 1
            # Fairness: a flood of connections must not starve relays. Short of fds, yield
            # after every accept, so that the connections already accepted get their
            # upstream sockets before the next accept takes the fd they wait for.
            if burst >= ACCEPT_BURST or self._short_of_fds > time.monotonic():
                burst = 0
                await checkpoint()

    # ---- one connection ------------------------------------------------------------

    async def _handle(self, conn: socket.socket, peer, listen_port: int) -> None:
        started = time.monotonic()
        self.active += 1
        self.total += 1
        fields = {"src": peer, "port": None, "backend": None, "up": 0, "down": 0}
        outcome = "error"
        upstream: socket.socket | None = None
        own_key = None
        result = RelayResult()
        level = logging.INFO
        stats = None  # the route's RouteStats, once there is a route
        bstats = None  # the backend's BackendStats, once connected
        try:
            try:
                dst = original_dst.original_destination(conn)
            except OSError:
                dst = None
            # Not redirected (no conntrack entry, or it reads back our own address): the
            # connection came to a listen port directly; route it by that port. Only a
            # destination on the listen port can be our own address (one syscall saved).
            if dst is None:
                port = listen_port
            elif dst[1] == listen_port:
                local = conn.getsockname()
                port = listen_port if dst[0] == local[0] else dst[1]
            else:
                port = dst[1]
            fields["port"] = port
            # Ours, looped back: from one of our upstream sockets' local address and to the
            # port it dialled. Not the address alone: Linux gives one local port to several
            # connections with different destinations, so a client may share a port with
            # an upstream of ours (seen under load on 127.0.0.1) and is not a loop.
            if (peer[0], peer[1], port) in self._own_upstreams:
                outcome, level = "loop", logging.ERROR
                return
            route = self.table.lookup(port, peer[0])
            if route is None:
                outcome, level = "no-route", logging.WARNING
                return
            fields["route"] = route.name
            cfg = route.config
            stats = route.stats
            stats.active += 1
            if cfg.max_connections and stats.active > cfg.max_connections:
                # Also what stops a routing loop that the checks below cannot see: every hop
                # holds one connection of the route on each daemon it passes.
                outcome = "limit"
                fields["error"] = f"max_connections {cfg.max_connections} reached"
                self._throttled.log(("limit", route.name), logging.WARNING,
                                    "route %s: %d connections open, its max_connections; closing new ones at once "
                                    "(outcome limit). A routing loop between two hosts looks like this too",
                                    route.name, cfg.max_connections,
                                    fields={"event": "limit", "route": route.name, "max_connections": cfg.max_connections})
                return
            if cfg.keepalive is not self._listener_keepalive and cfg.keepalive != self._listener_keepalive:
                set_keepalive(conn, cfg.keepalive)
            if not route.resolved and (first := self._first_answer.get(route)) is not None:
                with trio.move_on_after(cfg.connect_timeout):
                    await first.wait()
            # A trial of an expired ejection may wait for a socket and then for the connect.
            order = pick_order(route.backends.backends, cfg.balance, route.pick, time.monotonic(), self.rng,
                               trial_for=2 * cfg.connect_timeout)
            if not order:
                outcome, level = "no-backends", logging.WARNING
                fields["error"] = route.backends.error or "the route has no backends"
                return
            failures = []
            if any(b.address == peer[0] for b in order) and not self._is_local(peer[0], conn):
                # Never send a connection back to the host it came from: another host whose
                # route for this port points here, while ours points there, is a loop that
                # would multiply one connection until both daemons ran out of fds.
                failures.append(f"{peer[0]}: is where the connection came from (a loop between two hosts?)")
                order = [b for b in order if b.address != peer[0]]
                if not order:
                    outcome, level = "loop", logging.ERROR
                    fields["error"] = (f"the route's backends are all on {peer[0]}, the host that connected: "
                                       "its route for this port probably points back here")
                    return
            short: list[str] = []  # attempts this host had no local port (or memory) for
            full: list[str] = []  # backends passed over at max_backend_connections
            for backend in order:
                if self._is_own_listener(backend):
                    failures.append(f"{backend}: is ambassadord's own listener (loop)")
                    continue
                key = str(backend)
                b = stats.backend(key, backend)
                if cfg.max_backend_connections and b.active + b.connecting >= cfg.max_backend_connections:
                    full.append(f"{backend}: {b.active + b.connecting} connections, its max_backend_connections")
                    continue
                try:
                    sock = await self._new_upstream(backend, cfg.connect_timeout, cfg.keepalive)
                except OutOfResources as exc:
                    outcome, level = "capacity", logging.ERROR
                    fields["error"] = str(exc)
                    return
                connect_started = time.monotonic()
                b.connecting += 1
                try:
                    own_key = await self._connect(sock, backend, cfg.connect_timeout)
                except (OSError, trio.TooSlowError) as exc:
                    sock.close()
                    if isinstance(exc, OSError) and exc.errno in LOCAL_CONNECT_ERRNOS:
                        # This host's shortage, not the backend's fault: no ejection, no
                        # failure counted; the next backend (another destination, other
                        # free ports) may still work.
                        short.append(f"{backend}: {exc.strerror}")
                        self._throttled.log(
                            ("capacity", route.name), logging.ERROR,
                            "route %s: cannot connect to %s: %s. This host is out of local ports (or memory), "
                            "not the backend's fault: not ejected (outcome capacity). Raise "
                            "net.ipv4.ip_local_port_range or set net.ipv4.tcp_tw_reuse=1 (README, Limits)",
                            route.name, backend, exc.strerror,
                            fields={"event": "capacity", "route": route.name, "backend": key, "error": exc.strerror})
                        continue
                    reason = "timeout" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
                    failures.append(f"{backend}: {reason}")
                    b.failures += 1
                    stats.failures += 1
                    b.last_error, b.last_failure = reason, time.time()
                    ejected = route.pick.ejections.eject(backend, time.monotonic(), cfg.eject_for)
                    if ejected is not None:
                        self.peers.ejected(route.config.key, backend, ejected)
                    log.warning("route %s: backend %s failed (%s); %s", route.name, backend, reason,
                                "still ejected" if ejected is None else f"ejected for {ejected:g}s",
                                extra={"fields": {"event": "backend-failed", "route": route.name, "backend": str(backend), "error": reason}})
                    continue
                except BaseException:  # cancelled mid-connect: this socket is nobody else's
                    sock.close()
                    raise
                finally:
                    b.connecting -= 1
                route.pick.ejections.restore(backend)
                stats.observe_connect(time.monotonic() - connect_started)
                upstream = sock
                result.backend = fields["backend"] = key
                bstats = b
                bstats.active += 1
                bstats.connections += 1
                bstats.last_connect = time.time()
                stats.open.add(result)
                break
            if upstream is None:
                # The host's shortage or the limit, when either kept a backend from being
                # tried, rather than blame the backends.
                if short:
                    outcome, level = "capacity", logging.ERROR
                elif full:
                    outcome = "limit"
                    self._throttled.log(("backend-limit", route.name), logging.WARNING,
                                        "route %s: every backend that is not failing is at max_backend_connections "
                                        "(%d); closing new connections at once (outcome limit)",
                                        route.name, cfg.max_backend_connections,
                                        fields={"event": "limit", "route": route.name,
                                                "max_backend_connections": cfg.max_backend_connections})
                else:
                    outcome, level = "all-backends-failed", logging.ERROR
                fields["error"] = "; ".join(failures + short + full)
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await relay(conn, upstream, idle_timeout=cfg.idle_timeout, use_splice=self.use_splice,
                        kernel=self.kernel, result=result)
            outcome = result.outcome
        except Exception as exc:  # one connection's bug is logged and contained
            outcome, level = "error", logging.ERROR
            fields["error"] = repr(exc)
            log.exception("connection from %s: unexpected error", _addr_str(peer))
        except BaseException:
            # Cancelled (the grace period ran out), possibly wrapped in the relay nursery's
            # BaseExceptionGroup: not this connection's fault; let trio unwind it.
            outcome = "shutdown"
            raise
        finally:
            self.active -= 1
            if stats is not None:
                stats.active -= 1
                stats.count(outcome)
                if bstats is not None:
                    stats.open.discard(result)
                    stats.up += result.up
                    stats.down += result.down
                    bstats.active -= 1
                    bstats.up += result.up
                    bstats.down += result.down
                    stats.closed(result.backend, bstats)
            else:
                self.unrouted[outcome] = self.unrouted.get(outcome, 0) + 1
            if own_key is not None:
                self._forget_upstream(own_key)
            if upstream is not None:
                upstream.close()
            conn.close()
            if conn_log.isEnabledFor(level):
                fields["src"] = _addr_str(peer)
                fields["up"], fields["down"] = result.up, result.down
                fields["duration"] = round(time.monotonic() - started, 6)
                fields["outcome"] = outcome
                conn_log.log(level, "connection",
                             extra={"fields": {"event": "connection", **fields}})

    async def _new_upstream(self, backend: Backend, patience: float, keepalive: Keepalive = Keepalive()) -> socket.socket:
        """A fresh non-blocking upstream socket.

        Out of file descriptors (or memory) is a passing state, as in accept: wait
        CAPACITY_SLEEP and retry, for up to ``patience`` seconds, rather than drop a client
        that was already accepted.

        Raises:
            OutOfResources: still out of resources after ``patience`` seconds.
        """
        deadline = trio.current_time() + patience
        while True:
            try:
                # Non-blocking from the start: no separate ioctl.
                sock = socket.socket(backend.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                self._short_of_fds = time.monotonic() + 1.0
                if trio.current_time() + CAPACITY_SLEEP > deadline:
                    raise OutOfResources(f"cannot open a socket to {backend}: {exc.strerror}") from None
                await trio.sleep(CAPACITY_SLEEP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            set_keepalive(sock, keepalive)
        if self.mark is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            except PermissionError:
                log.warning("cannot set SO_MARK on upstream sockets (needs CAP_NET_ADMIN); "
                            "relying on the loop guard alone")
                self.mark = None
        return sock

    async def _connect(self, sock: socket.socket, backend: Backend, timeout: float) -> tuple[str, int, int]:
        """Connect a non-blocking socket; return (local ip, local port, backend port),
        registered as our own.

        Raises:
            OSError: refused, unreachable, ...
            trio.TooSlowError: not connected within ``timeout`` seconds.
        """
        err = sock.connect_ex((backend.address, backend.port))
        # The local port is bound by connect() itself: register it before the first await,
        # so that if the connection loops back to us, its handler already sees it as ours.
        local = sock.getsockname()
        key = (local[0], local[1], backend.port)
        self._own_upstreams[key] = self._own_upstreams.get(key, 0) + 1
        try:
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            if err:
                # To a nearby backend (loopback, the same host) the handshake is often over
                # by the time connect() returns: asking again says so (EISCONN) and saves
                # a wait; EALREADY means it is still going on.
                err = sock.connect_ex((backend.address, backend.port))
                if err == errno.EISCONN:
                    err = 0
                elif err in (errno.EALREADY, errno.EINPROGRESS):
                    with trio.fail_after(timeout):
                        await wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        except BaseException:
            self._forget_upstream(key)
            raise
        return key

    def _forget_upstream(self, key: tuple[str, int, int]) -> None:
        n = self._own_upstreams.get(key, 0) - 1
        if n > 0:
            self._own_upstreams[key] = n
        else:
            self._own_upstreams.pop(key, None)

    @staticmethod
    def _is_local(address: str, conn: socket.socket) -> bool:
        """Is ``address`` (a peer's) one of this host's own? Asked only when a peer's address
        is a backend of the route it asks for: rare across hosts, but every connection of a
        host process to a backend on the same host's loopback, hence the string test first
        (an ipaddress parse cost about 5 us a connection in the churn benchmark)."""
        if address.startswith("127.") or address == "::1":
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.is_loopback or address == conn.getsockname()[0]:
            return True
        try:
            with socket.socket(conn.family, socket.SOCK_STREAM) as probe:
                probe.bind((address, 0))  # only a local address can be bound
            return True
        except OSError:
            return False

    def _is_own_listener(self, backend: Backend) -> bool:
        for host, port in self._listen_addrs:
            if port != backend.port:
                continue
            if host == backend.address:
                return True
            if host in ("0.0.0.0", "::") and (":" in host) == (":" in backend.address):
                try:
                    if ipaddress.ip_address(backend.address).is_loopback:
                        return True
                except ValueError:
                    pass
        return False
