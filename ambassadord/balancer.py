"""Which backends to try, in which order: pure functions of the backend set and a little state.

No sockets, no trio, no clock of its own: the caller passes ``now`` and a ``random.Random``,
so every decision here is reproducible in a table-driven test.

Order of a pick:

1. Group backends by priority, lowest first (RFC 2782; static lists are all priority 0).
2. Within a group, apply the route's balance policy:
   * ``random``: weighted random order, RFC 2782's algorithm (weight-0 entries are kept
     but only chosen when the running-sum draw lands on 0, i.e. almost always last);
     with equal weights this is a uniform shuffle.
   * ``round-robin``: rotate the group by a per-route counter (weights ignored).
3. Leave out backends that active health checks (health.py) say are down, unless every
   backend is down: then checks are ignored, as if the route had none.
4. Move ejected backends (recent connect failures) to the end, keeping their relative
   order: they are still tried, as a last resort, when everything else fails.

Ejection is half-open, like a circuit breaker's: when a backend's ejection expires it goes
back to its place in the order, and the first pick that puts it first is its *trial*. While
that one connection tries it, every other pick keeps it at the back, so a backend that
drops packets stalls one connection per expiry, not every connection of that moment. The
trial's success restores the backend (``restore``); its failure ejects it again for twice
as long as the last time, up to ``MAX_BACKOFF`` times ``eject_for`` (``eject``). A trial
that never reports (its connection was cancelled) lapses after ``trial_for`` seconds, and
the next pick may try again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

from ambassadord.backends.interface import Backend

BALANCE_POLICIES = ("random", "round-robin")


def weighted_order(group: Sequence[Backend], rng: random.Random) -> list[Backend]:
    """RFC 2782 ordering of one priority group.

    "Arrange all SRV RRs (that have not been ordered yet) in any order, except that all
    those with weight 0 are placed at the beginning of the list. Compute the sum of the
    weights ... choose a uniform random number between 0 and the sum computed (inclusive),
    and select the RR whose running sum value is the first in the selected order which is
    greater than or equal to the random number selected."

    That draw gives the first weight-0 record probability 1/(sum+1) and every other record
    probability weight/(sum+1). Weights here may be fractional (a target with several
    addresses splits its weight), so this is the same rule in continuous form: a weight-0
    record (chosen at random among them) goes next with probability 1/(sum+1), otherwise
    the pick is proportional to weight. With no weight-0 record left, the pick is exactly
    proportional (the literal integer draw would favour whichever record is listed first
    by an extra 1/(sum+1)).
    """
    if len(group) <= 1:
        return list(group)
    w0 = group[0].weight
    if w0 > 0 and all(b.weight == w0 for b in group):
        out = list(group)
        rng.shuffle(out)  # equal weights: the same distribution, much cheaper
        return out
    zeros = [b for b in group if b.weight <= 0]
    rng.shuffle(zeros)
    weighted = [b for b in group if b.weight > 0]
    out: list[Backend] = []
    total = sum(b.weight for b in weighted)
    while weighted:
        if zeros and rng.random() * (total + 1) < 1:
            out.append(zeros.pop())
            continue
        draw = rng.random() * total
        running = 0.0
        for i, b in enumerate(weighted):
            running += b.weight
            if running > draw:
                break
        # (float rounding can leave draw == total: i is then the last index, which is right)
        chosen = weighted.pop(i)
        total -= chosen.weight
        out.append(chosen)
    out.extend(zeros)
    return out


# An ejection that ends with a failed trial is renewed twice as long, at most this many
# times eject_for (Envoy's outlier detection grows its ejections too, capped; it uses 300 s).
MAX_BACKOFF = 8


@dataclass
class Ejections:
    """Backends that failed recently: until when they stay at the back of the order, which
    of them is being tried again (half-open), and how long each was ejected last.

    ``until`` holds only ejections not yet tried again; ``trials`` maps a backend whose
    ejection expired and that one connection is trying to when that trial lapses; ``last``
    keeps the length of each backend's last ejection until it connects again.
    """

    until: dict[Backend, float] = field(default_factory=dict)
    trials: dict[Backend, float] = field(default_factory=dict)
    last: dict[Backend, float] = field(default_factory=dict)

    def eject(self, backend: Backend, now: float, duration: float) -> float | None:
        """``backend`` failed to connect. Returns how long it is now ejected for, or None if
        it already was (a connection that began before the ejection failing late: the
        ejection is not renewed, and a burst of such failures counts once)."""
        if self.until.get(backend, 0.0) > now:
            return None
        prev = self.last.get(backend)
        length = duration if prev is None else min(max(prev * 2, duration), duration * MAX_BACKOFF)
        self.until[backend] = now + length
        self.last[backend] = length
        self.trials.pop(backend, None)
        return length

    def adopt(self, backend: Backend, now: float, duration: float) -> None:
        """Another process (--workers) ejected ``backend`` for ``duration`` seconds."""
        self.until[backend] = max(self.until.get(backend, 0.0), now + duration)
        self.last[backend] = max(self.last.get(backend, 0.0), duration)
        self.trials.pop(backend, None)

    def restore(self, backend: Backend) -> None:
        """``backend`` connected: it is healthy again (called on every successful connect)."""
        if backend in self.last:
            del self.last[backend]
            self.until.pop(backend, None)
            self.trials.pop(backend, None)

    def is_ejected(self, backend: Backend, now: float) -> bool:
        """Ejected and not expired (a trial in flight does not count)."""
        t = self.until.get(backend)
        return t is not None and t > now

    def _held(self, backend: Backend, now: float) -> bool:
        """Kept at the back for this pick: ejected, or its trial is in flight."""
        t = self.until.get(backend)
        if t is not None:
            return t > now
        t = self.trials.get(backend)
        return t is not None and t > now

    def _due(self, backend: Backend) -> bool:
        """Expired (or its trial lapsed) and not restored: the next pick that puts it first tries it."""
        return backend in self.until or backend in self.trials

    def _start_trial(self, backend: Backend, now: float, trial_for: float) -> None:
        self.until.pop(backend, None)
        self.trials[backend] = now + trial_for

    def forget_missing(self, current: Sequence[Backend]) -> None:
        """Drop state of backends no longer in the set (called when a resolver publishes)."""
        keep = set(current)
        for d in (self.until, self.trials, self.last):
            for b in [b for b in d if b not in keep]:
                del d[b]


@dataclass
class PickState:
    """Per-route mutable selection state."""

    ejections: Ejections = field(default_factory=Ejections)
    rr_counter: int = 0
    # Backends that active health checks say are down (health.py; in a --workers helper,
    # as the main process sent them), and the checks' per-backend state (main process).
    down: frozenset[Backend] = frozenset()
    checks: dict = field(default_factory=dict)


def pick_order(
    backends: Sequence[Backend],
    policy: str,
    state: PickState,
    now: float,
    rng: random.Random,
    *,
    trial_for: float = 2.0,
) -> list[Backend]:
    """The order in which to try ``backends`` for one new connection.

    Args:
        backends: the route's current set (any order; priorities honoured).
        policy: one of BALANCE_POLICIES.
        state: the route's PickState (round-robin counter, ejections); updated.
        now: monotonic time, for ejection expiry.
        rng: source of randomness.
        trial_for: how long a trial of an expired ejection may take before another pick
            may try that backend (the route's connect timeout).
    Returns:
        Every backend exactly once, healthy ones first; but without the backends that
        health checks say are down, unless all of them are.
    """
    if state.down:
        up = [b for b in backends if b not in state.down]
        if up:  # all down: as if the route had no checks (health.py logs it)
            backends = up
    n = len(backends)
    if n == 0:
        return []
    if n == 1:
        return list(backends)
    if policy == "round-robin":
        turn = state.rr_counter
        state.rr_counter = turn + 1
    ordered: list[Backend] = []
    single_priority = all(b.priority == backends[0].priority for b in backends)
    groups = [list(backends)] if single_priority else [
        list(g) for _, g in groupby(sorted(backends, key=lambda b: b.priority), key=lambda b: b.priority)
    ]
    for group in groups:
        if policy == "round-robin":
            k = turn % len(group)
            ordered.extend(group[k:] + group[:k])
        elif policy == "random":
            ordered.extend(weighted_order(group, rng))
        else:
            raise ValueError(f"unknown balance policy {policy!r}")
    ej = state.ejections
    if ej.last:
        healthy = [b for b in ordered if not ej._held(b, now)]
        if len(healthy) != n:
            ordered = healthy + [b for b in ordered if ej._held(b, now)]
        if healthy and ej._due(healthy[0]):
            ej._start_trial(healthy[0], now, trial_for)
    return ordered
