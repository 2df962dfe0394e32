"""The main process's side of ``--workers N``: start N-1 helpers, keep them running, and
pass on to them what its Server tells its peers (peers.py).

The pool never holds the Server. Whoever makes it hands it two callables: ``table`` (the
RouteTable served now, sent to a helper that starts) and ``apply_ejection`` (a helper's
ejection, applied in this process too; the pool passes it on to the other helpers).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..peers import Peers
from .channel import Channel
from .protocol import (
    TO_MAIN,
    Abort,
    Backends,
    Down,
    Eject,
    Failed,
    Init,
    Looked,
    Lookup,
    Message,
    ProtocolError,
    Ready,
    Routes,
    RoutesOk,
    Settings,
    StatsReply,
    StatsRequest,
    Stop,
    encode,
    light_configs,
)

if TYPE_CHECKING:
    from ambassadord.backends.interface import Backend

    from ..routes import RouteTable

log = logging.getLogger("ambassadord")

READY_TIMEOUT = 20.0  # seconds a helper may take to start (import, bind, sockmap)
COLLECT_TIMEOUT = 1.0  # seconds the admin API waits for a helper's counters
SYNC_TIMEOUT = 5.0  # seconds a reload waits for every helper to confirm the new table
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class WorkerStartError(RuntimeError):
    """A helper process could not start (its reason in the message)."""


class _Helper:
    """One helper process as the pool knows it; restarted in place (same index)."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.channel: Channel | None = None
        self.ready = False
        self.pending: dict[int, trio.Event] = {}
        self.answers: dict[int, dict] = {}
        self.routes_seq = 0  # the last table it confirmed
        self.error: str | None = None  # what its Failed message said


