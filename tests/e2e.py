"""What the registry end-to-end tests (tests/test_e2e_consul.py, tests/test_e2e_etcd.py)
share: the machines, ambassadord on host B, and consumers that count which backend each
new connection reached.

The machines are those of tests/test_e2e_scenario.py (tests/topology.py): host A, host B
on a LAN, container C on B's bridge; nothing routes out. :func:`scenario_with_instances`
gives host A three more addresses (:data:`INSTANCES`), each with a redis-server of its
own whose ``whoami`` key names it (``r1`` .. ``r3``), and a redis-server on A's own
addresses whose ``whoami`` is :data:`MARKER`; so a consumer's ``GET whoami``
(:func:`whoami`) tells which backend a connection reached. The registry (Consul or etcd)
and ambassadord (:func:`daemon_on_b`) both run on host B.

Consumers connect to B's 127.0.0.1:6379 (nat OUTPUT) and, in the cross-host scenario, also
to the bridge address from C (nat PREROUTING, :data:`CLIENT_PATHS`); ``run --iptables``
redirects them to the daemon, which picks a backend from what the registry says now.

"Gone" means :data:`CONSECUTIVE` new connections in a row all avoided a backend
(:func:`wait_avoided`); the tests then check :data:`CONFIRM` more. Bounds that could fail by
chance are chosen so that they do not: with random balance over two backends, P(one is
seen fewer than 5 times in 40 connections) ~ 2e-7; with three over 90 connections, P(one
below 5) ~ 1e-10; "N consecutive connections all avoid a backend that is still in the set"
has probability 2^-N (N = 20 and then 30 more).
"""

from __future__ import annotations

import collections
import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon import Daemon, RedisProcess, connect, wait_until
from tests.topology import (
    BRIDGE,
    HOST_A,
    REDIS_PORT,
    RespClient,
    Topology,
    redis_cli,
    scenario_topology,
)

# Extra addresses of host A (on its LAN interface), one redis-server on each.
INSTANCES = {"r1": "10.250.0.11", "r2": "10.250.0.12", "r3": "10.250.0.13"}
MARKER = "redis on host A"  # whoami of the Redis on host A's own addresses (cross-host scenario)

CONSECUTIVE = 20  # "gone" = this many new connections in a row all avoided it
CONFIRM = 30  # ... and then this many more

# The cross-host scenario of issue 2: where a consumer is and the address it dials, and
# host A's Redis as a backend, by address family.
CLIENT_PATHS = [("host_b", "127.0.0.1"), ("host_b", "::1"), ("container", BRIDGE.v4), ("container", BRIDGE.v6)]
HOST_A_BACKENDS = [("v4", f"{HOST_A.v4}:{REDIS_PORT}"), ("v6", f"[{HOST_A.v6}]:{REDIS_PORT}")]
HOST_A_PATTERN = re.compile(re.escape(HOST_A.v4) + r"(?!\d)|" + re.escape(HOST_A.v6) + r"(?![0-9a-f:])", re.I)


# ---- machines -----------------------------------------------------------------------------


@dataclass
class Site:
    """The machines (a test file adds its registry on host B) and a work directory."""

    topo: Topology
    workdir: Path


@contextlib.contextmanager
def scenario_with_instances(prefix: str, workdir: Path) -> Iterator[Topology]:
    """Hosts A, B and C (``scenario_topology(prefix)``) and four redis-servers on A: one on
    A's own addresses (``whoami`` = MARKER), one on each of INSTANCES (``whoami`` = its
    name), their files under ``workdir``."""
    with scenario_topology(prefix) as topo, contextlib.ExitStack() as stack:
        a = topo.host_a
        iface = a.exec(["ip", "-o", "-4", "addr", "show", "to", HOST_A.v4]).split()[1]
        for addr in INSTANCES.values():
            a.exec(["ip", "addr", "add", f"{addr}/24", "dev", iface])

        stack.enter_context(RedisProcess(REDIS_PORT, host=HOST_A.v4, also_on=[HOST_A.v6], ns=a, workdir=workdir))
        with RespClient.connect(a, HOST_A.v4) as direct:
            direct.command("SET", "whoami", MARKER)
        for name, addr in INSTANCES.items():
            stack.enter_context(RedisProcess(REDIS_PORT, host=addr, ns=a, workdir=workdir))
            with RespClient.connect(a, addr) as direct:
                direct.command("SET", "whoami", name)
        yield topo


