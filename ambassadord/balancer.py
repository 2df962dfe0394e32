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
3. Move ejected backends (recent connect failures) to the end, keeping their relative
   order: they are still tried, as a last resort, when everything else fails.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

from backends.interface import Backend

BALANCE_POLICIES = ("random", "round-robin")


def weighted_order(group: Sequence[Backend], rng: random.Random) -> list[Backend]:
    """RFC 2782 ordering of one priority group.

    "Arrange all SRV RRs (that have not been ordered yet) in any order, except that all
    those with weight 0 are placed at the beginning of the list. Compute the sum of the
    weights ... choose a uniform random number between 0 and the sum computed (inclusive),
    and select the RR whose running sum value is the first in the selected order which is
    greater than or equal to the random number selected."
    """
    if len(group) <= 1:
        return list(group)
    weights = [b.weight for b in group]
    if all(w == weights[0] for w in weights) and weights[0] > 0:
        out = list(group)
        rng.shuffle(out)  # equal weights: the same distribution, much cheaper
        return out
    remaining = sorted(group, key=lambda b: b.weight != 0)  # weight 0 first, stable
    out = []
    while remaining:
        total = sum(b.weight for b in remaining)
        # The RFC's inclusive draw from 0 exists to give weight-0 records (placed first) a
        # small chance. Without any weight-0 record left it would instead favour whichever
        # record happens to be first by an extra 1/(total+1), so then draw from 1.
        draw = rng.randint(0 if remaining[0].weight == 0 else 1, total)
        running = 0
        for i, b in enumerate(remaining):
            running += b.weight
            if running >= draw:
                out.append(remaining.pop(i))
                break
    return out


@dataclass
class Ejections:
    """Backends that failed recently, and until when they stay at the back of the order."""

    until: dict[Backend, float] = field(default_factory=dict)

    def eject(self, backend: Backend, now: float, duration: float) -> None:
        self.until[backend] = now + duration

    def restore(self, backend: Backend) -> None:
        self.until.pop(backend, None)

    def is_ejected(self, backend: Backend, now: float) -> bool:
        t = self.until.get(backend)
        if t is None:
            return False
        if t <= now:
            del self.until[backend]
            return False
        return True

    def forget_missing(self, current: Sequence[Backend]) -> None:
        """Drop state of backends no longer in the set (called when a resolver publishes)."""
        keep = set(current)
        for b in [b for b in self.until if b not in keep]:
            del self.until[b]


@dataclass
class PickState:
    """Per-route mutable selection state."""

    ejections: Ejections = field(default_factory=Ejections)
    rr_counter: int = 0


def pick_order(
    backends: Sequence[Backend],
    policy: str,
    state: PickState,
    now: float,
    rng: random.Random,
) -> list[Backend]:
    """The order in which to try ``backends`` for one new connection.

    Args:
        backends: the route's current set (any order; priorities honoured).
        policy: one of BALANCE_POLICIES.
        state: the route's PickState (round-robin counter, ejections); updated.
        now: monotonic time, for ejection expiry.
        rng: source of randomness.
    Returns:
        Every backend exactly once; healthy ones first.
    """
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
    if state.ejections.until:
        healthy = [b for b in ordered if not state.ejections.is_ejected(b, now)]
        if len(healthy) != n:
            ejected = [b for b in ordered if state.ejections.is_ejected(b, now)]
            ordered = healthy + ejected
    return ordered
