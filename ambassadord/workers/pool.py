"""``--workers N``: N processes accept and relay on the same port; one of them resolves.

Python runs one thread at a time, so one process uses one core for connection set-up (the
part the kernel relay cannot take: accept, SO_ORIGINAL_DST, connect). With ``--workers N``
the daemon is N processes:

* the **main** process is the one started: it reads the configuration, installs the
  iptables rules, runs every route's resolver (one watch per route per host, however many
  workers), serves the admin API, handles signals and reloads, and serves connections
  like any worker;
* N-1 **helper** processes (``python -m ambassadord.workers FD``) only serve connections.

Every process binds the listen addresses with SO_REUSEPORT, so the kernel spreads new
connections over them (by a hash of the addresses and ports). A helper never talks to
Consul, etcd or DNS: the main process sends it the route table and every backend set its
resolvers publish, over a private socketpair (length-prefixed pickle frames; both ends are
this program). What travels:

======================  ==========================================================
main -> helper          ``init`` (settings), ``routes`` (the table and current sets),
                        ``backends`` (one route's new set), ``eject`` (a backend
                        failed in another process), ``down`` (a route's backends that
                        health checks say are down), ``stats`` (a request),
                        ``stop`` / ``abort``
helper -> main          ``ready``, ``failed`` (why it cannot start), ``eject``,
                        ``stats`` (the answer: its counters)
======================  ==========================================================

A backend that fails in one process is ejected in all of them. The admin API asks every
helper for its counters when it is read and shows the sums.

Helpers ignore SIGTERM, SIGINT and SIGHUP: the main process decides (a ``systemctl stop``
or Ctrl-C reaches the whole group, and must not count twice). A helper whose main process
is gone (the socketpair reads EOF) stops like after SIGTERM. A helper that dies is
restarted by the main process, with a backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import trio
from trio.lowlevel import wait_readable, wait_writable

log = logging.getLogger("ambassadord")

_HEADER = struct.Struct("!I")
READY_TIMEOUT = 20.0  # seconds a helper may take to start (import, bind, sockmap)
COLLECT_TIMEOUT = 1.0  # seconds the admin API waits for a helper's counters
SYNC_TIMEOUT = 5.0  # seconds a reload waits for every helper to confirm the new table
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def default_count(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """``--workers auto``: the cores this process may run on (its CPU affinity), capped by
    its cgroup's CPU quota (cgroup v2 ``cpu.max``: a container given 1.5 CPUs gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpus(cgroup_root: str, proc_cgroup: str) -> int | None:
    """Whole CPUs (rounded up) allowed by cpu.max of this process's cgroup and its parents;
    None when there is no limit or no cgroup v2."""
    try:
        with open(proc_cgroup) as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    best = None
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(cgroup_root, *parts[:depth], "cpu.max")) as f:
                fields = f.read().split()
        except OSError:
            continue
        limit, period = (fields + ["max", "100000"])[:2]
        if limit != "max":
            try:
                cpus = -(-int(limit) // int(period))
            except (ValueError, ZeroDivisionError):
                continue
            best = cpus if best is None else min(best, cpus)
    return best


class WorkerStartError(RuntimeError):
    """A helper process could not start (its reason in the message)."""


def frame(msg) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class Channel:
    """Pickle frames over a non-blocking stream socket. ``send`` never blocks (it queues;
    ``run_writer`` drains the queue), so resolvers and reload can call it synchronously."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._out = bytearray()
        self._in = bytearray()
        self._wake = trio.Event()
        self.closed = False

    def send(self, msg) -> None:
        self.send_frame(frame(msg))

    def send_frame(self, data: bytes) -> None:
        """Queue a frame made by frame() (one pickling for many channels)."""
        if self.closed:
            return
        self._out += data
        self._wake.set()

    async def run_writer(self) -> None:
        """Send what is queued, until the peer goes away (returns) or cancelled."""
        while True:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                await wait_writable(self.sock)
                continue
            except OSError:
                self.closed = True
                return
            del self._out[:n]

    async def recv(self):
        """The next message; EOFError when the peer is gone."""
        while True:
            if len(self._in) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(self._in)
                if len(self._in) >= _HEADER.size + n:
                    msg = pickle.loads(bytes(self._in[_HEADER.size:_HEADER.size + n]))
                    del self._in[:_HEADER.size + n]
                    return msg
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                await wait_readable(self.sock)
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                raise EOFError
            self._in += data


@dataclass(frozen=True, slots=True)
class SpecText:
    """A route's spec as a helper knows it: only its text (a helper resolves nothing, and
    need not import Consul, etcd or DNS clients to unpickle it)."""

    text: str


def light_configs(configs) -> list:
    return [dataclasses.replace(c, spec=SpecText(c.spec.text)) for c in configs]


@dataclass(frozen=True, slots=True)
class Settings:
    """What a helper needs to serve like the main process."""

    listen: tuple  # ListenAddress of every listener the main process bound
    grace: float
    mark: int | None
    use_splice: bool
    sockmap: str  # "on" / "off": what the main process ended up with
    sockmap_size: int
    log_format: str
    log_level: str


# ---- the main process's side ------------------------------------------------------------


class _Helper:
    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.channel: Channel | None = None
        self.ready = False
        self.pending: dict[int, trio.Event] = {}
        self.answers: dict[int, dict] = {}
        self.routes_seq = 0  # the last table it confirmed
        self.error: str | None = None  # what its "failed" message said


class WorkerPool:
    """The main process's handle on its helpers (count - 1 processes)."""

    def __init__(self, count: int, settings: Settings):
        self.count = count
        self.settings = settings
        self.server = None  # set by Server
        self.helpers = [_Helper(i) for i in range(1, count)]
        self.stopping = False
        self.aborting = False
        self._req = 0
        self._done = trio.Event()
        self.restarts = 0
        self.routes_seq = 0  # the last table sent (a reload); each helper says which it has
        self._synced = trio.Event()

    # -- what the server tells every helper --

    def routes(self, configs) -> None:
        """A reload: every helper gets the new table (see synced())."""
        self.routes_seq += 1
        self._broadcast(("routes", light_configs(configs), {}, self.routes_seq))

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
        self._broadcast(("backends", key, bset))

    def ejected(self, key, backend, duration: float, *, source: _Helper | None = None) -> None:
        self._broadcast(("eject", key, backend, duration), skip=source)

    def down(self, key, down) -> None:
        """The main process's health checks of route ``key`` say ``down`` are down (health.py)."""
        self._broadcast(("down", key, down))

    def stop(self) -> None:
        self.stopping = True
        self._broadcast(("stop",))

    def abort(self) -> None:
        self.stopping = self.aborting = True
        self._broadcast(("abort",))

    def _broadcast(self, msg, *, skip: _Helper | None = None) -> None:
        """``msg`` to every running helper but ``skip``, pickled once."""
        live = [h for h in self._live() if h is not skip]
        if live:
            data = frame(msg)
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
            h.channel.send(("stats", req))
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
        h.channel = ch = Channel(parent)
        server = self.server
        ch.send(("init", self.settings, h.index))
        ch.send(("routes", light_configs(r.config for r in server.table.routes),
                 {r.config.key: r.backends for r in server.table.routes if r.resolved}, self.routes_seq))
        for r in server.table.routes:
            if r.pick.down:
                ch.send(("down", r.config.key, r.pick.down))
        if self.stopping:
            ch.send(("abort",) if self.aborting else ("stop",))
        error = "exited"
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ch.run_writer)
                with trio.move_on_after(READY_TIMEOUT) as ready_scope:
                    while not h.ready:
                        msg = await self._next(h)
                        if msg is None:
                            break
                if ready_scope.cancelled_caught:
                    error = f"was not ready after {READY_TIMEOUT:g}s"
                    h.proc.kill()
                elif h.ready:
                    started = True
                    task_status.started()
                    while await self._next(h) is not None:
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

    async def _next(self, h: _Helper):
        """Read and act on one message from the helper; None at EOF."""
        try:
            msg = await h.channel.recv()
        except EOFError:
            return None
        kind = msg[0]
        if kind == "ready":
            h.ready = True
            h.error = None
            log.debug("worker %d ready (pid %d)", h.index, h.proc.pid)
        elif kind == "routes-ok":
            h.routes_seq = msg[1]
            self._synced.set()
        elif kind == "failed":
            h.error = msg[1]
        elif kind == "stats":
            _, req, snap = msg
            ev = h.pending.get(req)
            if ev is not None:
                h.answers[req] = snap
                ev.set()
        elif kind == "eject":
            _, key, backend, duration = msg
            self.server.apply_ejection(key, backend, duration)
            self.ejected(key, backend, duration, source=h)
        return msg


