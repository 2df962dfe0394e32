"""What the resolver tests against a real registry (tests/test_consul.py, tests/test_etcd.py)
share: :class:`Watch`, which runs a resolver's ``watch()`` and records every backend set it
publishes, with trio timestamps, so that a test can wait for a set and time a change.

Each test file subclasses it with its own ``change()``, the timed change and its limit as
that file's issue states it (measured from the registry call's return for Consul, from
its start for etcd); both build on :meth:`Watch.timed_change`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
import trio

from ambassadord.backends import BackendSet

TIMEOUT = 10.0  # default deadline of every wait on the watch


def addrs(backends) -> set[tuple[str, int]]:
    """The (address, port) pairs of some backends."""
    return {(b.address, b.port) for b in backends}


async def call(fn, *args, **kw):
    """A blocking call (an HTTP request, an etcdctl run) from a trio test, in a worker thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw))


class Watch:
    """Runs ``resolver.watch`` and records what it publishes, with trio timestamps.

    ``name`` heads its messages; ``published`` is every (time, set) so far, ``latencies``
    what ``change()`` measured.
    """

    def __init__(self, resolver, name: str):
        self.resolver = resolver
        self.name = name
        self.published: list[tuple[float, BackendSet]] = []
        self._event = trio.Event()
        self.latencies: list[tuple] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Watch]:
        """``resolver.watch(self.publish)`` in a nursery for the block; cancelled at its end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.resolver.watch, self.publish)
            yield self
            nursery.cancel_scope.cancel()

    def publish(self, backend_set: BackendSet) -> None:
        self.published.append((trio.current_time(), backend_set))
        event, self._event = self._event, trio.Event()
        event.set()

    @property
    def last(self) -> BackendSet:
        return self.published[-1][1]

    def history(self) -> str:
        return "\n".join(f"  {t:9.3f} {sorted(addrs(s))} stale={s.stale} error={s.error!r}" for t, s in self.published)

    def _counters(self) -> str:
        counters = [f"failures={self.resolver.failures}"]
        if hasattr(self.resolver, "compactions"):  # the etcd resolver's
            counters.append(f"compactions={self.resolver.compactions}")
        return ", ".join(counters)

    async def until(self, pred, what: str, *, start: int = 0, timeout: float = TIMEOUT) -> tuple[float, BackendSet]:
        """The first set published at position ``start`` or later for which ``pred`` holds."""
        i = start
        with trio.move_on_after(timeout):
            while True:
                while i < len(self.published):
                    t, s = self.published[i]
                    i += 1
                    if pred(s):
                        return t, s
                await self._event.wait()
        pytest.fail(f"{self.name}: no published set {what} within {timeout:g}s; {self._counters()}; "
                    f"published:\n{self.history()}")

    async def fresh(self, expected: set, what: str, *, start: int = 0, timeout: float = TIMEOUT):
        # a fresh set has no error, except the explanation an empty one carries
        return await self.until(lambda s: addrs(s) == expected and not s.stale
                                and (s.error is None if expected else s.error.startswith("no ")),
                                f"{sorted(expected)} (fresh) after {what}", start=start, timeout=timeout)

    async def timed_change(self, what: str, expected: set,
                           calls: Iterable[Callable[[], object]]) -> tuple[float, float]:
        """Run the blocking ``calls`` one after the other (in a worker thread); wait for the
        fresh set ``expected`` published after the first one started.

        Returns the times from the last call's return and from the first call's start to
        that publish.
        """
        mark = len(self.published)
        started = trio.current_time()
        for fn in calls:
            await call(fn)
        returned = trio.current_time()
        t, _ = await self.fresh(expected, what, start=mark)
        return t - returned, t - started
