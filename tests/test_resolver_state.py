"""The resolver state machine (backends/state.py), as tables: pure, no trio, no sockets.

Each case feeds one ResolverState a sequence of inputs at given times and checks, after
every input, what it says to publish (or that it says nothing), the stale age and whether
the last good set was dropped. The cases follow the transition table of the module's
docstring, row by row, then the stale limit (DNS's ``--dns-stale-for``) and the
changes-only failures of etcd's unusable values.

Two clocks go in: ``now`` (monotonic, for the stale age) and ``wall`` (stamped into
``updated``). Here the wall clock runs at three times the monotonic one's pace from an
epoch of its own, so that a machine which mixed the two up would fail.
"""

from __future__ import annotations

import pytest

from ambassadord.backends.interface import Backend
from ambassadord.backends.state import ResolverState

SOURCE = "srv://_redis._tcp.example"
A = (Backend("10.0.0.1", 6379),)
AB = (Backend("10.0.0.1", 6379), Backend("10.0.0.2", 6379))
E1, E2 = "timeout (servers 10.0.0.53:53)", "every server failed (SERVFAIL)"
NX, NX2 = "_redis._tcp.example SRV: NXDOMAIN", "_redis._tcp.example SRV: no records"


def wall(now: float) -> float:
    return 1_700_000_000.0 + 3 * now


# -- what a step should come to: (published set as (backends, stale, error, stamped at), age, dropped)


def fresh(backends, at):
    """A fresh answer, published, stamped at ``at``."""
    return (backends, False, None, at), None, False


def empty(error, at):
    """An authoritative empty answer, published: no backends, not stale, the reason."""
    return ((), False, error, at), None, False


def stale(backends, error, at, age):
    """The last good set kept (stamped at its own answer's time ``at``), stale, ``age`` old."""
    return (backends, True, error, at), age, False


def refused(error, at, dropped=False):
    """An empty stale set: nothing to keep (or the last good set just ``dropped``)."""
    return ((), True, error, at), None, dropped


NOTHING = (None, None, False)  # nothing to publish: the route holds that set already


def unchanged(age):
    """Nothing to publish, on a failure that keeps a set ``age`` old."""
    return None, age, False


def ok(backends):
    return ("answer", backends)


def nx(error):
    return ("not_found", error)


def fail(error):
    return ("failed", error)


def fail_once(error):
    return ("failed_changes_only", error)


