"""Active health checks: a TCP connect to each backend of a route every ``check_interval``.

In the spirit of HAProxy's ``check inter rise fall``: a backend that is up goes down after
``check_fall`` checks in a row fail, and a backend that is down comes up again after
``check_rise`` checks in a row pass. As with HAProxy's default ``init-state up``, a
backend that no check has seen yet counts as up, but its first check alone decides: a
backend that is dead when it appears (or when the daemon starts) is down after one check,
not ``check_fall``.

A backend that is down is left out of the pick order (balancer.py); if every backend of a
route is down, the checks are ignored and the route picks as if it had none (the
ejections still apply), and a warning says so: refusing every client because a check
cannot connect would turn a broken check into an outage.

Two parts, as everywhere here: ``observe`` is the pure rise/fall state machine (tested by
tables in tests/test_health.py); ``check_route`` is the I/O loop, one task per route with
checks, run beside the route's resolver and only in the main process of --workers (its
results reach the helpers as the route's set of down backends, see workers/).

Checks connect through the server's own upstream socket path (``SO_MARK``, the loop
guard) but are not connections: they count nowhere in the connection counters, only in
each backend's check state.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import trio

from ambassadord.backends.interface import Backend

log = logging.getLogger("ambassadord")

# Checks start at a random point of the first interval and each next one comes after
# interval * (1 +- JITTER): checks of many routes and hosts never fall into step (HAProxy's
# spread-checks does the same).
JITTER = 0.1

# Shorter intervals would be a busy loop of connects to every backend (a typo such as
# 0.002 for 2): refused with a message, at the edge (config.py, parser.py).
MIN_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class CheckState:
    """One backend's health as the checks see it."""

    up: bool = True
    seen: bool = False  # a check has given a result since the backend appeared
    successes: int = 0  # in a row
    failures: int = 0  # in a row
    checks: int = 0  # results so far
    failed: int = 0  # of which failed
    last_result: str | None = None  # "ok", or what went wrong ("timeout", "Connection refused")
    last_at: float | None = None  # wall clock of the last result
    changed_at: float | None = None  # wall clock of the last change between up and down


def observe(state: CheckState, error: str | None, *, rise: int, fall: int, at: float) -> CheckState:
    """The state after one check: passed (``error`` None) or failed with ``error``."""
    if error is None:
        successes, failures = state.successes + 1, 0
        up = state.up or successes >= rise
    else:
        successes, failures = 0, state.failures + 1
        up = state.up and failures < (fall if state.seen else 1)
    return replace(state, up=up, seen=True, successes=successes, failures=failures, checks=state.checks + 1,
                   failed=state.failed + (error is not None), last_result=error or "ok", last_at=at,
                   changed_at=at if up != state.up else state.changed_at)


def down_set(states: dict[Backend, CheckState], current) -> frozenset[Backend]:
    """The backends of ``current`` that the checks say are down."""
    return frozenset(b for b in current if (s := states.get(b)) is not None and not s.up)


class NoResult(Exception):
    """The check could not be made (this host is short of fds or local ports): it says
    nothing about the backend."""


# connect(backend, timeout): returns when a TCP connection was made (and closed again);
# raises OSError or trio.TooSlowError when it could not be, NoResult when it was not tried.
Connect = Callable[[Backend, float], Awaitable[None]]


async def check_once(connect: Connect, backend: Backend, timeout: float) -> str | None:
    """One check: None if it passed, else what went wrong.

    Raises:
        NoResult: from ``connect``; the check says nothing.
    """
    try:
        await connect(backend, timeout)
    except trio.TooSlowError:
        return "timeout"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


async def check_route(route, connect: Connect, changed: Callable[[object], None], *,
                      rng: random.Random | None = None) -> None:
    """Check every backend of ``route`` every ``route.config.check_interval`` seconds, until
    cancelled. Results go to ``route.pick.checks`` (per backend) and ``route.pick.down``;
    ``changed(route)`` is called whenever the set of down backends changes.

    A backend whose check is still running (a blackhole: up to the connect timeout) is not
    checked again until it ends, so a slow check never piles up.
    """
    cfg = route.config
    interval, rise, fall, timeout = cfg.check_interval, cfg.check_rise, cfg.check_fall, cfg.connect_timeout
    rng = rng or random.Random()
    states: dict[Backend, CheckState] = route.pick.checks
    running: set[Backend] = set()

    def settle() -> None:
        current = route.backends.backends
        for b in [b for b in states if b not in current]:
            del states[b]
        down = down_set(states, current)
        if down != route.pick.down:
            route.pick.down = down
            changed(route)

    async def check(backend: Backend) -> None:
        try:
            error = await check_once(connect, backend, timeout)
        except NoResult as exc:
            log.debug("route %s: no health check of %s this time: %s", route.name, backend, exc)
            return
        finally:
            running.discard(backend)
        if backend not in route.backends.backends:
            return  # left the set while it was checked
        old = states.get(backend, CheckState())
        new = states[backend] = observe(old, error, rise=rise, fall=fall, at=time.time())
        if new.up != old.up:
            log.log(logging.INFO if new.up else logging.WARNING, "route %s: backend %s is %s (health check: %s)",
                    route.name, backend, "up" if new.up else "down", new.last_result,
                    extra={"fields": {"event": "check-up" if new.up else "check-down", "route": route.name,
                                      "backend": str(backend), "result": new.last_result}})
        settle()

    await trio.sleep(rng.uniform(0, interval))
    async with trio.open_nursery() as nursery:
        while True:
            settle()
            for backend in route.backends.backends:
                if backend not in running:
                    running.add(backend)
                    nursery.start_soon(check, backend)
            await trio.sleep(interval * rng.uniform(1 - JITTER, 1 + JITTER))


def all_down(route) -> bool:
    """Every backend of the route is down by its checks (so they are ignored)."""
    current = route.backends.backends
    return bool(current) and all(b in route.pick.down for b in current)
