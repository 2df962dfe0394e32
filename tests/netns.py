"""Real network namespaces for tests: create, run commands in, make sockets in, delete.

Every namespace is named ``amb-<something>-<pid>`` so that parallel runs do not collide,
gets only a loopback interface unless a test links it to another, and has no default route:
no traffic can leave the machine. Use :func:`namespaces` (a context manager) so that they
are deleted also when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

REQUIRED_TOOLS = (
    "ip", "ss", "iptables", "ip6tables", "iptables-restore", "iptables-save", "ip6tables-save",
    "redis-server", "redis-cli",
)


def missing_prerequisites() -> list[str]:
    """What a netns end-to-end test needs and this machine lacks (empty when all is there)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces and iptables need CAP_SYS_ADMIN/CAP_NET_ADMIN)")
    return missing


def require_prerequisites() -> None:
    """Skip when prerequisites are missing, but fail under CI, where a skip would hide a gap."""
    import pytest

    missing = missing_prerequisites()
    if not missing:
        return
    message = "netns test prerequisites missing: " + ", ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def run(cmd: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 30) -> str:
    """Run a command in the root namespace; return stdout; raise with stderr on failure."""
    proc = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace")


class Netns:
    """One network namespace. Created up with loopback; delete() removes it."""

    def __init__(self, label: str):
        self.name = f"amb-{label}-{os.getpid()}"
        with contextlib.suppress(RuntimeError):
            run(["ip", "netns", "del", self.name])
        run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])

    def exec(self, cmd: Sequence[str], **kw) -> str:
        """Run a command inside the namespace; see :func:`run`."""
        return run(["ip", "netns", "exec", self.name, *cmd], **kw)

    def popen(self, cmd: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running process inside the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def listening(self) -> set[str]:
        """The local addresses of the TCP sockets listening in the namespace, as ``ss``
        writes them (``127.0.0.1:10000``, ``[::]:10000``, ``[::ffff:127.0.0.1]:15051``)."""
        return {line.split()[3] for line in self.exec(["ss", "-Hltn"]).splitlines() if len(line.split()) > 3}

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (created by a thread that setns'd into it).

        A socket belongs to the namespace it was created in for its whole life, so the test
        process can use it from any thread, including under trio (wrap with trio.socket.from_stdlib_socket).
        """
        result: list = []

        def make() -> None:
            try:
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(socket.socket(family, type))
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        t = threading.Thread(target=make)  # this thread's netns dies with it
        t.start()
        t.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def delete(self) -> None:
        with contextlib.suppress(RuntimeError):
            run(["ip", "netns", "del", self.name])


def link(a: Netns, a_addrs: Sequence[str], b: Netns, b_addrs: Sequence[str], *, tag: str) -> tuple[str, str]:
    """Join two namespaces with a veth pair; give each side its addresses (CIDR notation).

    IPv6 addresses are added with ``nodad`` so they are usable at once. Returns the two
    interface names (a side, b side).
    """
    ifa, ifb = f"v{tag}a"[:15], f"v{tag}b"[:15]
    run(["ip", "link", "add", ifa, "netns", a.name, "type", "veth", "peer", "name", ifb, "netns", b.name])
    for ns, ifname, addrs in ((a, ifa, a_addrs), (b, ifb, b_addrs)):
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            ns.exec(["ip", "addr", "add", addr, "dev", ifname, *extra])
        ns.exec(["ip", "link", "set", ifname, "up"])
    return ifa, ifb


def sweep_stale() -> list[str]:
    """Delete the namespaces an earlier test run left behind (killed before its clean-up
    ran): ``amb-<label>-<pid>`` whose pid is gone and in which no process runs. Returns
    their names."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    swept = []
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "amb" or not parts[-1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[-1]}"):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        if pids:
            continue
        if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode == 0:
            swept.append(name)
    return swept


@contextlib.contextmanager
def namespaces(*labels: str) -> Iterator[list[Netns]]:
    """Create one namespace per label; delete them all on exit, also on failure."""
    made: list[Netns] = []
    try:
        for label in labels:
            made.append(Netns(label))
        yield made
    finally:
        for ns in made:
            ns.delete()
