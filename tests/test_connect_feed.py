"""Connect mode's daemon side, as pure logic: which routes reach the kernel's maps, with
what, and what the kernel's events become (connect/feed.py). The real plane, in a real
cgroup, is tests/test_connect_bpf.py's and tests/test_e2e_connect.py's."""

from __future__ import annotations

import ipaddress
import logging

import pytest
from ambassadord.backends.interface import Backend, BackendSet

from ambassadord.config import ConfigError
from ambassadord.connect.feed import ConnectFeed, kernel_set
from ambassadord.connect.layout import BackendEjected, ConnectionEnded, ConnStats
from ambassadord.connect.scopes import assign
from ambassadord.daemon import _redirect_ports
from ambassadord.routes import Route, RouteTable
from ambassadord.server import ListenAddress
from ambassadord.sources import load_routes

A, B, C = Backend("10.0.0.1", 6379), Backend("10.0.0.2", 6379, priority=1), Backend("10.0.0.3", 6379, weight=5)


class RecordingPlane:
    def __init__(self):
        self.calls = []

    def set_route(self, port, backends, **opts):
        self.calls.append(("set", port, list(backends), opts))

    def remove_route(self, port, scope=0):
        self.calls.append(("remove", port, scope))


def ended(src, dialled, backend, *, up=0, down=0, outcome="ok", port=None):
    return ConnectionEnded(cookie=1, source=src, dialled=dialled, backend=backend, route_port=port or dialled[1],
                           scope=0, outcome=outcome, bytes_received=down, bytes_acked=up,
                           start_ns=1_000_000_000, end_ns=1_500_000_000)


def configs(*maps, mode=None):
    return load_routes(maps=list(maps), flag_defaults={"mode": mode}).routes


def feed_for(cfgs, plane=None):
    table = RouteTable([Route(c) for c in cfgs])
    plane = plane or RecordingPlane()
    return ConnectFeed(plane, cfgs, lambda: table, backend=lambda *a: a, limit=2), plane, table


@pytest.mark.parametrize("backends, down, limit, kept, dropped", [
    ((A, B, C), (), 8, (A, C, B), ()),            # lowest priority first, the resolver's order within one
    ((A, B, C), (A,), 8, (C, B), ()),             # down ones left out
    ((A, B), (A, B), 8, (A, B), ()),              # all down: all kept, as the proxy's balancer does
    ((A, B, C), (), 2, (A, C), (B,)),             # the map holds ``limit``: the highest priority goes
])
def test_kernel_set(backends, down, limit, kept, dropped):
    assert kernel_set(backends, down, limit=limit) == (list(kept), list(dropped))


def test_only_connect_routes_are_fed_and_a_set_is_written_whole():
    cfgs = load_routes(maps=["6379=10.0.0.1:6379", "5432=10.0.0.9:5432"],
                       config_file=None, flag_defaults={"mode": None}).routes
    cfgs = [cfgs[0].__class__(**{**_fields(cfgs[0]), "mode": "connect"}), cfgs[1]]
    feed, plane, _ = feed_for(cfgs)
    feed.backends(cfgs[1].key, BackendSet((Backend("10.0.0.9", 5432),)))
    assert plane.calls == []  # a proxy route never reaches the kernel
    feed.backends(cfgs[0].key, BackendSet((A, C)))
    assert plane.calls == [("set", 6379, [("10.0.0.1", 6379, 1, 0), ("10.0.0.3", 6379, 5, 0)],
                            {"scope": 0, "balance": "random", "eject_for": 10.0, "connect_timeout": 2.0})]


def test_health_checks_and_reloads_reach_the_map():
    cfgs = configs("6379=10.0.0.1:6379", mode="connect")
    feed, plane, _ = feed_for(cfgs)
    key = cfgs[0].key
    feed.backends(key, BackendSet((A, C)))
    feed.down(key, frozenset({A}))
    assert plane.calls[-1][2] == [("10.0.0.3", 6379, 5, 0)]
    changed = configs("6379=10.0.0.1:6379", mode="connect")
    changed = [changed[0].__class__(**{**_fields(changed[0]), "eject_for": 3.0})]
    feed.routes(changed)  # an option changed: written again with it
    assert plane.calls[-1][3]["eject_for"] == 3.0
    feed.routes(configs("6379=10.0.0.1:6379"))  # now a proxy route: out of the kernel
    assert plane.calls[-1] == ("remove", 6379, 0)
    n = len(plane.calls)
    feed.backends(key, BackendSet((A,)))
    assert len(plane.calls) == n


def test_more_backends_than_the_map_holds_is_said_once(caplog):
    cfgs = configs("6379=10.0.0.1:6379", mode="connect")
    feed, plane, _ = feed_for(cfgs)
    with caplog.at_level(logging.WARNING, logger="ambassadord"):
        for _ in range(3):
            feed.backends(cfgs[0].key, BackendSet((A, B, C)))
    assert [r.getMessage() for r in caplog.records].count(
        "route 6379: connect mode holds 2 backends per route; left out: 10.0.0.2:6379") == 1


