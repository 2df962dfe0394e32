"""The Consul resolvers end to end (issue 4): real namespaces, real iptables, real Redis,
a real consul 1.8.7 agent.

The machines are those of tests/test_e2e_scenario.py (tests/topology.py): host A, host B
on a LAN, container C on B's bridge; nothing routes out. Host A gets three more addresses,
each with a redis-server of its own whose ``whoami`` key names it (``r1`` .. ``r3``), so a
consumer's ``GET whoami`` tells which backend a connection reached. The Consul agent
(``-dev``) and ambassadord both run on host B; the test process drives the agent over
sockets made in B's namespace (tests/consul.py with ``ns=``).

Consumers connect to B's 127.0.0.1:6379 (nat OUTPUT) and, in the cross-host scenario, also
to the bridge address from C (nat PREROUTING); ``run --iptables`` redirects them to the
daemon, which picks a backend from what Consul says now.

Bounds that could fail by chance are chosen so that they do not: with random balance over
two backends, P(one is seen fewer than 5 times in 40 connections) ~ 2e-7; with three over
90 connections, P(one below 5) ~ 1e-10; "N consecutive connections all avoid a backend
that is still in the set" has probability 2^-N (N = 20 and then 30 more).
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

from tests import netns, topology
from tests.consul import ConsulAgent, consul_binary
from tests.daemon import Daemon, wait_until
from tests.topology import (
    BRIDGE,
    HOST_A,
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

CHANGE_WITHIN = 3.0  # issue 4: a registration / deregistration / critical check shows within 3 s
CONSECUTIVE = 20  # "gone" = this many new connections in a row all avoided it
CONFIRM = 30  # ... and then this many more
OUTAGE = 3.0  # s of Consul agent outage during which connections must keep being served


# ---- machines -----------------------------------------------------------------------------


@dataclass
class Site:
    topo: Topology
    agent: ConsulAgent
    workdir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """Hosts A, B and C; four redis-servers on A; a Consul agent on B (free ports)."""
    netns.require_prerequisites()
    consul_binary()  # skip (or fail under CI) before building anything
    workdir = tmp_path_factory.mktemp("e2e-consul")
    with scenario_topology("ec") as topo, contextlib.ExitStack() as stack:
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

        agent = stack.enter_context(ConsulAgent(node="amb-e2e-host-b", ns=topo.host_b))
        yield Site(topo, agent, workdir)


@pytest.fixture
def consul(site) -> Iterator[ConsulAgent]:
    """The module's agent, emptied after each test (and running again if a test stopped it)."""
    agent = site.agent
    if not agent.running:
        agent.start()
    yield agent
    if not agent.running:
        agent.start()  # -dev: a fresh agent is empty anyway
        return
    for sid in agent.services():
        agent.deregister(sid)
    agent.kv_delete("services", recurse=True)


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
                         stale: bool | None = None) -> dict:
    """The first ``backends`` record logged at/after ``after_wall`` (time.time()) with exactly
    ``backends`` (and ``stale`` if given)."""
    def match(r: dict) -> bool:
        return (r.get("event") == "backends" and r["ts"] >= after_wall - 0.001 and set(r["backends"]) == backends
                and (stale is None or r["stale"] is stale))

    return daemon.wait_for(match, timeout=10)


def addr_of(name: str) -> str:
    return f"{INSTANCES[name]}:{REDIS_PORT}"


def consul_args(consul: ConsulAgent, spec: str) -> list[str]:
    return ["--map", f"{REDIS_PORT}={spec}", "--consul", consul.http_addr]


def register(consul: ConsulAgent, *names: str) -> dict[str, str]:
    """Register instances of ``redis`` (with TTL checks, passing); {name: check id}."""
    checks = {n: consul.register("redis", n, INSTANCES[n], REDIS_PORT, ttl_check=True) for n in names}
    consul.wait_for_health("redis", lambda entries: set(names) <= {e["Service"]["ID"] for e in entries})
    return checks


def report(text: str) -> None:
    """Measured figures, visible with ``pytest -s`` (or -rP)."""
    print(f"\n[figures] {text}")


# ---- consul://: the service resolver ---------------------------------------------------------


def test_traffic_reaches_both_registered_instances(site, consul):
    register(consul, "r1", "r2")
    with daemon_on_b(site, consul_args(consul, "consul:///redis")) as daemon:
        counts = sample(site, 40)
        report(f"2 instances, 40 connections: {dict(counts)}")
        assert set(counts) == {"r1", "r2"}, counts
        assert min(counts.values()) >= 5, f"one instance got almost nothing: {dict(counts)}"
        by_backend = collections.Counter(r["backend"] for r in redis_connections(daemon, 40))
        assert by_backend == {addr_of("r1"): counts["r1"], addr_of("r2"): counts["r2"]}, by_backend


