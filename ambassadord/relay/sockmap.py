"""Kernel-side relaying with a BPF sockmap (experimental): established flows leave Python.

How it works. A BPF_MAP_TYPE_SOCKHASH ``socks`` holds both sockets of every relayed
connection, and an ``sk_skb`` stream-verdict program attached to it runs for every chunk
of data that arrives on any socket in it. The program redirects the data to the egress of
the socket's peer: ``targets``, a second sockhash without a program, maps the cookie of
the socket the data arrived on to its peer, and ``bpf_sk_redirect_hash`` does the rest.
The bytes go from one TCP socket to the other inside the kernel, without a wake-up, a
syscall or a copy in the daemon.

Why two maps: a pair cannot join a map atomically. If the redirect target were ``socks``
itself, data arriving on the first socket of a pair before the second had joined would
find no target and be dropped. Both entries of ``targets`` (which runs nothing) go in
first, then the sockets join ``socks``; by then every redirect has its target. Data that
arrived before a socket joined ``socks`` waits in its receive queue; setting SO_RCVLOWAT
after joining makes TCP signal it, so the verdict takes it, in order.

Both maps are keyed by socket cookie, so there are no slots to manage, and closing a
socket takes it out of both (with the entry that has it as a target): four map updates
per connection, nothing to delete.

Written with raw ``bpf(2)`` calls through ctypes and a hand-assembled program of 12
instructions: no compiler, no libbpf, nothing to install. Needs CAP_BPF (or
CAP_SYS_ADMIN) and CAP_NET_ADMIN. The system call's number differs between
architectures (``BPF_SYSCALLS``); on one not in that table the kernel relay says so and
is not used.

The program, in BPF assembly (r1 = the skb)::

    r6 = r1
    call bpf_get_socket_cookie          ; r0 = cookie of the socket the data arrived on
    *(u64 *)(r10 - 8) = r0
    r1 = r6
    r2 = map[targets] ll                ; cookie -> the peer socket
    r3 = r10
    r3 += -8
    r4 = 0                              ; flags 0: the peer's egress (send it)
    call bpf_sk_redirect_hash           ; SK_PASS if redirected, SK_DROP if no peer
    exit

A socket whose peer is gone (closed) has no entry any more: its data is dropped, as the
peer could not have taken it either.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import socket
import struct

import trio

_libc = ctypes.CDLL(None, use_errno=True)

# bpf(2)'s number by platform.machine(), from each architecture's system call table
# (aarch64, riscv64 and loongarch64 share the generic one; 32-bit arm is its EABI), with
# the width of that architecture's pointers: a process of the other width (32-bit Python
# on a 64-bit kernel, or a 64-bit one under `setarch i686`) uses another table. Calling a
# wrong number would run some other system call with our arguments.
BPF_SYSCALLS = {
    "x86_64": (321, 64), "i386": (357, 32), "i686": (357, 32),
    "aarch64": (280, 64), "armv7l": (386, 32), "armv6l": (386, 32),
    "riscv64": (280, 64), "ppc64": (361, 64), "ppc64le": (361, 64), "s390x": (351, 64),
    "loongarch64": (280, 64),
}

BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 3, 5, 8
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_PSEUDO_MAP_FD = 1
SO_COOKIE = 57
BPF_ANY = 0

_FN_GET_SOCKET_COOKIE, _FN_SK_REDIRECT_HASH = 46, 72


class SockmapError(OSError):
    """The kernel refused (no BPF, no capability, verifier, ...), or this architecture is
    not supported: relay in user space."""


def bpf_syscall_number(machine: str, pointer_bits: int) -> int:
    """bpf(2)'s number for a process with ``pointer_bits``-bit pointers on ``machine``
    (``platform.machine()``).

    Raises:
        SockmapError: the architecture is not in BPF_SYSCALLS, or the process's pointers
            are not as wide as the architecture's (its numbers are another table's).
    """
    number, bits = BPF_SYSCALLS.get(machine, (None, None))
    if number is None or bits != pointer_bits:
        what = f"architecture {machine or 'unknown'}" + (f" (a {pointer_bits}-bit process)" if number else "")
        raise SockmapError(f"the kernel relay does not know the bpf syscall number on {what}; run with --sockmap off")
    return number


def _nr_bpf() -> int:
    return bpf_syscall_number(platform.machine(), struct.calcsize("P") * 8)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(_nr_bpf(), cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise SockmapError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return ret


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ld_map(dst: int, fd: int) -> bytes:
    return _insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd) + _insn(0, 0, 0, 0, 0)


def _program(targets_fd: int) -> bytes:
    return b"".join([
        _insn(0xBF, 6, 1),                        # r6 = r1
        _insn(0x85, imm=_FN_GET_SOCKET_COOKIE),   # call
        _insn(0x7B, 10, 0, -8),                   # *(u64 *)(r10 - 8) = r0
        _insn(0xBF, 1, 6),                        # r1 = r6
        _ld_map(2, targets_fd),                   # r2 = targets (2 slots)
        _insn(0xBF, 3, 10),                       # r3 = r10
        _insn(0x07, 3, imm=-8),                   # r3 += -8
        _insn(0xB7, 4, imm=0),                    # r4 = 0
        _insn(0x85, imm=_FN_SK_REDIRECT_HASH),    # call
        _insn(0x95),                              # exit
    ])


def cookie(sock: socket.socket) -> int:
    return struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


class Sockmap:
    """The maps and the attached program; ``capacity`` sockets (two per connection)."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._fds: list[int] = []
        self._nr = _nr_bpf()  # SockmapError on an architecture we do not know
        try:
            self.socks = self._map(BPF_MAP_TYPE_SOCKHASH, 8, 4, capacity)
            self.targets = self._map(BPF_MAP_TYPE_SOCKHASH, 8, 4, capacity)
            prog = _program(self.targets)
            license_ = ctypes.create_string_buffer(b"GPL")
            log = ctypes.create_string_buffer(65536)
            insns = ctypes.create_string_buffer(prog, len(prog))
            attr = struct.pack("<IIQQIIQII16sII", BPF_PROG_TYPE_SK_SKB, len(prog) // 8, ctypes.addressof(insns),
                               ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0,
                               b"ambassadord", 0, BPF_SK_SKB_STREAM_VERDICT)
            try:
                self.prog = _bpf(BPF_PROG_LOAD, attr + bytes(128 - len(attr)))
            except SockmapError as exc:
                raise SockmapError(exc.errno, f"{exc.strerror}; verifier: {log.value.decode(errors='replace')[-500:]}")
            self._fds.append(self.prog)
            _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", self.socks, self.prog, BPF_SK_SKB_STREAM_VERDICT, 0) + bytes(112))
        except BaseException:
            self.close()
            raise
        self.used = 0  # sockets in the maps
        # One key, one value and one attr buffer for every map update and delete, made
        # once (trio runs one thing at a time): an update is one syscall, no allocation.
        self._key = ctypes.create_string_buffer(8)
        self._val = ctypes.create_string_buffer(4)
        self._attr = ctypes.create_string_buffer(128)
        struct.pack_into("<QQQ", self._attr, 8, ctypes.addressof(self._key), ctypes.addressof(self._val), BPF_ANY)
        self._syscall = _libc.syscall

    def _map(self, kind: int, key: int, value: int, entries: int) -> int:
        fd = _bpf(BPF_MAP_CREATE, struct.pack("<IIII", kind, key, value, entries) + bytes(112))
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def add_pair(self, a: socket.socket, b: socket.socket) -> tuple[bytes, bytes]:
        """Put two connected sockets in the maps, each redirecting to the other."""
        if self.used + 2 > self.capacity:
            raise SockmapError(0, "sockmap full")
        ka, kb = struct.pack("<Q", cookie(a)), struct.pack("<Q", cookie(b))
        fa, fb = struct.pack("<I", a.fileno()), struct.pack("<I", b.fileno())
        self.used += 2
        try:
            self._update(self.targets, ka, fb)
            self._update(self.targets, kb, fa)
            for key, fd, sock in ((ka, fa, a), (kb, fb, b)):
                self._update(self.socks, key, fd)
                # Data that arrived before the socket joined waits in its receive queue
                # until more comes: setting SO_RCVLOWAT makes TCP signal it now
                # (tcp_set_rcvlowat -> data_ready), so the verdict takes it, in order.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except BaseException:
            self.remove_pair((ka, kb))
            raise
        return ka, kb

    def remove_pair(self, handle: tuple[bytes, bytes], *, closing: bool = False) -> None:
        """Take a pair out. ``closing``: both sockets are about to be closed, and closing a
        socket takes it out of both maps by itself: nothing to delete."""
        if not closing:
            for fd in (self.socks, self.targets):
                for key in handle:
                    try:
                        self._delete(fd, key)
                    except SockmapError:
                        pass
        self.used -= 2

    def _delete(self, fd: int, key: bytes) -> None:
        # Rare (a pair that leaves without closing): its own attr, as the kernel wants
        # everything after the key pointer zero.
        k = ctypes.create_string_buffer(key, len(key))
        attr = ctypes.create_string_buffer(struct.pack("<IIQ", fd, 0, ctypes.addressof(k)) + bytes(112), 128)
        self._call(BPF_MAP_DELETE_ELEM, attr)

    def _update(self, fd: int, key: bytes, value: bytes) -> None:
        self._key.raw = key
        self._val.raw = value
        # attr: map_fd (u32), pad, key pointer, value pointer, flags: only map_fd changes.
        struct.pack_into("<I", self._attr, 0, fd)
        self._call(BPF_MAP_UPDATE_ELEM, self._attr)

    def _call(self, cmd: int, attr) -> None:
        if self._syscall(self._nr, cmd, attr, 128) < 0:
            err = ctypes.get_errno()
            raise SockmapError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")


# ---- end-of-stream watching ------------------------------------------------------------------

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