def test_events_become_log_lines_failures_and_ejections(caplog):
    cfgs = configs("6379=10.0.0.1:6379", mode="connect")
    feed, _, table = feed_for(cfgs)
    route = table.routes[0]
    route.update(BackendSet((A, C)))
    feed.backends(route.config.key, route.backends)
    with caplog.at_level(logging.INFO, logger="ambassadord.conn"):
        feed.account(ended(("127.0.0.1", 40000), ("127.0.0.1", 6379), ("10.0.0.1", 6379), up=10, down=2000))
        feed.account(ended(("127.0.0.1", 0), ("127.0.0.1", 6379), ("10.0.0.3", 6379), outcome="refused"))
        feed.account(ended(("127.0.0.1", 40002), ("127.0.0.1", 6379), ("10.0.0.1", 6379), outcome="reset"))
    with caplog.at_level(logging.WARNING, logger="ambassadord"):
        feed.account(BackendEjected(cookie=2, backend=("10.0.0.3", 6379), dialled=("127.0.0.1", 6379),
                                    route_port=6379, scope=0, start_ns=0, until_ns=10))
    st = route.stats
    # established connections are counted from the kernel's totals (below), failures here
    assert st.outcomes == {"connect-failed": 1} and st.active == 0
    assert st.backends[str(C)].failures == 1 and st.backends[str(C)].last_error == "refused"
    assert route.pick.ejections.until  # the failed one is ejected, as /routes and the metrics show
    lines = [r.fields for r in caplog.records if r.name == "ambassadord.conn"]
    assert lines[0] == {"event": "connection", "src": "127.0.0.1:40000", "port": 6379, "route": "6379",
                        "backend": "10.0.0.1:6379", "up": 10, "down": 2000, "mode": "connect",
                        "duration": 0.5, "outcome": "ok"}
    assert lines[1]["outcome"] == "connect-failed" and lines[1]["error"] == "refused"
    assert lines[2]["outcome"] == "reset"


def test_the_kernels_totals_become_counters_once():
    cfgs = configs("6379=10.0.0.1:6379", mode="connect")
    feed, _, table = feed_for(cfgs)
    route = table.routes[0]
    route.update(BackendSet((A, C)))
    feed.backends(route.config.key, route.backends)
    where = (6379, 0, ("10.0.0.1", 6379))
    feed.apply_stats({where: ConnStats(ok=3, reset=1, bytes_acked=10, bytes_received=2000)})
    feed.apply_stats({where: ConnStats(ok=3, reset=1, bytes_acked=10, bytes_received=2000)})  # nothing new
    st = route.stats
    assert st.outcomes == {"ok": 3, "reset": 1} and (st.up, st.down) == (10, 2000)
    assert st.backends[str(A)].connections == 4 and st.backend_bytes(str(A)) == (10, 2000)
    assert st.connect_histogram()[0][-1] == ("+Inf", 0)  # the kernel measures no connect time
    feed.apply_stats({where: ConnStats(ok=5, reset=1, bytes_acked=30, bytes_received=2000)})
    assert st.outcomes["ok"] == 5 and st.up == 30
    feed.apply_stats({where: ConnStats(ok=1, reset=0, bytes_acked=1, bytes_received=1)})  # the kernel forgot it
    assert st.outcomes["ok"] == 6 and (st.up, st.down) == (31, 2001)
    feed.apply_stats({where: ConnStats(ok=1, reset=0, bytes_acked=1, bytes_received=1),
                      (5432, 0, ("10.0.0.9", 5432)): ConnStats(1, 0, 1, 1)})  # no such route: dropped
    assert st.total() == 7
    # open connections: established minus ended, per backend and per route
    feed.apply_stats({where: ConnStats(ok=1, reset=0, bytes_acked=1, bytes_received=1, established=4)})
    assert st.active == 3 and st.backends[str(A)].active == 3 and st.total() == 10
    feed.apply_stats({where: ConnStats(ok=4, reset=0, bytes_acked=9, bytes_received=9, established=4)})
    assert st.active == 0 and st.backends[str(A)].active == 0 and st.outcomes["ok"] == 9


def test_an_event_for_a_route_gone_is_dropped():
    feed, _, table = feed_for(configs("6379=10.0.0.1:6379", mode="connect"))
    feed.account(ended(("127.0.0.1", 1), ("127.0.0.1", 5432), ("10.0.0.1", 5432), outcome="refused"))
    assert table.routes[0].stats.outcomes == {}


