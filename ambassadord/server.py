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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from trio.lowlevel import checkpoint, wait_readable

from ambassadord.backends.interface import Backend, BackendSet, ResolverOptions, failed_set

from . import health, original_dst
from .balancer import pick_order
from .logs import CONNECTION_LOGGER, Throttled
from .peers import NO_PEERS, Peers
from .relay import KernelRelay, RelayResult, relay
from .routes import PASSTHROUGH, Keepalive, Route, RouteConfig, RouteTable, SpecText, client_address
from .stats import Outcome
from .upstream import CAPACITY_ERRNOS, CAPACITY_SLEEP, Connector, Refused, set_keepalive

log = logging.getLogger("ambassadord")
conn_log = logging.getLogger(CONNECTION_LOGGER)

# accept() errors. CAPACITY_ERRNOS (upstream.py) mean "out of a resource", not "bug": back
# off and go on, as trio's serve_listeners does. These concern only the one connection
# being accepted: ECONNABORTED, and
# the "pending network errors" that accept(2) says Linux passes on for TCP (ENETDOWN,
# EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH). Go on.
TRANSIENT_ACCEPT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH,
                           errno.ENONET, errno.ENETUNREACH, errno.EOPNOTSUPP, errno.ETIMEDOUT, errno.EHOSTDOWN,
                           errno.ENOPROTOOPT}
# accept() errors that can only be our bug (the listener is not a listening socket, or
# is closed): they surface. Any other, unforeseen errno is logged and the loop goes on:
# one odd error must not stop a daemon that serves every route of the host.
BUG_ACCEPT_ERRNOS = {errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT}
LISTEN_BACKLOG = 4096
# Connections accepted in a row (without waiting) before the accept loop lets others run.
ACCEPT_BURST = 8


@dataclass(slots=True)
class ReloadSummary:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if names]
        return "; ".join(parts) or "no route changed"


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
    """A socket address (from getsockname/accept) as ListenAddress writes one."""
    return str(ListenAddress(sockaddr[0], sockaddr[1]))


SESSION_SWEEP = 1.0  # seconds between looks at on_down = "shutdown" connections


def _usable(route: Route, backend: str, now: float) -> bool:
    """Is ``backend`` (as the connection's log names it) in the route's set, not ejected
    and not down by the health checks?"""
    for b in route.backends.backends:
        if str(b) == backend:
            return not route.pick.ejections.is_ejected(b, now) and b not in route.pick.down
    return False


_PASSTHROUGH_CACHE = 4096  # passthrough routes kept (one per host address and port dialled)


def intended_port(original: tuple[str, int] | None, listen_port: int) -> int:
    """The port a connection was meant for: its original destination's (SO_ORIGINAL_DST),
    or, not redirected (no conntrack entry: ``None``), the listen port it arrived on.

    The local address does not matter: a connection that was not redirected but is tracked
    reads back its own local address and port (RECIPES.md), which is the listen port; one
    redirected from another address's listen port was meant for that same port.
    """
    return listen_port if original is None else original[1]


def _original_destination(conn: socket.socket) -> tuple[str, int] | None:
    try:
        return original_dst.original_destination(conn)
    except OSError:  # the client is already gone, ...: route it by the listen port
        return None


# The level of a connection's log line, by outcome (INFO for those not named).
OUTCOME_LEVELS = {Outcome.LOOP: logging.ERROR, Outcome.CAPACITY: logging.ERROR, Outcome.ALL_BACKENDS_FAILED: logging.ERROR,
                  Outcome.ERROR: logging.ERROR, Outcome.NO_ROUTE: logging.WARNING, Outcome.NO_BACKENDS: logging.WARNING}


