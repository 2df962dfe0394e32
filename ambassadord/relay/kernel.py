"""The relay in the kernel: a BPF sockmap moves the bytes, one task per connection waits.

``KernelRelay`` owns the kernel resources of this data plane and nothing else owns them:
the Sockmap (two BPF maps and the attached verdict program, three fds) and the Watcher
(one epoll fd). The daemon makes one at start (SockmapError: not here, relay in user
space), the Server runs its task (``run``: the Watcher) for as long as it serves, and the
daemon closes it at exit (``close``, or ``with``).

Per connection (``KernelRelay.relay``): both sockets join the sockmap before anything has
been read from them, and the kernel redirects every chunk from one to the other. The
connection's task only waits for news from the Watcher: EOF, errors, data the kernel
passed up. Bytes are counted from the sockets (TCP_INFO), since none pass through here.

Ordering rules the kernel imposes, kept here in one place:

* The FIN is passed on only once every byte before it has been written into the other
  socket (``_drained``): the kernel sends redirected data from a work queue, and a FIN
  sent before it would cut it off.
* A reset is told from a FIN by the socket's TCP state and SO_ERROR (``_was_reset``), and
  only on EPOLLHUP/EPOLLERR, which a reset socket always reports.
* Closing a socket takes it out of the maps and the epoll set: after the relay, the
  caller's close() is the clean-up; only our own bookkeeping is undone here.

Send buffers (the bulk rate). The kernel sends redirected data from a work item
(net/core/skmsg.c, ``sk_psock_backlog``). When the target socket's send buffer is full it
does not wait for space: it re-schedules itself one timer tick later
(``schedule_delayed_work(&psock->work, 1)``), and the write-space wake-up that TCP gives
as soon as ACKs free the buffer cannot bring that forward (``schedule_delayed_work`` on a
work that is pending already does nothing). So a direction moves at most about one send
buffer per tick. TCP's auto-tuned buffer stops at tcp_wmem's maximum (4 MiB by default),
and a tick is 4 ms at HZ=250: measured on a 2-core VM, an iperf3 upload through the proxy
made 3.3-5.3 Gbit/s (splice(2): 6.3-11.3), its upstream socket had data in flight 5 % of
the time (TCP_INFO), and the work item ran ~140 times a second, three quarters of them
started by that timer, ~3 MiB each. Each socket therefore gets a send buffer of
SEND_BUFFER (``_widen``): the same upload made 6.5-15.2 Gbit/s in the same run, its
socket busy 87 % of the time and limited by the receiver's window rather than by the tick
(bench/README.md has the numbers). The buffer is a limit, not an allocation:
an idle or request/response connection uses no more memory for it.
"""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import struct

import trio

from .contract import Broken, RelayResult, half_close
from .sockmap import Sockmap, SockmapError
from .tcp_abi import SO_SNDBUFFORCE, TCP_CLOSE, TCP_INFO_BYTES, TCP_INFO_BYTES_OFFSET, TCP_INFO_LEN, TIOCOUTQ
from .user import CHUNK, send_all
from .watcher import Flow, Watcher


# What the kernel relay asks for as each socket's send buffer (the kernel doubles it for its
# bookkeeping: sk_sndbuf is 32 MiB). One tick's worth of the fastest stream we expect: 32
# MiB every 4 ms (HZ=250) is ~67 Gbit/s, every 10 ms (HZ=100) ~27 Gbit/s. See the module
# docstring for why; 8 MiB (16 effective) made 6-11 Gbit/s in the same measurement.
SEND_BUFFER = 16 * 1024 * 1024


def fallback_send_buffer(wmem_max: int | None, tcp_wmem_max: int | None) -> int | None:
    """What to ask with plain SO_SNDBUF where SO_SNDBUFFORCE is not allowed, or None for
    nothing at all.

    The kernel caps SO_SNDBUF at net.core.wmem_max (and doubles it), and setting it stops
    TCP's auto-tuning, which grows the buffer up to tcp_wmem's maximum by itself. Where the
    cap is not above that (212992 on many distributions), asking would shrink the buffer:
    then leave it alone. Unknown values (None) count as "not above".
    """
    if wmem_max is None or tcp_wmem_max is None or 2 * min(wmem_max, SEND_BUFFER) <= tcp_wmem_max:
        return None
    return min(wmem_max, SEND_BUFFER)


def _sysctl_int(path: str, field: int = 0) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[field])
    except (OSError, ValueError, IndexError):
        return None


