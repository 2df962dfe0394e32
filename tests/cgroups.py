"""cgroup v2 directories for tests: a child cgroup of our own, processes and sockets in it.

Tests never attach BPF to the machine's root cgroup: :func:`child_cgroup` makes a fresh
directory under the cgroup2 mount (found in /proc/mounts) and removes it on exit, also
when the test fails (processes still in it are moved back out first).

A socket belongs to the cgroup its creator was in when it was created, for its whole
life. :func:`socket_in` makes one in a cgroup (and, optionally, a network namespace) by
moving this process into the cgroup for the moment of the socket() call; :func:`popen_in`
starts a command whose process is in the cgroup (and enters a namespace with ``nsenter
--net``, because ``ip netns exec`` hides the cgroup mounts).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

from ambassadord.connect.cgroup import cgroup2_mount
from tests.daemon import connect
from tests.netns import Netns

_serial = itertools.count()


def own_cgroup_dir() -> str:
    """The cgroup v2 directory this process is in."""
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(cgroup2_mount(), line[3:].strip().lstrip("/"))
    raise LookupError("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")


def move(pid: int, cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(pid))


@contextlib.contextmanager
def child_cgroup(label: str) -> Iterator[str]:
    """A new cgroup directory ``amb-<label>-<pid>-<n>`` under the cgroup2 mount; on exit
    its processes go back to ours and it is removed (an attachment dies with it)."""
    path = os.path.join(cgroup2_mount(), f"amb-{label}-{os.getpid()}-{next(_serial)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        home = own_cgroup_dir()
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        with contextlib.suppress(OSError):
                            move(int(pid), home)
                os.rmdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a process that is exiting leaves the cgroup a moment later


def socket_in(cgroup_dir: str, ns: Netns | None = None, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created in ``cgroup_dir`` (and in ``ns``, if given)."""
    home = own_cgroup_dir()
    move(os.getpid(), cgroup_dir)
    try:
        return ns.socket(family) if ns is not None else socket.socket(family, socket.SOCK_STREAM)
    finally:
        move(os.getpid(), home)


def sockets_in(cgroup_dir: str, ns: Netns, n: int, family: int = socket.AF_INET) -> list[socket.socket]:
    """``n`` TCP sockets created in ``cgroup_dir`` and ``ns``, with two moves of this process
    in all (a socket's cgroup is the one it was created in; a move takes tens of ms)."""
    home = own_cgroup_dir()
    move(os.getpid(), cgroup_dir)
    try:
        return [ns.socket(family) for _ in range(n)]
    finally:
        move(os.getpid(), home)


def popen_in(cgroup_dir: str, cmd: Sequence[str], ns: Netns | None = None, **kw) -> subprocess.Popen:
    """Start ``cmd`` in ``cgroup_dir`` (and in ``ns`` through ``nsenter --net``)."""
    procs = os.path.join(cgroup_dir, "cgroup.procs")

    def enter() -> None:  # in the child, before exec
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    if ns is not None:
        cmd = ["nsenter", f"--net=/run/netns/{ns.name}", *cmd]
    return subprocess.Popen(list(cmd), preexec_fn=enter, **kw)


def run_in(cgroup_dir: str, cmd: Sequence[str], ns: Netns | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = popen_in(cgroup_dir, cmd, ns, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def attached(cgroup_dir: str) -> str:
    """What ``bpftool cgroup show`` lists on the directory (empty: nothing attached)."""
    out = subprocess.run(["bpftool", "cgroup", "show", cgroup_dir], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if line.strip() and not line.startswith("ID"))


def dial(cgroup_dir: str | None, ns: Netns, host: str, port: int, *, timeout: float = 5) -> socket.socket:
    """A connected socket from ``ns`` to ``host:port``, made in ``cgroup_dir`` (None: in ours)."""
    make = None if cgroup_dir is None else (lambda family: socket_in(cgroup_dir, ns, family))
    return connect(host, port, ns=ns, timeout=timeout, make=make)