def _log_connection(level: int, fields: dict, result: RelayResult, outcome: str, error: str | None,
                    started: float, unrouted: Throttled) -> None:
    """A connection's one line (README, "Logs"): ``fields`` as the handler filled them in,
    then what it came to. An unrouted one goes through ``unrouted``: a scan or a flood of
    them is one line a second per port, with how many were left out."""
    fields["src"] = _addr_str(fields["src"])
    fields["up"], fields["down"] = result.up, result.down
    if error is not None:
        fields["error"] = error
    fields["duration"] = round(time.monotonic() - started, 6)
    fields["outcome"] = outcome
    if outcome == Outcome.NO_ROUTE:
        unrouted.log(("no-route", fields["port"]), level, "connection", fields={"event": "connection", **fields})
    else:
        conn_log.log(level, "connection", extra={"fields": {"event": "connection", **fields}})


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
        self.use_splice = use_splice
        self.kernel = kernel
        self.rng = rng or random.Random()
        self.resolve = resolve
        self.peers = peers if peers is not None else NO_PEERS
        # --docker (docker_watch.ContainerWatch.first_seen): for a connection's source
        # address, None (route it now) or a coroutine function to await before the lookup.
        self.first_seen: Callable[[str], Callable[[], Awaitable[None]] | None] | None = None
        # --docker's catch-all redirect from the container bridges: a container's connection
        # that no route takes goes on to where it was headed (_passthrough), as if there
        # were no redirect. Off: such a connection is closed (outcome no-route).
        self.passthrough = False
        self._passthroughs: dict[tuple[str, int], Route] = {}
        # on_down = "shutdown": the open connections of such routes (their relay's cancel
        # scope -> route and backend), and since when each one's backend is unusable.
        self._sessions: dict[trio.CancelScope, tuple[Route, str]] = {}
        self._down_since: dict[trio.CancelScope, float] = {}
        self._listen_ports = {s.getsockname()[1] for s in listeners}
        self.active = 0
        self.total = 0
        self.unrouted: dict[str, int] = {}  # connections closed before a route was found, by outcome
        self.started_at = time.time()
        self.listening = False  # True from the first accept loop's start until shutdown
        # Opens and connects upstream sockets, and knows them (loop guard).
        self.upstreams = Connector({s.getsockname()[:2] for s in listeners}, mark=mark, on_eject=self._ejected)
        self._first_answer: dict[Route, trio.Event] = {r: trio.Event() for r in table.routes}
        self._accept_scope: trio.CancelScope | None = None
        self._resolvers: trio.Nursery | None = None
        self._resolver_scopes: dict[Route, trio.CancelScope] = {}
        self._conn_scope: trio.CancelScope | None = None
        self.stopping = False
        self._aborted = False
        self._throttled = Throttled()
        self._hints = Throttled(every=60.0)  # advice on a misuse: once a minute is plenty
        self._unrouted_log = Throttled(conn_log)
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
                resolvers.start_soon(self._shut_down_sessions)
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
                nursery.start_soon(health.check_route, route, self.upstreams.probe, self._checks_changed,
                                   name=f"health checks {route.name}")
                await self._watch_route(route)

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
        upstreams = self.upstreams
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
                    upstreams.short_of_fds = time.monotonic() + 1.0
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
            if burst >= ACCEPT_BURST or upstreams.short_of_fds > time.monotonic():
                burst = 0
                await checkpoint()

    # ---- one connection ------------------------------------------------------------

    async def _handle(self, conn: socket.socket, peer, listen_port: int) -> None:
        """One connection, in the order of DESIGN.md's "Data flow". Whichever way it ends
        (an Outcome), it is counted once, closed, and logged in one line."""
        started = time.monotonic()
        self.active += 1
        self.total += 1
        fields = {"src": peer, "port": None, "backend": None, "up": 0, "down": 0}
        outcome, error, result = Outcome.ERROR, None, RelayResult()
        route = upstream = own = bstats = None
        try:
            original = _original_destination(conn)
            fields["port"] = port = intended_port(original, listen_port)
            if self.upstreams.is_own(peer, port):  # one of our upstream connections, looped back
                raise Refused(Outcome.LOOP)
            if self.first_seen is not None and (ask := self.first_seen(peer[0])) is not None:
                await ask()  # a container's first connection, maybe before Docker told us of it
            if (route := self.table.lookup(port, peer[0])) is None:
                if not self.passthrough or (route := self._passthrough(original, peer[0])) is None:
                    if port in self._listen_ports:
                        self._not_redirected(peer, port)
                    raise Refused(Outcome.NO_ROUTE)
            fields["route"] = route.name
            route.stats.active += 1  # until route.stats.closed()
            await self._admit(route, conn)
            upstream, own, bstats = await self.upstreams.connect(route, self._pick_order(route), result,
                                                                 peer[0], conn)
            fields["backend"] = result.backend
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            outcome = await self._relay(route, conn, upstream, result)
        except Refused as exc:
            outcome, error = exc.outcome, exc.error
        except Exception as exc:  # one connection's bug is logged and contained
            outcome, error = Outcome.ERROR, repr(exc)
            log.exception("connection from %s: unexpected error", _addr_str(peer))
        except BaseException:
            # Cancelled (the grace period ran out), possibly wrapped in the relay nursery's
            # BaseExceptionGroup: not this connection's fault; let trio unwind it.
            outcome = Outcome.SHUTDOWN
            raise
        finally:
            self.active -= 1
            if route is not None:
                route.stats.closed(outcome, result, bstats)
            else:
                self.unrouted[outcome] = self.unrouted.get(outcome, 0) + 1
            if upstream is not None:
                self.upstreams.release(upstream, own)
            conn.close()
            # A passthrough that failed is a container dialling a closed port of this host:
            # ordinary, not the daemon's error.
            passed = route is not None and route.config.origin == PASSTHROUGH
            level = logging.INFO if passed else OUTCOME_LEVELS.get(outcome, logging.INFO)
            if conn_log.isEnabledFor(level):
                _log_connection(level, fields, result, outcome, error, started, self._unrouted_log)

    async def _admit(self, route: Route, conn: socket.socket) -> None:
        """Let one more connection into ``route`` (already counted in its ``active``): its
        limit, its keepalive on the client socket, its first backend set. Raises Refused."""
        cfg = route.config
        if cfg.max_connections and route.stats.active > cfg.max_connections:
            raise self._at_limit(route)
        if cfg.keepalive is not self._listener_keepalive and cfg.keepalive != self._listener_keepalive:
            set_keepalive(conn, cfg.keepalive)
        if not route.resolved:
            await self._first_answer_of(route)

    def _at_limit(self, route: Route) -> Refused:
        """``route`` holds max_connections already: the next one is closed at once."""
        # Also what stops a routing loop that the other loop checks cannot see: every hop
        # holds one connection of the route on each daemon it passes.
        cap = route.config.max_connections
        self._throttled.log(("limit", route.name), logging.WARNING,
                            "route %s: %d connections open, its max_connections; closing new ones at once "
                            "(outcome limit). A routing loop between two hosts looks like this too",
                            route.name, cap, fields={"event": "limit", "route": route.name, "max_connections": cap})
        return Refused(Outcome.LIMIT, f"max_connections {cap} reached")

    async def _first_answer_of(self, route: Route) -> None:
        """Wait (up to connect_timeout) for a new route's first set of backends."""
        if (first := self._first_answer.get(route)) is not None:
            with trio.move_on_after(route.config.connect_timeout):
                await first.wait()

    def _pick_order(self, route: Route) -> list[Backend]:
        """The backends to try, in order (balancer.pick_order).

        Raises:
            Refused: outcome no-backends.
        """
        cfg = route.config
        # A trial of an expired ejection may wait for a socket and then for the connect.
        order = pick_order(route.backends.backends, cfg.balance, route.pick, time.monotonic(), self.rng,
                           trial_for=2 * cfg.connect_timeout)
        if not order:
            raise Refused(Outcome.NO_BACKENDS, route.backends.error or "the route has no backends")
        return order

    async def _relay(self, route: Route, conn: socket.socket, upstream: socket.socket, result: RelayResult) -> str:
        """Relay until the connection ends; its outcome. A route with on_down = "shutdown"
        registers the relay, which _shut_down_sessions may cancel (outcome backend-down);
        the others pay nothing for it."""
        kw = dict(idle_timeout=route.config.idle_timeout, use_splice=self.use_splice, kernel=self.kernel, result=result)
        if route.config.on_down != "shutdown":
            await relay(conn, upstream, **kw)
            return result.outcome
        session = trio.CancelScope()
        self._sessions[session] = (route, result.backend)
        try:
            with session:
                await relay(conn, upstream, **kw)
        finally:
            self._sessions.pop(session, None)
            self._down_since.pop(session, None)
        return Outcome.BACKEND_DOWN if session.cancelled_caught else result.outcome

    async def _shut_down_sessions(self) -> None:
        """on_down = "shutdown": once a second, close the connections whose backend has been
        unusable (gone from the set, ejected, down by the checks) for the route's drain time.
        A backend that comes back in time keeps its connections."""
        while True:
            await trio.sleep(SESSION_SWEEP)
            if not self._sessions:
                continue
            now, current = time.monotonic(), {r.config.key: r for r in self.table.routes}
            for session, (route, backend) in list(self._sessions.items()):
                live = current.get(route.config.key, route)
                if _usable(live, backend, now):
                    self._down_since.pop(session, None)
                elif now - self._down_since.setdefault(session, now) >= live.config.drain:
                    session.cancel()

    def _not_redirected(self, peer, port: int) -> None:
        """A connection came to the listen port itself, and no route has that port: the
        consumer dialled the daemon, not the service (rate-limited: a port scan must not
        flood the log)."""
        self._hints.log(("direct", port), logging.WARNING,
                        "a connection from %s came to the listen port %d itself (not redirected) and no route "
                        "has port %d: consumers dial the service's own port (e.g. 127.0.0.1:6379), which the "
                        "REDIRECT rules (run --iptables) send here; to serve port %d directly, map it "
                        "(--map %d=SPEC)", _addr_str(peer), port, port, port, port,
                        fields={"event": "not-redirected", "port": port})

    def _passthrough(self, original: tuple[str, int] | None, src: str) -> Route | None:
        """A route straight to ``original``, the address a container dialled (one of this
        host's: the redirect takes only those), for a connection no route takes; None for
        a host process's connection, or one that was not redirected or was meant for us."""
        if original is None or client_address(src) is None or original[1] in self._listen_ports:
            return None
        route = self._passthroughs.get(original)
        if route is None:
            if len(self._passthroughs) >= _PASSTHROUGH_CACHE:
                self._passthroughs.clear()
            backend = Backend(*original)
            route = Route(RouteConfig(port=original[1], spec=SpecText(str(backend)), origin=PASSTHROUGH,
                                      name=PASSTHROUGH, max_connections=0, keepalive=self._listener_keepalive),
                          BackendSet((backend,), source=PASSTHROUGH), resolved=True)
            self._passthroughs[original] = route
        return route

    def _ejected(self, route: Route, backend: Backend, ejected: float) -> None:
        """A failed connect ejected ``backend`` of ``route``: so do the other processes."""
        if route.config.origin != PASSTHROUGH:  # a passthrough's is this process's own business
            self.peers.ejected(route.config.key, backend, ejected)
