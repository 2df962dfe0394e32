"""The Consul resolvers end to end (issue 4): real namespaces, real iptables, real Redis,
a real consul 1.8.7 agent.

The machines (hosts A and B, container C), the redis-servers ``r1`` .. ``r3`` on host A
and the consumers on B and C that tell which of them each new connection reached come from
tests/e2e.py, shared with tests/test_e2e_etcd.py (tests/e2e.py's docstring says more, also
why no bound below fails by chance). The Consul agent (``-dev``) and ambassadord both run
on host B; the test process drives the agent over sockets made in B's namespace
(tests/consul.py with ``ns=``), and the daemon picks a backend from what Consul says now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests import e2e, netns
from tests.consul import ConsulAgent, consul_binary
from tests.e2e import (
    CONFIRM,
    CONSECUTIVE,
    HOST_A_BACKENDS,
    INSTANCES,
    addr_of,
    assert_clients_reach_host_a,
    assert_host_a_unwritten,
    assert_logged_backends,
    assert_spread,
    cross_host_config,
    daemon_on_b,
    first_backends_event,
    ms,
    report,
    sample,
    scenario_with_instances,
    serve_through_outage,
    stale_warnings,
    wait_avoided,
    wait_reached,
    wait_seen,
)
from tests.topology import HOST_A, REDIS_PORT

pytestmark = pytest.mark.netns

CHANGE_WITHIN = 3.0  # issue 4: a registration / deregistration / critical check shows within 3 s
OUTAGE = 3.0  # s of Consul agent outage during which connections must keep being served
RESOLVER = "ambassadord.resolver.consul"  # the resolvers' logger


# ---- machines -----------------------------------------------------------------------------


@dataclass
class Site(e2e.Site):
    agent: ConsulAgent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """Hosts A, B and C; four redis-servers on A; a Consul agent on B (free ports)."""
    netns.require_prerequisites()
    consul_binary()  # skip (or fail under CI) before building anything
    workdir = tmp_path_factory.mktemp("e2e-consul")
    with (scenario_with_instances("ec", workdir) as topo,
          ConsulAgent(node="amb-e2e-host-b", ns=topo.host_b) as agent):
        yield Site(topo, workdir, agent)


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


def consul_args(consul: ConsulAgent, spec: str) -> list[str]:
    return ["--map", f"{REDIS_PORT}={spec}", "--consul", consul.http_addr]


def register(consul: ConsulAgent, *names: str) -> dict[str, str]:
    """Register instances of ``redis`` (with TTL checks, passing); {name: check id}."""
    checks = {n: consul.register("redis", n, INSTANCES[n], REDIS_PORT, ttl_check=True) for n in names}
    consul.wait_for_health("redis", lambda entries: set(names) <= {e["Service"]["ID"] for e in entries})
    return checks


def assert_removed_within_3s(site: Site, name: str, what: str, change: Callable[[], object], *, left: str) -> None:
    """After ``change()`` (a registry call), CONSECUTIVE new connections in a row avoid
    ``name`` within CHANGE_WITHIN from just before the call; the next CONFIRM all reach ``left``."""
    since = time.monotonic()
    change()
    avoided = wait_avoided(site, name, since)
    report(f"{what}: avoided by +{avoided.gone_after * 1000:.0f}ms")
    assert avoided.gone_after < CHANGE_WITHIN, f"{what}: {name} still reached {avoided.gone_after:.2f}s later"
    after = sample(site, CONFIRM)
    assert after == {left: CONFIRM}, f"after {what}, new connections went to {dict(after)}"


# ---- consul://: the service resolver ---------------------------------------------------------


def test_traffic_reaches_both_registered_instances(site, consul):
    register(consul, "r1", "r2")
    with daemon_on_b(site, consul_args(consul, "consul:///redis")) as daemon:
        counts = assert_spread(site, {"r1", "r2"}, 40, "2 instances")
        assert_logged_backends(daemon, counts)


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
        report(f"{how}: agent call {called * 1000:.0f}ms; route updated (log) +{(event['ts'] - wall) * 1000:.0f}ms; "
               f"last connection to r2 {ms(avoided.last_hit)} ({avoided.hits} of {avoided.connections}); "
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

        assert_spread(site, {"r1", "r2", "r3"}, 90, "3 instances")


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

        # New connections while the agent is down, for at least OUTAGE seconds and until the
        # daemon has failed to reach it (and retried) three times: every one must be served.
        down = serve_through_outage(site, daemon, wall, RESOLVER, seconds=OUTAGE, retries=3)
        outage = time.time() - wall
        warnings = stale_warnings(daemon, wall, RESOLVER)
        report(f"agent down {outage:.1f}s: {sum(down.values())} connections all served: {dict(down)}; "
               f"{len(warnings)} stale warnings, e.g. {warnings[0]['msg']!r}")
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
        assert_removed_within_3s(site, "r2", "after the restart, deregister r2", lambda: consul.deregister("r2"),
                                 left="r3")
        assert daemon.proc.pid == pid and daemon.alive()


# ---- consul-kv:// --------------------------------------------------------------------------


def test_kv_prefix_traffic_delete_and_malformed_value(site, consul):
    consul.kv_put("services/redis/a", addr_of("r1"))
    consul.kv_put("services/redis/b", addr_of("r2"))
    with daemon_on_b(site, consul_args(consul, "consul-kv:///services/redis")) as daemon:
        assert_spread(site, {"r1", "r2"}, 40, "KV, 2 keys")

        assert_removed_within_3s(site, "r2", "KV delete b", lambda: consul.kv_delete("services/redis/b"), left="r1")

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
        assert_spread(site, {"r1", "r3"}, 40, "KV, keys a and c")


# ---- the cross-host scenario of issue 2, over Consul ---------------------------------------------


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
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_CACERT"):
        monkeypatch.delenv(var, raising=False)
    config = cross_host_config(site, "consul:///redis")
    agent = default_agent
    agent.register("redis", "redis-on-host-a", HOST_A.v4, REDIS_PORT)  # what host A's deployment does
    agent.wait_for_health("redis", 1)
    with daemon_on_b(site, ["--config", str(config)]) as daemon:
        assert_host_a_unwritten(daemon, config)
        for family, backend in HOST_A_BACKENDS:
            if family == "v6":  # the same instance, re-registered with its IPv6 address
                wall = time.time()
                agent.register("redis", "redis-on-host-a", HOST_A.v6, REDIS_PORT)
                first_backends_event(daemon, {backend}, wall)
            assert_clients_reach_host_a(site, daemon, family, backend)
