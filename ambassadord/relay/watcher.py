"""End-of-stream watching for the sockets in the sockmap: one epoll set, one task.

The kernel moves the bytes; what the daemon still has to see is each socket's EOF, its
errors, and any data the verdict passed up instead of redirecting. The Watcher hands
those to the one relay task of the connection (a Flow).
"""

from __future__ import annotations

import select
import socket

import trio


class Watcher:
    """Tells relays when a socket in the sockmap has news: EOF, an error, or data that the
    kernel passed up instead of redirecting.

    Not trio's wait_readable: a socket in the sockmap looks readable for an instant every
    time data arrives (before the verdict moves it), so waiting for EPOLLIN would wake the
    daemon once per message and give back most of what the kernel relay saves. Here one
    epoll set of our own asks only for EPOLLRDHUP (the peer's FIN), errors and hang-ups,
    and one trio task waits on that epoll fd and hands events to the relays.
    """

    MASK = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP | select.EPOLLONESHOT
    # After a socket's EOF: EPOLLRDHUP stays true (it would fire again at once), but a
    # reset after the FIN must still be seen.
    ERRORS = select.EPOLLERR | select.EPOLLHUP | select.EPOLLONESHOT

    def __init__(self):
        self._ep = select.epoll()
        self._waiters: dict[int, Flow] = {}

    def close(self) -> None:
        self._ep.close()

    def register(self, flow: Flow, *socks: socket.socket) -> None:
        for s in socks:
            self._waiters[s.fileno()] = flow
            self._ep.register(s.fileno(), self.MASK)

    def rearm(self, sock: socket.socket, *, errors_only: bool = False) -> None:
        """Watch again (each event disarms the socket: EPOLLONESHOT). ``errors_only``:
        after its EOF, for a reset or an error only."""
        self._ep.modify(sock.fileno(), self.ERRORS if errors_only else self.MASK)

    def unregister(self, *socks: socket.socket, closing: bool = False) -> None:
        """``closing``: the sockets are about to be closed, which takes them out of the
        epoll set by itself (they are not dup'ed)."""
        for s in socks:
            fd = s.fileno()
            if self._waiters.pop(fd, None) is not None and not closing:
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass

    async def run(self) -> None:
        """Deliver events until cancelled (one task for the whole daemon)."""
        poll, waiters = self._ep.poll, self._waiters
        while True:
            await trio.lowlevel.wait_readable(self._ep.fileno())
            for fd, mask in poll(0):
                flow = waiters.get(fd)
                if flow is not None:
                    flow.pending[fd] = flow.pending.get(fd, 0) | mask
                    flow.event.set()


class Flow:
    """The news for one relayed connection, filled by the Watcher."""

    __slots__ = ("event", "pending")

    def __init__(self):
        self.event = trio.Event()
        self.pending: dict[int, int] = {}

    async def wait(self) -> dict[int, int]:
        await self.event.wait()
        self.event = trio.Event()
        news, self.pending = self.pending, {}
        return news