# ---- the helper process's side ----------------------------------------------------------


class _Link:
    """A helper's handle on the main process (what Server calls as ``workers``)."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def ejected(self, key, backend, duration: float) -> None:
        self.channel.send(("eject", key, backend, duration))

    # The main process's table, sets and checks arrive as messages; nothing to tell it here.
    def routes(self, configs) -> None:
        pass

    def down(self, key, down) -> None:
        pass

    def backends(self, key, bset) -> None:
        pass

    def stop(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _helper_main(fd: int) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    channel = Channel(sock)

    async def main() -> int:
        from .. import logs
        from ..routes import Route, RouteTable
        from ..server import Server, StartupError, bind_listeners

        msg = await channel.recv()
        assert msg[0] == "init", msg
        settings: Settings = msg[1]
        index = msg[2]
        logs.setup(settings.log_format, settings.log_level)
        logging.getLogger().handlers[0].addFilter(_tag(index))
        _, configs, sets, seq = await channel.recv()
        sockmap = None
        if settings.sockmap == "on":
            from ..sockmap import Sockmap, SockmapError

            try:
                sockmap = Sockmap(2 * settings.sockmap_size)
            except SockmapError as exc:
                log.warning("worker %d: sockmap not available (%s); relaying in user space", index, exc)
        try:
            listeners = bind_listeners(list(settings.listen), reuseport=True)
        except StartupError as exc:
            channel.send(("failed", str(exc)))
            await _flush(channel)
            return 1
        server = Server(RouteTable([Route(c) for c in configs]), listeners, grace=settings.grace,
                        mark=settings.mark, use_splice=settings.use_splice, sockmap=sockmap, resolve=False,
                        workers=_Link(channel))
        for key, bset in sets.items():
            server.install(key, bset)

        async def serve_messages() -> None:
            try:
                while True:
                    msg = await channel.recv()
                    kind = msg[0]
                    if kind == "backends":
                        server.install(msg[1], msg[2])
                    elif kind == "routes":
                        if not server.stopping:
                            server.reload(msg[1])
                        for key, bset in msg[2].items():
                            server.install(key, bset)
                        channel.send(("routes-ok", msg[3]))
                    elif kind == "eject":
                        server.apply_ejection(msg[1], msg[2], msg[3])
                    elif kind == "down":
                        server.apply_down(msg[1], msg[2])
                    elif kind == "stats":
                        channel.send(("stats", msg[1], server.stats_snapshot()))
                    elif kind == "stop":
                        server.shutdown()
                    elif kind == "abort":
                        server.abort()
            except EOFError:
                server.shutdown()  # the main process is gone

        async with trio.open_nursery() as nursery:

            async def run_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                # Returns after stop and the grace period: then the rest goes too.
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(channel.run_writer)
            await nursery.start(run_server)
            channel.send(("routes-ok", seq))
            channel.send(("ready", os.getpid()))
            nursery.start_soon(serve_messages)
        return 0

    return trio.run(main)


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


async def _flush(channel: Channel) -> None:
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run_writer)
            while channel._out and not channel.closed:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
