"""The BPF sockmap and its verdict program: established flows leave Python.

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

Written with raw ``bpf(2)`` calls through ctypes and a hand-assembled program of 10
instructions (11 slots: the map load takes two): no compiler, no libbpf, nothing to
install. Needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN. Every number and layout of
the kernel's interface is in bpf_abi.py. The system call's number differs between
architectures (``bpf_abi.BPF_SYSCALLS``); on one not in that table the kernel relay says
so and is not used.

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
import socket
import struct

from .bpf_abi import (
    ADD64_IMM, ATTR_SIZE, BPF_ANY, BPF_MAP_CREATE, BPF_MAP_DELETE_ELEM, BPF_MAP_TYPE_SOCKHASH, BPF_MAP_UPDATE_ELEM,
    BPF_PROG_ATTACH, BPF_PROG_LOAD, BPF_PROG_TYPE_SK_SKB, BPF_PSEUDO_MAP_FD, BPF_SK_SKB_STREAM_VERDICT, BPF_SYSCALLS,
    CALL, EXIT, FN_GET_SOCKET_COOKIE, FN_SK_REDIRECT_HASH, INSN, LD_IMM64, MAP_CREATE_ATTR, MAP_ELEM_ATTR,
    MOV64_IMM, MOV64_REG, PROG_ATTACH_ATTR, PROG_LOAD_ATTR, SO_COOKIE, STX_DW,
)

_libc = ctypes.CDLL(None, use_errno=True)


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
    return INSN.pack(code, (src << 4) | dst, off, imm)


def _ld_map(dst: int, fd: int) -> bytes:
    """dst = the map ``fd`` (the loader turns the fd into the map's address)."""
    return _insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd) + _insn(0)


def _program(targets_fd: int) -> bytes:
    return b"".join([
        _insn(MOV64_REG, 6, 1),                   # r6 = r1
        _insn(CALL, imm=FN_GET_SOCKET_COOKIE),    # r0 = bpf_get_socket_cookie(r1)
        _insn(STX_DW, 10, 0, -8),                 # *(u64 *)(r10 - 8) = r0
        _insn(MOV64_REG, 1, 6),                   # r1 = r6
        _ld_map(2, targets_fd),                   # r2 = targets
        _insn(MOV64_REG, 3, 10),                  # r3 = r10
        _insn(ADD64_IMM, 3, imm=-8),              # r3 += -8
        _insn(MOV64_IMM, 4, imm=0),               # r4 = 0
        _insn(CALL, imm=FN_SK_REDIRECT_HASH),     # r0 = bpf_sk_redirect_hash(r1, r2, r3, r4)
        _insn(EXIT),                              # return r0
    ])


def _attr(layout, *fields) -> bytes:
    """A union bpf_attr: the command's fields, zero to ATTR_SIZE."""
    head = layout.pack(*fields)
    return head + bytes(ATTR_SIZE - len(head))


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
            attr = _attr(PROG_LOAD_ATTR, BPF_PROG_TYPE_SK_SKB, len(prog) // INSN.size, ctypes.addressof(insns),
                         ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0,
                         b"ambassadord", 0, BPF_SK_SKB_STREAM_VERDICT)
            try:
                self.prog = _bpf(BPF_PROG_LOAD, attr)
            except SockmapError as exc:
                raise SockmapError(exc.errno, f"{exc.strerror}; verifier: {log.value.decode(errors='replace')[-500:]}")
            self._fds.append(self.prog)
            _bpf(BPF_PROG_ATTACH, _attr(PROG_ATTACH_ATTR, self.socks, self.prog, BPF_SK_SKB_STREAM_VERDICT, 0))
        except BaseException:
            self.close()
            raise
        self.used = 0  # sockets in the maps
        # One key, one value and one attr buffer for every map update and delete, made
        # once (trio runs one thing at a time): an update is one syscall, no allocation.
        self._key = ctypes.create_string_buffer(8)
        self._val = ctypes.create_string_buffer(4)
        self._attr = ctypes.create_string_buffer(
            _attr(MAP_ELEM_ATTR, 0, 0, ctypes.addressof(self._key), ctypes.addressof(self._val), BPF_ANY), ATTR_SIZE)
        self._syscall = _libc.syscall

    def _map(self, kind: int, key: int, value: int, entries: int) -> int:
        fd = _bpf(BPF_MAP_CREATE, _attr(MAP_CREATE_ATTR, kind, key, value, entries))
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
        attr = ctypes.create_string_buffer(_attr(MAP_ELEM_ATTR, fd, 0, ctypes.addressof(k), 0, 0), ATTR_SIZE)
        self._call(BPF_MAP_DELETE_ELEM, attr)

    def _update(self, fd: int, key: bytes, value: bytes) -> None:
        self._key.raw = key
        self._val.raw = value
        # attr: map_fd (u32), pad, key pointer, value pointer, flags: only map_fd changes.
        struct.pack_into("<I", self._attr, 0, fd)
        self._call(BPF_MAP_UPDATE_ELEM, self._attr)

    def _call(self, cmd: int, attr) -> None:
        if self._syscall(self._nr, cmd, attr, ATTR_SIZE) < 0:
            err = ctypes.get_errno()
            raise SockmapError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
