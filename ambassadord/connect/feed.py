"""Connect mode's daemon side: backend sets into the kernel, the kernel's news into counters.

The routes' resolvers, health checks and reloads run in the Server as in proxy mode; the
Server tells a :class:`peers.Peers` about each (peers.py). :class:`ConnectFeed` is one:
for every route whose ``mode`` is ``connect`` it writes the live backends into the
ConnectPlane's maps (plane.py), a whole set in one map update, so no connect sees half of
a change. Backends that the route's health checks say are down are left out (all of them
down: all are kept, as the proxy's balancer does).

Its ``run()`` task reads what the kernel counted (conn_stats: connections established,
ended, reset, and bytes, per route and backend) into the routes' counters every second
(open connections included), and the plane's
events: a failed connect becomes a backend failure and an ejection, shown by /routes and
the metrics like one of the proxy's; when connection lines are logged (INFO), every
connection's end is an event too, for its one log line with the proxy's fields.

Pure except for the plane it is given, so tests drive it with a recording stand-in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import trio

from ..peers import Peers
from ..stats import Outcome

log = logging.getLogger("ambassadord")
conn_log = logging.getLogger("ambassadord.conn")  # the proxy's too (server.py): one --log-connections

CONNECT = "connect"


def kernel_set(backends: Sequence, down: Iterable = (), *, limit: int) -> tuple[list, list]:
    """(kept, dropped): the backends to write into a route's map value, in the resolver's
    order, without the ones ``down`` (unless that is all of them), at most ``limit``
    (the lowest priorities first; the rest in ``dropped``)."""
    down = frozenset(down)
    up = [b for b in backends if b not in down] or list(backends)
    ordered = sorted(up, key=lambda b: b.priority)  # stable: the resolver's order within a priority
    return ordered[:limit], ordered[limit:]


class ConnectFeed(Peers):
    """The connect-mode routes' sets into ``plane``; its events into the routes' counters.

    Args:
        plane: a ConnectPlane (or a stand-in with its methods).
        configs: the routes at start (every mode: only ``connect`` ones are fed).
        table: ``() -> RouteTable``, the server's current table.
        backend: makes the plane's backend value from (ip, port, weight, priority).
        limit: backends one route's map value holds.
    """

    def __init__(self, plane, configs, table: Callable, *, backend: Callable, limit: int):
        self.plane = plane
        self._table = table
        self._by_key: tuple = (None, {})  # (the table, its routes by key): made again after a reload
        self._counted: dict = {}  # the kernel's totals at the last look (apply_stats)
        self._backend = backend
        self._limit = limit
        self._configs = {c.key: c for c in configs if c.mode == CONNECT}
        self._sets: dict = {}
        self._down: dict = {}
        self._warned: set = set()
        # Routes limited to a source network: the netns cookies they cover (scopes.py),
        # and for every route, the scopes its set is written under now (0: host-wide).
        self._scopes: dict = {}
        self._written: dict = {}

    @property
    def scoped_keys(self) -> list:
        """The connect routes limited to a source network (scopes.py looks for them)."""
        return [key for key in self._configs if key[1] is not None]

    def set_scopes(self, scopes: dict) -> None:
        """``{route key: {netns cookie, ...}}`` (scopes.assign) as found now."""
        old, self._scopes = self._scopes, scopes
        for key in self._configs:
            if key[1] is not None and old.get(key, set()) != scopes.get(key, set()) and key in self._sets:
                self._write(key)

    # ---- what the server tells ----------------------------------------------------------

    def routes(self, configs) -> None:
        new = {c.key: c for c in configs if c.mode == CONNECT}
        for key in self._configs.keys() - new.keys():
            for scope in self._written.pop(key, ()):
                self.plane.remove_route(key[0], scope)
            self._sets.pop(key, None)
            self._down.pop(key, None)
        old, self._configs = self._configs, new
        for key, cfg in new.items():
            if key in self._sets and (key not in old or not old[key].same_route(cfg)):
                self._write(key)

    def backends(self, key, bset) -> None:
        if key in self._configs:
            self._sets[key] = bset
            self._write(key)

    def down(self, key, down: frozenset) -> None:
        if key in self._configs:
            self._down[key] = down
            if key in self._sets:
                self._write(key)

    def _write(self, key) -> None:
        cfg, bset = self._configs[key], self._sets[key]
        kept, dropped = kernel_set(bset.backends, self._down.get(key, ()), limit=self._limit)
        if dropped and (key, len(dropped)) not in self._warned:
            self._warned.add((key, len(dropped)))
            log.warning("route %s: connect mode holds %d backends per route; left out: %s",
                        cfg.describe(), self._limit, ", ".join(map(str, dropped)))
        scopes = {0} if cfg.source is None else set(self._scopes.get(key, ()))
        try:
            backends = [self._backend(b.address, b.port, b.weight, b.priority) for b in kept]
            for scope in sorted(scopes):
                self.plane.set_route(cfg.port, backends, scope=scope, balance=cfg.balance, eject_for=cfg.eject_for,
                                     connect_timeout=cfg.connect_timeout)
        except (ValueError, OSError) as exc:  # a value the kernel's layout cannot hold, a full map
            log.error("route %s: connect mode cannot take this backend set (%s); the kernel keeps the one before",
                      cfg.describe(), exc)
            return
        for scope in self._written.get(key, set()) - scopes:
            self.plane.remove_route(cfg.port, scope)
        self._written[key] = scopes

    # ---- what the kernel tells ----------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Every connection's end is an event only when its log line is wanted; the counts
        # come from the kernel's conn_stats either way (at churn rates, an event costs the
        # daemon more CPU than the connection costs the kernel).
        self.plane.set_connection_events(conn_log.isEnabledFor(logging.INFO))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_events)
            nursery.start_soon(self._read_stats)
            task_status.started()

    async def _read_events(self) -> None:
        async for event in self.plane.events():
            try:
                self.account(event)
            except Exception:  # one bad event must not stop the counting
                log.exception("connect mode: could not account for %r", event)

    async def _read_stats(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            try:
                self.apply_stats(self.plane.connection_stats())
            except Exception:
                log.exception("connect mode: could not read the kernel's connection counts")

    def _route_of(self, port: int, scope: int):
        """The Route that the kernel's (route port, scope) stands for now, or None."""
        for key, scopes in self._written.items():
            if key[0] == port and scope in scopes:
                return self._routes_by_key().get(key)
        return None

    def _routes_by_key(self) -> dict:
        """The server's current table by route key (made again after a reload)."""
        table = self._table()
        if self._by_key[0] is not table:
            self._by_key = (table, {r.config.key: r for r in table.routes})
        return self._by_key[1]

    def apply_stats(self, stats: dict) -> None:
        """The kernel's totals (plane.connection_stats()) into the routes' counters: what
        was added since the last look, and how many are open now."""
        now, seen, open_now = time.time(), {}, {}
        for where, total in stats.items():
            seen[where] = total
            route = self._route_of(where[0], where[1])
            if route is None or route.config.mode != CONNECT:
                continue
            backend = _find(route, where[2])
            name = str(backend) if backend is not None else _addr(where[2])
            st = route.stats
            before = self._counted.get(where)
            if before is None or any(a < b for a, b in zip(_fields(total), _fields(before))):
                before = None  # new, or the kernel forgot and started again: all of it is new
            ok, reset, up, down = (a - b for a, b in zip(_fields(total), _fields(before) if before else (0, 0, 0, 0)))
            if ok or reset or up or down or total.open:
                b = st.backend(name, backend)
                b.active = total.open
                open_now[route] = open_now.get(route, 0) + total.open
            if not (ok or reset or up or down):
                continue
            st.outcomes[Outcome.OK] = st.outcomes.get(Outcome.OK, 0) + ok
            if reset:
                st.outcomes[Outcome.RESET] = st.outcomes.get(Outcome.RESET, 0) + reset
            st.up += up
            st.down += down
            b.connections += ok + reset
            b.up += up
            b.down += down
            b.last_connect = now
        for route in self._routes_fed():
            route.stats.active = open_now.get(route, 0)
            if route not in open_now:
                for b in route.stats.backends.values():
                    b.active = 0
        self._counted = seen

    def _routes_fed(self) -> list:
        """The Routes of the connect-mode routes written into the kernel now."""
        by_key = self._routes_by_key()
        return [r for key in self._written if (r := by_key.get(key)) is not None]

    def account(self, event) -> None:
        """One event of the plane (layout.py): a connection that ended (or whose connect
        failed), or a backend the kernel ejected. An established connection is counted by
        apply_stats(); here it only gets its log line."""
        route = self._route_of(event.route_port, event.scope)
        if route is None or route.config.mode != CONNECT:
            return  # a route removed since (or changed to proxy): nothing to count it in
        backend = _find(route, event.backend)
        key = str(backend) if backend is not None else _addr(event.backend)
        if not hasattr(event, "outcome"):  # BackendEjected
            ejected = route.pick.ejections.eject(backend, time.monotonic(), route.config.eject_for) \
                if backend is not None else None
            log.warning("route %s: backend %s failed; %s", route.name, key,
                        "still ejected" if ejected is None else f"ejected for {ejected:g}s",
                        extra={"fields": {"event": "backend-ejected", "route": route.name, "backend": key,
                                          "mode": CONNECT}})
            return
        if event.outcome in _CONNECTED:
            outcome, error = (Outcome.OK if event.outcome == "ok" else Outcome.RESET), None
        else:
            st = route.stats
            st.active += 1  # counted at its end: the kernel reports a connection once
            st.connect_failed(st.backend(key, backend), event.outcome, time.time())
            st.closed(Outcome.CONNECT_FAILED, None, None)
            outcome, error = Outcome.CONNECT_FAILED, event.outcome
        # As the proxy's: a reset is the peers' business (INFO); a failed connect, a WARNING.
        level = logging.WARNING if outcome == Outcome.CONNECT_FAILED else logging.INFO
        if conn_log.isEnabledFor(level):
            fields = {"event": "connection", "src": _addr(event.source), "port": event.dialled[1],
                      "route": route.name, "backend": key, "up": event.bytes_acked, "down": event.bytes_received,
                      "mode": CONNECT}
            if error is not None:
                fields["error"] = error
            fields["duration"] = round(event.duration, 6)
            fields["outcome"] = str(outcome)
            conn_log.log(level, "connection", extra={"fields": fields})


# What the kernel says of a connection that was established ("reset": it ended in a RST).
_CONNECTED = ("ok", "reset")
# How often the kernel's counts are read into the routes' (metrics lag by at most this).
STATS_INTERVAL = 1.0


def _fields(stats) -> tuple[int, int, int, int]:
    return stats.ok, stats.reset, stats.bytes_acked, stats.bytes_received


def _find(route, addr):
    """The Backend of ``route``'s current set at ``addr`` (ip, port), or None."""
    ip, port = addr
    for b in route.backends.backends:
        if b.port == port and b.address == ip:
            return b
    return None


def _addr(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
