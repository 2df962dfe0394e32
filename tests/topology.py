"""The end-to-end scenario's machines, as network namespaces, and what runs on them.

::

    host A                         host B                                container C
    redis-server                   ambassadord run --iptables ...
    10.250.0.1/24  ── veth ──────  10.250.0.2/24
    fd00:250::1/64                 fd00:250::2/64
                                   br0 10.251.0.1/24  ── veth ─────────  10.251.0.2/24
                                       fd00:251::1/64                    fd00:251::2/64
                                                                         default via the br0 addresses

A and B are two hosts on one LAN; C is a container on B's bridge, whose gateway is the
bridge address, as with Docker's docker0. Nothing has a route out of the machine: A and B
have only their connected subnets, C's default route ends in B, and B does not forward
(``ip_forward`` is 0 in a new namespace). So C can reach A's Redis only through a process
on B, which is what the tests want to prove ambassadord is.

:func:`scenario_topology` builds it and deletes it, also when a test fails;
:class:`RedisServer` and :class:`AmbassadordProcess` run the two servers inside it;
:class:`RespClient` is enough of the Redis protocol to move a large value byte-exactly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.netns import Netns, link, namespaces

REPO_ROOT = Path(__file__).resolve().parent.parent

REDIS_PORT = 6379
AMBASSADORD_PORT = 10000  # the daemon's default listen port


@dataclass(frozen=True)
class Addresses:
    """One interface's addresses, without prefix length."""

    v4: str
    v6: str

    def cidrs(self, v4_prefix: int = 24, v6_prefix: int = 64) -> list[str]:
        return [f"{self.v4}/{v4_prefix}", f"{self.v6}/{v6_prefix}"]


HOST_A = Addresses("10.250.0.1", "fd00:250::1")
HOST_B = Addresses("10.250.0.2", "fd00:250::2")
BRIDGE = Addresses("10.251.0.1", "fd00:251::1")  # br0 in host B: the container's gateway
CONTAINER = Addresses("10.251.0.2", "fd00:251::2")
BRIDGE_NAME = "br0"


@dataclass(frozen=True)
class Topology:
    host_a: Netns
    host_b: Netns
    container: Netns


@contextlib.contextmanager
def scenario_topology(label: str = "e2e") -> Iterator[Topology]:
    """Create hosts A and B and container C (see the module docstring); delete them on exit.

    ``label`` keeps the namespace names of two topologies alive at once apart
    (``amb-<label>-a-<pid>`` ...).
    """
    with namespaces(f"{label}-a", f"{label}-b", f"{label}-c") as (a, b, c):
        link(a, HOST_A.cidrs(), b, HOST_B.cidrs(), tag="ab")
        # A new namespace does not forward by default; say so, since the tests rely on it.
        b.exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])

        b.exec(["ip", "link", "add", BRIDGE_NAME, "type", "bridge"])
        b.exec(["ip", "addr", "add", BRIDGE.cidrs()[0], "dev", BRIDGE_NAME])
        b.exec(["ip", "addr", "add", BRIDGE.cidrs()[1], "dev", BRIDGE_NAME, "nodad"])
        b.exec(["ip", "link", "set", BRIDGE_NAME, "up"])
        _, b_port = link(c, CONTAINER.cidrs(), b, [], tag="cb")
        b.exec(["ip", "link", "set", b_port, "master", BRIDGE_NAME])
        c.exec(["ip", "route", "add", "default", "via", BRIDGE.v4])
        c.exec(["ip", "-6", "route", "add", "default", "via", BRIDGE.v6])

        yield Topology(host_a=a, host_b=b, container=c)


# --- talking to Redis ------------------------------------------------------------------


def connect(ns: Netns, host: str, port: int, *, timeout: float = 10) -> socket.socket:
    """A TCP connection from inside ``ns`` to ``host:port`` (an IPv4 or IPv6 literal)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ns.socket(family)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class RespError(Exception):
    """Redis answered with an error reply."""


class RespClient:
    """The few bits of RESP2 the tests need: send a command, read one reply.

    Binary-safe, unlike ``redis-cli`` output, so a value can be compared byte for byte.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._reader = sock.makefile("rb")

    @classmethod
    @contextlib.contextmanager
    def connect(cls, ns: Netns, host: str, port: int = REDIS_PORT, *, timeout: float = 10) -> Iterator[RespClient]:
        sock = connect(ns, host, port, timeout=timeout)
        client = cls(sock)
        try:
            yield client
        finally:
            client._reader.close()  # the socket's fd closes only once its reader is closed too
            sock.close()

    def command(self, *args: bytes | str | int) -> bytes | str | int | list | None:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self._sock.sendall(
            b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        )
        return self._reply()

    def _reply(self) -> bytes | str | int | list | None:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed mid-reply (read {line!r})")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._reader.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError(f"connection closed after {len(data)} of {n} bulk bytes")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"not a RESP reply: {line!r}")


def redis_cli(ns: Netns, host: str, *args: str, port: int = REDIS_PORT, timeout: float = 10) -> str:
    """Run ``redis-cli -h HOST -p PORT ARGS...`` in ``ns``; return its stripped output.

    Raises (with redis-cli's stderr) when it exits non-zero, e.g. connection refused.
    """
    return ns.exec(["redis-cli", "-h", host, "-p", str(port), *args], timeout=timeout).strip()


# --- processes -------------------------------------------------------------------------


