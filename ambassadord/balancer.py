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