def test_mode_option_and_its_errors(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text('[defaults]\nmode = "connect"\n[routes]\n6379 = "10.0.0.1:6379"\n'
                 '5432 = { backend = "10.0.0.2:5432", mode = "proxy" }\n')
    modes = {c.port: c.mode for c in load_routes(config_file=str(f)).routes}
    assert modes == {6379: "connect", 5432: "proxy"}
    f.write_text('[routes]\n6379 = { backend = "10.0.0.1:6379", mode = "kernel" }\n')
    with pytest.raises(ConfigError, match=r"routes.toml.*6379.*bad mode 'kernel': expected one of proxy, connect"):
        load_routes(config_file=str(f))


def test_connect_routes_are_not_redirected():
    cfgs = configs("6379=10.0.0.1:6379", "5432=10.0.0.9:5432")
    cfgs[0] = cfgs[0].__class__(**{**_fields(cfgs[0]), "mode": "connect"})
    assert _redirect_ports(cfgs, (ListenAddress("0.0.0.0", 10000),)) == (5432,)


def _fields(cfg) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}



N1, N2 = ipaddress.ip_network("172.18.0.0/16"), ipaddress.ip_network("172.18.5.0/24")


@pytest.mark.parametrize("namespaces, routes, expected", [
    ({}, [(6379, N1)], {(6379, N1): set()}),
    ({7: ["172.18.0.2"], 8: ["10.0.0.2"]}, [(6379, N1), (6379, None)], {(6379, N1): {7}}),
    # the most specific network of each port wins, per namespace
    ({7: ["172.18.0.2"], 8: ["172.18.5.9"]}, [(6379, N1), (6379, N2), (5432, N1)],
     {(6379, N1): {7}, (6379, N2): {8}, (5432, N1): {7, 8}}),
    # a namespace with addresses in two networks, and IPv6 never in an IPv4 network
    ({9: ["fd00::1", "172.18.5.1"]}, [(6379, N1), (6379, N2)], {(6379, N1): set(), (6379, N2): {9}}),
])
def test_assign_scopes(namespaces, routes, expected):
    assert assign(namespaces, routes) == expected


def test_a_scoped_route_is_written_once_per_namespace_and_follows_them():
    cfgs = configs("6379@172.18.0.0/16=10.0.0.1:6379", "6379=10.0.0.3:6379", mode="connect")
    feed, plane, _ = feed_for(cfgs)
    scoped, wide = (c.key for c in cfgs)
    assert feed.scoped_keys == [scoped]
    feed.backends(scoped, BackendSet((A,)))
    feed.backends(wide, BackendSet((C,)))
    assert [(c[0], c[3]["scope"]) for c in plane.calls] == [("set", 0)]  # no namespace yet: only the host-wide one
    plane.calls.clear()
    feed.set_scopes({scoped: {7, 8}})
    assert sorted((c[0], c[3]["scope"], c[2][0][0]) for c in plane.calls) == [("set", 7, "10.0.0.1"),
                                                                              ("set", 8, "10.0.0.1")]
    plane.calls.clear()
    feed.set_scopes({scoped: {8}})  # namespace 7 went
    assert plane.calls[-1] == ("remove", 6379, 7)
    plane.calls.clear()
    feed.routes([cfgs[1]])  # the scoped route went
    assert plane.calls == [("remove", 6379, 8)]


def test_check_shows_a_mode_column_only_when_a_route_is_not_proxied(tmp_path, capsys):
    from ambassadord.cli import main

    f = tmp_path / "routes.toml"
    f.write_text('[routes]\n6379 = { backend = "10.0.0.1:6379", mode = "connect" }\n80 = "10.0.0.2:80"\n')
    assert main(["check", "--config", str(f)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["PORT", "SOURCE", "BACKEND", "MODE"]
    assert lines[1].split()[3] == "proxy" and lines[2].split()[3] == "connect"
    f.write_text('[routes]\n80 = "10.0.0.2:80"\n')
    assert main(["check", "--config", str(f)]) == 0
    assert "MODE" not in capsys.readouterr().out


def test_a_set_the_kernel_cannot_hold_is_refused_and_the_last_one_stays(caplog):
    from ambassadord.connect.layout import Backend as KernelBackend

    cfgs = configs("6379=10.0.0.1:6379", mode="connect")
    table = RouteTable([Route(c) for c in cfgs])
    plane = RecordingPlane()
    feed = ConnectFeed(plane, cfgs, lambda: table, backend=KernelBackend, limit=32)
    key = cfgs[0].key
    feed.backends(key, BackendSet((A,)))
    with caplog.at_level(logging.ERROR, logger="ambassadord"):
        feed.backends(key, BackendSet((Backend("10.0.0.7", 6379, weight=70000),)))  # > 16 bits
    assert len(plane.calls) == 1  # only the first set reached the kernel
    assert "route 6379: connect mode cannot take this backend set" in caplog.text and "70000" in caplog.text
