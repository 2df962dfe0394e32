"""Relay bytes both ways between two connected sockets, half-close aware.

Three ways, fastest first (``relay`` picks):

1. **In the kernel** (``--sockmap``, the default where the kernel allows it): both sockets
   join a BPF sockmap (sockmap.py) before anything has been read from them, and the
   kernel redirects every chunk from one to the other. The connection's task only waits
   for news from the sockmap Watcher: EOF, errors, data the kernel passed up. Bytes are
   counted from the sockets (TCP_INFO). Not used with an idle timeout (no byte passes
   here to reset it).
2. **recv/send** through one shared scratch buffer, one task per direction.
3. **splice(2)**, socket -> pipe -> socket, which a recv/send direction switches to once
   it has moved SPLICE_AFTER bytes or filled the whole buffer in one read (bulk): small
   request/response traffic never pays for a pipe.

Semantics, the same for all three:

* EOF on one side becomes ``shutdown(SHUT_WR)`` of the other (as in mitmproxy's TCP
  layer): a client that sends its request and shuts its write side still gets the whole
  reply. The relay ends when both directions have seen EOF. In the kernel, the FIN is
  passed on only once every byte before it has been written into the other socket.
* A reset or any other socket error in either direction ends both directions at once, and
  is passed on as a reset: the other socket gets SO_LINGER 0, so the caller's close()
  sends an RST and drops what is still queued. (Closed normally, it would send a FIN after
  the bytes that made it through, and a truncated stream would look complete.)
* An optional idle timeout ends the relay when no byte moved either way for that long.
* The caller owns the sockets and closes them (``finally``) as soon as the relay returns;
  the relay never closes them. (After a kernel relay they are still in the sockmap:
  closing them is what takes them out.)

Why raw non-blocking stdlib sockets rather than trio's socket wrappers: the hot loop tries
the syscall first and only waits for readiness when the kernel says EAGAIN (or, after a
short read, at once: the socket is drained), and it skips the wrappers' checkpoints.
Fairness: a direction that keeps filling the buffer yields every _STREAK chunks.

Memory: the copy path reads into one process-wide scratch buffer (trio runs one task at a
time, and a chunk is handed to the kernel before the next await). Only when the
destination cannot take a chunk at once is the remainder copied into a per-connection
``bytes``. So an idle connection costs no user-space buffer at all.

Measured: bench/compare.py (README, "Performance").
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from .sockmap import Flow, SockmapError

CHUNK = 256 * 1024
_scratch = bytearray(CHUNK)
_scratch_view = memoryview(_scratch)

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
SPLICE_AVAILABLE = hasattr(os, "splice")
# Pipe capacity for splice: 1 MiB lets one syscall move a large chunk (default is 64 KiB).
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1024 * 1024
# With splice on, a direction starts with recv/send and moves to splice once it has moved
# this much, or once one read filled the whole buffer: small request/response traffic
# never pays for a pipe (pipe2 + fcntl + two closes), bulk gets zero-copy within a chunk.
SPLICE_AFTER = 1024 * 1024
# Full-buffer chunks moved in a row before the copy pump yields to other tasks.
_STREAK = 4


@dataclass(slots=True, eq=False)  # eq=False: hashable by identity (kept in a set while open)
class RelayResult:
    up: int = 0  # bytes client -> backend
    down: int = 0  # bytes backend -> client
    outcome: str | None = None  # None while running; "ok", "idle-timeout", "client-reset", ...
    backend: str | None = None  # which backend (for the admin API's live per-backend bytes)
    # While the kernel relays (sockmap), no byte passes through here: this reads the
    # counts from the sockets (TCP_INFO) when someone asks (stats.py).
    refresh: object = None


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
    _half_close(dst, dst_name)


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
        _half_close(dst, dst_name)
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


def _half_close(sock: socket.socket, name: str) -> None:
    """Pass an EOF on. Each direction does this once, to its destination, and we close
    nothing ourselves: so ENOTCONN (the socket is in state CLOSE) means its peer reset it."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise _Broken(f"{name}-reset") from exc


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


