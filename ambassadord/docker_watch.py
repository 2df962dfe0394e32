"""``--docker``: the engine's containers, as the routes need them, kept fresh.

:class:`ContainerWatch` keeps one :class:`~ambassadord.containers.Container` per container
the engine has (running, or created and not started yet), and tells the daemon (``apply``,
a reload with a reason) whenever what they declare or where they are changes. The daemon
then reads every route source again, this one included (sources.ContainerRoutes).

How it stays right:

* **Subscribe, then list.** The event stream is opened first and the containers listed
  after, so that nothing that happens in between is missed (an event for a container the
  list already showed is harmless: it is inspected again).
* **Events.** ``create`` (labels and env are known before the container runs: its ports
  are redirected before it starts), ``start``, ``die`` (its addresses go, its ports stay),
  ``destroy`` (it goes), ``rename``, and ``network connect`` / ``disconnect``. Each
  inspects the container again; nothing else is read per event.
* **A container's first connection** (:meth:`first_seen`): a connection from an address
  the watch does not know may come from a container that started a millisecond ago, before
  its ``start`` event arrived. The server asks the watch first: the running containers are
  listed, the new ones inspected, the routes applied, and only then is the connection
  routed (at most :data:`LOOKUP_WAIT` seconds). Addresses that belong to no container are
  remembered until the containers next change, so a host's own connections cost one
  listing, not one per connection.
* **The engine goes away** (restart, upgrade): the last known routes stay, the loss is
  logged once, and the watch reconnects with a backoff (:data:`BACKOFF`), lists again and
  applies what changed meanwhile.
* **Bad declarations** are logged once per container (with its name and the key); its
  other routes count (containers.py).

Errors: only ``docker_api.DockerError`` is expected from the engine; anything else is a
bug, logged with its traceback, and treated as a lost engine (the watch goes on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from .config import RouteDefaults
from .containers import Container, container_routes, declared, from_inspect, listed_addresses, mapping
from .docker_api import DockerClient, DockerError, Endpoint
from .routes import client_address

log = logging.getLogger("ambassadord")

# Seconds between attempts to reach a lost engine: doubling from the first to the second.
BACKOFF = (0.5, 10.0)
# How long a connection from an unknown address waits for Docker's answer (a listing and
# an inspect or two: milliseconds, unless the engine hangs).
LOOKUP_WAIT = 2.0
# Container events that change what it declares or where it is; "die" and "destroy" are
# handled on their own.
_INSPECT_ON = frozenset({"create", "start", "restart", "unpause", "rename", "update"})
# How many reasons a reload line names before "and N more".
_REASONS_SHOWN = 3


def _declares(c: Container) -> bool:
    """Does it declare a port (its routes, or its redirected ports, change with it)?"""
    return bool(declared(c)[0])


class ContainerWatch:
    """The containers of one Docker engine (the module's docstring says how).

    Args:
        endpoint: where the engine's API is (docker_api.endpoint()).
        apply: re-read the routes; awaited with a reason, one call at a time.
        client: makes the API client (a test seam; docker_api.DockerClient by default).
    """

    def __init__(self, endpoint: Endpoint, apply: Callable[[str], Awaitable[None]], *,
                 client: Callable[[Endpoint], DockerClient] = DockerClient):
        self.endpoint = endpoint
        self._make_client = client
        self._apply = apply
        self.containers: dict[str, Container] = {}
        self.connected = False
        self.engine = ""  # "24.0.7 (API 1.43)" once connected
        self.error: str | None = None  # why the engine is not connected (None: it is)
        self.lost_at: float | None = None  # wall clock of the loss
        self._client: DockerClient | None = None
        self._known: set[str] = set()  # every address of every container
        self._routed: set[str] = set()  # the same, as of the last change applied
        self._strangers: set[str] = set()  # asked about; no container has them (until a change)
        self._lookup_lock = trio.Lock()
        self._changes = 0  # counts changes of self.containers
        self._applied = 0  # the last change that apply() saw
        self._applied_event = trio.Event()
        self._reasons: list[str] = []
        self._wake = trio.Event()
        self._announced: dict[str, tuple] = {}  # id -> the (labels, env) whose problems were logged
        self._inspections: trio.Nursery | None = None  # one task per container being inspected
        self._inspecting: dict[str, str] = {}  # id -> why it must be inspected (again) once that ends
        self._starting: set[str] = set()  # created or started, no address seen yet

    # ---- what the daemon reads ----------------------------------------------------

    def snapshot(self) -> tuple[Container, ...]:
        """The containers now, for sources.ContainerRoutes."""
        return tuple(self.containers.values())

    def declared_ports(self) -> set[int]:
        """Every port some container declares, running or not yet started (its ports are
        redirected from its ``create`` event on, before its first connection)."""
        return {port for c in self.containers.values() for port in declared(c)[0]}

    def first_seen(self, addr: str) -> Callable[[], Awaitable[None]] | None:
        """None if connections from ``addr`` can be routed now; else a coroutine function
        to await first, which asks Docker about ``addr`` (the module's docstring says why).
        Cheap: set lookups on every connection."""
        addr = client_address(addr)
        if addr is None or addr in self._routed or addr in self._strangers:
            return None
        if addr in self._known:  # a container's address whose routes are being applied
            return self._until_applied
        if self._client is None:  # the engine is away: nobody to ask
            return None
        return lambda: self._look_up(addr)

    def status(self) -> dict:
        """For /routes and the status page."""
        return {"url": self.endpoint.url, "connected": self.connected, "engine": self.engine or None,
                "error": self.error, "lost_at": self.lost_at, "containers": len(self.containers),
                "declaring": sum(1 for c in self.containers.values() if declared(c)[0])}

    # ---- running --------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow the engine until cancelled. ``started`` once the first listing was applied
        or the first attempt failed: the daemon serves either way."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._apply_loop)
            delay, started = BACKOFF[0], False

            def ready() -> None:
                nonlocal started
                if not started:
                    started = True
                    task_status.started()

            while True:
                try:
                    async with self._make_client(self.endpoint) as client:
                        await self._follow(client, ready)
                    why = "the event stream ended"
                except DockerError as exc:
                    why = str(exc)
                except Exception as exc:  # a bug of ours or the client's: logged, retried
                    log.exception("docker: watching %s failed", self.endpoint.url)
                    why = f"{type(exc).__name__}: {exc}"
                if self.connected:
                    delay = BACKOFF[0]
                self._lost(why)
                ready()
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF[1])

    async def _follow(self, client: DockerClient, ready: Callable[[], None]) -> None:
        """Subscribe, list, apply; then follow the events until the stream breaks."""
        version = await client.version()
        # dockerd answers the subscription a moment before it subscribes: events since a
        # second ago are replayed, so none falls in between (one seen twice is harmless).
        async with client.events(since=time.time() - 1) as events:
            await self._resync(client)
            self._client = client
            was_lost = self.error is not None
            self.connected, self.error, self.lost_at = True, None, None
            self.engine = f"{version.get('Version', '?')} (API {version.get('ApiVersion', '?')})"
            log.info("docker: %s %s at %s: %d container(s), %d declaring routes",
                     "reconnected to" if was_lost else "following", self.engine, self.endpoint.url,
                     len(self.containers), self.status()["declaring"])
            self._changed("containers listed")
            await self._wait_applied(self._changes)
            ready()
            try:
                async with trio.open_nursery() as self._inspections:
                    async for event in events:
                        self._on_event(client, event)
                    self._inspections.cancel_scope.cancel()
            finally:
                self._client = None
                self._inspecting.clear()

    def _lost(self, why: str) -> None:
        first = self.connected or self.error is None
        self.connected, self._client = False, None
        if first:
            self.lost_at = time.time()
            log.warning("docker: lost the engine at %s (%s); keeping the routes of %d container(s) until it is "
                        "back; retrying every %g-%gs", self.endpoint.url, why, len(self.containers), *BACKOFF,
                        extra={"fields": {"event": "docker-lost", "error": why}})
        elif why != self.error:
            log.warning("docker: still cannot reach %s: %s", self.endpoint.url, why)
        self.error = why

    # ---- keeping the containers ----------------------------------------------------

    async def _resync(self, client: DockerClient) -> None:
        """Every container anew: the listing, and an inspect of each one that is new or
        whose addresses changed; those gone are dropped."""
        fresh: dict[str, Container] = {}
        for cid, kept in self._listed(await client.containers()):
            found = kept or await self._inspect(client, cid)
            if found is not None:
                fresh[cid] = found
        gone = [c for cid, c in self.containers.items() if cid not in fresh]
        for c in gone:
            log.info("docker: %s is gone", c.describe())
        self.containers = fresh
        self._reindex()

    async def _inspect(self, client: DockerClient, cid: str) -> Container | None:
        doc = await client.inspect(cid)
        if doc is None:
            return None
        found = from_inspect(doc)
        if self._announced.get(cid) != (found.labels, found.env):
            self._announced[cid] = (found.labels, found.env)
            self._announce(found)
        return found

    def _announce(self, c: Container) -> None:
        """Say once what a container declares, and what of it is wrong. Checked with a
        placeholder address, so that a container not started yet is checked too; its real
        routes come with its addresses."""
        ports = declared(c)[0]
        _, problems = container_routes(Container(c.id, c.name, ("192.0.2.1",), c.labels, c.env), RouteDefaults())
        for problem in problems:
            log.warning("docker: %s", problem, extra={"fields": {"event": "docker-bad-declaration"}})
        if ports:
            log.info("docker: %s declares %s", c.describe(), ", ".join(
                f"{port}={spec} ({where.rsplit(': ', 1)[-1]})" for port, (spec, where) in sorted(ports.items())))

    def _on_event(self, client: DockerClient, event: dict) -> None:
        """One event: what it says for sure applied now; an inspect, when needed, started
        beside the stream (dockerd answers an inspect of a starting container only once
        its start is over, and the events after it must not wait that long)."""
        kind, action = event.get("Type"), str(event.get("Action", ""))
        actor = mapping(event.get("Actor"))
        if kind == "network" and action in ("connect", "disconnect"):
            cid = str(mapping(actor.get("Attributes")).get("container", ""))
            why = f"network {action}"
        elif kind == "container":
            cid, why = str(actor.get("ID") or event.get("id") or ""), action
        else:
            return
        if not cid:
            return
        old = self.containers.get(cid)
        if kind == "container" and action in ("create", "start", "restart"):
            self._starting.add(cid)  # until it has an address
        if kind == "container" and action in ("die", "destroy"):
            self._starting.discard(cid)
        if kind == "container" and action == "destroy":
            self._announced.pop(cid, None)
            if old is not None:
                del self.containers[cid]
                self._changed(f"{old.describe()} removed", _declares(old))
            return
        if kind == "container" and action == "create" and old is None:
            # Its labels come with the event: the ports it declares by label are
            # redirected now, before it runs (its env comes with the inspect).
            attributes = mapping(actor.get("Attributes"))
            labels = {k: str(v) for k, v in attributes.items() if k.startswith("connect.")}
            if labels:
                created = Container(cid, str(attributes.get("name", cid[:12])), (), labels, {})
                self.containers[cid] = created
                self._changed(f"{created.describe()} created")
        if kind == "container" and action == "die":
            if old is not None and old.addresses:
                self.containers[cid] = Container(old.id, old.name, (), old.labels, old.env)
                self._changed(f"{old.describe()} stopped", _declares(old))
            return
        if kind == "container" and action not in _INSPECT_ON:
            return
        self._inspect_soon(client, cid, why)

    def _inspect_soon(self, client: DockerClient, cid: str, why: str) -> None:
        """Inspect ``cid`` in a task of its own; one at a time per container (one asked for
        meanwhile runs once the current one is over)."""
        if cid in self._inspecting:
            self._inspecting[cid] = why
            return
        self._inspecting[cid] = ""

        async def inspect() -> None:
            reason = why
            try:
                while True:
                    await self._update(client, cid, reason)
                    reason = self._inspecting[cid]
                    if not reason:
                        return
                    self._inspecting[cid] = ""
            except DockerError as exc:  # the stream notices a lost engine; this one only logs
                log.warning("docker: cannot inspect container %s: %s", cid[:12], exc)
            except Exception:  # an answer we cannot read: this container's problem, not the watch's
                log.exception("docker: container %s: cannot read what the engine says of it", cid[:12])
            finally:
                self._inspecting.pop(cid, None)

        self._inspections.start_soon(inspect)

    async def _update(self, client: DockerClient, cid: str, why: str) -> None:
        found = await self._inspect(client, cid)
        old = self.containers.get(cid)
        if found is None:
            self._starting.discard(cid)
            if old is not None:
                del self.containers[cid]
                self._changed(f"{old.describe()} removed", _declares(old))
            return
        if found == old:
            return
        self.containers[cid] = found
        if found.addresses:
            self._starting.discard(cid)
        self._changed(f"{found.describe()}: {why}", _declares(found) or (old is not None and _declares(old)))

    # ---- applying ---------------------------------------------------------------------

    def _reindex(self) -> None:
        self._known = {a for c in self.containers.values() for a in c.addresses}
        self._strangers.clear()

    def _changed(self, reason: str, declaring: bool = True) -> None:
        """The containers changed; if it changes routes or redirected ports (a container
        that declares something, now or before), the routes are applied again."""
        self._reindex()
        if not declaring:  # its addresses are known now; no route to apply
            if self._applied == self._changes:
                self._routed = set(self._known)
            return
        self._changes += 1
        self._reasons.append(reason)
        self._wake.set()

    async def _apply_loop(self) -> None:
        """Apply changes one reload at a time; a burst (``compose up``) is one reload."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            upto, known, reasons, self._reasons = self._changes, set(self._known), self._reasons, []
            more = len(reasons) - _REASONS_SHOWN
            why = "docker: " + "; ".join(reasons[:_REASONS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
            try:
                await self._apply(why)
            finally:
                self._applied, self._routed = upto, known
                self._applied_event.set()
                self._applied_event = trio.Event()

    async def _until_applied(self) -> None:
        """Wait (at most LOOKUP_WAIT) until the changes made so far are applied."""
        with trio.move_on_after(LOOKUP_WAIT):
            await self._wait_applied(self._changes)

    async def _wait_applied(self, change: int) -> None:
        while self._applied < change:
            await self._applied_event.wait()

    async def _look_up(self, addr: str) -> None:
        """Ask Docker about ``addr``; return once its routes (if any) are applied."""
        with trio.move_on_after(LOOKUP_WAIT):
            async with self._lookup_lock:  # the first connections of one container share a listing
                client = self._client
                if addr in self._known or addr in self._strangers or client is None:
                    pass
                else:
                    try:
                        await self._refresh(client)
                    except DockerError as exc:
                        log.debug("docker: looking up %s: %s", addr, exc)
                        return
                    if addr not in self._known:
                        self._strangers.add(addr)
                        return
            if addr in self._known:
                await self._wait_applied(self._changes)

    async def _refresh(self, client: DockerClient) -> None:
        """The containers being started, and the running ones that are new or whose
        addresses changed, inspected (dockerd lists a container as running only a little
        after its process started)."""
        for cid in list(self._starting):
            await self._update(client, cid, "first connection")
        for cid, kept in self._listed(await client.containers()):
            if kept is None:
                await self._update(client, cid, "first connection")

    def _listed(self, entries) -> list[tuple[str, Container | None]]:
        """``(id, the container as known)`` of each entry of a listing that is a container
        as Docker describes one; None where it is new or its addresses changed (it needs an
        inspect)."""
        found = []
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict) or not entry.get("Id"):
                continue
            cid, old = str(entry["Id"]), self.containers.get(str(entry["Id"]))
            found.append((cid, old if old is not None and old.addresses == listed_addresses(entry) else None))
        return found

