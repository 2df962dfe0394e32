"""The system's libbpf (``libbpf.so.1``, Debian's libbpf1) through ctypes: only the calls
connect mode needs.

libbpf reads the compiled object (ELF, with BTF), creates its maps, loads its programs
(the kernel's verifier runs here), attaches them to a cgroup as BPF links, and reads a
ring buffer. Everything libbpf prints while a call runs is captured (``libbpf_set_print``)
and carried by :class:`LibbpfError`, so a refused program shows the verifier's log.

Resource handling: :class:`BpfObject` owns its maps and programs (``close()`` frees
them), :class:`Link` one attachment (``destroy()`` detaches it; a link also detaches
when its last file descriptor closes, so a process killed with SIGKILL leaves nothing
attached), :class:`RingBuffer` its epoll set. Each ``close``/``destroy`` is idempotent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable, Iterator

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int

PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, ctypes.c_char_p, _c_void_p)  # level, format, va_list
SAMPLE_FN = ctypes.CFUNCTYPE(_c_int, _c_void_p, _c_void_p, ctypes.c_size_t)  # ctx, data, size
LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2 (dropped)


class LibbpfError(OSError):
    """A libbpf call failed: ``errno``, a message naming the call, and ``log``, what libbpf
    printed meanwhile (for a load: the verifier's log of the refused program)."""

    def __init__(self, err: int, message: str, log: str = ""):
        super().__init__(err, f"{message}: {os.strerror(err)}" if err else message)
        self.log = log

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.log}" if self.log else text


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _c_void_p]
_capture = threading.local()


@PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    # va_list is an array type (x86_64) or a by-reference struct (aarch64): either way a
    # pointer arrives here, and vsnprintf takes it as it is.
    lines = getattr(_capture, "lines", None)
    if lines is None or level >= LIBBPF_DEBUG:
        return 0
    buf = ctypes.create_string_buffer(16384)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    lines.append(buf.value.decode(errors="replace"))
    return 0


