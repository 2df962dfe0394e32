"""The scenario of issue 2, end to end: real namespaces, real iptables, real Redis.

Host A runs Redis; host B runs ``ambassadord run --iptables`` with one route, 6379 to A;
C is a container on B's bridge (see tests/topology.py for the addresses). Consumers on B
and in C talk to an ordinary local address on port 6379, over IPv4 and IPv6, and must be
answered by A's Redis:

* ``127.0.0.1`` / ``::1`` on B: the nat OUTPUT path (a process on the host);
* the bridge address from C: the nat PREROUTING path (a container, gateway = bridge).

The daemon runs in three variants of the same route: ``--map`` to A's IPv4 address, a
``--config`` mapping file, and ``--map`` to A's IPv6 address. Every client path runs
against every variant (client and backend address families are independent).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.daemon import Daemon, RedisProcess, connect
from tests.topology import (
    BRIDGE,
    HOST_A,
    REDIS_PORT,
    RespClient,
    Topology,
    redis_cli,
    scenario_topology,
)

pytestmark = pytest.mark.netns

MARKER = "redis on host A"  # stored in A's Redis, read back through the proxy


def route_args(variant: str, workdir: Path) -> list[str]:
    """The daemon's route flags for one variant: 6379 -> host A's Redis."""
    if variant == "map-v4":
        return ["--map", f"{REDIS_PORT}={HOST_A.v4}:{REDIS_PORT}"]
    if variant == "map-v6":
        return ["--map", f"{REDIS_PORT}=[{HOST_A.v6}]:{REDIS_PORT}"]
    if variant == "config-v4":
        config = workdir / "routes.toml"
        config.write_text(f'[routes]\n{REDIS_PORT} = "{HOST_A.v4}:{REDIS_PORT}"\n')
        return ["--config", str(config)]
    raise AssertionError(variant)


VARIANTS = ["map-v4", "config-v4", "map-v6"]

# Where a consumer is and the address it dials (port 6379 on it).
CLIENT_PATHS = [
    pytest.param("host_b", "127.0.0.1", id="host-v4"),  # nat OUTPUT
    pytest.param("host_b", "::1", id="host-v6"),
    pytest.param("container", BRIDGE.v4, id="container-v4"),  # nat PREROUTING
    pytest.param("container", BRIDGE.v6, id="container-v6"),
]


def start_redis_on_a(topo: Topology, workdir: Path) -> RedisProcess:
    redis = RedisProcess(REDIS_PORT, host=HOST_A.v4, also_on=[HOST_A.v6], ns=topo.host_a, workdir=workdir)
    with RespClient.connect(topo.host_a, HOST_A.v4) as direct:
        direct.command("SET", "whoami", MARKER)
    return redis


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    """Hosts A and B and container C, with Redis running on A; shared by the module."""
    netns.require_prerequisites()
    with scenario_topology("e2e") as topo:
        redis = start_redis_on_a(topo, tmp_path_factory.mktemp("redis"))
        try:
            yield topo
        finally:
            redis.stop()


@pytest.fixture(scope="module", params=VARIANTS)
def ambassadord(request, topology, tmp_path_factory) -> Iterator[Daemon]:
    """ambassadord on host B with the route 6379 -> A, in each variant; stopped after its tests."""
    workdir = tmp_path_factory.mktemp(request.param)
    with start_ambassadord_on_b(topology, request.param, workdir) as daemon:
        yield daemon
        daemon.stop()


def start_ambassadord_on_b(topo: Topology, variant: str, workdir: Path) -> Daemon:
    """``ambassadord run --iptables`` on host B with the route of ``variant``, logging at
    debug level; ready once it listens (and so redirects)."""
    return Daemon(["--iptables", *route_args(variant, workdir), "--log-level", "debug"], ns=topo.host_b,
                  workdir=workdir)


def test_container_reaches_host_a_only_through_host_b(topology):
    """The topology itself: B reaches A's Redis directly; C cannot (B does not forward),
    so a PONG in C below can only come through a proxy on B."""
    assert redis_cli(topology.host_b, HOST_A.v4, "ping") == "PONG"
    assert redis_cli(topology.host_b, HOST_A.v6, "ping") == "PONG"
    for address in (HOST_A.v4, HOST_A.v6):
        with pytest.raises(OSError):  # B drops it: a timeout (a SYN-ACK takes microseconds here)
            connect(address, REDIS_PORT, ns=topology.container, timeout=0.5).close()


@pytest.mark.parametrize(("where", "address"), CLIENT_PATHS)
def test_ping_is_answered_by_host_a(topology, ambassadord, where, address):
    consumer = getattr(topology, where)
    assert redis_cli(consumer, address, "ping") == "PONG"
    assert redis_cli(consumer, address, "get", "whoami") == MARKER


@pytest.mark.parametrize(("where", "address"), CLIENT_PATHS)
def test_one_mib_value_round_trips(topology, ambassadord, where, address, request):
    consumer = getattr(topology, where)
    key = f"big:{request.node.callspec.id}"
    value = os.urandom(1 << 20)  # every byte value, so nothing is "text" by luck

    with RespClient.connect(consumer, address) as redis:
        assert redis.command("SET", key, value) == "OK"
        assert_same_bytes(redis.command("GET", key), value, "GET through the proxy")
    with RespClient.connect(topology.host_a, HOST_A.v4) as direct:
        assert_same_bytes(direct.command("GET", key), value, "GET on host A directly")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sigterm_exits_0_and_removes_its_rules(variant, tmp_path):
    """A fresh topology of its own, so that the daemon's whole life is in this test."""
    netns.require_prerequisites()
    with scenario_topology("life") as topo:
        redis = start_redis_on_a(topo, tmp_path)
        try:
            host_b = topo.host_b
            with pytest.raises(RuntimeError, match="refused"):
                redis_cli(host_b, "127.0.0.1", "ping")  # nothing on B's 6379 before

            with start_ambassadord_on_b(topo, variant, tmp_path) as daemon:
                assert daemon.CHAIN in daemon.nat_rules("iptables")
                assert daemon.CHAIN in daemon.nat_rules("ip6tables")
                assert redis_cli(host_b, "127.0.0.1", "ping") == "PONG"
                # exits 0 within 5 s of SIGTERM, else it fails quoting the log
                daemon.stop(expect=0, timeout=5)

            for tool in ("iptables", "ip6tables"):
                rules = daemon.nat_rules(tool)
                assert daemon.CHAIN not in rules, f"{tool}-save -t nat after exit:\n{rules}"
            with pytest.raises(RuntimeError, match="refused"):
                redis_cli(host_b, "127.0.0.1", "ping")
        finally:
            redis.stop()


def assert_same_bytes(got: object, want: bytes, what: str) -> None:
    """Compare large values without pytest diffing a megabyte."""
    if got == want:
        return
    if not isinstance(got, bytes):
        raise AssertionError(f"{what}: expected {len(want)} bytes, got {got!r:.200}")
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise AssertionError(f"{what}: got {len(got)} bytes, expected {len(want)}; first difference at byte {first}")