# (stale_for, rows); each row: (now, input, expected step)
CASES = {
    # ---- from nothing yet
    "nothing, answer: fresh": (None, [(1, ok(A), fresh(A, 1))]),
    "nothing, not found: empty with the reason": (None, [(1, nx(NX), empty(NX, 1))]),
    "nothing, failure: empty stale (the route refuses)": (None, [(1, fail(E1), refused(E1, 1))]),
    # ---- from a fresh set
    "fresh, same answer: nothing (a confirmation)": (None, [(1, ok(A), fresh(A, 1)), (2, ok(A), NOTHING)]),
    "fresh, other answer: fresh": (None, [(1, ok(A), fresh(A, 1)), (2, ok(AB), fresh(AB, 2)),
                                          (3, ok(A), fresh(A, 3))]),
    "fresh, not found: empty": (None, [(1, ok(A), fresh(A, 1)), (2, nx(NX), empty(NX, 2))]),
    "fresh, failure: kept stale, its own time, aged from its answer": (
        None, [(1, ok(A), fresh(A, 1)), (4, fail(E1), stale(A, E1, 1, 3))]),
    "fresh, confirmed, failure: aged from the confirmation, stamped at the change": (
        None, [(1, ok(A), fresh(A, 1)), (5, ok(A), NOTHING), (7, fail(E1), stale(A, E1, 1, 2))]),
    # ---- from a stale set
    "stale, failures: every one published, the age grows": (
        None, [(1, ok(A), fresh(A, 1)), (2, fail(E1), stale(A, E1, 1, 1)), (3, fail(E1), stale(A, E1, 1, 2)),
               (5, fail(E2), stale(A, E2, 1, 4))]),
    "stale, same answer: fresh again": (
        None, [(1, ok(A), fresh(A, 1)), (2, fail(E1), stale(A, E1, 1, 1)), (3, ok(A), fresh(A, 3)),
               (4, ok(A), NOTHING), (6, fail(E2), stale(A, E2, 3, 2))]),
    "stale, other answer: fresh": (
        None, [(1, ok(A), fresh(A, 1)), (2, fail(E1), stale(A, E1, 1, 1)), (3, ok(AB), fresh(AB, 3))]),
    "stale, not found: empty, nothing kept": (
        None, [(1, ok(A), fresh(A, 1)), (2, fail(E1), stale(A, E1, 1, 1)), (3, nx(NX), empty(NX, 3)),
               (4, fail(E1), refused(E1, 4))]),
    # ---- from an empty set (not found)
    "empty, same reason: nothing; another reason: empty": (
        None, [(1, nx(NX), empty(NX, 1)), (2, nx(NX), NOTHING), (3, nx(NX2), empty(NX2, 3)), (4, nx(NX2), NOTHING)]),
    "empty, failure: empty stale (nothing to keep)": (
        None, [(1, ok(A), fresh(A, 1)), (2, nx(NX), empty(NX, 2)), (3, fail(E1), refused(E1, 3))]),
    "empty, answer: fresh": (None, [(1, nx(NX), empty(NX, 1)), (2, ok(A), fresh(A, 2))]),
    # ---- from an empty stale set (failed with nothing to keep)
    "empty stale, failures: every one published": (
        None, [(1, fail(E1), refused(E1, 1)), (2, fail(E1), refused(E1, 2)), (3, fail(E2), refused(E2, 3))]),
    "empty stale, answer: fresh": (None, [(1, fail(E1), refused(E1, 1)), (2, ok(A), fresh(A, 2))]),
    "empty stale, not found: empty": (None, [(1, fail(E1), refused(E1, 1)), (2, nx(NX), empty(NX, 2))]),
    "empty stale, not found with the same text: empty, no longer stale": (
        None, [(1, fail(NX), refused(NX, 1)), (2, nx(NX), empty(NX, 2))]),
    # ---- the stale limit (DNS: --dns-stale-for)
    "stale limit: kept up to the limit, dropped past it, then refused": (
        10, [(0, ok(A), fresh(A, 0)), (5, ok(A), NOTHING),
             (9, fail(E1), stale(A, E1, 0, 4)),
             (15, fail(E1), stale(A, E1, 0, 10)),          # exactly the limit: still kept
             (15.5, fail(E2), refused(E2, 15.5, dropped=True)),
             (16, fail(E2), refused(E2, 16)),              # dropped once, not again
             (17, ok(A), fresh(A, 17)),                    # recovery: fresh, a new age
             (26, fail(E1), stale(A, E1, 17, 9)),
             (28, fail(E1), refused(E1, 28, dropped=True))]),
    "stale limit: a confirmation restarts the age": (
        10, [(0, ok(A), fresh(A, 0)), (8, fail(E1), stale(A, E1, 0, 8)), (9, ok(A), fresh(A, 9)),
             (12, ok(A), NOTHING), (21, fail(E1), stale(A, E1, 9, 9))]),
    "stale limit: none held, nothing to drop": (
        1, [(0, ok(A), fresh(A, 0)), (1, nx(NX), empty(NX, 1)), (50, fail(E1), refused(E1, 50))]),
    "no stale limit: kept however long the outage lasts": (
        None, [(0, ok(A), fresh(A, 0)), (86_400 * 30, fail(E1), stale(A, E1, 0, 86_400 * 30))]),
    # ---- failures published only when they change something (etcd's unusable value)
    "changes only: published once while it holds": (
        None, [(1, ok(A), fresh(A, 1)), (2, fail_once(E1), stale(A, E1, 1, 1)), (3, fail_once(E1), unchanged(2)),
               (4, fail_once(E2), stale(A, E2, 1, 3)), (5, ok(A), fresh(A, 5)), (6, fail_once(E2), stale(A, E2, 5, 1))]),
    "changes only, nothing held: one empty stale set": (
        None, [(1, fail_once(E1), refused(E1, 1)), (2, fail_once(E1), NOTHING), (3, fail(E1), refused(E1, 3))]),
}


def feed(state: ResolverState, kind: str, arg, now: float):
    if kind == "answer":
        return state.answer(arg, now, wall(now))
    if kind == "not_found":
        return state.not_found(arg, now, wall(now))
    return state.failed(arg, now, wall(now), changes_only=kind == "failed_changes_only")


def observed(step):
    s = step.publish
    published = None if s is None else (s.backends, s.stale, s.error, s.updated)
    return published, step.age, step.dropped


@pytest.mark.parametrize("stale_for, rows", CASES.values(), ids=CASES.keys())
def test_transitions(stale_for, rows):
    state = ResolverState(SOURCE, stale_for=stale_for)
    held = None
    for i, (now, (kind, arg), expected) in enumerate(rows):
        step = feed(state, kind, arg, now)
        (backends_etc, age, dropped) = expected
        if backends_etc is not None:
            backends, is_stale, error, at = backends_etc
            expected = ((backends, is_stale, error, wall(at)), age, dropped)
        assert observed(step) == expected, f"row {i} ({kind} {arg!r} at {now})"
        if step.publish is not None:
            assert step.publish.source == SOURCE
            held = step.publish
        assert state.published is held, f"row {i}: the set the route holds"


ANSWERED = [
    ([], False),
    ([fail(E1)], False),
    ([fail(E1), nx(NX)], True),
    ([ok(A)], True),
    ([ok(A), fail(E1), fail(E1)], True),
]


@pytest.mark.parametrize("inputs, answered", ANSWERED)
def test_answered_says_whether_the_source_ever_answered(inputs, answered):
    """What Consul's failure log line says: "keeping the last known set" (even an empty one)
    once the agent has answered, "no backends known yet" before."""
    state = ResolverState(SOURCE)
    for t, (kind, arg) in enumerate(inputs):
        feed(state, kind, arg, t)
    assert state.answered is answered