def library() -> ctypes.CDLL:
    """libbpf.so.1, its functions typed; OSError when it is not installed."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise OSError(f"cannot load libbpf ({path}): {exc}; Debian: apt-get install libbpf1") from None
        signatures = {
            "libbpf_set_print": (PRINT_FN, [PRINT_FN]),
            "bpf_object__open_file": (_c_void_p, [ctypes.c_char_p, _c_void_p]),
            "bpf_object__load": (_c_int, [_c_void_p]),
            "bpf_object__close": (None, [_c_void_p]),
            "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, ctypes.c_char_p]),
            "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, ctypes.c_char_p]),
            "bpf_map__fd": (_c_int, [_c_void_p]),
            "bpf_map__key_size": (ctypes.c_uint32, [_c_void_p]),
            "bpf_map__value_size": (ctypes.c_uint32, [_c_void_p]),
            "bpf_program__attach_cgroup": (_c_void_p, [_c_void_p, _c_int]),
            "bpf_link__destroy": (_c_int, [_c_void_p]),
            "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
            "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
            "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
            "ring_buffer__new": (_c_void_p, [_c_int, SAMPLE_FN, _c_void_p, _c_void_p]),
            "ring_buffer__consume": (_c_int, [_c_void_p]),
            "ring_buffer__epoll_fd": (_c_int, [_c_void_p]),
            "ring_buffer__free": (None, [_c_void_p]),
            "libbpf_num_possible_cpus": (_c_int, []),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        lib.libbpf_set_print(_print)
        _lib = lib
        return lib


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """What libbpf prints (warnings and info) in this thread while the block runs."""
    library()
    _capture.lines = lines = []
    try:
        yield lines
    finally:
        _capture.lines = None


def _fail(what: str, err: int | None = None, log: list[str] | None = None) -> LibbpfError:
    return LibbpfError(err if err is not None else ctypes.get_errno(), what, "".join(log or ()).rstrip())


class BpfObject:
    """A compiled BPF object file, opened and loaded: its maps exist, its programs passed
    the verifier. Raises LibbpfError (with libbpf's log) when either step fails."""

    def __init__(self, path: str):
        lib = library()
        self._obj = None
        with captured() as log:
            obj = lib.bpf_object__open_file(os.fsencode(path), None)
            if not obj:
                raise _fail(f"libbpf cannot open {path}", log=log)
            self._obj = obj
            rc = lib.bpf_object__load(obj)
        if rc != 0:
            self.close()
            raise _fail(f"the kernel refused the BPF programs of {path}", -rc, log)

    def program(self, name: str) -> int:
        """The ``struct bpf_program *`` of a program (its C function's name)."""
        prog = library().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise LibbpfError(0, f"no BPF program {name!r} in the object")
        return prog

    def _map(self, name: str) -> int:
        m = library().bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise LibbpfError(0, f"no BPF map {name!r} in the object")
        return m

    def map_fd(self, name: str) -> int:
        return library().bpf_map__fd(self._map(name))

    def map_sizes(self, name: str) -> tuple[int, int]:
        """``(key size, value size)`` of a map as the object defines it."""
        m, lib = self._map(name), library()
        return lib.bpf_map__key_size(m), lib.bpf_map__value_size(m)

    def close(self) -> None:
        if self._obj:
            library().bpf_object__close(self._obj)
            self._obj = None


class Link:
    """One program attached to one cgroup (a BPF link: multi-attach, so programs that
    others attached to the same cgroup keep running)."""

    def __init__(self, program: int, cgroup_fd: int, name: str):
        lib = library()
        with captured() as log:
            link = lib.bpf_program__attach_cgroup(program, cgroup_fd)
        if not link:
            raise _fail(f"cannot attach BPF program {name} to the cgroup", log=log)
        self._link, self.name = link, name

    def destroy(self) -> None:
        if self._link:
            library().bpf_link__destroy(self._link)
            self._link = None


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    if library().bpf_map_update_elem(fd, key, value, flags) != 0:
        raise _fail("bpf_map_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under ``key``, or None when there is none."""
    buf = ctypes.create_string_buffer(value_size)
    if library().bpf_map_lookup_elem(fd, key, buf) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise _fail("bpf_map_lookup_elem", err)
    return buf.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False when it was not there."""
    if library().bpf_map_delete_elem(fd, key) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        raise _fail("bpf_map_delete_elem", err)
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a hash map (a snapshot: the kernel may change it meanwhile)."""
    lib, keys = library(), []
    current = None
    nxt = ctypes.create_string_buffer(key_size)
    while lib.bpf_map_get_next_key(fd, current, nxt) == 0:
        keys.append(nxt.raw)
        current = ctypes.create_string_buffer(nxt.raw, key_size)
        if len(keys) > 1_000_000:  # a map that changes under us forever: stop
            break
    return keys


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key."""
    n = library().libbpf_num_possible_cpus()
    if n <= 0:
        raise LibbpfError(-n, "libbpf_num_possible_cpus")
    return n


class RingBuffer:
    """A BPF ring buffer map, read in records: ``consume()`` hands every record that is
    ready to ``on_record(bytes)`` without blocking; ``fileno()`` is an epoll descriptor
    that polls readable when records are waiting (for trio.lowlevel.wait_readable)."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]):
        def sample(_ctx: int, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._callback = SAMPLE_FN(sample)  # kept alive as long as libbpf may call it
        rb = library().ring_buffer__new(map_fd, self._callback, None, None)
        if not rb:
            raise _fail("ring_buffer__new")
        self._rb = rb

    def fileno(self) -> int:
        return library().ring_buffer__epoll_fd(self._rb)

    def consume(self) -> int:
        """Hand over every record that is ready; returns how many."""
        n = library().ring_buffer__consume(self._rb)
        if n < 0:
            raise LibbpfError(-n, "ring_buffer__consume")
        return n

    def close(self) -> None:
        if self._rb:
            library().ring_buffer__free(self._rb)
            self._rb = None
