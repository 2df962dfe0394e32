"""Connect mode's pure parts, without the kernel: the maps' bytes (ambassadord/connect/
layout.py) and where cgroup v2 is mounted (cgroup.find_cgroup2_mount).

The kernel test (tests/test_connect_bpf.py) checks the same sizes against the compiled
object at load; here each field's place and byte order is pinned."""

from __future__ import annotations

import socket
import sys

import pytest

from ambassadord.connect import MAX_BACKENDS, Backend, BackendEjected, ConnectionEnded, find_cgroup2_mount
from ambassadord.connect import layout

HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
"""


@pytest.mark.parametrize("text, mount", [
    (HYBRID, "/sys/fs/cgroup/unified"),
    ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n", "/sys/fs/cgroup"),
    ("none /mnt/my\\040cgroups cgroup2 rw 0 0\n", "/mnt/my cgroups"),
    ("cgroup2 /a cgroup2 rw 0 0\ncgroup2 /b cgroup2 rw 0 0\n", "/a"),
])
def test_find_cgroup2_mount(text, mount):
    assert find_cgroup2_mount(text) == mount


@pytest.mark.parametrize("text", ["", "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n", "garbage\n"])
def test_no_cgroup2_mount(text):
    with pytest.raises(LookupError, match="cgroup2"):
        find_cgroup2_mount(text)


def test_sizes_match_the_c_structs():
    assert (layout.ROUTE_KEY.size, layout.BACKEND.size, layout.ROUTE_HEAD.size) == (16, 24, 24)
    assert layout.ROUTE_SIZE == 24 + MAX_BACKENDS * 24 == 792
    assert (layout.ADDR_KEY.size, layout.EJECT_KEY.size, layout.EVENT.size) == (20, 20, 112)


def test_route_key_is_scope_then_port_host_order():
    key = layout.route_key(6379, scope=0x0102030405060708)
    assert key == (0x0102030405060708).to_bytes(8, "little") + (6379).to_bytes(2, "little") + bytes(6)
    assert layout.route_key(80) == bytes(8) + (80).to_bytes(2, "little") + bytes(6)


def test_route_value_bytes():
    value = layout.route_value(
        [Backend("10.0.0.5", 6379, weight=3, priority=1), Backend("fd00::5", 6380), Backend("::ffff:10.0.0.7", 1)],
        balance="round-robin", eject_for=2.5, connect_timeout=0.0015)
    assert len(value) == layout.ROUTE_SIZE
    rr, timeout_ms, eject_ns, count, balance = layout.ROUTE_HEAD.unpack_from(value)
    assert (rr, timeout_ms, eject_ns, count, balance) == (0, 2, 2_500_000_000, 3, 1)  # 1.5 ms rounds up
    first = value[24:48]
    assert first[:16] == bytes([10, 0, 0, 5]) + bytes(12)  # network order, IPv4 first
    assert first[16:18] == bytes([0x18, 0xEB])  # 6379, network order
    assert first[18] == socket.AF_INET
    assert first[20:24] == (3).to_bytes(2, "little") + (1).to_bytes(2, "little")
    second = value[48:72]
    assert second[:16] == socket.inet_pton(socket.AF_INET6, "fd00::5") and second[18] == socket.AF_INET6
    third = value[72:96]
    assert third[:4] == bytes([10, 0, 0, 7]) and third[18] == socket.AF_INET  # v4-mapped is IPv4
    assert value[96:] == bytes(len(value) - 96)


def test_route_value_round_trip():
    backends = [Backend("10.0.0.5", 6379, 3, 1), Backend("fd00::5", 6380, 0, 2)]
    value = layout.route_value(backends, eject_for=10, connect_timeout=2)
    assert layout.unpack_route(value) == (backends, {"rr": 0, "connect_timeout": 2.0, "eject_for": 10.0, "balance": "random"})
    assert layout.unpack_route(layout.route_value([], eject_for=0, connect_timeout=0))[0] == []


@pytest.mark.parametrize("make, message", [
    (lambda: Backend("10.0.0.300", 1), "'10.0.0.300' is not an IP address"),
    (lambda: Backend("redis.local", 1), "'redis.local' is not an IP address"),
    (lambda: Backend("10.0.0.1", 0), "port 0"),
    (lambda: Backend("10.0.0.1", 65536), "port 65536"),
    (lambda: Backend("10.0.0.1", 1, weight=-1), "weight -1"),
    (lambda: Backend("10.0.0.1", 1, priority=70000), "priority 70000"),
    (lambda: Backend("10.0.0.1", 1, weight=1.5), "weight 1.5"),
    (lambda: layout.route_value([], balance="least-conn", eject_for=1, connect_timeout=1), "'least-conn'"),
    (lambda: layout.route_value([], eject_for=-1, connect_timeout=1), "eject_for -1"),
    (lambda: layout.route_value([], eject_for=1, connect_timeout=float("nan")), "connect_timeout nan"),
    (lambda: layout.route_value([Backend("10.0.0.1", 1)] * 33, eject_for=1, connect_timeout=1), "at most 32"),
    (lambda: layout.route_key(0), "route port 0"),
    (lambda: layout.route_key(80, scope=-1), "scope -1"),
])
def test_bad_values_are_named(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_address_keys_round_trip():
    assert layout.unpack_addr_key(layout.addr_key("172.17.0.1")) == "172.17.0.1"
    assert layout.unpack_addr_key(layout.addr_key("::ffff:172.17.0.1")) == "172.17.0.1"
    assert layout.unpack_addr_key(layout.addr_key("fd00::1")) == "fd00::1"
    key = layout.eject_key("10.0.0.5", 6379)
    assert key == bytes([10, 0, 0, 5]) + bytes(12) + bytes([0x18, 0xEB, socket.AF_INET, 0])
    assert layout.unpack_eject_key(key) == ("10.0.0.5", 6379)
    assert layout.unpack_eject_key(layout.eject_key("fd00::5", 80)) == ("fd00::5", 80)


def _record(kind, outcome=0, **kw):
    v4 = lambda ip: socket.inet_aton(ip) + bytes(12)  # noqa: E731
    return layout.EVENT.pack(
        kw.get("cookie", 77), 1_000, 3_000_000_001, 8, 7, kw.get("scope", 0),
        v4("10.1.0.2"), v4("127.0.0.1"), socket.inet_pton(socket.AF_INET6, "fd00::5"),
        40000, 6379, 6390, 6379, kind, outcome, socket.AF_INET, socket.AF_INET, socket.AF_INET6)


def test_connection_ended_event():
    event = layout.unpack_event(_record(layout.EVENT_CLOSED, outcome=3, scope=9))
    assert event == ConnectionEnded(
        cookie=77, source=("10.1.0.2", 40000), dialled=("127.0.0.1", 6379), backend=("fd00::5", 6390),
        route_port=6379, scope=9, outcome="reset", bytes_received=8, bytes_acked=7, start_ns=1_000,
        end_ns=3_000_000_001)
    assert event.duration == pytest.approx(3.0)
    assert [layout.unpack_event(_record(1, o)).outcome for o in range(4)] == ["ok", "refused", "timeout", "reset"]


def test_ejection_event():
    event = layout.unpack_event(_record(layout.EVENT_EJECTED))
    assert event == BackendEjected(cookie=77, backend=("fd00::5", 6390), dialled=("127.0.0.1", 6379), route_port=6379,
                                   scope=0, start_ns=1_000, until_ns=3_000_000_001)


def test_bad_records():
    with pytest.raises(ValueError, match="unknown kind 9"):
        layout.unpack_event(_record(9))
    with pytest.raises(ValueError, match="10 bytes"):
        layout.unpack_event(bytes(10))


def test_conn_stats_key_and_per_cpu_values():
    key = layout.STAT_KEY.pack(7, bytes([10, 0, 0, 2]) + bytes(12), (6390).to_bytes(2, "big"), 16379, socket.AF_INET)
    assert len(key) == 32 and layout.unpack_stat_key(key) == (16379, 7, ("10.0.0.2", 6390))
    per_cpu = layout.STAT_VALUE.pack(1, 0, 6, 7, 5) + layout.STAT_VALUE.pack(2, 1, 60, 70, 0)  # opened on one CPU
    total = layout.sum_stats(per_cpu)
    assert total == layout.ConnStats(ok=3, reset=1, bytes_acked=66, bytes_received=77, established=5)
    assert total.open == 1
    assert layout.CONFIG.pack(5, layout.CONFIG_CONNECTION_EVENTS) == (5).to_bytes(8, sys.byteorder) + (1).to_bytes(8, sys.byteorder)