@pytest.mark.parametrize("how", ["deregister", "critical"])
def test_removed_instance_gets_no_new_connections_within_3s(site, consul, how):
    checks = register(consul, "r1", "r2")
    with daemon_on_b(site, consul_args(consul, "consul:///redis")) as daemon:
        wait_seen(site, {"r1", "r2"})

        wall, since = time.time(), time.monotonic()
        if how == "deregister":
            consul.deregister("r2")
        else:
            consul.check_fail(checks["r2"], "test: critical")
        called = time.monotonic() - since
        avoided = wait_avoided(site, "r2", since)
        event = first_backends_event(daemon, {addr_of("r1")}, wall, stale=False)
        last = "never" if avoided.last_hit is None else f"+{avoided.last_hit * 1000:.0f}ms"
        report(f"{how}: agent call {called * 1000:.0f}ms; route updated (log) +{(event['ts'] - wall) * 1000:.0f}ms; "
               f"last connection to r2 {last} ({avoided.hits} of {avoided.connections}); "
               f"{CONSECUTIVE} in a row avoided it by +{avoided.gone_after * 1000:.0f}ms")
        assert avoided.gone_after < CHANGE_WITHIN, f"{how}: r2 still reached {avoided.gone_after:.2f}s later"

        after = sample(site, CONFIRM)
        assert after == {"r1": CONFIRM}, f"after the {how}, new connections went to {dict(after)}"


def test_third_instance_receives_connections_within_3s(site, consul):
    register(consul, "r1", "r2")
    with daemon_on_b(site, consul_args(consul, "consul:///redis")):
        wait_seen(site, {"r1", "r2"})

        since = time.monotonic()
        register(consul, "r3")
        took, tried = wait_reached(site, "r3", since, timeout=CHANGE_WITHIN)
        report(f"register r3: first connection to it +{took * 1000:.0f}ms (connection #{tried})")

        counts = sample(site, 90)
        report(f"3 instances, 90 connections: {dict(counts)}")
        assert set(counts) == {"r1", "r2", "r3"}, counts
        assert min(counts.values()) >= 5, f"one instance got almost nothing: {dict(counts)}"


def test_agent_outage_keeps_last_set_and_restart_is_picked_up(site, consul):
    register(consul, "r1", "r2")
    with daemon_on_b(site, consul_args(consul, "consul:///redis")) as daemon:
        wait_seen(site, {"r1", "r2"})
        pid = daemon.proc.pid

        # The agent goes away: the route keeps its last known set, marked stale.
        wall = time.time()
        consul.stop()
        with pytest.raises(OSError):
            consul.services()
        stale_event = first_backends_event(daemon, {addr_of("r1"), addr_of("r2")}, wall, stale=True)

        def retries() -> list[dict]:
            return [r for r in daemon._records_so_far() if r["ts"] >= wall and r["level"] == "warning"
                    and r["logger"] == "ambassadord.resolver.consul" and "stale" in r["msg"]]

        # New connections while the agent is down, for at least OUTAGE seconds and until the
        # daemon has failed to reach it (and retried) three times: every one must be served.
        down: collections.Counter = collections.Counter()
        since = time.monotonic()
        while time.monotonic() - since < OUTAGE or len(retries()) < 3:
            assert time.monotonic() - since < 15, f"in 15 s: {len(retries())} stale retries logged, {dict(down)}"
            down[whoami(site)] += 1  # must succeed: an error fails the test
        outage = time.time() - wall
        report(f"agent down {outage:.1f}s: {sum(down.values())} connections all served: {dict(down)}; "
               f"{len(retries())} stale warnings, e.g. {retries()[0]['msg']!r}")
        assert set(down) == {"r1", "r2"}, down
        assert stale_event["error"], stale_event

        # The agent is back, empty (-dev): register a changed set.
        wall, since = time.time(), time.monotonic()
        consul.start()
        register(consul, "r2", "r3")
        took, _ = wait_reached(site, "r3", since, timeout=20)
        avoided = wait_avoided(site, "r1", since, timeout=20)
        event = first_backends_event(daemon, {addr_of("r2"), addr_of("r3")}, wall, stale=False)
        report(f"agent restarted: r3 reached +{took:.2f}s, r1 avoided by +{avoided.gone_after:.2f}s "
               f"(log +{event['ts'] - wall:.2f}s)")
        after = sample(site, CONFIRM)
        assert set(after) == {"r2", "r3"}, after

        # ... and the watch goes on after the restart (the index went backwards): changes
        # show within 3 s again.
        since = time.monotonic()
        consul.deregister("r2")
        avoided = wait_avoided(site, "r2", since)
        report(f"after the restart, deregister r2: avoided by +{avoided.gone_after * 1000:.0f}ms")
        assert avoided.gone_after < CHANGE_WITHIN
        assert sample(site, CONFIRM) == {"r3": CONFIRM}
        assert daemon.proc.pid == pid and daemon.alive()


