"""The etcd resolver end to end (issue 5): real namespaces, real iptables, real Redis, a
real etcd (Debian's etcd-server 3.4).

The machines are those of tests/test_e2e_scenario.py (tests/topology.py): host A, host B
on a LAN, container C on B's bridge; nothing routes out. Host A gets three more addresses,
each with a redis-server of its own whose ``whoami`` key names it (``r1`` .. ``r3``), so a
consumer's ``GET whoami`` tells which backend a connection reached. etcd (one member, its
data directory kept across restarts) and ambassadord both run on host B; etcd listens on
B's loopback 127.0.0.1:2379 (the daemon's default endpoint) and on B's LAN address; the
test process drives it with etcdctl run in B's namespace (tests/etcd_server.py). A change
is timed from just before the etcdctl call that makes it, so every figure includes that
call (reported on its own) and errs on the slow side.

Consumers connect to B's 127.0.0.1:6379 (nat OUTPUT) and, in the cross-host scenario, also
to the bridge address from C (nat PREROUTING); ``run --iptables`` redirects them to the
daemon, which picks a backend from what etcd holds now. The daemon is given B's LAN
address as ``--etcd``, except in the cross-host scenario, where it finds etcd at its
default 127.0.0.1:2379; that lets a test hold the daemon off etcd (an iptables REJECT of
B's LAN address, port 2379) while the test itself still changes keys over loopback, so
that "keys changed before the daemon got back to etcd" is certain rather than a race.

Bounds that could fail by chance are chosen so that they do not: with random balance over
two backends, P(one is seen fewer than 5 times in 40 connections) ~ 2e-7; with three over
90 connections, P(one below 5) ~ 1e-10; "N consecutive connections all avoid a backend
that is still in the set" has probability 2^-N (N = 20 and then 30 more).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns, topology
from tests.daemon import Daemon, wait_until
from tests.etcd_server import EtcdError, EtcdServer, require_etcd
from tests.topology import (
    BRIDGE,
    HOST_A,
    HOST_B,
    REDIS_PORT,
    RedisServer,
    RespClient,
    Topology,
    connect,
    redis_cli,
    scenario_topology,
)

pytestmark = pytest.mark.netns

# Extra addresses of host A (on its LAN interface), one redis-server on each.
INSTANCES = {"r1": "10.250.0.11", "r2": "10.250.0.12", "r3": "10.250.0.13"}
MARKER = "redis on host A"  # whoami of the Redis on host A's own addresses (cross-host scenario)

PREFIX = "/services/redis"
SPEC = "etcd:///services/redis"  # the key /services/redis and the keys below /services/redis/
ETCD_PORT = 2379  # etcd's client port, and the daemon's default endpoint 127.0.0.1:2379
DAEMON_ETCD = f"{HOST_B.v4}:{ETCD_PORT}"  # --etcd for the daemon in the first tests; the test itself uses 127.0.0.1

CHANGE_WITHIN = 1.0  # issue 5: every put or delete under the prefix updates the route within 1 s
RESTART_WITHIN = 2.0  # ... and after an etcd restart, keys changed right after converge within 2 s
CONSECUTIVE = 20  # "gone" = this many new connections in a row all avoided it
CONFIRM = 30  # ... and then this many more
OUTAGE = 2.0  # s of etcd outage during which connections must keep being served
DOWN_CONNECTIONS = 20  # ... at least this many of them
STALE_RETRIES = 3  # ... and until the daemon has logged this many stale warnings


# ---- machines -----------------------------------------------------------------------------


@dataclass
class Site:
    topo: Topology
    etcd: EtcdServer
    workdir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """Hosts A, B and C; four redis-servers on A; etcd on B (127.0.0.1:2379 and B's LAN
    address)."""
    netns.require_prerequisites()
    require_etcd()
    workdir = tmp_path_factory.mktemp("e2e-etcd")
    with scenario_topology("ee") as topo, contextlib.ExitStack() as stack:
        a = topo.host_a
        iface = a.exec(["ip", "-o", "-4", "addr", "show", "to", HOST_A.v4]).split()[1]
        for addr in INSTANCES.values():
            a.exec(["ip", "addr", "add", f"{addr}/24", "dev", iface])

        main = RedisServer(a, [HOST_A.v4, HOST_A.v6], workdir)
        stack.callback(main.stop)
        with RespClient.connect(a, HOST_A.v4) as direct:
            direct.command("SET", "whoami", MARKER)
        for name, addr in INSTANCES.items():
            sub = workdir / name
            sub.mkdir()
            server = RedisServer(a, [addr], sub)
            stack.callback(server.stop)
            with RespClient.connect(a, addr) as direct:
                direct.command("SET", "whoami", name)

        etcd = stack.enter_context(EtcdServer(ns=topo.host_b, host="127.0.0.1", listen_hosts=(HOST_B.v4,),
                                              client_port=ETCD_PORT, name="host-b"))
        yield Site(topo, etcd, workdir)


@pytest.fixture
def etcd(site) -> Iterator[EtcdServer]:
    """The module's etcd with nothing under /services (running again if a test stopped it)."""
    server = site.etcd
    if not server.running:
        server.start()
    server.delete("/services", prefix=True)
    yield server
    if not server.running:
        server.start()
    server.delete("/services", prefix=True)