@contextlib.contextmanager
def daemon_on_b(site: Site, args: list[str], *, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """``ambassadord run --iptables ARGS`` on host B (JSON logs); stopped with SIGTERM at the end,
    which must exit 0 and remove its nat rules. Its log is shown when a test fails."""
    with Daemon(["--iptables", *args], ns=site.topo.host_b, workdir=site.workdir, env=env) as daemon:
        yield daemon
        daemon.stop()
        for tool in ("iptables", "ip6tables"):
            rules = daemon.nat_rules(tool)
            assert daemon.CHAIN not in rules, f"{tool}-save -t nat after the daemon exited:\n{rules}"


def addr_of(name: str) -> str:
    """The backend ``HOST:PORT`` of the instance ``name`` (``r1`` .. ``r3``)."""
    return f"{INSTANCES[name]}:{REDIS_PORT}"


# ---- consumers ------------------------------------------------------------------------------


def whoami(site: Site, host: str = "127.0.0.1", *, where: str = "host_b") -> str:
    """One new consumer connection to HOST:6379 (from host B by default): who answered."""
    with RespClient.connect(getattr(site.topo, where), host, REDIS_PORT, timeout=5) as redis:
        answer = redis.command("GET", "whoami")
    return answer.decode() if isinstance(answer, bytes) else repr(answer)


def sample(site: Site, n: int) -> collections.Counter:
    return collections.Counter(whoami(site) for _ in range(n))


def assert_spread(site: Site, names: set[str], n: int, what: str) -> collections.Counter:
    """``n`` new connections (reported as ``what``): each of ``names`` answered at least 5
    of them, and nobody else any. Returns who answered how many."""
    counts = sample(site, n)
    report(f"{what}, {n} connections: {dict(counts)}")
    assert set(counts) == names, f"{what}: expected all of {sorted(names)}, got {dict(counts)}"
    assert min(counts.values()) >= 5, f"{what}: one backend got almost nothing: {dict(counts)}"
    return counts


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


def serve_through_outage(site: Site, daemon: Daemon, since_wall: float, logger: str, *, seconds: float,
                         retries: int, connections: int = 0) -> collections.Counter:
    """New connections while the registry is down, for at least ``seconds``, at least
    ``connections`` of them, and until the daemon has logged ``retries`` stale warnings
    (failed retries) since ``since_wall``: every one must be served (an error fails the
    test), within 15 s. Returns who answered them."""
    down: collections.Counter = collections.Counter()
    since = time.monotonic()
    while (time.monotonic() - since < seconds or sum(down.values()) < connections
           or len(stale_warnings(daemon, since_wall, logger)) < retries):
        assert time.monotonic() - since < 15, \
            f"in 15 s: {len(stale_warnings(daemon, since_wall, logger))} stale warnings logged, {dict(down)}"
        down[whoami(site)] += 1  # must succeed: an error fails the test
    return down


# ---- the daemon's log -------------------------------------------------------------------------


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


def assert_logged_backends(daemon: Daemon, counts: collections.Counter) -> None:
    """The daemon's connection records on port 6379 (all of them, once there are as many as
    ``counts`` counts) name the backends that ``counts`` (from :func:`sample`, the daemon's
    first connections) says answered, and as often."""
    by_backend = collections.Counter(r["backend"] for r in redis_connections(daemon, sum(counts.values())))
    assert by_backend == {addr_of(name): n for name, n in counts.items()}, \
        f"the daemon logged {dict(by_backend)}; the consumers were answered by {dict(counts)}"


def first_backends_event(daemon: Daemon, backends: set[str], after_wall: float, *,
                         stale: bool | None = None, timeout: float = 10) -> dict:
    """The first ``backends`` record logged at/after ``after_wall`` (time.time()) with exactly
    ``backends`` (and ``stale`` if given)."""
    def match(r: dict) -> bool:
        return (r.get("event") == "backends" and r["ts"] >= after_wall - 0.001 and set(r["backends"]) == backends
                and (stale is None or r["stale"] is stale))

    return daemon.wait_for(match, timeout=timeout)


def stale_warnings(daemon: Daemon, after_wall: float, logger: str) -> list[dict]:
    """The resolver's (``logger``'s) "keeping the last known set (stale)" warnings since ``after_wall``."""
    return [r for r in daemon._records_so_far() if r["ts"] >= after_wall and r["level"] == "warning"
            and r["logger"] == logger and "stale" in r["msg"]]


# ---- the cross-host scenario of issue 2 ------------------------------------------------------


def cross_host_config(site: Site, spec: str) -> Path:
    """Check that C cannot reach A but through a process on B; write the daemon's config
    file with the one route ``6379 = SPEC``."""
    with pytest.raises(OSError):
        connect(HOST_A.v4, REDIS_PORT, ns=site.topo.container, timeout=0.5).close()
    config = site.workdir / "routes-cross-host.toml"
    config.write_text(f'[routes]\n{REDIS_PORT} = "{spec}"\n')
    return config


def assert_host_a_unwritten(daemon: Daemon, config: Path) -> dict[str, str]:
    """No address of host A in the daemon's config file, command line or environment;
    returns them by name."""
    written = {
        "config file": config.read_text(),
        "command line": Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
        "environment": Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().replace(b"\0", b"\n").decode(),
    }
    for what, text in written.items():
        assert not HOST_A_PATTERN.search(text), f"host A's address is in the daemon's {what}:\n{text}"
    return written


def assert_clients_reach_host_a(site: Site, daemon: Daemon, family: str, backend: str) -> None:
    """From every one of CLIENT_PATHS: ``redis-cli ping`` and a ``GET whoami`` are answered
    by host A's Redis, and the daemon logged both connections to ``backend``."""
    for where, dial in CLIENT_PATHS:
        before = len(redis_connections(daemon, 0))
        pong = redis_cli(getattr(site.topo, where), dial, "ping")
        assert pong == "PONG", (family, where, dial, pong)
        who = whoami(site, dial, where=where)
        assert who == MARKER, (family, where, dial, who)
        records = redis_connections(daemon, 2, skip=before)
        assert [r["backend"] for r in records] == [backend, backend], (family, where, dial, records)


# ---- figures --------------------------------------------------------------------------------


def report(text: str) -> None:
    """Measured figures, visible with ``pytest -s`` (or -rP)."""
    print(f"\n[figures] {text}")


def ms(seconds: float | None) -> str:
    """``+123ms`` (``never`` for None)."""
    return "never" if seconds is None else f"+{seconds * 1000:.0f}ms"