class WorkerPool(Peers):
    """The main process's handle on its helpers (count - 1 processes), and its Server's peers.

    Args:
        count: processes in all, the main one included.
        settings: what every helper gets in its Init.
        table: the RouteTable the main process serves now (a starting helper gets it).
        apply_ejection: ``(key, backend, duration)``: a helper ejected ``backend`` of route
            ``key``; the main process ejects it too (Server.apply_ejection).
    """

    def __init__(self, count: int, settings: Settings, *, table: Callable[[], RouteTable],
                 apply_ejection: Callable[[tuple, Backend, float], None]):
        self.count = count
        self.settings = settings
        self._table = table
        self._apply_ejection = apply_ejection
        # --docker: the watch's first_seen (docker_watch.ContainerWatch), set by the daemon
        # once it follows the engine; a helper's Lookup is answered once what it returns
        # has been awaited (None: at once).
        self.first_seen: Callable | None = None
        self._nursery: trio.Nursery | None = None
        self.helpers = [_Helper(i) for i in range(1, count)]
        self.stopping = False
        self.aborting = False
        self._req = 0
        self._done = trio.Event()
        self.restarts = 0
        self.routes_seq = 0  # the last table sent (a reload); each helper says which it has
        self._synced = trio.Event()

    # -- Peers: what the server tells every helper --

    def routes(self, configs) -> None:
        """A reload: every helper gets the new table (see synced())."""
        self.routes_seq += 1
        self._broadcast(Routes(light_configs(configs), {}, self.routes_seq))

    async def synced(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Wait until every running helper has installed the table of the last routes()
        (so that a reload is over, and READY=1 sent, only when all of them serve it).
        False if one did not within ``timeout`` (it is logged)."""
        with trio.move_on_after(timeout):
            while True:
                late = [h for h in self._live() if h.ready and h.routes_seq < self.routes_seq]
                if not late:
                    return True
                self._synced = trio.Event()
                await self._synced.wait()
        late = ", ".join(str(h.index) for h in self._live() if h.ready and h.routes_seq < self.routes_seq)
        if late:
            log.warning("worker(s) %s did not confirm the new routes within %gs", late, timeout)
            return False
        return True

    def backends(self, key, bset) -> None:
        self._broadcast(Backends(key, bset))

    def ejected(self, key, backend, duration: float, *, source: _Helper | None = None) -> None:
        self._broadcast(Eject(key, backend, duration), skip=source)

    def down(self, key, down) -> None:
        """The main process's health checks of route ``key`` say ``down`` are down (health.py)."""
        self._broadcast(Down(key, down))

    def stop(self) -> None:
        self.stopping = True
        self._broadcast(Stop())

    def abort(self) -> None:
        self.stopping = self.aborting = True
        self._broadcast(Abort())

    def _broadcast(self, msg: Message, *, skip: _Helper | None = None) -> None:
        """``msg`` to every running helper but ``skip``, encoded once."""
        live = [h for h in self._live() if h is not skip]
        if live:
            data = encode(msg)
            for h in live:
                h.channel.send_frame(data)

    def _live(self):
        return [h for h in self.helpers if h.channel is not None and not h.channel.closed]

    async def collect(self, timeout: float = COLLECT_TIMEOUT) -> list[dict]:
        """Every ready helper's counters (stats_snapshot), asked now; a helper that does not
        answer within ``timeout`` is left out."""
        self._req += 1
        req = self._req
        asked = [h for h in self._live() if h.ready]
        for h in asked:
            h.pending[req] = trio.Event()
            h.channel.send(StatsRequest(req))
        with trio.move_on_after(timeout):
            for h in asked:
                await h.pending[req].wait()
        out = []
        for h in asked:
            h.pending.pop(req, None)
            snap = h.answers.pop(req, None)
            if snap is not None:
                out.append(snap)
        return out

    def pids(self) -> list[int]:
        return [h.proc.pid for h in self.helpers if h.proc is not None and h.proc.returncode is None]

    # -- running them --

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start every helper, report started once all are ready, then keep them running
        (restart the ones that die) until stop()/abort() and their exit.

        Raises:
            WorkerStartError: a helper could not start (the message says why).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for h in self.helpers:
                await nursery.start(self._keep, h)
            task_status.started()
        self._done.set()

    async def wait_closed(self, timeout: float) -> None:
        """After stop()/abort(): wait for the helpers to finish; kill those still there."""
        with trio.move_on_after(timeout):
            await self._done.wait()
        for h in self.helpers:
            if h.proc is not None and h.proc.returncode is None:
                log.warning("worker %d (pid %d) did not stop; killing it", h.index, h.proc.pid)
                h.proc.kill()
        await self._done.wait()

    async def _keep(self, h: _Helper, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        attempt = 0
        first = True
        while True:
            started_at = time.monotonic()
            error = await self._run_one(h, task_status if first else trio.TASK_STATUS_IGNORED)
            if first and not h.ready:
                raise WorkerStartError(f"worker {h.index} did not start: {error}")
            first = False
            if self.stopping:
                return
            if time.monotonic() - started_at > 60:
                attempt = 0
            delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
            attempt += 1
            self.restarts += 1
            log.error("worker %d %s; restarting it in %gs", h.index, error, delay,
                      extra={"fields": {"event": "worker-exit", "worker": h.index}})
            await trio.sleep(delay)
            if self.stopping:
                return

    async def _run_one(self, h: _Helper, task_status) -> str:
        """Run one helper process until it exits; return what happened, in words."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        h.ready = False
        try:
            h.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ambassadord.workers", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            return f"could not be started ({exc})"
        finally:
            child.close()
        h.channel = ch = Channel(parent, TO_MAIN)
        routes = self._table().routes
        ch.send(Init(self.settings, h.index))
        ch.send(Routes(light_configs(r.config for r in routes),
                       {r.config.key: r.backends for r in routes if r.resolved}, self.routes_seq))
        for r in routes:
            if r.pick.down:
                ch.send(Down(r.config.key, r.pick.down))
        if self.stopping:
            ch.send(Abort() if self.aborting else Stop())
        error = "exited"
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ch.run_writer)
                with trio.move_on_after(READY_TIMEOUT) as ready_scope:
                    while not h.ready:
                        if not await self._next(h):
                            break
                if ready_scope.cancelled_caught:
                    error = f"was not ready after {READY_TIMEOUT:g}s"
                    h.proc.kill()
                elif h.ready:
                    started = True
                    task_status.started()
                    while await self._next(h):
                        pass
                nursery.cancel_scope.cancel()
        finally:
            ch.closed = True
            parent.close()
            for ev in h.pending.values():
                ev.set()
            self._synced.set()
            with trio.CancelScope(shield=True):
                code = await h.proc.wait()
        if h.error is not None:
            error = h.error
        elif code < 0:
            error = f"(pid {h.proc.pid}) was killed by {signal.Signals(-code).name}"
        else:
            error = f"(pid {h.proc.pid}) exited with code {code}"
        h.ready = h.ready and started
        return error

    async def _next(self, h: _Helper) -> bool:
        """Read and act on one message from the helper; False at EOF."""
        try:
            msg = await h.channel.recv()
        except EOFError:
            return False
        except ProtocolError as exc:
            log.error("worker %d sent a bad message: %s; ignored", h.index, exc)
            return True
        self._receive(h, msg)
        return True

    def _receive(self, h: _Helper, msg: Message) -> None:
        """Act on one message from helper ``h`` (one of protocol.TO_MAIN: the channel
        accepts nothing else)."""
        match msg:
            case Ready(pid):
                h.ready = True
                h.error = None
                log.debug("worker %d ready (pid %d)", h.index, pid)
            case RoutesOk(seq):
                h.routes_seq = seq
                self._synced.set()
            case Failed(reason):
                h.error = reason
            case StatsReply(req, snapshot):
                ev = h.pending.get(req)
                if ev is not None:
                    h.answers[req] = snapshot
                    ev.set()
            case Eject(key, backend, duration):
                self._apply_ejection(key, backend, duration)
                self.ejected(key, backend, duration, source=h)
            case Lookup(addr, req):
                ask = self.first_seen(addr) if self.first_seen is not None else None
                if ask is None or self._nursery is None:
                    h.channel.send(Looked(req))
                else:
                    self._nursery.start_soon(self._look_up, h, ask, req)

    async def _look_up(self, h: _Helper, ask, req: int) -> None:
        try:
            await ask()
        finally:
            h.channel.send(Looked(req))