# ---- consul-kv:// --------------------------------------------------------------------------


def test_kv_prefix_traffic_delete_and_malformed_value(site, consul):
    consul.kv_put("services/redis/a", addr_of("r1"))
    consul.kv_put("services/redis/b", addr_of("r2"))
    with daemon_on_b(site, consul_args(consul, "consul-kv:///services/redis")) as daemon:
        counts = sample(site, 40)
        report(f"KV, 2 keys, 40 connections: {dict(counts)}")
        assert set(counts) == {"r1", "r2"}, counts
        assert min(counts.values()) >= 5, counts

        since = time.monotonic()
        consul.kv_delete("services/redis/b")
        avoided = wait_avoided(site, "r2", since)
        report(f"KV delete b: avoided by +{avoided.gone_after * 1000:.0f}ms")
        assert avoided.gone_after < CHANGE_WITHIN
        assert sample(site, CONFIRM) == {"r1": CONFIRM}

        # A malformed value under the prefix: skipped, named in the log; the rest keeps serving.
        wall = time.time()
        consul.kv_put("services/redis/bad", f"{INSTANCES['r3']}:notaport")
        record = daemon.wait_for(lambda r: r["ts"] >= wall - 0.001 and "services/redis/bad" in r.get("msg", ""))
        report(f"malformed value logged: {record['level']} {record['msg']!r}")
        assert record["level"] in ("warning", "error"), record
        assert sample(site, CONFIRM) == {"r1": CONFIRM}

        # A good key next to the bad one is picked up.
        since = time.monotonic()
        consul.kv_put("services/redis/c", addr_of("r3"))
        took, _ = wait_reached(site, "r3", since, timeout=CHANGE_WITHIN)
        report(f"KV put c: first connection to r3 +{took * 1000:.0f}ms")
        counts = sample(site, 40)
        assert set(counts) == {"r1", "r3"} and min(counts.values()) >= 5, counts


# ---- the cross-host scenario of issue 2, over Consul ---------------------------------------------

CLIENT_PATHS = [("host_b", "127.0.0.1"), ("host_b", "::1"), ("container", BRIDGE.v4), ("container", BRIDGE.v6)]
HOST_A_PATTERN = re.compile(re.escape(HOST_A.v4) + r"(?!\d)|" + re.escape(HOST_A.v6) + r"(?![0-9a-f:])", re.I)


@pytest.fixture
def default_agent(site) -> Iterator[ConsulAgent]:
    """A second agent on host B, on Consul's default HTTP address 127.0.0.1:8500 (closed
    at teardown, so its log is still there when a failing test's report is made)."""
    with ConsulAgent(node="host-b", ns=site.topo.host_b, ports={"http": 8500}) as agent:
        yield agent


def test_cross_host_scenario_over_consul(site, default_agent, monkeypatch):
    """Host B's consumers reach host A's Redis through ``6379 = "consul:///redis"``, with no
    address of host A written anywhere on host B: Consul (on B's default agent address,
    127.0.0.1:8500, so not even --consul is given) is the only place that knows it."""
    topo = site.topo
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_CACERT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(OSError):  # C cannot reach A but through a process on B
        connect(topo.container, HOST_A.v4, REDIS_PORT, timeout=0.5).close()

    config = site.workdir / "routes-cross-host.toml"
    config.write_text(f'[routes]\n{REDIS_PORT} = "consul:///redis"\n')
    agent = default_agent
    agent.register("redis", "redis-on-host-a", HOST_A.v4, REDIS_PORT)  # what host A's deployment does
    agent.wait_for_health("redis", 1)
    with daemon_on_b(site, ["--config", str(config)]) as daemon:
        written = {
            "config file": config.read_text(),
            "command line": Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(),
            "environment": Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().replace(b"\0", b"\n").decode(),
        }
        for what, text in written.items():
            assert not HOST_A_PATTERN.search(text), f"host A's address is in the daemon's {what}:\n{text}"

        for family, address in (("v4", HOST_A.v4), ("v6", HOST_A.v6)):
            if family == "v6":  # the same instance, re-registered with its IPv6 address
                wall = time.time()
                agent.register("redis", "redis-on-host-a", HOST_A.v6, REDIS_PORT)
                first_backends_event(daemon, {f"[{HOST_A.v6}]:{REDIS_PORT}"}, wall)
            backend = f"[{address}]:{REDIS_PORT}" if ":" in address else f"{address}:{REDIS_PORT}"
            for where, dial in CLIENT_PATHS:
                before = len(redis_connections(daemon, 0))
                assert redis_cli(getattr(topo, where), dial, "ping") == "PONG", (family, where, dial)
                assert whoami(site, dial, where=where) == MARKER, (family, where, dial)
                records = redis_connections(daemon, 2, skip=before)
                assert [r["backend"] for r in records] == [backend, backend], (family, where, dial, records)