@contextlib.contextmanager
def daemon_on_b(site: Site, args: list[str], *, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """``ambassadord run --iptables ARGS`` on host B (JSON logs); stopped with SIGTERM at the end,
    which must exit 0 and remove its nat rules. Its log is shown when a test fails."""
    b = site.topo.host_b
    daemon = Daemon(["--iptables", *args], ns=b, workdir=site.workdir, env=env)
    topology._started(daemon.log, f"{daemon.command} in {b.name}")
    try:
        yield daemon
        daemon.stop()
        for tool in ("iptables-save", "ip6tables-save"):
            rules = b.exec([tool, "-t", "nat"])
            assert "AMBASSADORD" not in rules, f"{tool} -t nat after the daemon exited:\n{rules}"
    finally:
        daemon.kill()
        topology._finished(daemon.log)


# ---- consumers ------------------------------------------------------------------------------


def whoami(site: Site, host: str = "127.0.0.1", *, where: str = "host_b") -> str:
    """One new consumer connection to HOST:6379 (from host B by default): who answered."""
    with RespClient.connect(getattr(site.topo, where), host, REDIS_PORT, timeout=5) as redis:
        answer = redis.command("GET", "whoami")
    return answer.decode() if isinstance(answer, bytes) else repr(answer)


def sample(site: Site, n: int) -> collections.Counter:
    return collections.Counter(whoami(site) for _ in range(n))


def wait_seen(site: Site, names: set[str], *, timeout: float = 10) -> collections.Counter:
    """New connections until each of ``names`` has answered one; fails after ``timeout``."""
    seen: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout
    while not names <= set(seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"within {timeout:g}s, connections reached {dict(seen)}; "
                                 f"expected all of {sorted(names)}")
        with contextlib.suppress(OSError, ConnectionError):
            seen[whoami(site)] += 1
    return seen


@dataclass
class Avoided:
    gone_after: float  # s from the change until CONSECUTIVE new connections in a row avoided it
    last_hit: float | None  # s from the change to the start of the last connection that still reached it
    connections: int  # connections made until then
    hits: int  # of which reached it


def wait_avoided(site: Site, name: str, since: float, *, timeout: float = 10) -> Avoided:
    """Make new connections until CONSECUTIVE in a row avoid ``name`` (a failed connection
    breaks the run); measured from ``since`` (time.monotonic() just before the change)."""
    run = total = hits = 0
    last_hit = None
    while run < CONSECUTIVE:
        if time.monotonic() - since > timeout:
            raise AssertionError(f"{name} still received new connections {timeout:g}s after the change "
                                 f"({hits} of {total}, the last at +{last_hit:.3f}s)")
        started = time.monotonic()
        total += 1
        try:
            who = whoami(site)
        except (OSError, ConnectionError):
            run = 0
            continue
        if who == name:
            hits += 1
            last_hit = started - since
            run = 0
        else:
            run += 1
    return Avoided(time.monotonic() - since, last_hit, total, hits)


def wait_reached(site: Site, name: str, since: float, *, timeout: float) -> tuple[float, int]:
    """New connections until one reaches ``name``: (s from ``since``, connections made)."""
    total = 0
    while True:
        if time.monotonic() - since > timeout:
            raise AssertionError(f"no new connection reached {name} within {timeout:g}s ({total} tried)")
        total += 1
        with contextlib.suppress(OSError, ConnectionError):
            if whoami(site) == name:
                return time.monotonic() - since, total


def redis_connections(daemon: Daemon, count: int, *, skip: int = 0) -> list[dict]:
    """The daemon's connection records for port 6379 after the first ``skip``, once there
    are ``count`` (a record is written when its connection has closed, a moment after the
    client's side did)."""
    def records() -> list[dict] | None:
        found = [r for r in daemon._records_so_far() if r.get("event") == "connection" and r.get("port") == REDIS_PORT]
        return found[skip:] if len(found) >= skip + count else None

    wait_until(lambda: records() is not None, timeout=10,
               what=lambda: f"{count} connection records on port {REDIS_PORT} after the first {skip}; "
                            f"{daemon.describe()}")
    return records()  # the log only grows: still there


def first_backends_event(daemon: Daemon, backends: set[str], after_wall: float, *,
                         stale: bool | None = None, timeout: float = 10) -> dict:
    """The first ``backends`` record logged at/after ``after_wall`` (time.time()) with exactly
    ``backends`` (and ``stale`` if given)."""
    def match(r: dict) -> bool:
        return (r.get("event") == "backends" and r["ts"] >= after_wall - 0.001 and set(r["backends"]) == backends
                and (stale is None or r["stale"] is stale))

    return daemon.wait_for(match, timeout=timeout)


def addr_of(name: str) -> str:
    return f"{INSTANCES[name]}:{REDIS_PORT}"


def etcd_args(spec: str = SPEC) -> list[str]:
    """The route, and etcd at B's LAN address (not the default 127.0.0.1:2379)."""
    return ["--map", f"{REDIS_PORT}={spec}", "--etcd", DAEMON_ETCD]


def report(text: str) -> None:
    """Measured figures, visible with ``pytest -s`` (or -rP)."""
    print(f"\n[figures] {text}")


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"+{seconds * 1000:.0f}ms"


# ---- put and delete: traffic follows within 1 s ----------------------------------------------


def test_put_and_delete_keys_traffic_follows_within_1s(site, etcd):
    etcd.put(f"{PREFIX}/a", addr_of("r1"))
    etcd.put(f"{PREFIX}/b", addr_of("r2"))
    with daemon_on_b(site, etcd_args()) as daemon:
        # Both keys' values are backends, in proportion.
        counts = sample(site, 40)
        report(f"2 keys, 40 connections: {dict(counts)}")
        assert set(counts) == {"r1", "r2"}, counts
        assert min(counts.values()) >= 5, f"one backend got almost nothing: {dict(counts)}"
        by_backend = collections.Counter(r["backend"] for r in redis_connections(daemon, 40))
        assert by_backend == {addr_of("r1"): counts["r1"], addr_of("r2"): counts["r2"]}, by_backend

        # A third key: its backend receives new connections within 1 s of the put.
        wall, since = time.time(), time.monotonic()
        etcd.put(f"{PREFIX}/c", addr_of("r3"))
        called = time.monotonic() - since
        took, tried = wait_reached(site, "r3", since, timeout=5)
        event = first_backends_event(daemon, {addr_of("r1"), addr_of("r2"), addr_of("r3")}, wall, stale=False)
        report(f"put c: etcd call {called * 1000:.0f}ms; route updated (log) +{(event['ts'] - wall) * 1000:.0f}ms; "
               f"first connection to r3 {_ms(took)} (connection #{tried})")
        assert event["ts"] - wall < CHANGE_WITHIN, f"route updated {event['ts'] - wall:.2f}s after the put"
        assert took < CHANGE_WITHIN, f"r3 first reached {took:.2f}s after the put"

        counts = sample(site, 90)
        report(f"3 keys, 90 connections: {dict(counts)}")
        assert set(counts) == {"r1", "r2", "r3"}, counts
        assert min(counts.values()) >= 5, f"one backend got almost nothing: {dict(counts)}"

        # Delete b: within 1 s no new connection goes to r2 any more.
        wall, since = time.time(), time.monotonic()
        etcd.delete(f"{PREFIX}/b")
        called = time.monotonic() - since
        avoided = wait_avoided(site, "r2", since, timeout=5)
        event = first_backends_event(daemon, {addr_of("r1"), addr_of("r3")}, wall, stale=False)
        report(f"delete b: etcd call {called * 1000:.0f}ms; route updated (log) +{(event['ts'] - wall) * 1000:.0f}ms; "
               f"last connection to r2 {_ms(avoided.last_hit)} ({avoided.hits} of {avoided.connections}); "
               f"{CONSECUTIVE} in a row avoided it by {_ms(avoided.gone_after)}")
        assert event["ts"] - wall < CHANGE_WITHIN, f"route updated {event['ts'] - wall:.2f}s after the delete"
        assert avoided.last_hit is None or avoided.last_hit < CHANGE_WITHIN, \
            f"a connection started {avoided.last_hit:.2f}s after the delete still reached r2"

        after = sample(site, CONFIRM)
        assert set(after) == {"r1", "r3"} and "r2" not in after, f"after the delete, new connections went to {dict(after)}"


# ---- etcd restarts -------------------------------------------------------------------------------


@contextlib.contextmanager
def etcd_held_off(site: Site) -> Iterator[Callable[[], float]]:
    """Make etcd unreachable for the daemon only: TCP to B's LAN address, port 2379 (the
    daemon's ``--etcd``), is rejected with a reset, as when etcd is down; the test still
    reaches etcd on B's 127.0.0.1. Yields ``release()``, which removes the rule and returns
    time.monotonic() just after (idempotent); the rule goes at the end in any case."""
    b = site.topo.host_b
    rule = ["INPUT", "-p", "tcp", "-d", HOST_B.v4, "--dport", str(ETCD_PORT), "-j", "REJECT",
            "--reject-with", "tcp-reset"]
    b.exec(["iptables", "-I", *rule])
    released: list[float] = []

    def release() -> float:
        if not released:
            b.exec(["iptables", "-D", *rule])
            released.append(time.monotonic())
        return released[0]

    try:
        yield release
    finally:
        with contextlib.suppress(RuntimeError):
            release()


def stale_warnings(daemon: Daemon, after_wall: float) -> list[dict]:
    """The etcd resolver's "keeping the last known set (stale)" warnings since ``after_wall``."""
    return [r for r in daemon._records_so_far() if r["ts"] >= after_wall and r["level"] == "warning"
            and r["logger"] == "ambassadord.resolver.etcd" and "stale" in r["msg"]]


def wait_stale_warnings(daemon: Daemon, after_wall: float, count: int, *, timeout: float = 20) -> list[dict]:
    return wait_until(lambda: (found := stale_warnings(daemon, after_wall)) and len(found) >= count and found,
                      timeout=timeout, what=lambda: f"{count} stale warnings; {daemon.describe()}")


@dataclass
class Converged:
    route: float  # s from ``since`` to the route's non-stale ``backends`` record with the new set
    reached: float  # ... to the first new connection that reached the added backend
    last_hit: float | None  # ... to the start of the last new connection that reached the removed one
    avoided: Avoided


def wait_converged(site: Site, daemon: Daemon, *, added: str, removed: str, expect: set[str],
                   wall: float, since: float, timeout: float = 10) -> Converged:
    """After a change made at ``wall`` / ``since`` that adds ``added`` and removes ``removed``:
    new connections until ``added`` was reached and ``removed`` avoided CONSECUTIVE times in a
    row, and the route's log record with exactly ``expect``."""
    took, _ = wait_reached(site, added, since, timeout=timeout)
    avoided = wait_avoided(site, removed, since, timeout=timeout)
    event = first_backends_event(daemon, {addr_of(n) for n in expect}, wall, stale=False, timeout=timeout)
    return Converged(event["ts"] - wall, took, avoided.last_hit, avoided)


def test_etcd_restart_keeps_last_set_and_changes_right_after_converge_within_2s(site, etcd):
    etcd.put(f"{PREFIX}/a", addr_of("r1"))
    etcd.put(f"{PREFIX}/b", addr_of("r2"))
    with daemon_on_b(site, etcd_args()) as daemon:
        wait_seen(site, {"r1", "r2"})
        pid = daemon.proc.pid

        # etcd goes away: the route keeps its last known set, marked stale.
        wall = time.time()
        etcd.stop()
        with pytest.raises(EtcdError):  # gone indeed
            etcd.etcdctl("endpoint", "health", timeout=5, dial_timeout="0.5s", command_timeout="1s")
        stale_event = first_backends_event(daemon, {addr_of("r1"), addr_of("r2")}, wall, stale=True)

        # New connections while etcd is down, for at least OUTAGE seconds, at least
        # DOWN_CONNECTIONS of them, and until the daemon has failed to reach it (and retried)
        # STALE_RETRIES times: every one must be served, by the last known set.
        down: collections.Counter = collections.Counter()
        since = time.monotonic()
        while (time.monotonic() - since < OUTAGE or sum(down.values()) < DOWN_CONNECTIONS
               or len(stale_warnings(daemon, wall)) < STALE_RETRIES):
            assert time.monotonic() - since < 15, \
                f"in 15 s: {len(stale_warnings(daemon, wall))} stale warnings logged, {dict(down)}"
            down[whoami(site)] += 1  # must succeed: an error fails the test
        outage = time.time() - wall
        warnings = stale_warnings(daemon, wall)
        report(f"etcd down {outage:.1f}s: {sum(down.values())} connections all served: {dict(down)}; "
               f"{len(warnings)} stale warnings, e.g. {warnings[0]['msg']!r}; "
               f"route marked stale +{(stale_event['ts'] - wall) * 1000:.0f}ms")
        assert set(down) == {"r1", "r2"}, down
        assert stale_event["error"], stale_event

        # etcd is back, same data directory: change the keys as soon as it answers.
        restarted = time.monotonic()
        etcd.start()
        back = time.monotonic() - restarted
        wall, since = time.time(), time.monotonic()
        etcd.delete(f"{PREFIX}/b")
        etcd.put(f"{PREFIX}/c", addr_of("r3"))
        called = time.monotonic() - since
        assert etcd.get_prefix(PREFIX) == {f"{PREFIX}/a": addr_of("r1").encode(), f"{PREFIX}/c": addr_of("r3").encode()}
        done = wait_converged(site, daemon, added="r3", removed="r2", expect={"r1", "r3"}, wall=wall, since=since)
        report(f"etcd restarted (healthy after {back:.2f}s), delete b + put c right after ({called * 1000:.0f}ms): "
               f"route updated (log) +{done.route * 1000:.0f}ms; r3 first reached {_ms(done.reached)}; "
               f"last connection to r2 {_ms(done.last_hit)} ({done.avoided.hits} of {done.avoided.connections}); "
               f"{CONSECUTIVE} in a row avoided it by {_ms(done.avoided.gone_after)}")
        assert done.route < RESTART_WITHIN, f"route converged {done.route:.2f}s after the change"
        assert done.reached < RESTART_WITHIN, f"r3 first reached {done.reached:.2f}s after the change"
        assert done.last_hit is None or done.last_hit < RESTART_WITHIN, \
            f"a connection started {done.last_hit:.2f}s after the delete still reached r2"
        after = sample(site, CONFIRM)
        assert set(after) == {"r1", "r3"}, after

        # Again, but this time the keys certainly change before the daemon gets back to etcd
        # (it is held off until after the change): the resumed watch must replay the delete
        # and the put it missed.
        wall = time.time()
        etcd.stop()
        first_backends_event(daemon, {addr_of("r1"), addr_of("r3")}, wall, stale=True)
        with etcd_held_off(site) as release:
            etcd.start()
            change_wall, since = time.time(), time.monotonic()
            etcd.delete(f"{PREFIX}/c")
            etcd.put(f"{PREFIX}/b", addr_of("r2"))
            # the daemon has not seen it: still the stale set, and a retry failed after the change
            wait_stale_warnings(daemon, change_wall, 1)
            held = sample(site, 10)
            assert set(held) <= {"r1", "r3"}, f"the daemon saw the change while held off: {dict(held)}"
            assert not [r for r in daemon._records_so_far() if r.get("event") == "backends" and r["ts"] >= wall
                        and not r["stale"]], "the route was updated while the daemon could not reach etcd"
            released = release()
        wall = time.time()
        done = wait_converged(site, daemon, added="r2", removed="r3", expect={"r1", "r2"}, wall=wall, since=released)
        report(f"etcd restarted, keys changed {released - since:.2f}s before the daemon could reach it again: "
               f"from then, route updated (log) +{done.route * 1000:.0f}ms; r2 first reached {_ms(done.reached)}; "
               f"last connection to the deleted r3 {_ms(done.last_hit)}")
        assert done.route < RESTART_WITHIN, f"route converged {done.route:.2f}s after etcd was reachable again"
        assert done.reached < RESTART_WITHIN, f"r2 first reached {done.reached:.2f}s after etcd was reachable again"
        assert done.last_hit is None or done.last_hit < RESTART_WITHIN, \
            f"the deleted key's r3 still reached {done.last_hit:.2f}s after etcd was reachable again"
        after = sample(site, CONFIRM)
        assert set(after) == {"r1", "r2"}, after

        # ... and the watch goes on after the restarts: a change shows within 1 s again.
        wall, since = time.time(), time.monotonic()
        etcd.delete(f"{PREFIX}/a")
        avoided = wait_avoided(site, "r1", since, timeout=5)
        event = first_backends_event(daemon, {addr_of("r2")}, wall, stale=False)
        report(f"after the restarts, delete a: route updated (log) +{(event['ts'] - wall) * 1000:.0f}ms; "
               f"last connection to r1 {_ms(avoided.last_hit)}")
        assert event["ts"] - wall < CHANGE_WITHIN
        assert avoided.last_hit is None or avoided.last_hit < CHANGE_WITHIN
        assert sample(site, CONFIRM) == {"r2": CONFIRM}
        assert daemon.proc.pid == pid and daemon.alive()


RESTARTS_APART = 12.0  # s between two etcd restarts in test_second_etcd_restart_...
RESTART_RETRIES = 4  # stale warnings (failed retries) per outage there


def test_second_etcd_restart_12s_later_converges_within_2s(site, etcd):
    """Two etcd restarts 12 s apart, each down until the daemon has retried RESTART_RETRIES
    times: after each, keys changed right after etcd is back converge within 2 s.

    12 s: more than the resolver's fast-retry window (10 s) after the first outage began,
    within one resync period (30 s). A regression test: the resolver used to reset its
    backoff only when a session ended normally (resync, compaction), so the second outage
    counted as the continuation of the first, already recovered one, and its retries backed
    off 1, 2, 4, 8 s instead of every ~0.5 s; after 4 retries the route stayed stale for
    4-12 s after etcd was back."""
    etcd.put(f"{PREFIX}/a", addr_of("r1"))
    etcd.put(f"{PREFIX}/b", addr_of("r2"))
    with daemon_on_b(site, etcd_args()) as daemon:
        wait_seen(site, {"r1", "r2"})
        first_down = time.monotonic()
        changes = [("b", "c", "r2", "r3", {"r1", "r3"}), ("c", "b", "r3", "r2", {"r1", "r2"})]
        figures = []
        for n, (gone, new, removed, added, expect) in enumerate(changes, 1):
            if n == 2:
                # the daemon serves normally until the second restart, RESTARTS_APART after the first
                def served_until_due() -> bool:
                    who = whoami(site)
                    assert who in {"r1", "r3"}, who
                    return time.monotonic() - first_down >= RESTARTS_APART

                wait_until(served_until_due, timeout=RESTARTS_APART + 10, interval=0.05,
                           what=lambda: f"connections between the restarts; {daemon.describe()}")
            wall, down_at = time.time(), time.monotonic()
            etcd.stop()
            wait_stale_warnings(daemon, wall, RESTART_RETRIES, timeout=30)
            etcd.start()
            wall, since = time.time(), time.monotonic()
            etcd.delete(f"{PREFIX}/{gone}")
            etcd.put(f"{PREFIX}/{new}", addr_of(added))
            done = wait_converged(site, daemon, added=added, removed=removed, expect=expect, wall=wall,
                                  since=since, timeout=RESTART_WITHIN + 1)
            figures.append(f"restart {n} (etcd down {since - down_at:.1f}s): route updated "
                           f"+{done.route * 1000:.0f}ms, {added} reached {_ms(done.reached)}")
            report("; ".join(figures))
            assert done.route < RESTART_WITHIN, f"restart {n}: route converged {done.route:.2f}s after the change"
            assert done.reached < RESTART_WITHIN, f"restart {n}: {added} first reached {done.reached:.2f}s later"


# ---- the cross-host scenario of issue 2, over etcd ---------------------------------------------

CLIENT_PATHS = [("host_b", "127.0.0.1"), ("host_b", "::1"), ("container", BRIDGE.v4), ("container", BRIDGE.v6)]
HOST_A_PATTERN = re.compile(re.escape(HOST_A.v4) + r"(?!\d)|" + re.escape(HOST_A.v6) + r"(?![0-9a-f:])", re.I)


def test_cross_host_scenario_over_etcd(site, etcd, monkeypatch):
    """Host B's consumers reach host A's Redis through ``6379 = "etcd:///services/redis"``,
    with no address of host A written anywhere on host B: the key's own value in etcd (on
    B's 127.0.0.1:2379, the default endpoint, so not even --etcd is given) is the only place
    that knows it."""
    topo = site.topo
    for var in [v for v in os.environ if v.startswith(("ETCDCTL_", "ETCD_"))]:
        monkeypatch.delenv(var)
    with pytest.raises(OSError):  # C cannot reach A but through a process on B
        connect(topo.container, HOST_A.v4, REDIS_PORT, timeout=0.5).close()

    config = site.workdir / "routes-cross-host.toml"
    config.write_text(f'[routes]\n{REDIS_PORT} = "{SPEC}"\n')
    etcd.put(PREFIX, f"{HOST_A.v4}:{REDIS_PORT}")  # what host A's deployment does
    with daemon_on_b(site, ["--config", str(config)]) as daemon:
        written = {
            "config file": config.read_text(),
            "command line": Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
            "environment": Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().replace(b"\0", b"\n").decode(),
        }
        for what, text in written.items():
            assert not HOST_A_PATTERN.search(text), f"host A's address is in the daemon's {what}:\n{text}"
        assert "--etcd" not in written["command line"], written["command line"]

        for family, address in (("v4", HOST_A.v4), ("v6", HOST_A.v6)):
            backend = f"[{address}]:{REDIS_PORT}" if ":" in address else f"{address}:{REDIS_PORT}"
            if family == "v6":  # host A's deployment now publishes its IPv6 address
                wall = time.time()
                etcd.put(PREFIX, backend)
                first_backends_event(daemon, {backend}, wall)
            for where, dial in CLIENT_PATHS:
                before = len(redis_connections(daemon, 0))
                assert redis_cli(getattr(topo, where), dial, "ping") == "PONG", (family, where, dial)
                assert whoami(site, dial, where=where) == MARKER, (family, where, dial)
                records = redis_connections(daemon, 2, skip=before)
                assert [r["backend"] for r in records] == [backend, backend], (family, where, dial, records)
