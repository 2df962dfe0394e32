"""Relay bytes both ways between two connected sockets, half-close aware.

Per connection: one nursery, two pumps (client->backend "up", backend->client "down").

* EOF on one side becomes ``shutdown(SHUT_WR)`` of the other (as in mitmproxy's TCP
  layer): a client that sends its request and shuts its write side still gets the whole
  reply. The relay ends when both directions have seen EOF.
* A reset or any other socket error in either direction ends both directions at once.
* An optional idle timeout ends the relay when no byte moved either way for that long.
* The caller owns the sockets and closes them (``finally``); the relay never closes them.

Why raw non-blocking stdlib sockets rather than trio's socket wrappers: the hot loop tries
the syscall first and only waits for readiness when the kernel says EAGAIN, and it skips
the wrappers' two checkpoints per call. Fairness is kept by an explicit checkpoint after
every chunk that did not have to wait.

Memory: the copy path reads into one process-wide scratch buffer (trio runs one task at a
time, and a chunk is handed to the kernel before the next await). Only when the
destination cannot take a chunk at once is the remainder copied into a per-connection
``bytes``. So an idle connection costs no user-space buffer at all.

splice(2) moves bytes socket -> pipe -> socket inside the kernel (no copy into Python).
It needs a pipe per direction, made when that direction first has data. Measured here
(bench/relay_modes.py, loopback, 2 cores): bulk 1964 MiB/s with splice vs 957 MiB/s with
recv/send; 1-byte ping-pong 12.6k vs 12.8k round trips/s, i.e. no cost for small
messages. So splice is the default where the platform has it (``--splice auto``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

CHUNK = 256 * 1024
_scratch = bytearray(CHUNK)
_scratch_view = memoryview(_scratch)

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")
# Pipe capacity for splice: 1 MiB lets one syscall move a large chunk (default is 64 KiB).
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1024 * 1024


@dataclass(slots=True, eq=False)  # eq=False: hashable by identity (kept in a set while open)
class RelayResult:
    up: int = 0  # bytes client -> backend
    down: int = 0  # bytes backend -> client
    outcome: str | None = None  # None while running; "ok", "idle-timeout", "client-reset", ...
    backend: str | None = None  # which backend (for the admin API's live per-backend bytes)


class _Broken(Exception):
    def __init__(self, outcome: str):
        self.outcome = outcome


async def _send_all(dst: socket.socket, data, dst_name: str) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = dst.send(view)
        except BlockingIOError:
            await wait_writable(dst)
            continue
        except OSError as exc:
            raise _Broken(f"{dst_name}-reset") from exc
        view = view[sent:]


async def _pump_copy(src, dst, result: RelayResult, up: bool, src_name: str, dst_name: str, scope, idle) -> None:
    recv_into, send = src.recv_into, dst.send
    buf, view = _scratch, _scratch_view
    while True:
        try:
            n = recv_into(buf)
        except BlockingIOError:
            await wait_readable(src)
            continue
        except OSError as exc:
            raise _Broken(f"{src_name}-reset") from exc
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
            raise _Broken(f"{dst_name}-reset") from exc
        if sent < n:
            # Backpressure: keep the rest in a private copy; the scratch buffer is shared.
            await _send_all(dst, bytes(view[sent:n]), dst_name)
        else:
            await checkpoint()
    _half_close(dst)


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
            import fcntl

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
                raise _Broken(f"{src_name}-reset") from exc
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
                    raise _Broken(f"{dst_name}-reset") from exc
            if not waited:
                await checkpoint()
        _half_close(dst)
    finally:
        os.close(rfd)
        os.close(wfd)


_pipe_warned = False


def _warn_pipe_fallback(exc: OSError) -> None:
    global _pipe_warned
    if not _pipe_warned:
        logging.getLogger("ambassadord").warning(
            "cannot create a pipe for splice (%s); copying instead where that happens", exc.strerror)
        _pipe_warned = True


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # the peer is already gone: nothing to tell it
            raise


async def relay(
    client: socket.socket,
    backend: socket.socket,
    *,
    idle_timeout: float | None = None,
    use_splice: bool = False,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy bytes both ways until both directions reach EOF, one breaks, or idle expires.

    Args:
        client, backend: connected, non-blocking stdlib sockets. Not closed here.
        idle_timeout: seconds without a byte either way after which the relay ends.
        use_splice: move bytes with splice(2) instead of recv/send.
        result: where to count bytes (the caller may read it even if cancelled).
    Returns:
        The RelayResult, with ``outcome`` one of "ok", "idle-timeout", "client-reset",
        "backend-reset".
    Raises:
        trio.Cancelled: from an enclosing scope (e.g. shutdown); byte counts are in ``result``.
    """
    if result is None:
        result = RelayResult()
    pump = _pump_splice if use_splice else _pump_copy
    with trio.CancelScope() as scope:
        if idle_timeout is not None:
            scope.deadline = trio.current_time() + idle_timeout

        async def guarded(src, dst, up, src_name, dst_name):
            try:
                await pump(src, dst, result, up, src_name, dst_name, scope, idle_timeout)
            except _Broken as exc:
                if result.outcome is None:
                    result.outcome = exc.outcome
                scope.cancel()
            except OSError as exc:  # shutdown() of a socket the peer reset
                if result.outcome is None:
                    result.outcome = f"{dst_name}-reset" if exc.errno else "error"
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, client, backend, True, "client", "backend")
            nursery.start_soon(guarded, backend, client, False, "backend", "client")
    if result.outcome is None:
        result.outcome = "idle-timeout" if scope.cancelled_caught else "ok"
    return result
