"""Where the cgroup v2 hierarchy is mounted (pure), and network namespace cookies.

Connect mode attaches its programs to a cgroup v2 directory. On a hybrid layout (cgroup v1
controllers at /sys/fs/cgroup/*, v2 at /sys/fs/cgroup/unified) the v2 root is not
/sys/fs/cgroup, so it is read from /proc/mounts, never assumed.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

SO_NETNS_COOKIE = 71  # asm-generic/socket.h (Linux 5.14+): getsockopt(SOL_SOCKET), a u64


def _unescape(field: str) -> str:
    # /proc/mounts writes a space, tab, newline and backslash in a path as \040 \011 \012 \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_cgroup2_mount(proc_mounts_text: str) -> str:
    """The mount point of the cgroup v2 hierarchy in the text of /proc/mounts (the first
    one, when it is mounted more than once). LookupError when there is none."""
    for line in proc_mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return _unescape(fields[1])
    raise LookupError("no cgroup2 file system in /proc/mounts (cgroup v2 is not mounted)")


def cgroup2_mount(path: str = "/proc/mounts") -> str:
    """:func:`find_cgroup2_mount` of this machine."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return find_cgroup2_mount(f.read())


def netns_cookie(sock: socket.socket | None = None) -> int:
    """The cookie of the network namespace ``sock`` lives in (default: this thread's), as
    bpf_get_netns_cookie() sees it. OSError on kernels before 5.14."""
    if sock is not None:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return netns_cookie(s)



CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_cookie_at(path: str) -> int:
    """The cookie of the network namespace at ``path`` (``/proc/PID/ns/net`` of a
    container's process, ``/run/netns/NAME``): what a route's ``scope`` limited to that
    consumer is. OSError on failure (see :func:`in_netns`)."""
    return in_netns(path, netns_cookie)


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """``fn()``, called by a short-lived thread inside the network namespace at ``path``
    (setns needs CAP_SYS_ADMIN), so the caller's own namespace never changes; the
    thread's namespace dies with it. What ``fn`` raises is raised here; OSError when the
    namespace cannot be entered."""
    result: list = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append((True, fn()))
        except BaseException as exc:  # handed to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=run, name="in-netns")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


_libc = ctypes.CDLL(None, use_errno=True)
