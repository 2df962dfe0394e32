"""What a Server tells the other processes of its daemon (--workers), and the no-op it
tells when there are none.

The server does not know who listens. In the main process of ``--workers N`` it is the
WorkerPool (workers/pool.py), which passes the news on to every helper; in a helper it is
the link to the main process (workers/helper.py), which passes on only what the helper
found out itself (an ejection). With ``--workers 1`` it is ``NO_PEERS``.

This module imports nothing of ambassadord: server.py and the workers package both depend
on it, and never on each other (the pool once held the Server, and server.py imported the
pool to find it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ambassadord.backends.interface import Backend, BackendSet

    from .routes import RouteConfig


class Peers:
    """The other processes of this daemon, as a Server sees them; every method does nothing.

    The telling methods are synchronous and must not block: a resolver's publish and a
    connection's failover call them. An implementation queues and returns.
    """

    def routes(self, configs: list[RouteConfig]) -> None:
        """A reload: this process serves ``configs`` from now on."""

    def backends(self, key, bset: BackendSet) -> None:
        """The resolver of route ``key`` (RouteConfig.key) published ``bset``."""

    def ejected(self, key, backend: Backend, duration: float) -> None:
        """This process ejected ``backend`` of route ``key`` for ``duration`` seconds."""

    def down(self, key, down: frozenset) -> None:
        """The health checks of route ``key`` say that ``down`` are down (health.py)."""

    def stop(self) -> None:
        """The server stops accepting; open connections get the grace period."""

    def abort(self) -> None:
        """The server stops at once, open connections too."""

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run beside the server: started before it listens (the server waits for
        ``started``); an exception here stops the server."""
        task_status.started()

    async def wait_closed(self, timeout: float) -> None:
        """After the server's grace period: wait up to ``timeout`` s for the peers to end."""


NO_PEERS = Peers()


class Fanout(Peers):
    """Several listeners as one: the --workers pool and connect mode's feed (connect/feed.py)
    both hear what the server tells."""

    def __init__(self, *peers: Peers):
        self.peers = peers

    def routes(self, configs) -> None:
        for p in self.peers:
            p.routes(configs)

    def backends(self, key, bset) -> None:
        for p in self.peers:
            p.backends(key, bset)

    def ejected(self, key, backend, duration: float) -> None:
        for p in self.peers:
            p.ejected(key, backend, duration)

    def down(self, key, down: frozenset) -> None:
        for p in self.peers:
            p.down(key, down)

    def stop(self) -> None:
        for p in self.peers:
            p.stop()

    def abort(self) -> None:
        for p in self.peers:
            p.abort()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for p in self.peers:
                await nursery.start(p.run)
            task_status.started()

    async def wait_closed(self, timeout: float) -> None:
        for p in self.peers:  # each bounds its own wait (the pool then kills what is left)
            await p.wait_closed(timeout)


def fanout(*peers: Peers | None) -> Peers:
    """The one Peers that tells each of ``peers`` (None: absent)."""
    present = [p for p in peers if p is not None and p is not NO_PEERS]
    if not present:
        return NO_PEERS
    return present[0] if len(present) == 1 else Fanout(*present)
