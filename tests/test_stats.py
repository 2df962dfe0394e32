"""Pure logic of the live counters (stats.py), the route diff of a reload, and the status table.

The daemon-level behaviour (real connections, real HTTP) is in test_admin.py and
test_reload.py; these pin down the arithmetic they rely on.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from ambassadord.admin import parse_admin
from ambassadord.status import render_status
from ambassadord.sources import load_routes
from ambassadord.relay import RelayResult
from ambassadord.routes import Route, RouteTable
from ambassadord.server import ListenAddress, Server, bind_listeners
from ambassadord.logs import TextFormatter
from ambassadord.stats import CONNECT_BUCKETS, Outcome, RouteStats
from ambassadord.backends.interface import Backend, BackendSet


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    st = RouteStats()
    for v in (0.0001, 0.0005, 0.003, 0.003, 7.0, 99.0):
        st.observe_connect(v)
    hist, total = st.connect_histogram()
    assert [le for le, _ in hist] == [repr(b) for b in CONNECT_BUCKETS] + ["+Inf"]
    counts = dict(hist)
    assert counts["0.0005"] == 2  # le is inclusive: 0.0005 falls in the 0.0005 bucket
    assert counts["0.0025"] == 2
    assert counts["0.005"] == 4
    assert counts["5.0"] == 4 and counts["10.0"] == 5 and counts["+Inf"] == 6
    assert total == pytest.approx(0.0001 + 0.0005 + 0.006 + 7.0 + 99.0)


def test_bytes_include_open_connections_and_per_backend_split():
    st = RouteStats()
    st.up, st.down = 100, 1000
    st.backend("10.0.0.1:1").up = 100
    st.backend("10.0.0.1:1").down = 1000
    a = RelayResult(up=5, down=50, backend="10.0.0.1:1")
    b = RelayResult(up=7, down=70, backend="10.0.0.2:1")
    st.open.update((a, b))
    assert st.bytes() == (112, 1120)
    assert st.backend_bytes("10.0.0.1:1") == (105, 1050)
    assert st.backend_bytes("10.0.0.2:1") == (7, 70)
    assert st.backend_bytes("10.0.0.3:1") == (0, 0)


def test_one_connection_counted_open_then_closed_with_its_bytes():
    st = RouteStats(current=frozenset({"10.0.0.1:1"}))
    b = st.backend("10.0.0.1:1")
    st.active += 1  # the handler's own count, once the connection has a route
    st.connect_failed(b, "Connection refused", 100.0)
    assert (b.failures, st.failures, b.last_error, b.last_failure) == (1, 1, "Connection refused", 100.0)
    r = RelayResult()
    st.opened("10.0.0.1:1", b, r, 0.003, 101.0)
    assert r.backend == "10.0.0.1:1" and st.open == {r}
    assert (b.active, b.connections, b.last_connect) == (1, 1, 101.0)
    assert dict(st.connect_histogram()[0])["0.0025"] == 0 and dict(st.connect_histogram()[0])["0.005"] == 1
    r.up, r.down = 10, 20
    assert st.bytes() == (10, 20)  # while open, read from the RelayResult
    st.closed("ok", r, b)
    assert (st.active, st.open, st.outcomes, st.total()) == (0, set(), {"ok": 1}, 1)
    assert (st.up, st.down, b.up, b.down, b.active) == (10, 20, 10, 20, 0)
    assert st.bytes() == (10, 20) and st.backend_bytes("10.0.0.1:1") == (10, 20)  # counted once
    assert "10.0.0.1:1" in st.backends  # still in the set: kept


def test_a_connection_closed_before_it_had_a_backend_counts_only_its_outcome():
    st = RouteStats()
    st.active += 1
    st.closed(Outcome.LIMIT, RelayResult(), None)
    assert (st.active, st.outcomes, st.up, st.down, st.backends) == (0, {"limit": 1}, 0, 0, {})


def test_a_backend_gone_from_the_set_is_forgotten_with_its_last_connection():
    st = RouteStats(current=frozenset())
    b = st.backend("10.0.0.1:1")
    first, second = RelayResult(), RelayResult()
    for r in (first, second):
        st.active += 1
        st.opened("10.0.0.1:1", b, r, 0.001, 1.0)
    st.closed("ok", first, b)
    assert st.backends == {"10.0.0.1:1": b}
    st.closed("client-reset", second, b)
    assert st.backends == {} and st.outcomes == {"ok": 1, "client-reset": 1}


def test_outcomes_are_the_plain_strings_in_logs_json_and_counters():
    assert json.dumps({"outcome": Outcome.NO_ROUTE, "outcomes": {Outcome.NO_ROUTE: 1}}) == (
        '{"outcome": "no-route", "outcomes": {"no-route": 1}}')
    assert [f"{Outcome.LOOP}", str(Outcome.LOOP), "%s" % Outcome.LOOP] == ["loop"] * 3
    record = logging.LogRecord("ambassadord.conn", logging.INFO, __file__, 1, "connection", None, None)
    record.fields = {"event": "connection", "outcome": Outcome.ALL_BACKENDS_FAILED}
    assert TextFormatter().format(record).endswith(" connection outcome=all-backends-failed")
    # The relay's outcomes are plain strings: one counter each, whichever spelling came first.
    st = RouteStats()
    st.active = 2
    st.closed(Outcome.OK, RelayResult(), None)
    st.closed("ok", RelayResult(), None)
    assert st.outcomes == {"ok": 2} and pickle.loads(pickle.dumps(st.outcomes)) == {"ok": 2}


def test_every_outcome_is_named_in_readme():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    sentence = re.search(r"The outcome is one of (.*?)There are also", readme, re.S).group(1)
    assert set(re.findall(r"`([a-z-]+)`", sentence)) == {o.value for o in Outcome}


def test_prune_keeps_backends_with_open_connections():
    st = RouteStats()
    st.backend("a:1").active = 1
    st.backend("b:1")
    st.backend("c:1")
    st.prune({"c:1"})
    assert set(st.backends) == {"a:1", "c:1"}


def test_route_update_records_times_and_prunes_stats():
    r = Route(load_routes(maps=["6379=10.0.0.1:1,10.0.0.2:1"], env={}).routes[0])
    r.stats.backend("10.0.0.9:1")  # a backend from an older set, nothing open
    t0 = time.time()
    r.update(BackendSet((Backend("10.0.0.1", 1),)))
    assert r.updated_at >= t0 and r.changed_at == r.updated_at
    assert "10.0.0.9:1" not in r.stats.backends
    first_change = r.changed_at
    r.update(BackendSet((Backend("10.0.0.1", 1),)))  # the same set again: not a change
    assert r.changed_at == first_change and r.updated_at >= first_change


@pytest.mark.parametrize("text, expected", [
    ("off", None), ("OFF", None), ("127.0.0.1:10001", ("127.0.0.1", 10001)), ("[::1]:9", ("::1", 9)),
])
def test_parse_admin(text, expected):
    got = parse_admin(text)
    assert (got if got is None else (got.host, got.port)) == expected


@pytest.mark.parametrize("text", ["nonsense", "1.2.3.4", "127.0.0.1:0", "127.0.0.1:70000", "::1:9", "host:9"])
def test_parse_admin_rejects(text):
    with pytest.raises(ValueError, match="admin address"):
        parse_admin(text)


def _server(configs) -> Server:
    return Server(RouteTable([Route(c) for c in configs]), bind_listeners([ListenAddress("127.0.0.1", 0)]))


def _configs(*maps, **defaults):
    return load_routes(maps=list(maps), env={}, flag_defaults=defaults or None).routes


async def test_reload_keeps_unchanged_routes_and_replaces_changed_ones():
    server = _server(_configs("1001=10.0.0.1:1", "1002=10.0.0.2:1", "1003=10.0.0.3:1"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        kept, changed, removed = (server.table.lookup(p, "127.0.0.1") for p in (1001, 1002, 1003))
        await trio.testing.wait_all_tasks_blocked()
        assert kept.resolved
        kept.pick.rr_counter = 7
        changed.stats.outcomes["ok"] = 1
        summary = server.reload(_configs("1001=10.0.0.1:1", "1002=10.0.0.22:1", "1004=10.0.0.4:1"))
        assert (summary.added, summary.removed, summary.changed) == (["1004"], ["1003"], ["1002"])
        assert str(summary) == "added 1004; removed 1003; changed 1002"
        assert server.table.lookup(1001, "127.0.0.1") is kept and kept.pick.rr_counter == 7
        new = server.table.lookup(1002, "127.0.0.1")
        assert new is not changed and new.stats is changed.stats  # counters kept by name
        assert server.table.lookup(1003, "127.0.0.1") is None
        await trio.testing.wait_all_tasks_blocked()
        assert [str(b) for b in new.backends] == ["10.0.0.22:1"]
        assert server.table.lookup(1004, "127.0.0.1").resolved
        assert set(server._resolver_scopes) == set(server.table.routes)  # the removed one's resolver is gone
        assert str(server.reload(_configs("1001=10.0.0.1:1", "1002=10.0.0.22:1", "1004=10.0.0.4:1"))) == "no route changed"
        server.shutdown()


async def test_reload_of_an_option_is_a_change():
    server = _server(_configs("1001=10.0.0.1:1"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        summary = server.reload(_configs("1001=10.0.0.1:1", balance="round-robin"))
        assert summary.changed == ["1001"]
        server.shutdown()


def _doc(**route):
    base = {"name": "6379", "spec": "consul:///redis", "resolved": True, "stale": False, "error": None,
            "active": 1, "connections": 3, "bytes_up": 10, "bytes_down": 2048, "updated_at": 95.0, "backends": []}
    base.update(route)
    return {"now": 100.0, "routes": [base], "connections": {"active": 1, "total": 4},
            "config": {"file": "/etc/r.toml", "loaded_at": 40.0, "last_reload": None}}


def _backend(name, **kw):
    b = {"name": name, "state": "up", "ejected_for": None, "in_set": True, "active": 0, "connections": 0,
         "failures": 0, "bytes_up": 0, "bytes_down": 0}
    b.update(kw)
    return b


def test_render_status_table():
    doc = _doc(backends=[_backend("10.0.0.5:6379", active=1, connections=2, bytes_down=2048),
                         _backend("10.0.0.6:6379", state="ejected", ejected_for=6.6, failures=3)])
    lines = render_status(doc).splitlines()
    assert lines[0].split() == ["ROUTE", "SPEC", "BACKEND", "STATE", "ACTIVE", "CONNS", "FAILS", "UP", "DOWN", "UPDATED"]
    assert lines[1].split() == ["6379", "consul:///redis", "10.0.0.5:6379", "up", "1", "2", "0", "0B", "2.0KiB", "5s", "ago"]
    assert lines[2].split() == ["10.0.0.6:6379", "ejected", "7s", "0", "0", "3", "0B", "0B"]
    assert lines[2].index("10.0.0.6") == lines[1].index("10.0.0.5")  # columns line up
    assert "1 route(s), 1 open connection(s), 4 since start; config loaded 60s ago from /etc/r.toml" in lines


def test_render_status_shows_errors_stale_and_rejected_reload():
    doc = _doc(stale=True, error="agent unreachable", backends=[_backend("10.0.0.5:6379")])
    doc["config"]["last_reload"] = {"at": 90.0, "ok": False, "error": "r.toml:3: bad port"}
    text = render_status(doc)
    assert "up (stale)" in text
    assert "route 6379: stale: agent unreachable" in text
    assert "last reload (10s ago) was rejected: r.toml:3: bad port" in text
    empty = render_status(_doc(error="NXDOMAIN", backends=[]))
    assert "no backends" in empty and "route 6379: NXDOMAIN" in empty


def test_render_status_names_the_workers_and_partial_counts():
    doc = _doc(backends=[_backend("10.0.0.5:6379")])
    assert "worker" not in render_status(doc)
    doc["workers"] = {"count": 4, "answered": 4, "pids": [1, 2, 3, 4], "restarts": 0}
    assert "4 worker processes" in render_status(doc).splitlines()
    doc["workers"] = {"count": 4, "answered": 3, "pids": [1, 2, 3], "restarts": 1}
    assert "4 worker processes; only 3 answered, counts are partial; 1 restarted" in render_status(doc).splitlines()


def test_render_status_says_which_routes_are_in_connect_mode():
    connect = render_status(_doc(mode="connect", backends=[_backend("10.0.0.5:6379")])).splitlines()
    assert connect[1].split()[:3] == ["6379", "consul:///redis", "(connect)"]
    proxy = render_status(_doc(mode="proxy", backends=[_backend("10.0.0.5:6379")])).splitlines()
    assert proxy[1].split()[:3] == ["6379", "consul:///redis", "10.0.0.5:6379"]