class ProcessExited(Exception):
    """A server died while we waited for it to be ready."""


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.05,
               failure: Callable[[], str]) -> None:
    """Poll ``condition`` until it is true; on timeout raise with ``failure()``'s text.

    ``condition`` may raise :class:`OSError` or :class:`RuntimeError` (not ready yet: poll
    again) or :class:`ProcessExited` (never going to be ready: stop now).
    """
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, RuntimeError, subprocess.TimeoutExpired):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(failure())
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, *, timeout: float = 5) -> int | None:
    """SIGTERM, then wait up to ``timeout`` s. Returns the exit status, or None if it had to
    be killed (SIGKILL) because it did not exit in time. Safe to call twice."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# Logs of the servers a test used: tests/conftest.py attaches their ends to the report of a
# test that fails, so that a failure says what the servers saw, also when the test stopped
# them itself.
_logs: dict[Path, str] = {}  # log file -> title, of servers running or stopped recently
_stopped: set[Path] = set()


def recent_logs() -> dict[Path, str]:
    """``{log file: title}`` of servers running now or stopped since :func:`forget_stopped`."""
    return dict(_logs)


def forget_stopped() -> None:
    """Start a new test's record: drop the logs of servers that are no longer running."""
    for path in _stopped:
        _logs.pop(path, None)
    _stopped.clear()


def _started(log: Path, title: str) -> None:
    _logs[log] = title


def _finished(log: Path) -> None:
    _stopped.add(log)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class RedisServer:
    """redis-server in a namespace, bound to the given addresses, no persistence.

    ``ip netns exec`` execs the command, so the Popen is redis-server itself.
    """

    def __init__(self, ns: Netns, binds: Sequence[str], workdir: Path, port: int = REDIS_PORT):
        self.ns, self.binds, self.port = ns, list(binds), port
        self.log = workdir / f"redis-{ns.name}.log"
        with open(self.log, "wb") as out:
            self.proc = ns.popen(
                ["redis-server", "--port", str(port), "--bind", *self.binds,
                 "--save", "", "--appendonly", "no", "--protected-mode", "no",
                 "--daemonize", "no", "--dir", str(workdir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        _started(self.log, f"redis-server in {ns.name}")
        try:
            wait_until(self._answers, timeout=15, failure=self._failure)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise ProcessExited(self._failure())
        with RespClient.connect(self.ns, self.binds[0], self.port, timeout=1) as redis:
            return redis.command("PING") == "PONG"

    def _failure(self) -> str:
        state = "is not answering" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"redis-server in {self.ns.name} {state}; its log:\n{tail(self.log)}"

    def stop(self) -> None:
        stop_process(self.proc)
        _finished(self.log)


class AmbassadordProcess:
    """``python -m ambassadord run ARGS...`` in a namespace, logging JSON at debug level
    to a file, with the venv's Python (the one running pytest).

    Ready when ``ss`` shows its listening sockets (``listening``: 0.0.0.0:10000 and
    [::]:10000 by default) and, with ``--iptables``, its nat chains are in both iptables and
    ip6tables. Watching rather than connecting keeps probe connections out of its log. Not
    ready in time, or dead, fails with the end of its log.
    """

    CHAIN = "AMBASSADORD"

    def __init__(self, ns: Netns, args: Sequence[str], workdir: Path, *,
                 listening: Sequence[str] = (f"0.0.0.0:{AMBASSADORD_PORT}", f"[::]:{AMBASSADORD_PORT}"),
                 ready_timeout: float = 15):
        self.ns = ns
        # No admin API unless a test asks for one: the default port would collide.
        admin = () if any(a == "--admin" or a.startswith("--admin=") for a in args) else ("--admin", "off")
        self.args = ["run", *args, *admin, "--log-format", "json", "--log-level", "debug"]
        self.log = workdir / f"ambassadord-{ns.name}-{time.monotonic_ns()}.log"
        self.listening = set(listening)
        self._stopped = False
        self.returncode: int | None = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as out:
            self.proc = ns.popen(
                [sys.executable, "-m", "ambassadord", *self.args],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )
        _started(self.log, f"{self.command} in {ns.name}")
        try:
            wait_until(self._ready, timeout=ready_timeout, failure=self._failure)
        except BaseException:
            self.stop()
            raise

    @property
    def command(self) -> str:
        return "python -m ambassadord " + " ".join(self.args)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise ProcessExited(self._failure())
        if not self.listening <= self.listeners():
            return False
        return "--iptables" not in self.args or (
            self.CHAIN in self.nat_rules("iptables") and self.CHAIN in self.nat_rules("ip6tables")
        )

    def listeners(self) -> set[str]:
        """``ADDR:PORT`` of every listening TCP socket in the daemon's namespace."""
        return {line.split()[3] for line in self.ns.exec(["ss", "-Hltn"]).splitlines() if line.strip()}

    def nat_rules(self, tool: str = "iptables") -> str:
        """``iptables-save -t nat`` (or ``ip6tables-save``) in the daemon's namespace."""
        return self.ns.exec([f"{tool}-save", "-t", "nat"])

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def _failure(self) -> str:
        if self.proc.poll() is None:
            try:
                have = sorted(self.listeners())
            except RuntimeError as exc:
                have = [str(exc)]
            state = (f"is not ready (want listeners {sorted(self.listening)}"
                     f"{' and its nat chains' if '--iptables' in self.args else ''}; listening: {have})")
        else:
            state = f"exited {self.proc.returncode}"
        return f"`{self.command}` in {self.ns.name} {state}; its log:\n{self.log_tail()}"

    def stop(self, timeout: float = 5) -> int | None:
        """SIGTERM; the exit status, or None if it had to be killed after ``timeout`` s."""
        if not self._stopped:
            self._stopped = True
            self.returncode = stop_process(self.proc, timeout=timeout)
            _finished(self.log)
        return self.returncode
