"""The daemon's own connections to backends: socket, mark, connect with failover, loop guard.

One connection's way to a backend, once its route and pick order are known (DESIGN.md,
"Data flow": "connect with failover, per-attempt timeout")::

    for each backend of the pick order:
        skip it if it is the client's own host or our own listener (loops),
             or if it is at max_backend_connections;
        open a socket: non-blocking, SO_MARK (the REDIRECT rule skips it), keepalive;
             short of fds, wait for one up to connect_timeout (outcome capacity);
        connect within connect_timeout:
             refused, unreachable, timed out: the backend's failure, counted and ejected;
             no local port or memory: this host's shortage, nobody's failure;
        the first that connects wins.
    none did: outcome capacity, limit or all-backends-failed, with every backend's reason.

The Connector also keeps the registry of its upstream sockets' local addresses: a connection
that arrives *from* one of them *for* the port that socket dialled is our own, looped back
by the REDIRECT rule, and the server's loop guard closes it (``is_own``).

Test seam: ``socket_factory`` (``socket.socket`` by default) makes every upstream socket, so
trio tests with ``autojump_clock`` drive timeouts, failover, capacity waits and ejections
with scripted sockets in milliseconds (tests/test_upstream.py). The same paths against real
sockets are in tests/test_server.py and tests/test_faults_server.py.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

import trio
from trio.lowlevel import wait_writable

from ambassadord.backends.interface import Backend

from . import health
from .logs import Throttled
from .routes import PASSTHROUGH, Keepalive, Route
from .stats import BackendStats, Outcome

log = logging.getLogger("ambassadord")

SO_MARK = getattr(socket, "SO_MARK", 36)
# IP_BIND_ADDRESS_NO_PORT is not needed: upstream sockets never bind explicitly.

# Errors that mean "out of a resource", not "bug" (socket() here, accept() in the server):
# wait briefly and go on, as trio's serve_listeners does.
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
CAPACITY_SLEEP = 0.1
# connect() errors that say this host is short of something, not that the backend is
# unwell: EADDRNOTAVAIL is "no free local port toward this backend" (tens of thousands of
# TIME_WAIT sockets at sustained churn; also no usable source address), EAGAIN its older
# spelling, ENOBUFS/ENOMEM memory. Outcome capacity: no ejection, no backend failure.
LOCAL_CONNECT_ERRNOS = {errno.EADDRNOTAVAIL, errno.EAGAIN, *CAPACITY_ERRNOS}
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # no separate ioctl per socket

OwnKey = tuple[str, int, int]  # an upstream socket's (local ip, local port, dialled port)


class OutOfResources(Exception):
    """No file descriptor (or memory) for a new socket, for longer than we can wait."""


class Refused(Exception):
    """The connection is closed before anything is relayed, with ``outcome`` and, where
    there is one to give, ``error`` (the log line's ``error`` field)."""

    def __init__(self, outcome: Outcome, error: str | None = None):
        super().__init__(outcome, error)
        self.outcome, self.error = outcome, error


def set_keepalive(sock: socket.socket, keepalive: Keepalive) -> None:
    """TCP keepalive on ``sock`` as ``keepalive`` says (off: SO_KEEPALIVE 0)."""
    if not keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)


# ---- the decisions (pure) -------------------------------------------------------------------


def host_short(exc: BaseException) -> bool:
    """Is a failed connect this host's shortage (no local port, no memory) rather than the
    backend's fault? Then the next backend (another destination, other free ports) may
    still work, and nobody is ejected."""
    return isinstance(exc, OSError) and exc.errno in LOCAL_CONNECT_ERRNOS


def failure_reason(exc: OSError | trio.TooSlowError) -> str:
    """What a backend's failed connect is called in logs, /routes and the ``error`` field."""
    return "timeout" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))


def no_upstream_outcome(short: list[str], full: list[str]) -> Outcome:
    """No backend took the connection. If this host's shortage or a limit kept a backend
    from being tried, say so rather than blame the backends."""
    if short:
        return Outcome.CAPACITY
    if full:
        return Outcome.LIMIT
    return Outcome.ALL_BACKENDS_FAILED


def _ignore_ejection(route: Route, backend: Backend, duration: float) -> None:
    pass


