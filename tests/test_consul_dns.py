"""The DNS resolver (backends/dns.py) against Consul's DNS interface: a real consul 1.8.7
agent (tests/consul.py) with registered services, answering ``NAME.service.consul``.

What Consul's DNS interface does, as these tests rely on it (checked against 1.8.7):

* ``NAME.service.consul`` SRV: one record per healthy instance, priority 1, weight 1,
  TTL 0. An instance with an IP Service.Address has the target ``<hex IP>.addr.dc1.consul.``
  (``7f000002.addr...`` for 127.0.0.2) and its A (or AAAA) record in the additional
  section; one without an Address has the target ``NODE.node.dc1.consul.``, with the
  node's address (here 127.0.0.1) in the additional section. The additional section also
  carries a TXT record of the node (``consul-network-segment=``), which is not an address.
* ``TAG.NAME.service.consul`` filters by tag; ``NAME.service.consul`` A lists the
  instances' addresses (what ``dns://NAME:PORT`` uses).
* An unknown service, or one whose every instance is critical: NXDOMAIN (with the SOA).
* Healthy means "not critical": an instance whose check is *warning* stays in DNS
  (``dns_config.only_passing`` is false by default), though the health API's ``?passing``
  drops it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ambassadord.backends import NotFound, ResolverOptions, parse_spec
from tests.consul import ConsulAgent

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0  # every wait on Consul (registration, check change, watch) has this deadline

R1 = ("127.0.0.2", 6379)  # redis-1, tag primary
R2 = ("127.0.0.3", 6380)  # redis-2, tag replica
R3 = ("127.0.0.4", 6381)  # redis-3, registered by the watch test


@pytest.fixture(scope="module")
def agent():
    with ConsulAgent(node="amb-dns-test") as a:
        yield a


@pytest.fixture
def redis(agent):
    """Two instances of ``redis`` with TTL checks (passing); yields {id: check id}.

    Afterwards every ``redis`` instance (also those a test added) is deregistered.
    """
    checks = {
        "redis-1": agent.register("redis", "redis-1", *R1, tags=("primary",), ttl_check=True),
        "redis-2": agent.register("redis", "redis-2", *R2, tags=("replica",), ttl_check=True),
    }
    agent.wait_for_health("redis", 2, timeout=TIMEOUT)
    yield checks
    for sid, svc in agent.services().items():
        if svc["Service"] == "redis":
            agent.deregister(sid)
    agent.wait_for_health("redis", 0, passing=False, timeout=TIMEOUT)


def options(agent: ConsulAgent, **kw) -> ResolverOptions:
    return ResolverOptions(dns_servers=(agent.dns_server,), **kw)


def addrs(backends) -> set[tuple[str, int]]:
    return {(b.address, b.port) for b in backends}


async def resolve(agent: ConsulAgent, spec: str):
    return await parse_spec(spec).resolver(options(agent)).resolve()


async def resolve_until(agent: ConsulAgent, spec: str, expected: set | type, *, timeout: float = TIMEOUT):
    """Resolve ``spec`` again and again until the answer's (address, port) set is ``expected``
    (or, given an exception class, until resolving raises it); fail with the last answer."""
    last = None
    with trio.move_on_after(timeout):
        while True:
            try:
                last = addrs(await resolve(agent, spec))
            except Exception as exc:  # noqa: BLE001 - compared below, and quoted on failure
                last = exc
                if isinstance(expected, type) and isinstance(exc, expected):
                    return exc
            if last == expected:
                return last
            await trio.sleep(0.05)
    pytest.fail(f"{spec}: not {expected} within {timeout:g}s; last answer {last!r}\n{agent.log_tail(20)}")


async def call(fn, *args, **kw):
    """A blocking agent call (urllib) from a trio test, in a worker thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


