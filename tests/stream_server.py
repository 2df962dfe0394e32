"""A real TCP server process for the relay fault tests (tests/test_faults_relay.py): it
tells apart a stream that ended cleanly (EOF) from one that was reset, as the backend
behind the daemon saw it.

Run as ``python -m tests.stream_server PORT`` (from the repository root); it listens on
127.0.0.1:PORT, prints ``listening`` once it does, then one line per connection, when that
connection is over::

    conn upload eof 16777216      the client's upload ended with a FIN, after that many bytes
    conn upload reset 3407872     ... with a reset
    conn download sent 67108864   it sent all it was asked to, then closed normally
    conn download reset 131072    its peer reset the connection before that
    conn abort reset 0            it sent what it was asked to and then reset the connection
    conn hold reset 1048576       (a long-lived stream) its peer reset it, before any EOF
    conn hold eof-reset 1048576   ... its peer shut its write side (EOF), then reset it
    conn hold held 1048576        ... nobody reset it within 30 s (then it closed it)

A connection starts with one command line: ``upload`` (or ``upload MS``: start reading only
after MS milliseconds, a slow server that the relay must wait for), ``download N`` (send N bytes, then
close), ``abort N`` (send N bytes, then close with SO_LINGER 0: a reset), or ``hold N``
(send N bytes, then keep the connection open, sending a byte every 50 ms, until the peer
resets it: a stream that never ends by itself, such as a subscription). One thread per
connection (threading is fine at the tests' scale: a few hundred connections).

:class:`StreamServer` runs it as a child process (tests/server_process.py) and reads those
lines back.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path

from tests.server_process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent  # the child imports this module as tests.stream_server

_CHUNK = 256 * 1024
_BEAT = 0.05  # seconds between two bytes of a held stream
_HOLD = 30.0  # how long a held stream waits for its peer to reset it
_lock = threading.Lock()


def _report(*words: object) -> None:
    line = " ".join(map(str, ("conn", *words))) + "\n"
    with _lock:  # one write per line, so lines of concurrent connections never interleave
        sys.stdout.write(line)
        sys.stdout.flush()


_DATA = os.urandom(_CHUNK)


def _send(sock: socket.socket, size: int) -> int:
    """Send ``size`` bytes; return how many went before the connection failed (if it did)."""
    sent = 0
    try:
        while sent < size:
            sent += sock.send(_DATA[:min(_CHUNK, size - sent)])
    except OSError:
        pass
    return sent


def read_to_end(sock: socket.socket) -> tuple[str, int]:
    """Read until the peer ends the stream: ("eof" or "reset", bytes read). Also what a
    test's client uses; a timeout of the socket's own is raised."""
    buf = bytearray(_CHUNK)
    total = 0
    try:
        while n := sock.recv_into(buf):
            total += n
    except ConnectionResetError:
        return "reset", total
    return "eof", total


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        command = b""
        try:
            while not command.endswith(b"\n"):
                byte = sock.recv(1)
                if not byte:
                    _report("none", "eof", 0)
                    return
                command += byte
        except OSError:
            _report("none", "reset", 0)
            return
        verb, *args = command.decode().split()
        if verb == "upload":
            time.sleep(int(args[0]) / 1000 if args else 0)  # the fault: a slow server
            self._upload(sock)
        elif verb in ("download", "abort"):
            self._download(sock, int(args[0]), abort=verb == "abort")
        elif verb == "hold":
            self._hold(sock, int(args[0]))
        else:
            _report("unknown", verb, 0)

    def _upload(self, sock: socket.socket) -> None:
        _report("upload", *read_to_end(sock))

    def _download(self, sock: socket.socket, size: int, *, abort: bool) -> None:
        sent = _send(sock, size)
        if sent < size:
            _report("download", "reset", sent)
        elif abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            _report("abort", "reset", 0)
        else:
            sock.close()  # before the report: a test may wait for the FIN to be on its way
            _report("download", "sent", sent)

    def _hold(self, sock: socket.socket, size: int) -> None:
        if _send(sock, size) < size:
            _report("hold", "reset", size)
            return
        sock.settimeout(_BEAT)
        eof = False
        deadline = time.monotonic() + _HOLD
        try:
            while time.monotonic() < deadline:
                if eof:
                    time.sleep(_BEAT)
                else:
                    with contextlib.suppress(TimeoutError):
                        eof = not sock.recv(_CHUNK)
                sock.send(b".")
        except OSError:
            _report("hold", "eof-reset" if eof else "reset", size)
            return
        _report("hold", "held", size)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def main() -> None:
    port = int(sys.argv[1])
    with _Server(("127.0.0.1", port), _Handler) as server:
        print("listening", flush=True)
        server.serve_forever()


class StreamServer(ServerProcess):
    """``python -m tests.stream_server PORT`` on 127.0.0.1, as a child process."""

    error = RuntimeError

    def __init__(self, port: int):
        super().__init__("stream")
        self.port = port
        self.label = f"stream server 127.0.0.1:{port}"
        self.ns = None
        self._start_or_close(10)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.stream_server", str(self.port)]

    def _addresses(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ready_step(self) -> str | None:
        return None if "listening" in self._text() else "no 'listening' line yet"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def _text(self) -> str:
        return self.log.read_text(errors="replace")

    def outcomes(self) -> list[tuple[str, str, int]]:
        """(kind, how it ended, bytes) of every connection over so far, oldest first."""
        out = []
        for line in self._text().split("\n")[:-1]:  # whole lines only: one may be half-written
            if line.startswith("conn "):
                _, kind, how, n = line.split()
                out.append((kind, how, int(n)))
        return out

    def counts(self, kind: str) -> collections.Counter:
        return collections.Counter(how for k, how, _ in self.outcomes() if k == kind)


if __name__ == "__main__":
    main()
