"""The relay in user space: bytes through this process, recv/send or splice(2).

Two pumps, one task per direction:

* **recv/send** (``_pump_copy``) through one shared scratch buffer;
* **splice(2)** (``_pump_splice``), socket -> pipe -> socket, which a recv/send direction
  switches to once it has moved SPLICE_AFTER bytes or filled the whole buffer in one
  read (bulk): small request/response traffic never pays for a pipe.

Used where the kernel relay is not: with an idle timeout (it moves with every byte, and
no byte passes here in the kernel), with ``--sockmap off``, or when the sockmap is full
or refuses a pair. An idle deadline ends both directions when no byte moved either way.

Why raw non-blocking stdlib sockets rather than trio's socket wrappers: the hot loop tries
the syscall first and only waits for readiness when the kernel says EAGAIN (or, after a
short read, at once: the socket is drained), and it skips the wrappers' checkpoints.
Fairness: a direction that keeps filling the buffer yields every _STREAK chunks.

Memory: the copy path reads into one process-wide scratch buffer (trio runs one task at a
time, and a chunk is handed to the kernel before the next await). Only when the
destination cannot take a chunk at once is the remainder copied into a per-connection
``bytes``. So an idle connection costs no user-space buffer at all.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from .contract import Broken, RelayResult, half_close

CHUNK = 256 * 1024
_scratch = bytearray(CHUNK)
_scratch_view = memoryview(_scratch)

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")
# Pipe capacity for splice: 1 MiB lets one syscall move a large chunk (default is 64 KiB).
_F_SETPIPE_SZ = fcntl.F_SETPIPE_SZ
_PIPE_SIZE = 1024 * 1024
# With splice on, a direction starts with recv/send and moves to splice once it has moved
# this much, or once one read filled the whole buffer: small request/response traffic
# never pays for a pipe (pipe2 + fcntl + two closes), bulk gets zero-copy within a chunk.
SPLICE_AFTER = 1024 * 1024
# Full-buffer chunks moved in a row before the copy pump yields to other tasks.
_STREAK = 4


async def send_all(dst: socket.socket, data, dst_name: str) -> None:
    """Send all of ``data``, waiting whenever ``dst`` is full (Broken if it was reset)."""
    view = memoryview(data)
    while view:
        try:
            sent = dst.send(view)
        except BlockingIOError:
            await wait_writable(dst)
            continue
        except OSError as exc:
            raise Broken(f"{dst_name}-reset") from exc
        view = view[sent:]


async def _pump_copy(src, dst, result: RelayResult, up: bool, src_name: str, dst_name: str, scope, idle,
                     splice_after: int | None = None) -> None:
    """recv/send until EOF. With ``splice_after``, hand over to the splice pump once this
    direction has moved that many bytes or a read filled the whole buffer (bulk)."""
    recv_into, send = src.recv_into, dst.send
    buf, view = _scratch, _scratch_view
    moved = 0
    streak = 0  # chunks in a row that did not wait (fairness, see below)
    while True:
        try:
            n = recv_into(buf)
        except BlockingIOError:
            await wait_readable(src)
            continue
        except OSError as exc:
            raise Broken(f"{src_name}-reset") from exc
        if n == 0:
            break
        # Counted as it flows (not at the end), so the admin API sees a long-lived connection's bytes.
        if up:
            result.up += n
        else:
            result.down += n
        if idle is not None:
            scope.deadline = trio.current_time() + idle
        try:
            sent = send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise Broken(f"{dst_name}-reset") from exc
        if sent < n:
            # Backpressure: keep the rest in a private copy; the scratch buffer is shared.
            await send_all(dst, bytes(view[sent:n]), dst_name)
            streak = 0
        elif n < CHUNK:
            # A short read drained the socket: the next recv would only say EAGAIN. Wait
            # for readiness straight away (one syscall and one scheduler pass saved per
            # message, which is most of request/response traffic).
            await wait_readable(src)
            streak = 0
            continue
        else:
            # A full buffer: more is probably queued. Go on without waiting, but let the
            # other tasks run every few chunks.
            streak += 1
            if streak >= _STREAK:
                streak = 0
                await checkpoint()
        if splice_after is not None:
            moved += n
            if n == CHUNK or moved >= splice_after:
                return await _pump_splice(src, dst, result, up, src_name, dst_name, scope, idle)
    _pass_eof(result, dst, dst_name)


async def _pump_splice(src, dst, result: RelayResult, up: bool, src_name: str, dst_name: str, scope, idle) -> None:
    # The pipe is made only once there is something to move: an idle connection holds no
    # pipe (two fds and a pipe buffer saved per direction).
    await wait_readable(src)
    try:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        # Out of fds: this direction copies instead (it needs no extra fd). The connection
        # is fine; tearing it down would turn a capacity blip into a reset.
        _warn_pipe_fallback(exc)
        return await _pump_copy(src, dst, result, up, src_name, dst_name, scope, idle)
    try:
        try:
            fcntl.fcntl(wfd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # fine: default pipe size, more syscalls
        splice = os.splice
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            try:
                n = splice(sfd, wfd, _PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await wait_readable(src)
                continue
            except OSError as exc:
                raise Broken(f"{src_name}-reset") from exc
            if n == 0:
                break
            # Counted when read from the source, as the copy pump does (see there).
            if up:
                result.up += n
            else:
                result.down += n
            if idle is not None:
                scope.deadline = trio.current_time() + idle
            waited = False
            while n:
                try:
                    n -= splice(rfd, dfd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    waited = True
                    await wait_writable(dst)
                except OSError as exc:
                    raise Broken(f"{dst_name}-reset") from exc
            if not waited:
                await checkpoint()
        _pass_eof(result, dst, dst_name)
    finally:
        os.close(rfd)
        os.close(wfd)


def _pass_eof(result: RelayResult, dst: socket.socket, dst_name: str) -> None:
    """Pass a source's EOF on, unless the other direction broke first. A reset wakes both
    directions at once; the one sending to the reset socket takes the error (a socket
    reports it once), and this one's recv then reads 0: no FIN of the peer's, but what is
    left of its reset. Passed on, it would show the other side a clean end of input (on
    which it may act) before the reset that pass_reset sends it."""
    if result.outcome is None:
        half_close(dst, dst_name)


_pipe_warned = False


def _warn_pipe_fallback(exc: OSError) -> None:
    global _pipe_warned
    if not _pipe_warned:
        logging.getLogger("ambassadord").warning(
            "cannot create a pipe for splice (%s); copying instead where that happens", exc.strerror)
        _pipe_warned = True


async def relay_user(client, backend, idle_timeout, use_splice, result: RelayResult) -> RelayResult:
    """Both directions in this process: recv/send, or splice once a direction is bulky."""
    splice_after = SPLICE_AFTER if use_splice else None
    with trio.CancelScope() as scope:
        if idle_timeout is not None:
            scope.deadline = trio.current_time() + idle_timeout

        async def guarded(src, dst, up, src_name, dst_name):
            try:
                await _pump_copy(src, dst, result, up, src_name, dst_name, scope, idle_timeout, splice_after)
            except Broken as exc:
                if result.outcome is None:
                    result.outcome = exc.outcome
                scope.cancel()

        async with trio.open_nursery() as nursery:
            # One task per direction; the upward one is this task itself (a spawn saved).
            nursery.start_soon(guarded, backend, client, False, "backend", "client")
            await guarded(client, backend, True, "client", "backend")
    if result.outcome is None:
        result.outcome = "idle-timeout" if scope.cancelled_caught else "ok"
    return result
