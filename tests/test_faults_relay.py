"""Fault injection on the relay: peers that reset mid-stream, in every relay mode.

A reset on one side must reach the other side as a reset, never as a clean end of stream
(a truncated upload followed by a FIN looks complete to the server), and a connection
whose client resets must leave nothing open in the daemon: no active connection in the
metrics, no fd. Each test runs the real daemon (tests/daemon.py) in front of a real TCP
server process (tests/stream_server.py) that records, per connection, whether it saw EOF
or a reset; clients are raw sockets that abort with SO_LINGER 0 (an RST, dropping what
they had not sent). Counts are asserted over many connections, as the faults are races.

Relay modes: user space copy, splice, the kernel (BPF sockmap; skipped where the kernel
or the capabilities do not allow one, a failure under CI).
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, connect, free_port, wait_until
from tests.stream_server import StreamServer
from tests.test_admin import admin_daemon
from tests.test_sockmap import sockmap_or_skip

MODES = {
    "copy": ["--splice", "off", "--sockmap", "off"],
    "splice": ["--splice", "on", "--sockmap", "off"],
    "sockmap": ["--sockmap", "on"],
}
MiB = 1024 * 1024
ROUNDS = 12  # connections per mode in the reset tests


@contextlib.contextmanager
def relay_daemon(mode: str, backend_port: int, tmp_path: Path) -> Iterator[tuple[Daemon, int, int]]:
    """The daemon in ``mode``, one process, listening on a free port routed to the stream
    server; yields (daemon, listen port, admin port). Stopped (SIGTERM, exit 0) at the end."""
    if mode == "sockmap":
        sockmap_or_skip()
    port, admin = free_port(), free_port()
    with admin_daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{backend_port}",
                       "--workers", "1", *MODES[mode]], admin, tmp_path) as daemon:
        yield daemon, port, admin
        daemon.stop()


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, what was not sent is dropped."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until_end(sock: socket.socket, timeout: float = 10) -> tuple[str, int]:
    """Read until the peer ends the stream: ("eof" or "reset", bytes read)."""
    sock.settimeout(timeout)
    buf = bytearray(MiB)
    total = 0
    try:
        while n := sock.recv_into(buf):
            total += n
    except ConnectionResetError:
        return "reset", total
    return "eof", total


def read_at_least(sock: socket.socket, size: int) -> None:
    sock.settimeout(10)
    buf = bytearray(64 * 1024)
    got = 0
    while got < size:
        n = sock.recv_into(buf)
        assert n, f"the stream ended after {got} bytes"
        got += n


def connection_outcomes(daemon: Daemon, n: int) -> collections.Counter:
    """The outcomes of the daemon's first ``n`` connections, once it has logged them."""
    records = wait_until(lambda: (r := daemon.connection_records()) and len(r) >= n and r, timeout=10,
                         what=lambda: f"{n} connection log lines; {daemon.describe()}")
    return collections.Counter(r["outcome"] for r in records[:n])


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_resets_mid_upload_is_a_reset_for_the_backend(mode, tmp_path):
    """The client uploads 16 MiB of a longer upload and aborts: the server must see a
    reset, never a clean EOF after a truncated stream."""
    payload = os.urandom(16 * MiB)
    with StreamServer(free_port()) as server, relay_daemon(mode, server.port, tmp_path) as (daemon, port, _):
        for _ in range(ROUNDS):
            c = connect("127.0.0.1", port)
            c.sendall(b"upload\n")
            c.sendall(payload)
            abort(c)
        wait_until(lambda: len(server.outcomes()) >= ROUNDS, timeout=20, what=server.log_tail)
        seen = server.counts("upload")
        assert seen["eof"] == 0, f"{seen['eof']} of {ROUNDS} aborted uploads reached the server as a clean EOF: {seen}"
        assert seen["reset"] == ROUNDS, seen
        assert connection_outcomes(daemon, ROUNDS) == {"client-reset": ROUNDS}


@pytest.mark.parametrize("mode", MODES)
def test_a_backend_that_resets_mid_download_is_a_reset_for_the_client(mode, tmp_path):
    """The server sends 16 MiB and resets: the client must see a reset, never a clean EOF."""
    with StreamServer(free_port()) as server, relay_daemon(mode, server.port, tmp_path) as (daemon, port, _):
        seen = collections.Counter()
        for _ in range(ROUNDS):
            with contextlib.closing(connect("127.0.0.1", port)) as c:
                c.sendall(b"abort %d\n" % (16 * MiB))
                seen[read_until_end(c)[0]] += 1
        assert seen["eof"] == 0, f"{seen['eof']} of {ROUNDS} aborted downloads reached the client as a clean EOF: {seen}"
        assert connection_outcomes(daemon, ROUNDS) == {"backend-reset": ROUNDS}