# TCP's byte counters count sequence numbers: tcpi_bytes_received includes the peer's FIN
# once it came, and on the side that connected, tcpi_bytes_acked includes its SYN.
def _bytes_received(sock: socket.socket, fin: bool) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    return TCP_INFO_BYTES.unpack_from(info, TCP_INFO_BYTES_OFFSET)[1] - fin


def _bytes_written(sock: socket.socket, syn: bool) -> int:
    """Bytes handed to this socket so far: acknowledged by the peer plus still queued."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    acked = TCP_INFO_BYTES.unpack_from(info, TCP_INFO_BYTES_OFFSET)[0]
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked - syn + queued


def _closed(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE  # tcpi_state


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
        Broken: ``dst`` was reset (CLOSE before we shut it): those bytes will never be
            written, and waiting for them would hold the connection forever.
    """
    delay = 0.0005
    received = _bytes_received(src, True)
    while _bytes_written(dst, dst_connected) < received:
        if _closed(dst):
            raise Broken(f"{dst_name}-reset")
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return received


class KernelRelay:
    """The kernel data plane: the sockmap and its Watcher, owned together.

    Args:
        connections: how many connections the kernel relays at once (two sockets each);
            more are relayed in user space.

    Raises:
        SockmapError: the kernel refused (no BPF, no capability, verifier, ...) or the
            architecture is not supported; nothing is left open then.

    Resource handling: four fds (three BPF, one epoll), released by ``close()``, which is
    idempotent; as a context manager it closes on exit. Close it after the Server that
    uses it has stopped: closing does not end relays in progress.
    """

    def __init__(self, connections: int):
        # SO_SNDBUFFORCE needs CAP_NET_ADMIN (loading the sk_skb program needs it too, so it
        # is there in practice); without it, fallback_send_buffer() decides.
        self._sndbuf: tuple[int, int] | None = (SO_SNDBUFFORCE, SEND_BUFFER)
        self.sockmap = Sockmap(2 * connections)
        try:
            self.watcher = Watcher()
        except OSError as exc:  # out of fds: as unavailable as a refusal, say so the same way
            self.sockmap.close()
            raise SockmapError(exc.errno, f"epoll: {exc.strerror}") from None
        except BaseException:
            self.sockmap.close()
            raise

    def close(self) -> None:
        self.watcher.close()
        self.sockmap.close()

    def __enter__(self) -> KernelRelay:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _widen(self, sock: socket.socket) -> None:
        """Give ``sock`` a send buffer of SEND_BUFFER (the module docstring says why)."""
        if self._sndbuf is None:
            return
        option, size = self._sndbuf
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except PermissionError:  # not allowed to force it here: decided once, for every socket
            fallback = fallback_send_buffer(_sysctl_int("/proc/sys/net/core/wmem_max"),
                                            _sysctl_int("/proc/sys/net/ipv4/tcp_wmem", 2))
            self._sndbuf = None if fallback is None else (socket.SO_SNDBUF, fallback)
            self._widen(sock)
        except OSError:
            pass  # a socket that is gone already: add_pair says so next

    async def run(self) -> None:
        """Tell the relays about their sockets' news until cancelled (one task for all)."""
        await self.watcher.run()

    async def relay(self, client: socket.socket, backend: socket.socket, result: RelayResult) -> None:
        """Let the kernel move the bytes; this task only sees EOF, errors and any data the
        kernel passed up, as told by the Watcher. One task per connection, no nursery.

        Raises:
            SockmapError: before any byte moved (the sockmap is full, or the kernel
                refused this pair): the caller relays in user space instead.
        """
        sockmap, watcher = self.sockmap, self.watcher
        self._widen(client)
        self._widen(backend)
        handle = sockmap.add_pair(client, backend)
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
                        await send_all(dst, data, dst_name)
                    if eof:
                        final[fd] = await _drained(src, dst, dst is backend, dst_name)
                        half_close(dst, dst_name)
                        shut.add(dst.fileno())
                        del ends[fd]
                        if ends:
                            watcher.rearm(src, errors_only=True)
                    else:
                        watcher.rearm(src)
        except Broken as exc:
            result.outcome = exc.outcome
        finally:
            # The caller closes both sockets next (see relay()), which takes them out of the
            # sockmap and the epoll set: only our own bookkeeping is undone here.
            watcher.unregister(client, backend, closing=True)
            sockmap.remove_pair(handle, closing=True)
            refresh()
            result.refresh = None
