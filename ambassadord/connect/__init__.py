"""Connect mode: the consumer's connect() is rewritten in the kernel to a live backend.

No proxy sits in the path: cgroup BPF programs pick the backend when the consumer calls
connect(), and from then on the consumer talks to the backend directly.

How the pieces fit:

* ``connect.bpf.c``: the programs (cgroup/connect4, connect6, getpeername4,
  getpeername6, sockops), in C; ``connect.bpf.o`` is the compiled object, committed
  (``scripts/build-bpf`` rebuilds it, byte for byte).
* ``layout``: every map key and value and the ring buffer's records, packed and
  unpacked (pure); the :class:`Backend` and event dataclasses.
* ``libbpf``: the system's libbpf through ctypes (load, attach, maps, ring buffer).
* ``cgroup``: where cgroup v2 is mounted (pure) and the network namespace cookie.
* ``plane``: :class:`ConnectPlane`, which owns the programs and maps on one cgroup.

The API (everything a daemon needs)::

    ConnectPlane(cgroup_dir: str, *, netns_cookie: int | None = None, object_path=None)
        .set_route(port, backends: Sequence[Backend], *, scope=0, balance="random",
                   eject_for: float, connect_timeout: float) -> None
        .remove_route(port, scope=0) -> bool
        .routes() -> {(port, scope): (backends, settings)}
        .set_catch_addresses(addresses: Iterable[str]) -> None;  .catch_addresses() -> set[str]
        .ejected() -> {(ip, port): seconds left};  .clear_ejection(ip, port) -> bool
        .counters() -> {name: count}
        .read_events() -> list[Event];  async .events() -> AsyncIterator[Event]   (trio)
        .close();  context manager
    Backend(ip: str, port: int, weight: int = 1, priority: int = 0)
    Event = ConnectionEnded | BackendEjected
    ConnectPlaneError;  find_cgroup2_mount(proc_mounts_text) -> str;  cgroup2_mount() -> str
    netns_cookie(sock=None) -> int;  netns_cookie_at(path) -> int   (a route's scope)
"""

from .cgroup import cgroup2_mount, find_cgroup2_mount, netns_cookie, netns_cookie_at
from .layout import MAX_BACKENDS, Backend, BackendEjected, ConnectionEnded, Event
from .plane import ConnectPlane, ConnectPlaneError

__all__ = [
    "MAX_BACKENDS", "Backend", "BackendEjected", "ConnectPlane", "ConnectPlaneError", "ConnectionEnded", "Event",
    "cgroup2_mount", "find_cgroup2_mount", "netns_cookie", "netns_cookie_at",
]
