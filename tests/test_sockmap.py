"""The kernel relay (ambassadord/relay/: kernel.py, sockmap.py) with a real daemon and real Redis.

The proof that the kernel moves the bytes: with the daemon stopped (SIGSTOP), a connection
it already relays keeps working under ``--sockmap on``, and stalls under ``--sockmap off``
(so the test can fail). The relay semantics (half-close, large payloads both ways at once,
byte counts) are tested for every mode in test_server.py; these are the daemon-level and
map-level checks; what the KernelRelay owns and releases; and the bpf(2) system call number
of each architecture.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import socket
import struct

import pytest

from ambassadord.dataplane import DataPlane
from ambassadord.relay import KernelRelay, Sockmap, SockmapError, bpf_syscall_number, cookie
from tests.daemon import Daemon, RedisProcess, connect, free_port, ping as redis_ping, require, sockmap_or_skip, wait_until


def ping(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(b"PING\r\n")
    return sock.recv(64)


@contextlib.contextmanager
def stopped(daemon: Daemon):
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_an_established_connection_works_while_the_daemon_is_stopped_only_in_the_kernel(tmp_path, mode):
    sockmap_or_skip().close()
    listen = free_port()
    with RedisProcess(free_port()) as redis:
        daemon = Daemon(["--listen", f"127.0.0.1:{listen}", "--map", f"{listen}=127.0.0.1:{redis.port}",
                         "--sockmap", mode, "--workers", "1"], listen=None, workdir=tmp_path)
        try:
            with contextlib.closing(connect("127.0.0.1", listen)) as c:
                assert ping(c, 5) == b"+PONG\r\n"
                with stopped(daemon):  # the one process there is (--workers 1)
                    if mode == "on":
                        for _ in range(100):
                            assert ping(c, 5) == b"+PONG\r\n"
                    else:
                        with pytest.raises(TimeoutError):
                            ping(c, 0.5)
                if mode == "off":
                    c.settimeout(5)
                    assert c.recv(64) == b"+PONG\r\n"  # the stalled reply, once it runs again
                assert ping(c, 5) == b"+PONG\r\n"
            daemon.stop()
        finally:
            daemon.kill()
        if mode == "on":
            assert "established connections are relayed in the kernel" in daemon.text()
            (rec,) = [r for r in daemon.records() if r.get("event") == "connection"]
            # bytes counted from the sockets (TCP_INFO), not the relay: 102 pings
            assert (rec["up"], rec["down"], rec["outcome"]) == (102 * 6, 102 * 7, "ok")


def test_a_full_map_falls_back_to_user_space(tmp_path):
    """Capacity for one connection (two sockets): a second, concurrent one is relayed in
    user space, and works all the same."""
    sockmap_or_skip().close()
    listen = free_port()
    with RedisProcess(free_port()) as redis:
        daemon = Daemon(["--listen", f"127.0.0.1:{listen}", "--map", f"{listen}=127.0.0.1:{redis.port}",
                         "--sockmap", "on", "--sockmap-size", "1", "--workers", "1"], listen=None, workdir=tmp_path)
        try:
            with contextlib.closing(connect("127.0.0.1", listen)) as first, \
                    contextlib.closing(connect("127.0.0.1", listen)) as second:
                assert ping(first, 5) == b"+PONG\r\n"
                assert ping(second, 5) == b"+PONG\r\n"
                with stopped(daemon):  # exactly one of them is relayed by the kernel
                    working = []
                    for c in (first, second):
                        try:
                            working.append(ping(c, 0.5) == b"+PONG\r\n")
                        except TimeoutError:
                            working.append(False)
                assert sorted(working) == [False, True]
            daemon.stop()
        finally:
            daemon.kill()
        assert "sockmap full" in daemon.text()


def test_pairs_redirect_to_each_other_and_can_leave_and_join_again():
    sm = sockmap_or_skip()
    try:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
            c = socket.create_connection(srv.getsockname())
            d, _ = srv.accept()
            with a, b, c, d:
                # the proxy's two sockets are b (to client a) and c (to backend d)
                handle = sm.add_pair(b, c)
                assert handle == (struct.pack("<Q", cookie(b)), struct.pack("<Q", cookie(c)))
                assert sm.used == 2
                a.sendall(b"to the backend")
                d.settimeout(2)
                assert d.recv(64) == b"to the backend"
                d.sendall(b"to the client")
                a.settimeout(2)
                assert a.recv(64) == b"to the client"
                sm.remove_pair(handle)
                assert sm.used == 0
                # Out of the maps: the bytes stay in b's receive queue, for user space.
                a.sendall(b"to the proxy")
                b.settimeout(2)
                assert b.recv(64) == b"to the proxy"
                again = sm.add_pair(b, c)
                a.sendall(b"relayed again")
                assert d.recv(64) == b"relayed again"
                sm.remove_pair(again)
    finally:
        sm.close()


def test_data_sent_before_the_pair_joined_is_relayed_at_once():
    """The client speaks first, before the daemon has connected upstream: its bytes wait
    in the receive queue and must not wait for more data to come (SO_RCVLOWAT kick)."""
    sm = sockmap_or_skip()
    try:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            client = socket.create_connection(srv.getsockname())
            proxy_side, _ = srv.accept()
            client.sendall(b"early")
            wait_until(lambda: _queued(proxy_side) == 5, timeout=2, what="the bytes to arrive")
            upstream = socket.create_connection(srv.getsockname())
            backend, _ = srv.accept()
            with client, proxy_side, upstream, backend:
                sm.add_pair(proxy_side, upstream)
                backend.settimeout(2)
                assert backend.recv(64) == b"early"
    finally:
        sm.close()


def _queued(sock: socket.socket) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


# ---- the KernelRelay: one owner for the kernel resources ----------------------------------


def _open_fds() -> set[int]:
    # Without the one listdir() itself had open while listing.
    return {n for n in map(int, os.listdir("/proc/self/fd")) if _is_open(n)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_kernel_relay_holds_four_fds_and_closing_it_releases_them():
    sockmap_or_skip().close()
    before = _open_fds()
    kernel = KernelRelay(4)
    assert len(_open_fds() - before) == 4  # the two maps, the program, the epoll set
    assert isinstance(kernel, DataPlane)
    kernel.close()
    assert _open_fds() == before
    with open(os.devnull) as reused:  # takes one of the numbers just freed
        kernel.close()  # a second close closes nothing, not someone else's fd
        os.fstat(reused.fileno())
    with KernelRelay(4):
        assert len(_open_fds() - before) == 4
    assert _open_fds() == before


def test_the_kernel_relay_gives_both_sockets_a_send_buffer_for_a_tick_of_bulk():
    """The redirect work waits a whole timer tick once a target's send buffer is full
    (kernel.py, "Send buffers"): both sockets get SEND_BUFFER, past net.core.wmem_max
    (the daemon may force it), and a bulk transfer arrives whole, in order."""
    sockmap_or_skip().close()
    import hashlib
    import threading

    import trio
    import trio.testing

    from ambassadord.relay import RelayResult
    from ambassadord.relay.kernel import SEND_BUFFER

    wmem_max = int(open("/proc/sys/net/core/wmem_max").read())
    data = os.urandom(1 << 20) * 24  # 24 MiB
    got = hashlib.sha256()

    async def main():
        with KernelRelay(4) as kernel, socket.create_server(("127.0.0.1", 0)) as srv:
            client = socket.create_connection(srv.getsockname())
            proxy_side, _ = srv.accept()
            upstream = socket.create_connection(srv.getsockname())
            backend, _ = srv.accept()
            with client, proxy_side, upstream, backend:
                proxy_side.setblocking(False)
                upstream.setblocking(False)
                client.settimeout(20)
                backend.settimeout(20)
                result = RelayResult()
                done = trio.Event()

                async def relay():
                    await kernel.relay(proxy_side, upstream, result)
                    done.set()

                def upload():
                    client.sendall(data)
                    client.shutdown(socket.SHUT_WR)

                def download():
                    while chunk := backend.recv(1 << 20):
                        got.update(chunk)
                    backend.shutdown(socket.SHUT_WR)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kernel.run)
                    nursery.start_soon(relay)
                    await trio.testing.wait_all_tasks_blocked()
                    for sock in (proxy_side, upstream):  # the kernel reports twice what was asked
                        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * SEND_BUFFER
                    assert SEND_BUFFER > wmem_max or os.geteuid() != 0
                    threads = [threading.Thread(target=f) for f in (upload, download)]
                    for t in threads:
                        t.start()
                    with trio.fail_after(20):
                        await done.wait()
                    await trio.to_thread.run_sync(lambda: [t.join() for t in threads])
                    nursery.cancel_scope.cancel()
                assert result.outcome is None  # no reset (relay() makes it "ok")
                assert (result.up, result.down) == (len(data), 0)
        assert got.digest() == hashlib.sha256(data).digest()

    trio.run(main)


@pytest.mark.parametrize("wmem_max, tcp_wmem_max, asked", [
    (212992, 4194304, None),  # many distributions: SO_SNDBUF would shrink the buffer
    (4194304, 4194304, 4194304),  # twice the cap is above what auto-tuning reaches
    (64 << 20, 4194304, 16 << 20),  # never more than SEND_BUFFER
    (2097152, 4194304, None),  # twice the cap is just what auto-tuning reaches: no gain
    (None, 4194304, None),  # unreadable: leave it alone
    (4194304, None, None),
])
def test_without_the_capability_to_force_it_the_send_buffer_is_only_ever_grown(wmem_max, tcp_wmem_max, asked):
    from ambassadord.relay.kernel import SEND_BUFFER, fallback_send_buffer

    assert SEND_BUFFER == 16 << 20
    assert fallback_send_buffer(wmem_max, tcp_wmem_max) == asked


def test_a_daemon_not_allowed_to_force_the_send_buffer_asks_once_and_then_falls_back(monkeypatch):
    sockmap_or_skip().close()
    from ambassadord.relay import kernel as kernel_module
    from ambassadord.relay.tcp_abi import SO_SNDBUFFORCE

    asked = []

    class Socket:  # only what _widen uses
        def setsockopt(self, level, option, value):
            asked.append((option, value))
            if option == SO_SNDBUFFORCE:
                raise PermissionError(1, "Operation not permitted")

    sysctls = {"/proc/sys/net/core/wmem_max": 8 << 20, "/proc/sys/net/ipv4/tcp_wmem": 4 << 20}
    monkeypatch.setattr(kernel_module, "_sysctl_int", lambda path, field=0: sysctls[path])
    with KernelRelay(4) as relay:
        relay._widen(Socket())
        relay._widen(Socket())
    assert asked == [(SO_SNDBUFFORCE, 16 << 20), (socket.SO_SNDBUF, 8 << 20), (socket.SO_SNDBUF, 8 << 20)]


def test_a_kernel_relay_short_of_fds_says_so_and_leaves_nothing_open():
    """Room for the maps and the program but not the epoll set (RLIMIT_NOFILE): a
    SockmapError, which the daemon's ``--sockmap auto`` turns into a user-space relay, and
    the three BPF fds closed again."""
    sockmap_or_skip().close()
    before = _open_fds()
    free = [n for n in range(max(before) + 5) if n not in before]  # the kernel takes the lowest first
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[3], hard))  # fd numbers free[0..2] only
    try:
        with pytest.raises(SockmapError, match="^.*epoll: Too many open files"):
            KernelRelay(4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _open_fds() == before


# ---- the bpf(2) system call number ---------------------------------------------------------

# From the kernel's tables: arch/x86/entry/syscalls/syscall_{64,32}.tbl, arch/arm/tools/syscall.tbl
# (EABI), include/uapi/asm-generic/unistd.h (aarch64, riscv64, loongarch64),
# arch/powerpc/kernel/syscalls/syscall.tbl, arch/s390/kernel/syscalls/syscall.tbl.
@pytest.mark.parametrize("machine, bits, number", [
    ("x86_64", 64, 321), ("i386", 32, 357), ("i686", 32, 357), ("aarch64", 64, 280),
    ("armv7l", 32, 386), ("armv6l", 32, 386), ("riscv64", 64, 280), ("ppc64", 64, 361),
    ("ppc64le", 64, 361), ("s390x", 64, 351), ("loongarch64", 64, 280),
])
def test_the_bpf_syscall_number_is_the_architectures_own(machine, bits, number):
    assert bpf_syscall_number(machine, bits) == number


@pytest.mark.parametrize("machine, bits, named", [
    ("mips64", 64, "architecture mips64"), ("sparc64", 64, "architecture sparc64"), ("", 64, "architecture unknown"),
    ("x86_64", 32, "architecture x86_64 (a 32-bit process)"), ("i686", 64, "architecture i686 (a 64-bit process)"),
])
def test_an_architecture_without_a_known_number_is_refused_plainly(machine, bits, named):
    with pytest.raises(SockmapError) as refused:
        bpf_syscall_number(machine, bits)
    assert str(refused.value) == (f"the kernel relay does not know the bpf syscall number on {named}; "
                                  "run with --sockmap off")


def test_a_sockmap_on_an_unknown_architecture_makes_no_system_call(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "mips64")
    with pytest.raises(SockmapError, match="on architecture mips64; run with --sockmap off"):
        Sockmap(8)


def test_the_daemon_says_why_the_kernel_relay_is_off_on_an_unsupported_platform(tmp_path):
    """``setarch linux32`` makes uname(2) name a 32-bit machine (i686, or armv8l on arm64)
    to this 64-bit process, a platform the table does not cover: ``--sockmap auto`` relays
    in user space and says why; ``--sockmap on`` refuses to start, saying why."""
    require("setarch")
    listen = free_port()
    with RedisProcess(free_port()) as redis:
        args = ["--listen", f"127.0.0.1:{listen}", "--map", f"{listen}=127.0.0.1:{redis.port}", "--workers", "1"]
        with Daemon([*args, "--sockmap", "auto"], listen=("127.0.0.1", listen), prefix=["setarch", "linux32"],
                    log_format="text", workdir=tmp_path) as auto:
            with contextlib.closing(connect("127.0.0.1", listen)) as c:
                assert redis_ping(c) == b"+PONG\r\n"
            auto.stop()
        with Daemon([*args, "--sockmap", "on"], listen=None, prefix=["setarch", "linux32"], log_format="text",
                    workdir=tmp_path, wait=False) as on:
            assert on.wait_exit(15) == 1, on.describe()
    unsupported = "the kernel relay does not know the bpf syscall number on architecture "
    assert f"sockmap not available ({unsupported}" in auto.text(), auto.describe()
    assert "; run with --sockmap off); relaying in user space" in auto.text(), auto.describe()
    assert f"--sockmap on: {unsupported}" in on.text(), on.describe()
