"""ConnectPlane: connect mode's programs and maps on one cgroup, owned by one object.

    with ConnectPlane("/sys/fs/cgroup/unified/consumers") as plane:
        plane.set_catch_addresses(["172.17.0.1"])
        plane.set_route(6379, [Backend("10.0.0.5", 6379), Backend("10.0.0.6", 6379)],
                        eject_for=10, connect_timeout=2)
        async for event in plane.events():   # under trio
            ...

What the kernel then does for every process in that cgroup (any network namespace) is
described in ``connect.bpf.c``; in short, a TCP connect to a mapped port on loopback (only
from the daemon's own network namespace, ``netns_cookie``) or on a catch address (from
anywhere) goes straight to a backend, and getpeername() still shows the dialled address.

Connections that connect mode cannot help with, unlike the proxy: a failed connect is not
retried on the next backend (the consumer sees the failure; the kernel ejects the
backend, so the next connect goes elsewhere); an IPv4 socket cannot be sent to an IPv6
backend (such backends are skipped in connect4); the route is chosen by port and network
namespace, not by source network. "Only the first connect to a dead backend fails" holds
for connects made one after another: connects already in flight when the first one
fails fail too, and when an ejection ends every connect may go to the backend until one
fails again (the proxy lets one probe through). A backend the kernel has no route to
fails the connect at once (ENETUNREACH) and is not ejected (no SYN was ever sent).

Resource handling: the constructor loads and attaches everything or, on any failure,
undoes what it did and raises :class:`ConnectPlaneError` (with the verifier's log when the
kernel refused a program). ``close()`` detaches every program and frees every map; it is
idempotent. The attachments are BPF links, so they also go away when the process dies, by
SIGKILL too: a restarted daemon never finds a second copy of itself attached. Established
connections are not affected by either (they never pass through a program again, except
getpeername(), which then shows the backend's address).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

from . import layout
from .cgroup import find_cgroup2_mount, netns_cookie as own_netns_cookie
from .layout import Backend, Event
from .libbpf import BpfObject, Link, RingBuffer, map_delete, map_keys, map_lookup, map_update, possible_cpus

OBJECT_PATH = Path(__file__).with_name("connect.bpf.o")
# How often events() reads the ring when nothing woke it: a connection's log line and
# counters come at most this much after its end.
READ_INTERVAL = 0.1
PROGRAMS = ("connect4", "connect6", "getpeername4", "getpeername6", "sock_ops")

__all__ = ["ConnectPlane", "ConnectPlaneError", "Backend", "find_cgroup2_mount"]


class ConnectPlaneError(Exception):
    """Connect mode cannot run here: the message names what is missing or refused."""


class ConnectPlane:
    """The BPF programs of connect mode, attached to ``cgroup_dir``, and their maps.

    Args:
      cgroup_dir: a cgroup v2 directory; its processes (and its descendants') are covered.
      netns_cookie: the network namespace whose loopback connects are rewritten (the
        daemon's own); default: the namespace of the calling thread.
      object_path: the compiled programs (default: the packaged ``connect.bpf.o``).

    Raises:
      ConnectPlaneError: not a cgroup v2 directory, no libbpf, no privilege (CAP_BPF and
        CAP_NET_ADMIN, or CAP_SYS_ADMIN), a kernel without what the programs use (built
        and tested on Linux 6.18; an older kernel refuses at load, and the message
        carries the verifier's reason), a map layout that does not match ``layout``.
    """

    def __init__(self, cgroup_dir: str, *, netns_cookie: int | None = None, object_path: str | os.PathLike | None = None):
        self.cgroup_dir = str(cgroup_dir)
        self._obj: BpfObject | None = None
        self._links: list[Link] = []
        self._ring: RingBuffer | None = None
        self._cgroup_fd = -1
        self._pending: list[bytes] = []
        try:
            self.netns_cookie = own_netns_cookie() if netns_cookie is None else int(netns_cookie)
            self._cgroup_fd = self._open_cgroup(self.cgroup_dir)
            path = str(object_path or OBJECT_PATH)
            self._obj = BpfObject(path)
            self._check_layout()
            self._fds = {name: self._obj.map_fd(name) for name in layout.MAP_SIZES}
            self._flags = 0
            self._write_config()
            self._ring = RingBuffer(self._obj.map_fd("events"), self._pending.append)
            for name in PROGRAMS:
                self._links.append(Link(self._obj.program(name), self._cgroup_fd, name))
        except OSError as exc:  # LibbpfError too: it carries libbpf's log
            self.close()
            raise ConnectPlaneError(f"connect mode on {self.cgroup_dir}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_cgroup(path: str) -> int:
        if not os.path.isfile(os.path.join(path, "cgroup.procs")) or not os.path.isfile(os.path.join(path, "cgroup.controllers")):
            raise ConnectPlaneError(f"{path} is not a cgroup v2 directory (no cgroup.procs and cgroup.controllers)")
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _check_layout(self) -> None:
        assert self._obj is not None
        for name, expected in layout.MAP_SIZES.items():
            actual = self._obj.map_sizes(name)
            if actual != expected:
                raise ConnectPlaneError(f"BPF map {name}: key/value sizes {actual} in the object, {expected} in layout.py")

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Detach every program and free every map (idempotent)."""
        for link in reversed(self._links):
            link.destroy()
        self._links = []
        if self._ring is not None:
            with contextlib.suppress(RuntimeError, ImportError):  # not under trio: nobody waits
                import trio

                trio.lowlevel.notify_closing(self._ring.fileno())  # wake an events() task
            self._ring.close()
            self._ring = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1

    @property
    def closed(self) -> bool:
        return self._obj is None

    def __enter__(self) -> ConnectPlane:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        if self._obj is None:
            raise ConnectPlaneError("the connect plane is closed")
        return self._fds[name]

    # ------------------------------------------------------------------ routes

    def set_route(self, port: int, backends: Sequence[Backend], *, scope: int = 0, balance: str = "random",
                  eject_for: float, connect_timeout: float) -> None:
        """Create or replace the route of ``port`` (``scope`` 0: host-wide; a netns cookie:
        only consumers in that namespace, before the host-wide route). The whole backend
        set is one map value, replaced in one update: a connect sees the old set or the
        new one. With an empty set (or none usable: IPv6 backends for an IPv4 socket)
        connects to the port pass untouched, counted as ``no_backend``. When every usable
        backend is ejected, the kernel picks among them anyway (the lowest priority),
        rather than passing the connect through. ValueError (from layout) for a bad value."""
        key = layout.route_key(port, scope)
        value = layout.route_value(backends, balance=balance, eject_for=eject_for, connect_timeout=connect_timeout)
        map_update(self._fd("routes"), key, value)

    def remove_route(self, port: int, scope: int = 0) -> bool:
        """Remove a route; False when there was none."""
        return map_delete(self._fd("routes"), layout.route_key(port, scope))

    def routes(self) -> dict[tuple[int, int], tuple[list[Backend], dict]]:
        """``{(port, scope): (backends, settings)}`` as the kernel has them (see layout.unpack_route)."""
        fd, out = self._fd("routes"), {}
        for key in map_keys(fd, layout.ROUTE_KEY.size):
            value = map_lookup(fd, key, layout.ROUTE_SIZE)
            if value is not None:
                scope, port = layout.ROUTE_KEY.unpack(key)
                out[(port, scope)] = layout.unpack_route(value)
        return out

    def set_catch_addresses(self, addresses: Iterable[str]) -> None:
        """The addresses whose connects are rewritten from any network namespace (the
        host's bridge addresses), replacing the previous set address by address. An IPv4
        address also catches its IPv4-mapped IPv6 form. ValueError for a bad address."""
        fd = self._fd("catch_addrs")
        wanted = {layout.addr_key(a) for a in addresses}
        for key in map_keys(fd, layout.ADDR_KEY.size):
            if key not in wanted:
                map_delete(fd, key)
        for key in wanted:
            map_update(fd, key, b"\x01")

    def catch_addresses(self) -> set[str]:
        return {layout.unpack_addr_key(k) for k in map_keys(self._fd("catch_addrs"), layout.ADDR_KEY.size)}

    # ------------------------------------------------------------------ what the kernel saw

    def ejected(self) -> dict[tuple[str, int], float]:
        """``{(ip, port): seconds left}`` of the backends the kernel skips now."""
        fd, out = self._fd("ejected"), {}
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns()'s clock
        for key in map_keys(fd, layout.EJECT_KEY.size):
            value = map_lookup(fd, key, layout.EJECT_VALUE.size)
            if value is None:
                continue
            (until,) = layout.EJECT_VALUE.unpack(value)
            if until > now:
                out[layout.unpack_eject_key(key)] = (until - now) / 1e9
        return out

    def clear_ejection(self, ip: str, port: int) -> bool:
        """Let a backend be chosen again now (e.g. an active health check saw it up)."""
        return map_delete(self._fd("ejected"), layout.eject_key(ip, port))

    def _write_config(self) -> None:
        map_update(self._fds["config"], (0).to_bytes(4, "little"), layout.CONFIG.pack(self.netns_cookie, self._flags))

    def set_connection_events(self, on: bool) -> None:
        """An event for every connection's end (for its log line), or (off, the default)
        only for failed connects and ejections. Either way every connection is counted
        in :meth:`connection_stats`."""
        self._flags = layout.CONFIG_CONNECTION_EVENTS if on else 0
        self._write_config()

    def connection_stats(self) -> dict[tuple[int, int, tuple[str, int]], layout.ConnStats]:
        """``{(route port, scope, (backend ip, port)): ConnStats}``: every established
        connection that ended since the plane was made, summed over CPUs. The kernel map
        forgets the longest unused key when full (16,384 keys)."""
        fd, ncpu, out = self._fd("conn_stats"), possible_cpus(), {}
        for key in map_keys(fd, layout.STAT_KEY.size):
            value = map_lookup(fd, key, layout.STAT_VALUE.size * ncpu)
            if value is not None:
                out[layout.unpack_stat_key(key)] = layout.sum_stats(value)
        return out

    def counters(self) -> dict[str, int]:
        """The kernel's counters, summed over CPUs: ``rewritten`` connects, ``no_backend``
        (a route matched, nothing usable: passed untouched), ``all_ejected`` (picked
        among ejected backends), ``no_storage`` (rewritten, but unobserved: no memory
        for socket storage), ``events_lost`` (the ring buffer was full)."""
        fd, ncpu, out = self._fd("counters"), possible_cpus(), {}
        for index, name in enumerate(layout.COUNTERS):
            raw = map_lookup(fd, index.to_bytes(4, "little"), layout.COUNTER.size * ncpu) or b""
            out[name] = sum(v for (v,) in layout.COUNTER.iter_unpack(raw))
        return out

    def read_events(self) -> list[Event]:
        """Every event waiting in the ring buffer, oldest first, without blocking."""
        if self._ring is None:
            raise ConnectPlaneError("the connect plane is closed")
        self._ring.consume()
        records, self._pending[:] = list(self._pending), []
        return [layout.unpack_event(r) for r in records]

    async def events(self) -> AsyncIterator[Event]:
        """The events as they come, under trio: wait until the ring buffer's epoll
        descriptor is readable, then read every record. One task at a time. The ring
        holds about 9,000 events; when nobody reads them, new ones are dropped and
        counted (``counters()["events_lost"]``), the connections are not affected.
        ``close()`` from another task ends a waiting one with trio.ClosedResourceError."""
        import trio

        if self._ring is None:
            raise ConnectPlaneError("the connect plane is closed")
        fd = self._ring.fileno()
        while True:
            for event in self.read_events():
                yield event
            # Woken when 64 KiB of events piled up (or an ejection came): else read what
            # is there every READ_INTERVAL (connect.bpf.c, WAKE_BYTES, says why).
            with trio.move_on_after(READ_INTERVAL):
                await trio.lowlevel.wait_readable(fd)
