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
from tests.stream_server import StreamServer, read_to_end
from tests.admin_client import admin_daemon, get_routes, route
from tests.daemon import sockmap_or_skip

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
        assert_all_reset(server, ROUNDS)
        assert connection_outcomes(daemon, ROUNDS) == {"client-reset": ROUNDS}


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_resets_while_the_relay_waits_for_a_slow_backend_is_a_reset_for_it(mode, tmp_path):
    """The server starts reading only after 100 ms; the client sends until every buffer
    on the way is full (the relay waits for the server to take more), or 32 MiB, and
    aborts. Once the server reads, it must get what was sent before the reset, then the
    reset. (The cap is for the kernel relay, which does not hold a fast sender back: it
    queues whatever the destination cannot take yet in kernel memory.)"""
    chunk = bytes(256 * 1024)
    with StreamServer(free_port()) as server, relay_daemon(mode, server.port, tmp_path) as (daemon, port, _):
        for _ in range(ROUNDS):
            c = connect("127.0.0.1", port)
            c.sendall(b"upload 100\n")
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(32 * MiB // len(chunk)):
                    c.send(chunk)
            abort(c)
        assert_all_reset(server, ROUNDS)
        assert connection_outcomes(daemon, ROUNDS) == {"client-reset": ROUNDS}


def assert_all_reset(server: StreamServer, n: int) -> None:
    """The server saw each of the ``n`` aborted uploads end with a reset: while uploading,
    or (kind "none") before it had even read the command line, which a reset may overtake
    in the kernel relay (the daemon drops what it had not yet passed on)."""
    wait_until(lambda: len(server.outcomes()) >= n, timeout=20, what=server.log_tail)
    seen = server.counts("upload") + server.counts("none")
    assert seen["eof"] == 0, f"{seen['eof']} of {n} aborted uploads reached the server as a clean EOF: {seen}"
    assert seen["reset"] == n, seen


@pytest.mark.parametrize("mode", MODES)
def test_a_backend_that_resets_mid_download_is_a_reset_for_the_client(mode, tmp_path):
    """The server sends 16 MiB and resets: the client must see a reset, never a clean EOF."""
    with StreamServer(free_port()) as server, relay_daemon(mode, server.port, tmp_path) as (daemon, port, _):
        seen = collections.Counter()
        for _ in range(ROUNDS):
            with contextlib.closing(connect("127.0.0.1", port)) as c:
                c.sendall(b"abort %d\n" % (16 * MiB))
                c.settimeout(10)
                seen[read_to_end(c)[0]] += 1
        assert seen["eof"] == 0, f"{seen['eof']} of {ROUNDS} aborted downloads reached the client as a clean EOF: {seen}"
        assert connection_outcomes(daemon, ROUNDS) == {"backend-reset": ROUNDS}


def test_a_client_that_resets_while_the_kernel_relay_drains_a_finished_download(tmp_path):
    """The kernel relay passes a backend's FIN on only once every byte before it is in the
    client's socket. The server sends 16 MiB and closes while the client reads nothing;
    then the client resets: those bytes will never be taken, and the connection must end
    at once (as the client's reset), not wait for them forever."""
    with StreamServer(free_port()) as server, relay_daemon("sockmap", server.port, tmp_path) as (daemon, port, admin):
        for i in range(ROUNDS):
            c = connect("127.0.0.1", port)
            c.sendall(b"download %d\n" % (16 * MiB))
            wait_until(lambda: len(server.outcomes()) > i, timeout=10, what=server.log_tail)
            abort(c)
        assert server.counts("download") == {"sent": ROUNDS}
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: route(get_routes(admin), str(port))["active"] == 0, timeout=10, what="")
        left = route(get_routes(admin), str(port))["active"]
        assert left == 0, f"{left} of {ROUNDS} connections still open in the daemon"
        assert connection_outcomes(daemon, ROUNDS) == {"client-reset": ROUNDS}


LEAK_CLIENTS = 200


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# (command, shut the write side before the reset): a download the server ends by itself,
# and a stream that it keeps open until it is reset (so that only the client's reset can
# end the connection); each aborted plainly and after SHUT_WR. The held streams' sizes
# tell their two kinds apart in the server's report.
LEAK_KINDS = [(b"download %d\n" % (32 * MiB), False), (b"download %d\n" % (32 * MiB), True),
              (b"hold %d\n" % (16 * MiB), False), (b"hold %d\n" % (16 * MiB + 1), True)]


@pytest.mark.parametrize("mode", MODES)
def test_clients_that_reset_mid_download_leave_nothing_open(mode, tmp_path):
    """200 clients each start a download, read 128 KiB of it, and reset, half of them after
    shutting their write side (SHUT_WR): afterwards the daemon has no active connection
    and no more fds than before, every backend connection was reset, and it still serves."""
    with StreamServer(free_port()) as server, relay_daemon(mode, server.port, tmp_path) as (daemon, port, admin):
        pid = daemon.proc.pid
        baseline = open_fds(pid)
        for i in range(LEAK_CLIENTS):
            command, shut_first = LEAK_KINDS[i % len(LEAK_KINDS)]
            c = connect("127.0.0.1", port)
            c.sendall(command)
            read_at_least(c, 128 * 1024)
            if shut_first:
                c.shutdown(socket.SHUT_WR)
            abort(c)

        # Only /proc while waiting: the admin API's own connections would count as fds.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: open_fds(pid) <= baseline, timeout=10, what="")
        extra = max(open_fds(pid) - baseline, 0)
        left = route(get_routes(admin), str(port))["active"]
        assert (left, extra) == (0, 0), (
            f"{left} of {LEAK_CLIENTS} reset connections still open in the daemon, {extra} fds more than before")
        assert connection_outcomes(daemon, LEAK_CLIENTS) == {"client-reset": LEAK_CLIENTS}

        # The backend was told: every held stream was reset (after the EOF of a client
        # that shut its write side first). So was every download in user space; in the
        # kernel, the backend's data is dropped at full speed from the client's reset
        # until the daemon has seen it, so a download may be all sent by then.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: len(server.outcomes()) >= LEAK_CLIENTS, timeout=10, what="")
        held = collections.Counter((how, n) for kind, how, n in server.outcomes() if kind == "hold")
        quarter = LEAK_CLIENTS // len(LEAK_KINDS)
        assert held[("reset", 16 * MiB)] == quarter, held
        assert held[("reset", 16 * MiB + 1)] + held[("eof-reset", 16 * MiB + 1)] == quarter, held
        if mode != "sockmap":
            assert server.counts("download") == {"reset": 2 * quarter}

        # ... and it still serves.
        with contextlib.closing(connect("127.0.0.1", port)) as c:
            c.sendall(b"download %d\n" % MiB)
            c.settimeout(10)
            assert read_to_end(c) == ("eof", MiB)
