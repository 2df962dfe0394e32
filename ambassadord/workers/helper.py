"""A helper process (``python -m ambassadord.workers FD``): serve connections like the main
process, with the table, sets and verdicts the main process sends (protocol.py).

A helper resolves nothing and checks nothing. It ignores SIGTERM, SIGINT and SIGHUP (the
main process decides) and stops like after SIGTERM when the main process is gone (the
socketpair reads EOF).
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import trio

from ..peers import Peers
from ..routes import client_address
from .channel import Channel
from .protocol import (
    TO_HELPER,
    Abort,
    Backends,
    Down,
    Eject,
    Failed,
    Init,
    Looked,
    Lookup,
    ProtocolError,
    Ready,
    Routes,
    RoutesOk,
    Settings,
    StatsReply,
    StatsRequest,
    Stop,
)

log = logging.getLogger("ambassadord")
# Seconds a connection waits for the main process's answer about its client address
# (docker_watch.LOOKUP_WAIT, which bounds the main process's own wait, plus a margin).
LOOKUP_WAIT = 2.5


class Link(Peers):
    """A helper's peers, as its Server sees them: the main process. Only what this helper
    found out itself travels (an ejection, and with --docker a client address it knows no
    container of); tables, sets and checks come from the main process, so the rest of
    Peers stays a no-op."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._req = 0
        self._asked: dict[str, tuple[int, trio.Event]] = {}  # address -> (Lookup req, answered)
        self._known: set[str] = set()  # the addresses of the container routes in the table
        self._strangers: set[str] = set()  # asked about, no route came (until the next table)

    def ejected(self, key, backend, duration: float) -> None:
        self.channel.send(Eject(key, backend, duration))

    def routes(self, configs) -> None:
        """The table changed (server.reload): which client addresses it has routes for."""
        self._known = {str(c.source.network_address) for c in configs if c.container and c.source is not None}
        self._strangers.clear()

    def first_seen(self, addr: str):
        """Server.first_seen under --docker: None, or a coroutine function that asks the
        main process (one Lookup per address at a time) and returns once it answered, or
        after LOOKUP_WAIT seconds."""
        addr = client_address(addr)
        if addr is None or addr in self._known or addr in self._strangers:
            return None
        return lambda: self._ask(addr)

    async def _ask(self, addr: str) -> None:
        if addr not in self._asked:
            self._req += 1
            self._asked[addr] = (self._req, trio.Event())
            self.channel.send(Lookup(addr, self._req))
        req, answered = self._asked[addr]
        with trio.move_on_after(LOOKUP_WAIT):
            await answered.wait()
        if self._asked.get(addr, (None,))[0] == req:
            del self._asked[addr]
            if addr not in self._known:
                self._strangers.add(addr)

    def looked(self, req: int) -> None:
        for addr, (r, answered) in self._asked.items():
            if r == req:
                answered.set()
                return


def main(fd: int) -> int:
    """Run the helper on the socketpair end ``fd``; the process's exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=fd), TO_HELPER)
    return trio.run(_serve, channel)


async def _serve(channel: Channel) -> int:
    # Imported here: the main process imports this package to start helpers, and needs
    # none of what serving takes.
    from .. import logs
    from ..routes import Route, RouteTable
    from ..server import Server, StartupError, bind_listeners

    try:
        settings, index, first = await _start(channel)
    except ProtocolError as exc:
        channel.send(Failed(str(exc)))
        await channel.flush(2)
        return 1
    logs.setup(settings.log_format, settings.log_level, connections=settings.log_connections)
    logging.getLogger().handlers[0].addFilter(_tag(index))
    kernel = None
    if settings.sockmap == "on":
        from ..relay import KernelRelay, SockmapError

        try:
            kernel = KernelRelay(settings.sockmap_size)
        except SockmapError as exc:
            log.warning("worker %d: sockmap not available (%s); relaying in user space", index, exc)
    try:
        listeners = bind_listeners(list(settings.listen), reuseport=True)
    except StartupError as exc:
        channel.send(Failed(str(exc)))
        await channel.flush(2)
        if kernel is not None:
            kernel.close()
        return 1
    link = Link(channel)
    server = Server(RouteTable([Route(c) for c in first.configs]), listeners, grace=settings.grace,
                    mark=settings.mark, use_splice=settings.use_splice, kernel=kernel, resolve=False,
                    peers=link)
    if settings.docker:
        link.routes(first.configs)
        server.first_seen = link.first_seen
    server.passthrough = settings.passthrough
    for key, bset in first.sets.items():
        server.install(key, bset)

    async with trio.open_nursery() as nursery:

        async def run_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            # Returns after stop and the grace period: then the rest goes too.
            await server.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        nursery.start_soon(channel.run_writer)
        await nursery.start(run_server)
        channel.send(RoutesOk(first.seq))
        channel.send(Ready(os.getpid()))
        nursery.start_soon(follow, channel, server)
    if kernel is not None:
        kernel.close()
    return 0


async def _start(channel: Channel) -> tuple[Settings, int, Routes]:
    """The two messages a helper starts with: Init, then the first Routes.

    Raises:
        ProtocolError: another message came first, or the main process went away.
    """
    try:
        match await channel.recv():
            case Init(settings, index):
                pass
            case other:
                raise ProtocolError(f"expected Init first, got {type(other).__name__}")
        match await channel.recv():
            case Routes() as first:
                return settings, index, first
            case other:
                raise ProtocolError(f"expected Routes after Init, got {type(other).__name__}")
    except EOFError:
        raise ProtocolError("the main process went away before the worker started") from None


async def follow(channel: Channel, server) -> None:
    """Apply what the main process sends to ``server``, until it stops or goes away."""
    while True:
        try:
            msg = await channel.recv()
        except EOFError:
            server.shutdown()  # the main process is gone
            return
        except ProtocolError as exc:
            log.error("bad message from the main process: %s; ignored", exc)
            continue
        receive(channel, server, msg)


def receive(channel: Channel, server, msg) -> None:
    """Act on one message from the main process."""
    match msg:
        case Backends(key, bset):
            server.install(key, bset)
        case Routes(configs, sets, seq):
            if not server.stopping:
                server.reload(list(configs))
            for key, bset in sets.items():
                server.install(key, bset)
            channel.send(RoutesOk(seq))
        case Eject(key, backend, duration):
            server.apply_ejection(key, backend, duration)
        case Down(key, down):
            server.apply_down(key, down)
        case StatsRequest(req):
            channel.send(StatsReply(req, server.stats_snapshot()))
        case Stop():
            server.shutdown()
        case Abort():
            server.abort()
        case Looked(req):
            server.peers.looked(req)
        case _:  # Init again: the main process's bug
            log.error("%s from the main process once running; ignored", type(msg).__name__)


def _tag(index: int):
    """A helper's log lines say which worker wrote them."""

    def tag(record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if fields is not None:  # a structured line: the index is one more field
            record.fields = {**fields, "worker": index}
        else:
            record.msg = f"worker {index}: {record.msg}"
        return True

    return tag
