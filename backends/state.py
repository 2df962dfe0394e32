"""What every resolver's watch loop remembers, and what it publishes after each answer.

A watch loop fetches and waits; this module decides. It is pure (no trio, no sockets, no
clock of its own): the loop feeds it what the source said and the time, and gets back a
:class:`Step`: the :class:`BackendSet` to publish (None when the route already holds that
set) and, on a failure, the stale age. The loop keeps its own log lines. The inputs:

* ``answer(backends)``: the source answered with backends (DNS records, passing
  instances, values under a key).
* ``not_found(error)``: an authoritative empty answer (NXDOMAIN or no records, no passing
  instance, no value under the key). The route has no backends, and says why in
  ``error``; this is no outage, so nothing is kept and the set is not stale.
* ``failed(error)``: the source could not answer (timeout, agent or etcd down, denied,
  a value nobody foresaw). The last good set keeps serving, marked stale with ``error``
  and its own ``updated``; with none, an empty stale set (the route refuses).

The transitions (``B``: backends, ``E``: an error text; every row is a case of
tests/test_resolver_state.py)::

    held now          answer(B')                not_found(E')           failed(E')
    nothing yet       fresh B'                  empty, E'               empty stale, E'
    fresh B           fresh B' if B' != B       empty, E'               B stale, E'
    B stale, E        fresh B'                  empty, E'               B stale, E'  [1]
    empty, E          fresh B'                  empty, E' if E' != E    empty stale, E'
    empty stale, E    fresh B'                  empty, E'               empty stale, E'

    [1] or, past ``stale_for`` seconds since B's last answer: empty stale, E' (dropped)

A failure is published every time, even unchanged, so that the route counts it
(``Route.errors``), unless the loop asks for changes only (``changes_only``: etcd's
unusable value, which would otherwise be published again on every update under the
prefix). Everything else is published when it changes the route's backends, staleness
or error, never again when the source merely confirms it.

What differs between resolvers on purpose is a parameter: ``stale_for`` (DNS drops a
stale answer after ``--dns-stale-for``; Consul, etcd and static lists keep theirs for as
long as the outage lasts: it says nothing about the backends).

Two clocks: ``now`` is monotonic (``trio.current_time()``), for the stale age; ``wall``
is ``time.time()``, stamped into a set's ``updated``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .interface import Backend, BackendSet, failed_set


@dataclass(frozen=True, slots=True)
class Step:
    """What one input to :class:`ResolverState` came to.

    ``publish``: the set to publish, None when the route holds it already.
    ``age``: on a failure that keeps the last good set, seconds since its last answer
    (None when there was none to keep, or it was dropped).
    ``dropped``: on a failure, the last good set was older than ``stale_for``: it goes now.
    """

    publish: BackendSet | None
    age: float | None = None
    dropped: bool = False


class ResolverState:
    """The last good set, its stale age and the last published set of one watch loop.

    Args:
        source: the spec's text, the ``source`` of every set.
        stale_for: seconds a stale set may serve after its last answer; None: no limit.
    """

    def __init__(self, source: str, stale_for: float | None = None):
        self.source = source
        self.stale_for = stale_for
        self.published: BackendSet | None = None
        # The set a failure keeps serving: the last answer with backends, as published
        # (with the ``updated`` of the answer that last changed it), and when the source
        # last gave it (``now``), changed or not. None once the source said "not found"
        # or the set outlived ``stale_for``.
        self.good: BackendSet | None = None
        self.good_at = 0.0
        # The source has answered (with backends or without) since the loop began.
        self.answered = False

    def answer(self, backends: tuple[Backend, ...], now: float, wall: float) -> Step:
        """The source answered with ``backends`` (not empty: an empty answer is ``not_found``)."""
        assert backends, "an empty answer is not_found(), with the reason"
        step = self._publish(BackendSet(backends, source=self.source, updated=wall))
        self.good, self.good_at, self.answered = self.published, now, True
        return step

    def not_found(self, error: str, now: float, wall: float) -> Step:
        """The source answered, authoritatively, that there is nothing; ``error`` says so."""
        self.good, self.answered = None, True
        return self._publish(BackendSet((), source=self.source, updated=wall, error=error))

    def failed(self, error: str, now: float, wall: float, *, changes_only: bool = False) -> Step:
        """The source could not answer. Published every time, unless ``changes_only``."""
        age, dropped = None, False
        if self.good is not None:
            age = now - self.good_at
            if self.stale_for is not None and age > self.stale_for:
                self.good, age, dropped = None, None, True
        new = failed_set(self.good, self.source, error, updated=wall)
        if changes_only:
            return Step(self._publish(new).publish, age, dropped)
        self.published = new
        return Step(new, age, dropped)

    def _publish(self, new: BackendSet) -> Step:
        old = self.published
        if old is not None and (old.backends, old.stale, old.error) == (new.backends, new.stale, new.error):
            return Step(None)
        self.published = new
        return Step(new)
