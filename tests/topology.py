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

:func:`scenario_topology` builds it and deletes it, also when a test fails; the servers
inside it are tests/daemon.py's (:class:`~tests.daemon.RedisProcess`,
:class:`~tests.daemon.Daemon`); :class:`RespClient` is enough of the Redis protocol to move
a large value byte-exactly.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from tests.daemon import connect
from tests.netns import Netns, link, namespaces

REDIS_PORT = 6379


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
        sock = connect(host, port, ns=ns, timeout=timeout)
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
