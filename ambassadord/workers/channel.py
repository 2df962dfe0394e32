"""Messages (protocol.py) over one end of the socketpair between main process and helper."""

from __future__ import annotations

import socket

import trio
from trio.lowlevel import wait_readable, wait_writable

from .protocol import Message, decode, encode, take_frame


class Channel:
    """Frames over a non-blocking stream socket. ``send`` never blocks (it queues;
    ``run_writer`` drains the queue), so resolvers and reload can call it synchronously.

    Args:
        sock: this end of the socketpair (made non-blocking here).
        accept: the messages this end receives (protocol.TO_HELPER or TO_MAIN).
    """

    def __init__(self, sock: socket.socket, accept: tuple[type, ...]):
        sock.setblocking(False)
        self.sock = sock
        self.accept = accept
        self._out = bytearray()
        self._in = bytearray()
        self._wake = trio.Event()
        self.closed = False

    def send(self, msg: Message) -> None:
        self.send_frame(encode(msg))

    def send_frame(self, data: bytes) -> None:
        """Queue a frame made by protocol.encode() (one pickling for many channels)."""
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

    async def flush(self, timeout: float) -> None:
        """Send what is queued (for a process about to exit), for at most ``timeout`` s."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.run_writer)
                while self._out and not self.closed:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    async def recv(self) -> Message:
        """The next message.

        Raises:
            EOFError: the peer is gone.
            ProtocolError: the next frame is not a message for this end (see
                protocol.decode); the frame is consumed, so the one after reads fine.
        """
        while True:
            payload = take_frame(self._in)
            if payload is not None:
                return decode(payload, self.accept)
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