def cli_resolve(agent: ConsulAgent, spec: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ambassadord", "resolve", "--dns-server", agent.dns_addr, spec],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


# ---- SRV: bare names and srv:// ----------------------------------------------------------


@pytest.mark.parametrize("spec", ["redis.service.consul", "srv://redis.service.consul"])
async def test_srv_name_returns_both_instances(agent, redis, spec):
    backends = await resolve(agent, spec)
    assert len(backends) == 2, backends
    assert addrs(backends) == {R1, R2}
    # Consul's SRV records: priority 1, weight 1; targets named <hex ip>.addr.dc1.consul
    assert {(b.priority, b.weight) for b in backends} == {(1, 1)}
    assert {b.name for b in backends} == {"7f000002.addr.dc1.consul", "7f000003.addr.dc1.consul"}


def test_cli_resolves_consul_name(agent, redis):
    proc = cli_resolve(agent, "redis.service.consul")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(lines) == ["127.0.0.2:6379", "127.0.0.3:6380"], proc.stdout


async def test_tag_filter(agent, redis):
    primary = await resolve(agent, "primary.redis.service.consul")
    assert addrs(primary) == {R1}
    assert addrs(await resolve(agent, "srv://replica.redis.service.consul")) == {R2}


async def test_service_without_address_gets_the_node_address(agent):
    """No Service.Address: the SRV target is NODE.node.dc1.consul, whose A record (the
    node's address, the agent's -bind 127.0.0.1) is in the additional section."""
    await call(agent.register, "noaddr", "noaddr-1", None, 7777)
    try:
        await call(agent.wait_for_health, "noaddr", 1, timeout=TIMEOUT)
        backends = await resolve(agent, "noaddr.service.consul")
        assert addrs(backends) == {("127.0.0.1", 7777)}
        assert [b.name for b in backends] == [f"{agent.node}.node.dc1.consul"]
    finally:
        await call(agent.deregister, "noaddr-1")


# ---- health ------------------------------------------------------------------------------


async def test_failing_ttl_check_drops_the_instance(agent, redis):
    await call(agent.check_fail, redis["redis-2"])
    await resolve_until(agent, "redis.service.consul", {R1})
    await call(agent.check_pass, redis["redis-2"])
    await resolve_until(agent, "redis.service.consul", {R1, R2})
    # every instance critical: Consul answers NXDOMAIN, the route has no backends
    await call(agent.check_fail, redis["redis-1"])
    await call(agent.check_fail, redis["redis-2"])
    await resolve_until(agent, "redis.service.consul", NotFound)


async def test_warning_instance_stays_in_dns(agent, redis):
    """Consul's DNS drops critical instances only (only_passing is off by default): a
    warning one leaves the health API's ?passing answer but keeps its SRV record."""
    await call(agent.check_warn, redis["redis-2"])
    await call(agent.wait_for_health, "redis", 1, timeout=TIMEOUT)
    assert addrs(await resolve(agent, "redis.service.consul")) == {R1, R2}


# ---- dns://NAME:PORT ------------------------------------------------------------------------


async def test_dns_spec_uses_a_records_with_fixed_port(agent, redis):
    backends = await resolve(agent, "dns://redis.service.consul:7000")
    assert len(backends) == 2, backends
    assert addrs(backends) == {(R1[0], 7000), (R2[0], 7000)}


# ---- unknown service -------------------------------------------------------------------------


async def test_unknown_service_is_not_found(agent):
    with pytest.raises(NotFound, match="NXDOMAIN"):
        await resolve(agent, "no-such-service.service.consul")
    with pytest.raises(NotFound):
        await resolve(agent, "dns://no-such-service.service.consul:6379")


def test_cli_unknown_service_exits_1(agent):
    proc = cli_resolve(agent, "no-such-service.service.consul")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "no-such-service.service.consul" in proc.stderr and "NXDOMAIN" in proc.stderr, proc.stderr


# ---- watch --------------------------------------------------------------------------------


async def test_watch_follows_registrations(agent, redis):
    """watch() publishes the two instances, then a set with a newly registered third, then
    one without a deregistered instance: Consul's TTL is 0, clamped to dns_min_ttl."""
    resolver = parse_spec("redis.service.consul").resolver(options(agent, dns_min_ttl=0.5))
    published = []
    wanted: set = {R1, R2}
    arrived = trio.Event()

    def publish(backend_set):
        published.append(backend_set)
        if addrs(backend_set) == wanted and not backend_set.stale and backend_set.error is None:
            arrived.set()

    async def expect(target: set, what: str):
        nonlocal wanted, arrived
        wanted, arrived = target, trio.Event()
        if published and addrs(published[-1]) == target:
            return
        with trio.move_on_after(TIMEOUT):
            await arrived.wait()
            return
        pytest.fail(f"watch: no published set {sorted(target)} within {TIMEOUT:g}s after {what}; published: "
                    f"{[(sorted(addrs(s)), s.stale, s.error) for s in published]}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.watch, publish)
        await expect({R1, R2}, "start")
        await call(agent.register, "redis", "redis-3", *R3)
        await expect({R1, R2, R3}, "registering redis-3")
        await call(agent.deregister, "redis-1")
        await expect({R2, R3}, "deregistering redis-1")
        nursery.cancel_scope.cancel()
    assert resolver.failures == 0