def _pass_reset(result: RelayResult, client: socket.socket, backend: socket.socket) -> None:
    """After one side reset, make the caller's close() of the other side a reset too."""
    other = {"client-reset": backend, "backend-reset": client}.get(result.outcome)
    if other is not None:
        try:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # not possible on a socket that is gone already; nothing to tell it then


# ---- in the kernel: sockmap -------------------------------------------------------------

_TCP_INFO_BYTES = struct.Struct("<QQ")  # tcpi_bytes_acked, tcpi_bytes_received at offset 120
_TIOCOUTQ = 0x5411


# TCP's byte counters count sequence numbers: tcpi_bytes_received includes the peer's FIN
# once it came, and on the side that connected, tcpi_bytes_acked includes its SYN.
def _bytes_received(sock: socket.socket, fin: bool) -> int:
    return _TCP_INFO_BYTES.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136), 120)[1] - fin


def _bytes_written(sock: socket.socket, syn: bool) -> int:
    """Bytes handed to this socket so far: acknowledged by the peer plus still queued."""
    acked = _TCP_INFO_BYTES.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136), 120)[0]
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked - syn + queued


_TCP_CLOSE = 7  # tcpi_state, the first byte of struct tcp_info


def _closed(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE


_HUP_OR_ERR = select.EPOLLHUP | select.EPOLLERR


def _was_reset(sock: socket.socket, write_shut: bool) -> bool:
    """Whether the peer of a socket in the sockmap reset it (or it failed otherwise).

    SO_ERROR alone cannot say: when the kernel's redirect of the other side's data into
    the reset socket fails, it overwrites the socket's ECONNRESET with EPIPE (the error it
    also reports, harmlessly, when a redirected FIN could not be "sent" as data). So the
    TCP state decides too: a socket whose write side we did not shut can reach CLOSE only
    through a reset or an error (a FIN leaves it in CLOSE_WAIT). Once we shut it, a FIN
    from its peer closes it too, and only SO_ERROR tells the two apart (nothing is
    redirected into it any more, so nothing overwrites that)."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading clears it
    if err and err != errno.EPIPE:
        return True
    return not write_shut and _closed(sock)


async def _drained(src: socket.socket, dst: socket.socket, dst_connected: bool, dst_name: str) -> int:
    """Wait until every byte ``src`` received (its FIN has come) has been written into
    ``dst``; return that count (final: nothing comes after the FIN). The kernel sends
    redirected data from a work queue; a FIN sent before it would cut it off.

    Raises:
        _Broken: ``dst`` was reset (CLOSE before we shut it): those bytes will never be
            written, and waiting for them would hold the connection forever.
    """
    delay = 0.0005
    received = _bytes_received(src, True)
    while _bytes_written(dst, dst_connected) < received:
        if _closed(dst):
            raise _Broken(f"{dst_name}-reset")
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return received


async def _relay_kernel(client, backend, sockmap, watcher, result: RelayResult) -> None:
    """Let the kernel move the bytes (sockmap.py); this task only sees EOF, errors and any
    data the kernel passed up, as told by the Watcher. One task per connection, no nursery."""
    handle = sockmap.add_pair(client, backend)  # SockmapError: the caller relays itself
    names = {client.fileno(): (client, "client"), backend.fileno(): (backend, "backend")}
    # The directions still open, by the fd of their source. A socket whose EOF came stays
    # watched (for errors only): it is still the other direction's destination, and its
    # peer may reset it after its FIN.
    ends = {client.fileno(): (client, backend, "client", "backend"),
            backend.fileno(): (backend, client, "backend", "client")}
    shut: set[int] = set()  # sockets whose write side we shut (their peer got our FIN)

    final: dict[int, int] = {}  # fd -> bytes it received in all, once its EOF came

    def refresh() -> None:
        try:
            up = final.get(client.fileno())
            result.up = up if up is not None else _bytes_received(client, client.fileno() not in ends)
            down = final.get(backend.fileno())
            result.down = down if down is not None else _bytes_received(backend, backend.fileno() not in ends)
        except OSError:
            pass

    flow = Flow()
    watcher.register(flow, client, backend)
    result.refresh = refresh
    try:
        while ends:
            news = await flow.wait()
            for fd, mask in news.items():
                sock, name = names[fd]
                # A reset socket is in TCP CLOSE, which epoll always reports as EPOLLHUP (or
                # carries an error, EPOLLERR): without either, this is a FIN or data, and the
                # two getsockopt calls of the check are saved (every connection's EOF path).
                if mask & _HUP_OR_ERR and _was_reset(sock, fd in shut):
                    result.outcome = f"{name}-reset"
                    return
                if fd not in ends:
                    watcher.rearm(sock, errors_only=True)
                    continue
                src, dst, src_name, dst_name = ends[fd]
                eof = False
                while True:  # what the kernel passed up (if anything), then EOF or not
                    try:
                        data = src.recv(CHUNK)
                    except BlockingIOError:
                        break
                    except OSError:
                        result.outcome = f"{src_name}-reset"
                        return
                    if not data:
                        eof = True
                        break
                    await _send_all(dst, data, dst_name)
                if eof:
                    final[fd] = await _drained(src, dst, dst is backend, dst_name)
                    _half_close(dst, dst_name)
                    shut.add(dst.fileno())
                    del ends[fd]
                    if ends:
                        watcher.rearm(src, errors_only=True)
                else:
                    watcher.rearm(src)
    except _Broken as exc:
        result.outcome = exc.outcome
    finally:
        # The caller closes both sockets next (see relay()), which takes them out of the
        # sockmap and the epoll set: only our own bookkeeping is undone here.
        watcher.unregister(client, backend, closing=True)
        sockmap.remove_pair(handle, closing=True)
        refresh()
        result.refresh = None


_sockmap_warned = False


async def relay(
    client: socket.socket,
    backend: socket.socket,
    *,
    idle_timeout: float | None = None,
    use_splice: bool = False,
    sockmap=None,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy bytes both ways until both directions reach EOF, one breaks, or idle expires.

    Args:
        client, backend: connected, non-blocking stdlib sockets. Not closed here; close
            them when this returns.
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
    if sockmap is not None and idle_timeout is None:
        # From the first byte: the sockets join the sockmap before this process has read
        # anything from them. (A hand-over after a user-space start was tried and
        # duplicated data: the verdict takes whole skbs from the receive queue, including
        # one that recv() had already read part of.)
        try:
            await _relay_kernel(client, backend, *sockmap, result)
        except SockmapError as exc:  # full, or the kernel refused this pair: relay here
            global _sockmap_warned
            # EOPNOTSUPP: a socket no longer established (the client already left): normal.
            if not _sockmap_warned and exc.errno != errno.EOPNOTSUPP:
                logging.getLogger("ambassadord").warning("sockmap: %s; relaying in user space where that happens", exc)
                _sockmap_warned = True
        else:
            if result.outcome is None:
                result.outcome = "ok"
            _pass_reset(result, client, backend)
            return result
    await _relay_user(client, backend, idle_timeout, use_splice, result)
    _pass_reset(result, client, backend)
    return result


async def _relay_user(client, backend, idle_timeout, use_splice, result: RelayResult) -> RelayResult:
    """Both directions in this process: recv/send, or splice once a direction is bulky."""
    splice_after = SPLICE_AFTER if use_splice else None
    with trio.CancelScope() as scope:
        if idle_timeout is not None:
            scope.deadline = trio.current_time() + idle_timeout

        async def guarded(src, dst, up, src_name, dst_name):
            try:
                await _pump_copy(src, dst, result, up, src_name, dst_name, scope, idle_timeout, splice_after)
            except _Broken as exc:
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