class Connector:
    """Opens, marks and connects the daemon's upstream sockets, and remembers them.

    Args:
        listen_addrs: the (host, port) of every listener: a backend that is one of them
            would be a loop.
        mark: SO_MARK for upstream sockets (so the iptables chain skips them), or None.
            Without the permission for it, a warning and the loop guard alone.
        socket_factory: ``socket.socket`` or a stand-in with its signature and the methods
            used here (the test seam).
        on_eject: called with (route, backend, seconds) when a failed connect ejects a
            backend (the server tells the other --workers processes).
    """

    def __init__(self, listen_addrs, *, mark: int | None = None,
                 socket_factory: Callable[[int, int], socket.socket] = socket.socket,
                 on_eject: Callable[[Route, Backend, float], None] = _ignore_ejection):
        self.mark = mark
        # Local (ip, port) and dialled port of every upstream socket of ours now connecting
        # or connected. A count, not a set: Linux may reuse one local port for connections
        # to different destinations, and closing one of them must not forget the other.
        self.own: dict[OwnKey, int] = {}
        self.short_of_fds = 0.0  # until when (monotonic) the accept loop yields after every accept
        self._listen_addrs = frozenset(listen_addrs)
        self._socket = socket_factory
        self._on_eject = on_eject
        self._throttled = Throttled(log)

    # ---- the loop guard ----------------------------------------------------------------

    def is_own(self, peer, port: int) -> bool:
        """Is a connection from ``peer`` for ``port`` one of ours, looped back? Not the
        address alone: Linux gives one local port to several connections with different
        destinations, so a client may share a port with an upstream of ours (seen under
        load on 127.0.0.1) and is not a loop."""
        return (peer[0], peer[1], port) in self.own

    def is_own_listener(self, backend: Backend) -> bool:
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

    # ---- one connection ------------------------------------------------------------------

    async def connect(self, route: Route, order: list[Backend], result, peer_ip: str,
                      client: socket.socket) -> tuple[socket.socket, OwnKey, BackendStats]:
        """Connect to the first backend of ``order`` that takes the connection of
        ``client`` (from ``peer_ip``).

        Returns:
            (the connected upstream socket, its key in the registry, its backend's
            BackendStats), with the connection counted open in ``route.stats`` and its
            bytes in ``result``. Hand the socket and key to release() when done.

        Raises:
            Refused: with outcome loop, capacity, limit or all-backends-failed, and every
                backend's reason.
        """
        cfg, stats = route.config, route.stats
        failures: list[str] = []
        if any(b.address == peer_ip for b in order) and not is_local(peer_ip, client):
            # Never send a connection back to the host it came from: another host whose
            # route for this port points here, while ours points there, is a loop that
            # would multiply one connection until both daemons ran out of fds.
            failures.append(f"{peer_ip}: is where the connection came from (a loop between two hosts?)")
            order = [b for b in order if b.address != peer_ip]
            if not order:
                raise Refused(Outcome.LOOP, f"the route's backends are all on {peer_ip}, the host that connected: "
                                            "its route for this port probably points back here")
        short: list[str] = []  # attempts this host had no local port (or memory) for
        full: list[str] = []  # backends passed over at max_backend_connections
        for backend in order:
            if self.is_own_listener(backend):
                failures.append(f"{backend}: is ambassadord's own listener (loop)")
                continue
            key = str(backend)
            b = stats.backend(key, backend)
            if cfg.max_backend_connections and b.active + b.connecting >= cfg.max_backend_connections:
                full.append(f"{backend}: {b.active + b.connecting} connections, its max_backend_connections")
                continue
            try:
                sock = await self.open(backend, cfg.connect_timeout, cfg.keepalive)
            except OutOfResources as exc:
                raise Refused(Outcome.CAPACITY, str(exc)) from None
            started = time.monotonic()
            b.connecting += 1
            try:
                own = await self.dial(sock, backend, cfg.connect_timeout)
            except (OSError, trio.TooSlowError) as exc:
                sock.close()
                if host_short(exc):
                    short.append(f"{backend}: {exc.strerror}")
                    self._short_of_ports(route, backend, exc)
                else:
                    failures.append(f"{backend}: {self._failed(route, backend, b, exc)}")
                continue
            except BaseException:  # cancelled mid-connect: this socket is nobody else's
                sock.close()
                raise
            finally:
                b.connecting -= 1
            route.pick.ejections.restore(backend)
            stats.opened(key, b, result, time.monotonic() - started, time.time())
            return sock, own, b
        raise Refused(no_upstream_outcome(short, full), "; ".join(failures + short + full))

    def release(self, sock: socket.socket, own: OwnKey) -> None:
        """Close an upstream socket that connect() returned."""
        self.forget(own)
        sock.close()

    def _failed(self, route: Route, backend: Backend, b: BackendStats, exc: OSError | trio.TooSlowError) -> str:
        """``backend`` failed to connect: count it, eject it, say so. Returns the reason."""
        reason = failure_reason(exc)
        route.stats.connect_failed(b, reason, time.time())
        if route.config.origin == PASSTHROUGH:  # a closed port of this host: the connection's line says so
            return reason
        ejected = route.pick.ejections.eject(backend, time.monotonic(), route.config.eject_for)
        if ejected is not None:
            self._on_eject(route, backend, ejected)
        log.warning("route %s: backend %s failed (%s); %s", route.name, backend, reason,
                    "still ejected" if ejected is None else f"ejected for {ejected:g}s",
                    extra={"fields": {"event": "backend-failed", "route": route.name, "backend": str(backend),
                                      "error": reason}})
        return reason

    def _short_of_ports(self, route: Route, backend: Backend, exc: OSError) -> None:
        self._throttled.log(
            ("capacity", route.name), logging.ERROR,
            "route %s: cannot connect to %s: %s. This host is out of local ports (or memory), "
            "not the backend's fault: not ejected (outcome capacity). Raise "
            "net.ipv4.ip_local_port_range or set net.ipv4.tcp_tw_reuse=1 (README, Limits)",
            route.name, backend, exc.strerror,
            fields={"event": "capacity", "route": route.name, "backend": str(backend), "error": exc.strerror})

    # ---- one socket ------------------------------------------------------------------------

    async def open(self, backend: Backend, patience: float, keepalive: Keepalive = Keepalive()) -> socket.socket:
        """A fresh non-blocking upstream socket toward ``backend``: TCP_NODELAY, the mark,
        ``keepalive`` if on.

        Out of file descriptors (or memory) is a passing state, as in accept: wait
        CAPACITY_SLEEP and retry, for up to ``patience`` seconds, rather than drop a client
        that was already accepted.

        Raises:
            OutOfResources: still out of resources after ``patience`` seconds.
        """
        deadline = trio.current_time() + patience
        while True:
            try:
                sock = self._socket(backend.family, _STREAM_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                self.short_of_fds = time.monotonic() + 1.0
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

    async def dial(self, sock: socket.socket, backend: Backend, timeout: float) -> OwnKey:
        """Connect a socket from open() to ``backend``; return its key, registered as our own
        (forget() it, or release() the socket, when done).

        Raises:
            OSError: refused, unreachable, ...
            trio.TooSlowError: not connected within ``timeout`` seconds.
        """
        err = sock.connect_ex((backend.address, backend.port))
        # The local port is bound by connect() itself: register it before the first await,
        # so that if the connection loops back to us, its handler already sees it as ours.
        local = sock.getsockname()
        key = (local[0], local[1], backend.port)
        self.own[key] = self.own.get(key, 0) + 1
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
            self.forget(key)
            raise
        return key

    def forget(self, key: OwnKey) -> None:
        n = self.own.get(key, 0) - 1
        if n > 0:
            self.own[key] = n
        else:
            self.own.pop(key, None)

    async def probe(self, backend: Backend, timeout: float) -> None:
        """One health check's connect (health.py): through our own upstream path (the mark,
        the loop guard), closed with a reset at once, so that checks leave no TIME_WAIT.

        Raises:
            OSError, trio.TooSlowError: the backend failed the check.
            health.NoResult: this host could not try (no fd, no local port).
        """
        if self.is_own_listener(backend):  # it would be accepted, and counted, as a client
            raise OSError(errno.ELOOP, "is ambassadord's own listener (loop)")
        try:
            sock = await self.open(backend, timeout)
        except OutOfResources as exc:
            raise health.NoResult(str(exc)) from None
        try:
            self.forget(await self.dial(sock, backend, timeout))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as exc:
            if host_short(exc):  # this host's capacity, not the backend's health
                raise health.NoResult(exc.strerror or str(exc)) from None
            raise
        finally:
            sock.close()


def is_local(address: str, client: socket.socket) -> bool:
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
    if ip.is_loopback or address == client.getsockname()[0]:
        return True
    try:
        with socket.socket(client.family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))  # only a local address can be bound
        return True
    except OSError:
        return False
