"""The Consul resolvers (backends/consul.py): ``consul://[AGENT]/SERVICE[?tag&dc]`` and
``consul-kv://[AGENT]/PATH``, their spec parsing, the pure answer -> backends helpers, the
blocking-query watch loop, and the ``--consul*`` options, mostly against a real consul 1.8.7
``-dev`` agent on loopback (tests/consul.py).

What the agent does, as these tests rely on it (checked against 1.8.7):

* ``/v1/health/service/NAME?passing`` with ``index`` and ``wait`` answers as soon as a
  registration, a deregistration or a check change touches NAME; its ``X-Consul-Index`` is
  the service's own index, which a restarted ``-dev`` agent starts again from ~10.
* An unknown ``dc``: HTTP 500 "No path to datacenter".
* ACLs with ``default_policy = "deny"``: a read **without a token** is not refused; Consul
  filters the answer (the health API answers ``[]``, a recursive KV read 404), with no
  header saying so. An unknown token is refused (HTTP 403 "ACL not found").
* ``consul tls cert create -server`` makes a certificate for ``server.dc1.consul``,
  ``localhost`` and ``127.0.0.1``.

Change latencies are measured from the moment the agent call (register, deregister, check
update, KV put/delete) returned to the moment watch() published the new set, and printed
(``pytest -s`` shows them). The issue asks for "within 2 s".

The environment-precedence, token-leak, sub-second-wait and silent-agent tests guard bugs
found (and fixed) while this file was written, first against python-consul, then again
when it was replaced by py-consul: the client's own reading of CONSUL_HTTP_TOKEN (which
beats the token it is given) had to be bypassed (backends/consul.py, _Consul).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import ambassadord.backends.consul as consul_backend
from ambassadord.backends import BackendSet, ResolverOptions, SpecError, TemporaryFailure, parse_spec
from ambassadord.backends.consul import (
    ConsulKVSpec,
    ConsulServiceResolver,
    ConsulServiceSpec,
    Instance,
    kv_entries,
    service_instances,
)
from tests.consul import ConsulAgent, consul_binary, free_ports
from tests.daemon import web_page
from tests.watch import Watch as BaseWatch
from tests.watch import addrs, call

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0  # deadline of every wait on the agent or on the watch
CHANGE_WITHIN = 2.0  # the issue: a change reaches the route's backend set within 2 s
CONSUL_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY", "CONSUL_CACERT")


@pytest.fixture(autouse=True)
def no_consul_env(monkeypatch):
    """py-consul reads CONSUL_HTTP_* from the process environment: none must leak in."""
    for name in CONSUL_ENV:
        monkeypatch.delenv(name, raising=False)


def opts(agent: ConsulAgent, **kw) -> ResolverOptions:
    return ResolverOptions(consul_addr=("127.0.0.1", agent.http_port), **kw)


def register_weighted(agent: ConsulAgent, service: str, id: str, address: str, port: int, passing: int) -> None:
    agent.put("/v1/agent/service/register", body={"Name": service, "ID": id, "Address": address, "Port": port,
                                                  "Weights": {"Passing": passing, "Warning": 1}})


def service_index(agent: ConsulAgent, service: str) -> int:
    _, headers, _ = agent.request("GET", f"/v1/health/service/{service}", query={"passing": True})
    return int(headers["X-Consul-Index"])


class Watch(BaseWatch):
    """tests/watch.py's, its change() timed from the agent call's return."""

    async def change(self, what: str, expected: set, fn, *args, **kw) -> float:
        """Run the agent call ``fn``; wait for the fresh set ``expected``; return the latency
        from the call's return to the publish, and check it against CHANGE_WITHIN."""
        latency, _ = await self.timed_change(what, expected, [functools.partial(fn, *args, **kw)])
        self.latencies.append((what, latency))
        print(f"{self.name}: {what}: published {latency * 1000:.0f} ms after the agent call returned")
        assert latency < CHANGE_WITHIN, f"{what}: took {latency:.2f}s\n{self.history()}"
        return latency


def watching(spec: str, options: ResolverOptions, name: str | None = None):
    """``async with watching(SPEC, OPTIONS) as watch``: a Watch (named ``name``, else SPEC)
    of SPEC's resolver, its watch() running for the block."""
    return Watch(parse_spec(spec).resolver(options), name or spec).running()


# ---- specs (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, agent, service, tag, dc", [
    ("consul:///redis", None, "redis", None, None),
    ("consul://10.0.0.5/redis", ("10.0.0.5", 8500), "redis", None, None),
    ("consul://10.0.0.5:8501/redis", ("10.0.0.5", 8501), "redis", None, None),
    ("consul://consul.local/redis/", ("consul.local", 8500), "redis", None, None),
    ("consul://[fd00::5]:8501/redis", ("fd00::5", 8501), "redis", None, None),
    ("consul://[fd00::5]/redis", ("fd00::5", 8500), "redis", None, None),
    ("consul:///redis?tag=primary", None, "redis", "primary", None),
    ("consul:///redis?dc=dc2", None, "redis", None, "dc2"),
    ("consul://127.0.0.1:8500/web.v2_a-b?tag=t&dc=dc1", ("127.0.0.1", 8500), "web.v2_a-b", "t", "dc1"),
])
def test_service_spec_parses(text, agent, service, tag, dc):
    spec = parse_spec(text)
    assert isinstance(spec, ConsulServiceSpec)
    assert (spec.text, spec.agent, spec.service, spec.tag, spec.dc) == (text, agent, service, tag, dc)


@pytest.mark.parametrize("text", [
    "consul://",
    "consul:///",
    "consul:///a/b",
    "consul:///re dis",
    "consul:///-redis",
    "consul:///redis#x",
    "consul:///redis?zone=x",
    "consul:///redis?tag=",
    "consul:///redis?tag=a&tag=b",
    "consul:///redis?tag",
    "consul://10.0.0.5:99999/redis",
    "consul://10.0.0.5:0/redis",
    "consul://10.0.0.5:http/redis",
    "consul://:8500/redis",
    "consul://[fd00::5]x/redis",
    # an agent host that is no hostname (issue 12: it passed at start and failed forever after)
    "consul://bad host/redis",
    "consul://bad host:8500/redis",
    "consul://agent..local/redis",
    "consul://agent_1!/redis",
    "consul://" + "a" * 64 + "/redis",
    "consul://10.0.0.256/redis",
    "consul://[zz]:8500/redis",
])
def test_service_spec_errors_quote_the_text(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert repr(text) in str(info.value), str(info.value)


@pytest.mark.parametrize("text, agent, path", [
    ("consul-kv:///svc/redis", None, "svc/redis"),
    ("consul-kv:///svc/redis/", None, "svc/redis"),
    ("consul-kv://10.0.0.5/svc", ("10.0.0.5", 8500), "svc"),
    ("consul-kv://10.0.0.5:8501/a/b/c", ("10.0.0.5", 8501), "a/b/c"),
    ("consul-kv://[::1]:8500/svc/redis", ("::1", 8500), "svc/redis"),
])
def test_kv_spec_parses(text, agent, path):
    spec = parse_spec(text)
    assert isinstance(spec, ConsulKVSpec)
    assert (spec.text, spec.agent, spec.path) == (text, agent, path)


@pytest.mark.parametrize("text", [
    "consul-kv://",
    "consul-kv:///",
    "consul-kv:///svc?recurse=1",
    "consul-kv:///svc#x",
    "consul-kv://10.0.0.5:0/svc",
    "consul-kv://10.0.0.5:x/svc",
    "consul-kv://bad host/svc",
])
def test_kv_spec_errors_quote_the_text(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert repr(text) in str(info.value), str(info.value)


# ---- answers -> backends (pure) --------------------------------------------------------------


def _entry(sid, node_addr, port, address=None, weights=None, node="n1"):
    svc = {"ID": sid, "Service": "web"}
    if port is not ...:
        svc["Port"] = port
    if address is not None:
        svc["Address"] = address
    if weights is not None:
        svc["Weights"] = weights
    return {"Node": {"Node": node, "Address": node_addr}, "Service": svc, "Checks": []}


@pytest.mark.parametrize("entry, instance, note", [
    # Service.Address wins over the node's
    (_entry("a", "10.1.0.1", 80, "10.0.0.1"), Instance("10.0.0.1", 80, 1), None),
    # no (or an empty) Service.Address: the node's
    (_entry("b", "10.1.0.1", 81), Instance("10.1.0.1", 81, 1), None),
    (_entry("c", "10.1.0.1", 82, ""), Instance("10.1.0.1", 82, 1), None),
    # Weights.Passing is the weight
    (_entry("d", "10.1.0.1", 83, "10.0.0.4", {"Passing": 7, "Warning": 1}), Instance("10.0.0.4", 83, 7), None),
    (_entry("e", "10.1.0.1", 84, "10.0.0.5", {"Warning": 3}), Instance("10.0.0.5", 84, 1), None),
    # IPv6 and hostnames are kept (hostnames are looked up later, by the resolver)
    (_entry("f", "10.1.0.1", 85, "fd00::5"), Instance("fd00::5", 85, 1), None),
    (_entry("g", "10.1.0.1", 86, "redis.internal"), Instance("redis.internal", 86, 1), None),
    # skipped, with a note naming the instance
    (_entry("h", "10.1.0.1", 0, "10.0.0.8"), None, "port"),
    (_entry("i", "10.1.0.1", ..., "10.0.0.9"), None, "port"),
    (_entry("j", "", 87, "", node="n9"), None, "no address"),
    (_entry("k", "", 88, None, node="n9"), None, "no address"),
])
def test_service_instances(entry, instance, note):
    instances, notes = service_instances([entry])
    if instance is None:
        assert instances == []
        assert len(notes) == 1, notes
        sid = entry["Service"]["ID"]
        assert repr(sid) in notes[0] and note in notes[0], notes
    else:
        assert instances == [instance]
        assert notes == []


def test_service_instances_keeps_the_good_ones_around_a_bad_one():
    entries = [_entry("a", "10.1.0.1", 80, "10.0.0.1"), _entry("bad", "10.1.0.1", 0, "10.0.0.2"),
               _entry("c", "10.1.0.2", 82)]
    instances, notes = service_instances(entries)
    assert instances == [Instance("10.0.0.1", 80, 1), Instance("10.1.0.2", 82, 1)]
    assert len(notes) == 1 and "'bad'" in notes[0]
    assert service_instances([]) == ([], [])
    assert service_instances(None) == ([], [])


def _checked(sid, addr, *checks, node="n1"):
    """An entry whose checks are (name, status, output) triples."""
    entry = _entry(sid, "10.1.0.1", 6379, addr, node=node)
    entry["Checks"] = [{"CheckID": name, "Name": name, "Status": status, "Output": output,
                        "ServiceID": "" if _node_check(name) else sid} for name, status, output in checks]
    return entry


SERF = ("Serf Health Status", "passing", "Agent alive and reachable")


def _node_check(name: str) -> bool:
    return name == SERF[0] or name.startswith("_node_maintenance")


@pytest.mark.parametrize("checks, status", [
    ((), "passing"),  # no check at all: Consul counts it passing
    ((SERF,), "passing"),
    ((SERF, ("redis", "passing", "TCP connect 10.0.0.1:6379: Success")), "passing"),
    ((SERF, ("redis", "warning", "slow")), "warning"),  # ?passing leaves warnings out too
    ((SERF, ("redis", "warning", "slow"), ("disk", "critical", "full")), "critical"),
    ((("Serf Health Status", "critical", "Agent not live or unreachable"),), "critical"),
    ((SERF, ("_service_maintenance:r1", "critical", "Maintenance mode is enabled")), "maintenance"),
    ((SERF, ("odd", "unknown-status", "")), "critical"),  # a status nobody foresaw does not pass
])
def test_an_instance_passes_when_every_check_passes(checks, status):
    """What Consul's own ?passing filter does, done here (it is no longer asked for, so
    that the failing instances can be shown): every check must say "passing"."""
    (inst,), notes = service_instances([_checked("r1", "10.0.0.1", *checks)])
    assert (inst.status, notes) == (status, [])
    assert inst.detail()["checks"] == [{"name": n, "status": st, "output": o, "scope": "node" if _node_check(n) else "service"}
                                       for n, st, o in checks]


def test_instance_details_are_kept_and_bounded():
    long = "HTTP GET http://10.0.0.1/health: 200 OK Output: " + "x" * 5000
    (inst,), _ = service_instances([_checked("web-1", "10.0.0.1", SERF, ("http", "passing", long + "\n\n  end"),
                                             node="node-a")])
    assert inst == Instance("10.0.0.1", 6379, 1)  # the details are no part of its identity
    assert (inst.id, inst.node, inst.status) == ("web-1", "node-a", "passing")
    output = inst.checks[1].output
    assert len(output) == consul_backend.CHECK_OUTPUT_MAX + 3 and output.endswith("...") and "\n" not in output


@pytest.mark.parametrize("checks", ["garbage", {"Status": "passing"}, [SERF, "passing"], [None]])
def test_a_garbled_check_list_skips_the_instance_with_a_note(checks):
    """With Consul's filter no longer asked for, a check list of another shape must not
    make an instance look passing."""
    entry = _entry("r1", "10.1.0.1", 6379, "10.0.0.1")
    entry["Checks"] = checks
    good = _checked("r2", "10.0.0.2", SERF)
    instances, notes = service_instances([entry, good, "not an entry"])
    assert [i.id for i in instances] == ["r2"]
    assert len(notes) == 2 and "'r1'" in notes[0] and "bad Checks" in notes[0] and "no object" in notes[1]


async def test_failing_instances_are_left_out_and_listed_with_their_checks():
    resolver = parse_spec("consul:///web").resolver(ResolverOptions())
    entries = [_checked("w1", "10.0.0.1", SERF, node="b"),
               _checked("w2", "10.0.0.2", SERF, ("redis", "critical", "dial tcp: connection refused"), node="a"),
               _checked("w3", "10.0.0.3", SERF, ("redis", "warning", "slow"), node="c")]
    backends, notes = await resolver.to_backends(entries)
    assert [str(b) for b in backends] == ["10.0.0.1:6379"] and notes == []
    view = resolver.registry_view()
    assert view["backends"] == {"10.0.0.1:6379": {"id": "w1", "node": "b", "status": "passing",
                                                  "checks": [{"name": SERF[0], "status": "passing", "output": SERF[2],
                                                              "scope": "node"}]}}
    assert [(f["id"], f["node"], f["address"], f["port"], f["status"]) for f in view["failing"]] == [
        ("w2", "a", "10.0.0.2", 6379, "critical"), ("w3", "c", "10.0.0.3", 6379, "warning")]  # by node
    assert view["failing"][0]["checks"][1]["output"] == "dial tcp: connection refused"
    assert view["failing_more"] == 0
    many = [_checked(f"x{i}", f"10.0.1.{i}", ("redis", "critical", "down")) for i in range(60)]
    backends, _ = await resolver.to_backends(many)
    view = resolver.registry_view()
    assert backends == () and view["backends"] == {}
    assert (len(view["failing"]), view["failing_more"]) == (consul_backend.FAILING_SHOWN, 60 - consul_backend.FAILING_SHOWN)


KV_ITEMS = [
    {"Key": "svc/redis", "Value": b"10.0.0.1:1, 10.0.0.2:2"},  # PATH's own value, split on commas
    {"Key": "svc/redis/a", "Value": b"10.0.0.3:3"},
    {"Key": "svc/redis/v6", "Value": b"[fd00::4]:4"},
    {"Key": "svc/redis/deep/er", "Value": b"10.0.0.5:5"},
    {"Key": "svc/redis/dup", "Value": b"10.0.0.3:3"},  # the same backend twice: once
    {"Key": "svc/redisX", "Value": b"10.0.0.9:9"},  # shares the prefix only: ignored
    {"Key": "svc/redisX/a", "Value": b"10.0.0.9:10"},
    {"Key": "svc/redis/folder/", "Value": None},  # folders: ignored
    {"Key": "svc/redis/folder2/", "Value": b"10.0.0.9:11"},
    {"Key": "svc/redis/empty", "Value": b""},  # empty: ignored, no note
    {"Key": "svc/redis/none", "Value": None},
    {"Key": "svc/redis/bad", "Value": b"nonsense"},  # malformed: a note naming the key
    {"Key": "svc/redis/badport", "Value": b"10.0.0.6:99999"},
    {"Key": "svc/redis/bin", "Value": b"\xff\xfe10.0.0.7:7"},  # not UTF-8: a note naming the key
]
KV_PAIRS = [("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3), ("fd00::4", 4), ("10.0.0.5", 5)]


@pytest.mark.parametrize("path", ["svc/redis", "/svc/redis/", "svc/redis/"])
def test_kv_entries(path):
    pairs, notes = kv_entries(path, KV_ITEMS)
    assert pairs == KV_PAIRS
    assert len(notes) == 3, notes
    by_key = {k: [n for n in notes if repr(k) in n] for k in ("svc/redis/bad", "svc/redis/badport", "svc/redis/bin")}
    assert all(len(v) == 1 for v in by_key.values()), notes
    assert "UTF-8" in by_key["svc/redis/bin"][0]
    assert "nonsense" in by_key["svc/redis/bad"][0]


def test_kv_entries_edge_cases():
    assert kv_entries("svc/redis", None) == ([], [])
    assert kv_entries("svc/redis", []) == ([], [])
    # only keys sharing the prefix: nothing
    assert kv_entries("svc/redis", [{"Key": "svc/redisX", "Value": b"10.0.0.9:9"}]) == ([], [])
    # a value with a malformed part keeps its good parts
    pairs, notes = kv_entries("p", [{"Key": "p", "Value": b"10.0.0.1:1,oops,10.0.0.2:2"}])
    assert pairs == [("10.0.0.1", 1), ("10.0.0.2", 2)]
    assert len(notes) == 1 and "'p'" in notes[0] and "oops" in notes[0]


# ---- the watch loop, with a scripted agent (virtual time) ------------------------------------

A = {"Node": {"Node": "n", "Address": "10.1.0.1"}, "Service": {"ID": "a", "Address": "10.0.0.1", "Port": 1}}
B = {"Node": {"Node": "n", "Address": "10.1.0.1"}, "Service": {"ID": "b", "Address": "10.0.0.2", "Port": 2}}


class ScriptedResolver(ConsulServiceResolver):
    """A service resolver whose agent answers from a script: (index, entries), optionally with
    the seconds it takes to answer, or an exception. Records each fetch as (time, index,
    wait); when the script runs out, fetch blocks."""

    def __init__(self, script, wait=30.0):
        super().__init__(ConsulServiceSpec.parse("consul:///web"), ResolverOptions(consul_wait=wait))
        self.script = list(script)
        self.calls: list[tuple[float, int, float | None]] = []
        self.done = trio.Event()
        self.rng = random.Random(4)

    async def fetch(self, index, wait):
        self.calls.append((trio.current_time(), index, wait))
        if not self.script:
            self.done.set()
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if len(step) == 3:  # (index, entries, seconds the agent takes to answer)
            await trio.sleep(step[2])
            return step[:2]
        return step


async def run_script(resolver) -> list[BackendSet]:
    published: list[BackendSet] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.watch, published.append)
        with trio.fail_after(3600):
            await resolver.done.wait()
        nursery.cancel_scope.cancel()
    return published


async def test_watch_loop_blocks_on_the_index_and_resets_it_when_it_goes_backwards(autojump_clock):
    r = ScriptedResolver([(100, [A]), (101, [A, B]), (5, [A, B]), (0, [A]), (2, [A])])
    published = await run_script(r)
    assert [(index, wait) for _, index, wait in r.calls] == [
        (0, None),     # the first read does not block
        (100, 30.0),   # then each query blocks on the last index
        (101, 30.0),   # -> 5: the index went backwards
        (0, None),     # ... so the loop starts over with a non-blocking read (Consul's rule); -> 0
        (1, 30.0),     # an index below 1 is used as 1 (Consul's rule: 0 would busy-loop)
        (2, 30.0),
    ]
    assert [addrs(s) for s in published] == [{("10.0.0.1", 1)}, {("10.0.0.1", 1), ("10.0.0.2", 2)},
                                            {("10.0.0.1", 1)}]
    assert not any(s.stale or s.error for s in published)
    # rate limit: at most one query per MIN_QUERY_INTERVAL, even when every answer is instant
    gaps = [b[0] - a[0] for a, b in zip(r.calls, r.calls[1:])]
    assert min(gaps) >= consul_backend.MIN_QUERY_INTERVAL - 1e-9, gaps


async def test_an_early_answer_with_nothing_changed_is_followed_by_a_read_that_does_not_block(autojump_clock):
    """An agent that is shutting down answers every blocking query at once, nothing changed
    (Consul 1.8 does, on SIGTERM). Were the next query to block with that index at the agent
    that comes back (its indexes start low again), it would block for its whole wait, blind
    to every change: a full test run missed changes for 10 s so. The next read does not
    block, and its index tells which agent answered. A blocking query that ran its whole
    wait with nothing changed is the usual case and costs no extra read."""
    r = ScriptedResolver([(100, [A]), (100, [A], 0.5), (7, [A]), (7, [A]), (8, [A, B]), (8, [A, B], 30.0),
                          (8, [A, B], 1.0), (8, [A, B]), (9, [A])])
    published = await run_script(r)
    assert [(index, wait) for _, index, wait in r.calls] == [
        (0, None),
        (100, 30.0),  # answered after 0.5 s of 30, nothing changed: an agent stopping?
        (0, None),    # so this read does not block -> 7: another agent, the index went backwards
        (0, None),    # ... and the loop starts over (Consul's rule) -> 7
        (7, 30.0),    # -> 8
        (8, 30.0),    # -> 8 after the whole wait: nothing changed, no extra read
        (8, 30.0),    # -> 8 after 1 s: early, so
        (0, None),    # a read that does not block -> 8: the same agent, blocking again
        (8, 30.0),    # -> 9
        (9, 30.0),
    ]
    assert [addrs(s) for s in published] == [{("10.0.0.1", 1)}, {("10.0.0.1", 1), ("10.0.0.2", 2)},
                                            {("10.0.0.1", 1)}]


async def test_watch_loop_keeps_the_last_set_stale_and_backs_off_with_jitter(autojump_clock):
    fail = TemporaryFailure("agent down (scripted)")
    r = ScriptedResolver([fail, (10, [A])] + [fail] * 8 + [(3, [A]), fail, (4, [A, B])])
    published = await run_script(r)
    assert r.failures == 10
    # no set known yet: an empty stale set with the error
    first = published[0]
    assert (first.backends, first.stale) == ((), True) and "agent down" in first.error
    good = published[1]
    assert addrs(good) == {("10.0.0.1", 1)} and not good.stale
    # during the outage: the last good set, stale, with the error and the good set's time
    outage = published[2:10]
    assert all(s.backends == good.backends and s.stale and "agent down" in s.error and s.updated == good.updated
               for s in outage), outage
    # back: fresh again (same backends, no longer stale), then the change
    assert [(addrs(s), s.stale, s.error) for s in published[10:]] == [
        ({("10.0.0.1", 1)}, False, None),
        ({("10.0.0.1", 1)}, True, "agent down (scripted)"),
        ({("10.0.0.1", 1), ("10.0.0.2", 2)}, False, None),
    ]
    # every query after a failure starts over without blocking (the agent may come back lower)
    times = [t for t, _, _ in r.calls]
    after_failure = [r.calls[i + 1] for i in (2, 3, 4, 5, 6, 7, 8, 9)]
    assert all((index, wait) == (0, None) for _, index, wait in after_failure)
    # exponential backoff with jitter in [0.5, 1.5) x, capped at BACKOFF_MAX; reset on success
    bases = [0.5, 1, 2, 4, 8, 16, 30, 30]
    gaps = [times[i + 1] - times[i] for i in range(2, 10)]
    ratios = [g / b for g, b in zip(gaps, bases)]
    assert all(0.5 - 1e-9 <= x < 1.5 for x in ratios), list(zip(gaps, bases))
    assert len({round(x, 3) for x in ratios}) > 1, f"no jitter: {ratios}"
    assert 0.25 - 1e-9 <= times[12] - times[11] < 0.75, "the backoff starts again from the first step after a success"
    # the first failure (nothing known yet) backs off as well
    assert 0.25 - 1e-9 <= times[1] - times[0] < 0.75


# ---- against a real agent: services ----------------------------------------------------------


@pytest.fixture(scope="module")
def agent():
    with ConsulAgent(node="amb-consul-test") as a:
        yield a


async def test_watch_follows_registrations_deregistrations_and_failing_checks(agent):
    """With consul_wait=30, every change below reaches watch() by the blocking query waking
    up, not by a periodic re-read: each must be published within 2 s of the agent call."""
    w1, w2, w3, w4 = ("127.0.0.2", 7001), ("127.0.0.3", 7002), ("127.0.0.4", 7003), ("127.0.0.5", 7004)
    check = {
        "w1": agent.register("web", "web-1", *w1, ttl_check=True),
        "w2": agent.register("web", "web-2", *w2, ttl_check=True),
    }
    try:
        agent.wait_for_health("web", 2, timeout=TIMEOUT)
        async with watching("consul:///web", opts(agent, consul_wait=30)) as watch:
            await watch.fresh({w1, w2}, "start")
            check["w3"] = await call(agent.register, "web", "web-3", *w3, ttl_check=True)
            await watch.fresh({w1, w2, w3}, "registering web-3")  # (its registration is not timed: see below)
            await watch.change("register a 4th instance", {w1, w2, w3, w4}, agent.register, "web", "web-4", *w4)
            await watch.change("deregister an instance", {w2, w3, w4}, agent.deregister, "web-1")
            await watch.change("TTL check critical", {w3, w4}, agent.check_fail, check["w2"])
            await watch.change("TTL check passing again", {w2, w3, w4}, agent.check_pass, check["w2"])
            await watch.change("TTL check warning (not passing)", {w3, w4}, agent.check_warn, check["w2"])
        assert watch.resolver.failures == 0
        assert all(not s.stale for _, s in watch.published)
    finally:
        for sid in ("web-1", "web-2", "web-3", "web-4"):
            agent.deregister(sid)


async def test_tag_and_datacenter_filters(agent):
    agent.register("tagged", "tagged-1", "127.0.0.2", 7101, tags=("primary",))
    agent.register("tagged", "tagged-2", "127.0.0.3", 7102, tags=("replica",))
    try:
        agent.wait_for_health("tagged", 2, timeout=TIMEOUT)

        async def resolve(spec):
            return addrs(await parse_spec(spec).resolver(opts(agent)).resolve())

        assert await resolve("consul:///tagged") == {("127.0.0.2", 7101), ("127.0.0.3", 7102)}
        assert await resolve("consul:///tagged?tag=primary") == {("127.0.0.2", 7101)}
        assert await resolve("consul:///tagged?tag=replica&dc=dc1") == {("127.0.0.3", 7102)}
        assert await resolve("consul:///tagged?dc=dc1") == {("127.0.0.2", 7101), ("127.0.0.3", 7102)}
        assert await resolve("consul:///tagged?tag=nosuchtag") == set()

        # the tag filter in a watch: a new primary appears, a new replica does not
        async with watching("consul:///tagged?tag=primary", opts(agent, consul_wait=30), "tag=primary") as watch:
            await watch.fresh({("127.0.0.2", 7101)}, "start")
            await call(agent.register, "tagged", "tagged-3", "127.0.0.4", 7103, tags=("replica",))
            await watch.change("register a primary", {("127.0.0.2", 7101), ("127.0.0.5", 7104)},
                               agent.register, "tagged", "tagged-4", "127.0.0.5", 7104, tags=("primary",))
        assert not any(("127.0.0.4", 7103) in addrs(s) for _, s in watch.published)

        # an unknown datacenter: one-shot -> TemporaryFailure; watch -> stale, empty, retrying
        with pytest.raises(TemporaryFailure, match="(?i)datacenter"):
            await parse_spec("consul:///tagged?dc=nowhere").resolver(opts(agent)).resolve()
        async with watching("consul:///tagged?dc=nowhere", opts(agent), "dc=nowhere") as watch:
            await watch.until(lambda s: watch.resolver.failures >= 3, "after 3 failures")
        assert all(s.stale and s.backends == () and "datacenter" in s.error.lower() for _, s in watch.published), \
            watch.history()
        assert len(watch.published) >= 3
    finally:
        for sid in ("tagged-1", "tagged-2", "tagged-3", "tagged-4"):
            agent.deregister(sid)


async def test_weights_and_node_address_fallback(agent):
    register_weighted(agent, "weighted", "weighted-1", "127.0.0.2", 7201, passing=7)
    agent.register("weighted", "weighted-2", None, 7202)  # no Service.Address: the node's, 127.0.0.1
    try:
        agent.wait_for_health("weighted", 2, timeout=TIMEOUT)
        resolver = parse_spec("consul:///weighted").resolver(opts(agent, consul_wait=30))
        backends = await resolver.resolve()
        assert {(b.address, b.port, b.weight) for b in backends} == {("127.0.0.2", 7201, 7), ("127.0.0.1", 7202, 1)}
        # a weight change alone is a change of the set
        async with Watch(resolver, "consul:///weighted").running() as watch:
            t, first = await watch.fresh({("127.0.0.2", 7201), ("127.0.0.1", 7202)}, "start")
            mark = len(watch.published)
            await call(register_weighted, agent, "weighted", "weighted-1", "127.0.0.2", 7201, passing=3)
            await watch.until(lambda s: {(b.port, b.weight) for b in s} == {(7201, 3), (7202, 1)},
                              "with weight 3", start=mark)
    finally:
        agent.deregister("weighted-1")
        agent.deregister("weighted-2")


async def test_resolve_one_shot(agent):
    agent.register("oneshot", "oneshot-1", "127.0.0.2", 7301)
    agent.register("oneshot", "oneshot-2", "127.0.0.3", 7302)
    agent.kv_put("oneshot/redis/a", "127.0.0.4:7303")
    agent.kv_put("oneshot/redis", "127.0.0.5:7304,127.0.0.6:7305")
    try:
        agent.wait_for_health("oneshot", 2, timeout=TIMEOUT)
        got = await parse_spec("consul:///oneshot").resolver(opts(agent)).resolve()
        assert addrs(got) == {("127.0.0.2", 7301), ("127.0.0.3", 7302)}
        # the spec's own agent wins over the options'
        dead = ResolverOptions(consul_addr=("127.0.0.1", free_ports(1)[0]))
        got = await parse_spec(f"consul://{agent.http_addr}/oneshot").resolver(dead).resolve()
        assert addrs(got) == {("127.0.0.2", 7301), ("127.0.0.3", 7302)}
        got = await parse_spec("consul-kv:///oneshot/redis").resolver(opts(agent)).resolve()
        assert addrs(got) == {("127.0.0.4", 7303), ("127.0.0.5", 7304), ("127.0.0.6", 7305)}
        # nothing there: an empty answer, not an error
        assert await parse_spec("consul:///no-such-service").resolver(opts(agent)).resolve() == ()
        assert await parse_spec("consul-kv:///no/such/path").resolver(opts(agent)).resolve() == ()
        # the agent is not there: TemporaryFailure naming the cause
        with pytest.raises(TemporaryFailure, match="Connection refused"):
            await parse_spec("consul:///oneshot").resolver(dead).resolve()
        with pytest.raises(TemporaryFailure, match="Connection refused"):
            await parse_spec("consul-kv:///oneshot/redis").resolver(dead).resolve()
    finally:
        agent.deregister("oneshot-1")
        agent.deregister("oneshot-2")
        agent.kv_delete("oneshot", recurse=True)


# ---- against a real agent: KV ----------------------------------------------------------------


async def test_kv_watch(agent, caplog):
    caplog.set_level(logging.WARNING, logger="ambassadord.resolver.consul")
    P = "kvw/svc/redis"
    a, b, c, d, e = [("127.0.0.2", 7401), ("127.0.0.3", 7402), ("127.0.0.4", 7403), ("127.0.0.5", 7404),
                     ("127.0.0.6", 7405)]
    agent.kv_put(f"{P}/a", "127.0.0.2:7401")
    agent.kv_put(f"{P}/b", "127.0.0.3:7402")
    agent.kv_put(P, "127.0.0.4:7403, 127.0.0.5:7404")  # the path's own value: a comma list
    agent.kv_put(f"{P}X", "127.0.0.9:7409")  # only shares the prefix: ignored
    agent.kv_put(f"{P}/bad", "not-a-backend")  # malformed: skipped, logged with its key
    agent.kv_put(f"{P}/bin", b"\xff\xfe\x00")  # not UTF-8: skipped, logged with its key
    try:
        async with watching(f"consul-kv:///{P}", opts(agent, consul_wait=30)) as watch:
            await watch.fresh({a, b, c, d}, "start")
            messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(f"'{P}/bad'" in m for m in messages), messages
            assert any(f"'{P}/bin'" in m and "UTF-8" in m for m in messages), messages
            await watch.change("put a child key", {a, b, c, d, e}, agent.kv_put, f"{P}/e", "127.0.0.6:7405")
            await watch.change("delete a child key", {b, c, d, e}, agent.kv_delete, f"{P}/a")
            await watch.change("change the path's value", {b, c, e}, agent.kv_put, P, "127.0.0.4:7403")
            caplog.clear()
            await watch.change("a child key turns malformed", {c, e}, agent.kv_put, f"{P}/b", "127.0.0.3:nope")
            assert any(f"'{P}/b'" in r.getMessage() for r in caplog.records), caplog.records
            mark = len(watch.published)
            await call(agent.kv_put, f"{P}X", "127.0.0.9:7410")
            await watch.change("delete everything", set(), agent.kv_delete, P, recurse=True)
            # the prefix-sharing key changed in between, and no set with it was published
            assert not any(("127.0.0.9", 7410) in addrs(s) for _, s in watch.published[mark:])
            assert not watch.last.stale and watch.last.backends == ()
            assert watch.last.error == "no backend under KV path 'kvw/svc/redis'"
            await watch.change("a key again", {a}, agent.kv_put, f"{P}/a", "127.0.0.2:7401")
        assert watch.resolver.failures == 0
    finally:
        agent.kv_delete("kvw", recurse=True)


# ---- against a real agent: outages and restarts ----------------------------------------------


@pytest.fixture(scope="module")
def restartable():
    """An agent of its own, since these tests stop and restart it (and so empty it)."""
    with ConsulAgent(node="amb-consul-restart") as a:
        yield a


@pytest.fixture
def short_backoff(monkeypatch):
    """Cap the retry backoff at 2 s so that recovering after a restart takes seconds, not up
    to 45 s (the backoff itself is tested above, in virtual time)."""
    monkeypatch.setattr(consul_backend, "BACKOFF_MAX", 2.0)


async def test_agent_outage_keeps_the_last_set_stale_and_recovers(restartable, short_backoff):
    agent = restartable
    r1, r2, r3 = ("127.0.0.2", 7501), ("127.0.0.3", 7502), ("127.0.0.4", 7503)
    agent.register("outage", "outage-1", *r1)
    agent.register("outage", "outage-2", *r2)
    agent.wait_for_health("outage", 2, timeout=TIMEOUT)
    async with watching("consul:///outage", opts(agent, consul_wait=30)) as watch:
        _, good = await watch.fresh({r1, r2}, "start")
        mark = len(watch.published)
        await call(agent.stop)
        _, stale = await watch.until(lambda s: s.stale, "stale after the agent stopped", start=mark)
        assert stale.backends == good.backends and stale.updated == good.updated and stale.error
        assert watch.resolver.failures >= 1
        # still down: it keeps retrying (the failure count grows), the set keeps serving
        await watch.until(lambda s: watch.resolver.failures >= 3, "after 3 failures", start=mark)
        assert all(s.stale and s.backends == good.backends for _, s in watch.published[mark:])
        assert any("Connection refused" in (s.error or "") for _, s in watch.published[mark:]), watch.history()

        # back, empty (-dev): the watch sees it by itself and follows changes again
        mark = len(watch.published)
        await call(agent.start)
        await watch.fresh(set(), "the agent restarted empty", start=mark)
        await watch.change("register after the restart", {r3}, agent.register, "outage", "outage-3", *r3)


async def test_index_going_backwards_after_restart(restartable, short_backoff):
    """A restarted -dev agent's index starts again low. The watch must not keep blocking on
    the old, higher index: with consul_wait=30, a change made after the restart must show
    within 2 s, not after the 30 s wait."""
    agent = restartable
    if not agent.running:
        agent.start()
    s1, s2, s3 = ("127.0.0.2", 7601), ("127.0.0.3", 7602), ("127.0.0.4", 7603)
    agent.register("idx", "idx-1", *s1)
    for i in range(15):  # raise the service's index well above where a fresh agent starts
        agent.register("idx", "idx-tmp", "127.0.0.9", 7609)
        agent.deregister("idx-tmp")
    agent.wait_for_health("idx", 1, timeout=TIMEOUT)
    before = service_index(agent, "idx")
    async with watching("consul:///idx", opts(agent, consul_wait=30)) as watch:
        await watch.fresh({s1}, "start")
        mark = len(watch.published)
        await call(agent.restart)
        await call(agent.register, "idx", "idx-1", *s1)
        await watch.fresh({s1}, "the restart", start=mark)
        await watch.change("register after the restart", {s1, s2}, agent.register, "idx", "idx-2", *s2)
        await watch.change("deregister after the restart", {s2}, agent.deregister, "idx-1")
        after = service_index(agent, "idx")
        assert after < before, f"the scenario needs the index to go backwards: {before} -> {after}"
        await watch.change("register again", {s2, s3}, agent.register, "idx", "idx-3", *s3)


async def test_sub_second_wait_is_not_a_failure(agent, monkeypatch):
    monkeypatch.setattr(consul_backend, "HTTP_MARGIN", 1.0)  # so that the failure shows in 1 s, not 5
    agent.register("quiet", "quiet-1", "127.0.0.2", 7701)
    try:
        agent.wait_for_health("quiet", 1, timeout=TIMEOUT)
        resolver = parse_spec("consul:///quiet").resolver(opts(agent, consul_wait=0.5))
        done = trio.Event()
        answers = 0
        fetch = resolver.fetch

        async def counting_fetch(index, wait):
            nonlocal answers
            try:
                return await fetch(index, wait)
            finally:
                answers += 1
                if answers >= 4:
                    done.set()

        resolver.fetch = counting_fetch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resolver.watch, lambda s: None)
            with trio.fail_after(TIMEOUT):
                await done.wait()  # 3 blocking queries of ~0.5 s each, nothing changing
            nursery.cancel_scope.cancel()
        assert resolver.failures == 0
    finally:
        agent.deregister("quiet-1")


@pytest.mark.parametrize("blocking", [False, True], ids=["plain-query", "blocking-query"])
async def test_a_silent_agent_times_out(monkeypatch, blocking):
    """An agent that takes the connection and never answers (a partition, a hung agent)
    fails the query once the client's timeout is over, so the watch retries instead of
    holding a thread forever; a blocking query is not cut short before its wait."""
    monkeypatch.setattr(consul_backend, "HTTP_MARGIN", 0.5)
    wait = 1.0
    with socket.socket() as silent:  # listening, never accepting: the kernel completes the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        resolver = parse_spec(f"consul://127.0.0.1:{silent.getsockname()[1]}/quiet").resolver(ResolverOptions())
        start = trio.current_time()
        with trio.fail_after(TIMEOUT), pytest.raises(TemporaryFailure, match="timed out"):
            if blocking:
                await resolver._read(42, wait)
            else:
                await resolver.resolve()
        took = trio.current_time() - start
    if blocking:
        assert took >= wait, f"a blocking query failed after {took:.2f}s, before its {wait}s wait"


async def test_a_web_server_that_is_not_consul_gives_a_short_error():
    """An agent address that points at some other web server (a page of HTML on every
    path, no X-Consul-Index): the failure names the address and stays one short line, not
    the whole page that the client quotes."""
    page = b"<html><body>" + b"<p>not consul</p>" * 500 + b"</body></html>"
    with web_page(page) as port:
        addr = f"127.0.0.1:{port}"
        resolver = parse_spec(f"consul://{addr}/web").resolver(ResolverOptions())
        with trio.fail_after(TIMEOUT), pytest.raises(TemporaryFailure) as failure:
            await resolver.resolve()
    message = str(failure.value)
    assert addr in message and "\n" not in message and len(message) < 400, message


async def test_a_removed_watch_closes_its_connection_to_the_agent(agent):
    """A route removed by a reload ends its watch: its connection to the agent closes then,
    not when the cyclic garbage collector gets to the client (turned off here, so that it
    cannot hide a leak). 20 watches started and cancelled mid-query leave no fd open once
    their abandoned queries are over."""
    agent.register("fds", "fds-1", "127.0.0.2", 7951)
    try:
        agent.wait_for_health("fds", 1, timeout=TIMEOUT)
        options = opts(agent, consul_wait=0.3)
        fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
        gc.collect()
        gc.disable()
        try:
            before = fds()
            for _ in range(20):
                resolver = parse_spec("consul:///fds").resolver(options)
                answered = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(resolver.watch, lambda s: answered.set())
                    with trio.fail_after(TIMEOUT):
                        await answered.wait()
                    await trio.sleep(0.05)  # the blocking query is on its way
                    nursery.cancel_scope.cancel()
                del resolver
            with trio.move_on_after(TIMEOUT):
                while fds() > before:  # the abandoned queries end within their 0.3 s wait
                    await trio.sleep(0.05)
            assert fds() == before, f"{fds() - before} fd(s) still open after 20 watches ended"
        finally:
            gc.enable()
    finally:
        agent.deregister("fds-1")


# ---- process environment vs explicit options ---------------------------------------------------




@pytest.mark.parametrize("case", ["spec-agent", "options-agent"])
async def test_explicit_agent_beats_process_env(agent, monkeypatch, case):
    agent.register("envtest", "envtest-1", "127.0.0.2", 7801)
    try:
        agent.wait_for_health("envtest", 1, timeout=TIMEOUT)
        # the env names an agent that is not there; the issue: spec's, else --consul, else env
        monkeypatch.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{free_ports(1)[0]}")
        if case == "spec-agent":
            resolver = parse_spec(f"consul://{agent.http_addr}/envtest").resolver(ResolverOptions())
        else:
            resolver = parse_spec("consul:///envtest").resolver(opts(agent))
        assert addrs(await resolver.resolve()) == {("127.0.0.2", 7801)}
    finally:
        agent.deregister("envtest-1")


# ---- ACL ---------------------------------------------------------------------------------------

ACL_HCL = 'acl { enabled = true default_policy = "deny" enable_token_persistence = false tokens { master = "root" agent = "root" } }'


class ACLConsulAgent(ConsulAgent):
    """A -dev agent with ACLs on (deny by default); the fixture's own calls use the master
    token. Its DNS interface answers the anonymous token only, so readiness skips DNS."""

    token = "root"

    def request(self, method, path, *, query=None, **kw):
        return super().request(method, path, query={**(query or {}), "token": self.token}, **kw)

    def _dns_answers(self) -> bool:
        return True


@pytest.fixture(scope="module")
def acl_agent():
    with ACLConsulAgent(node="amb-consul-acl", extra_args=["-hcl", ACL_HCL]) as a:
        a.register("secret", "secret-1", "127.0.0.2", 7901)
        a.kv_put("acl/redis/a", "127.0.0.3:7902")
        a.wait_for_health("secret", 1, timeout=TIMEOUT)
        yield a


async def test_acl_token(acl_agent, caplog):
    agent = acl_agent
    # the right token: works
    got = await parse_spec("consul:///secret").resolver(opts(agent, consul_token="root")).resolve()
    assert addrs(got) == {("127.0.0.2", 7901)}
    got = await parse_spec("consul-kv:///acl/redis").resolver(opts(agent, consul_token="root")).resolve()
    assert addrs(got) == {("127.0.0.3", 7902)}
    # a token the agent does not know: refused (403) -> TemporaryFailure naming the token option
    for spec in ("consul:///secret", "consul-kv:///acl/redis"):
        with pytest.raises(TemporaryFailure, match="(?i)permission denied.*ACL token") as info:
            await parse_spec(spec).resolver(opts(agent, consul_token="wrong")).resolve()
        assert "ACL not found" in str(info.value)
    # no token: Consul 1.8 does not refuse, it filters (the anonymous token may read nothing)
    # and says nothing about it: the answer is simply empty
    assert await parse_spec("consul:///secret").resolver(opts(agent)).resolve() == ()
    assert await parse_spec("consul-kv:///acl/redis").resolver(opts(agent)).resolve() == ()

    # ... which a token-less watch points out, rather than looking like a service without instances
    async with watching("consul:///secret", opts(agent), "no token") as watch:
        _, s = await watch.until(lambda s: True, "an answer")
    assert s.backends == () and not s.stale and s.error == "no passing instance of service 'secret'"
    assert any("missing --consul-token" in r.getMessage() for r in caplog.records), caplog.records

    # in a watch: a refused token keeps the last set (none yet: empty), stale, with the error
    async with watching("consul:///secret", opts(agent, consul_token="wrong"), "wrong token") as watch:
        _, s = await watch.until(lambda s: s.stale, "stale")
    assert s.backends == () and "permission denied" in s.error.lower() and "ACL" in s.error
    # ... and with the token it watches
    async with watching("consul:///secret", opts(agent, consul_token="root", consul_wait=30), "token") as watch:
        await watch.fresh({("127.0.0.2", 7901)}, "start")
        await watch.change("register with ACLs on", {("127.0.0.2", 7901), ("127.0.0.4", 7903)},
                           agent.register, "secret", "secret-2", "127.0.0.4", 7903)
    agent.deregister("secret-2")


async def test_token_option_beats_process_env(acl_agent, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "wrong")
    got = await parse_spec("consul:///secret").resolver(opts(acl_agent, consul_token="root")).resolve()
    assert addrs(got) == {("127.0.0.2", 7901)}


# ---- HTTPS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    """An agent with an HTTPS port, its certificate made by ``consul tls`` (SANs
    server.dc1.consul, localhost, 127.0.0.1). Yields (agent, https port, CA file)."""
    binary = consul_binary()
    d = tmp_path_factory.mktemp("consul-tls")
    for cmd in (["tls", "ca", "create"], ["tls", "cert", "create", "-server", "-dc", "dc1"]):
        subprocess.run([binary, *cmd], cwd=d, check=True, capture_output=True, timeout=60)
    https_port, = free_ports(1)
    hcl = [f"ports {{ https = {https_port} }}", f'cert_file = "{d}/dc1-server-consul-0.pem"',
           f'key_file = "{d}/dc1-server-consul-0-key.pem"', f'ca_file = "{d}/consul-agent-ca.pem"',
           "verify_incoming = false"]
    with ConsulAgent(node="amb-consul-tls", extra_args=[x for h in hcl for x in ("-hcl", h)]) as a:
        a.register("tlssvc", "tlssvc-1", "127.0.0.2", 8001)
        a.kv_put("tls/redis", "127.0.0.3:8002")
        a.wait_for_health("tlssvc", 1, timeout=TIMEOUT)
        yield a, https_port, str(d / "consul-agent-ca.pem")


def tls_opts(port, **kw) -> ResolverOptions:
    return ResolverOptions(consul_addr=("127.0.0.1", port), consul_scheme="https", **kw)


async def test_https_agent(tls_agent):
    agent, port, ca = tls_agent
    got = await parse_spec("consul:///tlssvc").resolver(tls_opts(port, consul_ca=ca)).resolve()
    assert addrs(got) == {("127.0.0.2", 8001)}
    got = await parse_spec("consul-kv:///tls/redis").resolver(tls_opts(port, consul_ca=ca)).resolve()
    assert addrs(got) == {("127.0.0.3", 8002)}
    # by a name in the certificate, given in the spec
    got = await parse_spec(f"consul://localhost:{port}/tlssvc").resolver(tls_opts(1, consul_ca=ca)).resolve()
    assert addrs(got) == {("127.0.0.2", 8001)}
    # without the CA: the system's trust store does not know consul's CA
    with pytest.raises(TemporaryFailure, match="TLS") as info:
        await parse_spec("consul:///tlssvc").resolver(tls_opts(port)).resolve()
    assert "--consul-ca" in str(info.value) and "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    # plain http to the https port: refused by the agent, not hanging
    with pytest.raises(TemporaryFailure, match="HTTPS"):
        await parse_spec("consul:///tlssvc").resolver(ResolverOptions(consul_addr=("127.0.0.1", port))).resolve()
    # a watch over https follows changes
    async with watching("consul:///tlssvc", tls_opts(port, consul_ca=ca, consul_wait=30), "https") as watch:
        await watch.fresh({("127.0.0.2", 8001)}, "start")
        await watch.change("register over https", {("127.0.0.2", 8001), ("127.0.0.4", 8003)},
                           agent.register, "tlssvc", "tlssvc-2", "127.0.0.4", 8003)
    agent.deregister("tlssvc-2")


async def test_token_does_not_leak_into_errors(tls_agent, caplog):
    agent, port, ca = tls_agent
    caplog.set_level(logging.WARNING, logger="ambassadord.resolver.consul")
    secret = "s3cr3t-0123456789"
    with pytest.raises(TemporaryFailure) as info:
        await parse_spec("consul:///tlssvc").resolver(tls_opts(port, consul_token=secret)).resolve()
    assert secret not in str(info.value), str(info.value)


async def test_consul_http_ssl_1_means_https(tls_agent, monkeypatch):
    agent, port, ca = tls_agent
    monkeypatch.setenv("CONSUL_HTTP_SSL", "1")
    got = await parse_spec("consul:///tlssvc").resolver(tls_opts(port, consul_ca=ca)).resolve()
    assert addrs(got) == {("127.0.0.2", 8001)}


# ---- the command line ------------------------------------------------------------------------------


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    return subprocess.run([sys.executable, "-m", "ambassadord", "resolve", *argv], cwd=REPO_ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)


@pytest.fixture
def cli_service(agent):
    agent.register("clisvc", "clisvc-1", "127.0.0.2", 8101)
    agent.register("clisvc", "clisvc-2", "127.0.0.3", 8102)
    agent.wait_for_health("clisvc", 2, timeout=TIMEOUT)
    yield ["127.0.0.2:8101", "127.0.0.3:8102"]
    agent.deregister("clisvc-1")
    agent.deregister("clisvc-2")


def test_cli_resolve_with_flag_and_env(agent, cli_service):
    for argv, env in [(["--consul", agent.http_addr], None), (["--consul", agent.url], None),
                      ([], {"CONSUL_HTTP_ADDR": agent.http_addr})]:
        proc = cli(*argv, "consul:///clisvc", env=env)
        assert proc.returncode == 0, (argv, env, proc.stderr)
        assert sorted(proc.stdout.splitlines()) == cli_service, (argv, env, proc.stdout)
    proc = cli(f"consul://{agent.http_addr}/clisvc")
    assert proc.returncode == 0 and sorted(proc.stdout.splitlines()) == cli_service, proc.stderr


def test_cli_env_addr_with_scheme(agent, cli_service):
    proc = cli("consul:///clisvc", env={"CONSUL_HTTP_ADDR": agent.url})
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == cli_service


@pytest.mark.parametrize("argv, env, names", [
    (["--consul", "unix:///x"], {}, "--consul"),
    (["--consul", "127.0.0.1:99999"], {}, "--consul"),
    (["--consul", "127.0.0.1:8500/path"], {}, "--consul"),
    ([], {"CONSUL_HTTP_ADDR": "nonsense:99999"}, "CONSUL_HTTP_ADDR"),
    (["--consul-ca", "/nonexistent/ca.pem"], {}, "--consul-ca"),
    ([], {"CONSUL_CACERT": "/nonexistent/ca.pem"}, "CONSUL_CACERT"),
])
def test_cli_bad_consul_options_exit_2(argv, env, names):
    proc = cli(*argv, "consul:///redis", env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert names in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_bad_spec_exits_2():
    proc = cli("consul:///redis?zone=a")
    assert proc.returncode == 2 and "'consul:///redis?zone=a'" in proc.stderr, proc.stderr


def test_agent_host_is_checked_when_the_spec_is_parsed():
    """The message names the spec, the agent and what is wrong with its host."""
    with pytest.raises(SpecError) as info:
        parse_spec("consul://bad host/x")
    assert str(info.value) == ("spec 'consul://bad host/x': bad agent address 'bad host': host 'bad host': "
                               "label 'bad host' has the character ' ' (allowed: letters, digits, '-' and '_')")
    proc = cli("consul://bad host/x")
    assert proc.returncode == 2 and "'consul://bad host/x'" in proc.stderr and "' '" in proc.stderr, proc.stderr
    proc = cli("--consul", "bad host:8500", "consul:///x")
    assert proc.returncode == 2 and "--consul" in proc.stderr and "'bad host'" in proc.stderr, proc.stderr


def test_cli_unknown_service_exits_1(agent):
    proc = cli("--consul", agent.http_addr, "consul:///nosuchservice")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "nosuchservice" in proc.stderr, proc.stderr


def test_cli_unreachable_agent_exits_1():
    port, = free_ports(1)
    proc = cli("--consul", f"127.0.0.1:{port}", "consul:///redis")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Connection refused" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_token_and_https(acl_agent, tls_agent):
    proc = cli("--consul", acl_agent.http_addr, "--consul-token", "root", "consul:///secret")
    assert (proc.returncode, proc.stdout) == (0, "127.0.0.2:7901\n"), proc.stderr
    proc = cli("consul:///secret", env={"CONSUL_HTTP_ADDR": acl_agent.http_addr, "CONSUL_HTTP_TOKEN": "root"})
    assert (proc.returncode, proc.stdout) == (0, "127.0.0.2:7901\n"), proc.stderr
    proc = cli("--consul", acl_agent.http_addr, "--consul-token", "wrong", "consul:///secret")
    assert proc.returncode == 1 and "permission denied" in proc.stderr, proc.stderr

    _, port, ca = tls_agent
    proc = cli("--consul", f"https://127.0.0.1:{port}", "--consul-ca", ca, "consul:///tlssvc")
    assert (proc.returncode, proc.stdout) == (0, "127.0.0.2:8001\n"), proc.stderr
    proc = cli("consul:///tlssvc", env={"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}", "CONSUL_HTTP_SSL": "true",
                                        "CONSUL_CACERT": ca})
    assert (proc.returncode, proc.stdout) == (0, "127.0.0.2:8001\n"), proc.stderr
    proc = cli("--consul", f"https://127.0.0.1:{port}", "consul:///tlssvc")
    assert proc.returncode == 1 and "TLS" in proc.stderr, proc.stderr


# ---- saying why a service has no backends ----------------------------------------------------


async def test_an_empty_answer_says_why(agent, acl_agent):
    async def why(spec: str, options) -> str:
        resolver = parse_spec(spec).resolver(options)
        assert await resolver.resolve() == ()
        return await resolver.explain_empty()

    agent.register("redis-why", "redis-why-1", "127.0.0.2", 7001, tags=["primary"])
    try:
        agent.wait_for_health("redis-why", 1, timeout=TIMEOUT)
        # a misspelled name: the names the agent knows, the closest first
        said = await why("consul:///redis-wy", opts(agent))
        assert said.startswith("no service named 'redis-wy' (did you mean 'redis-why'?); known: redis-why"), said
        # the tag filter is part of the message, with the tags the instances have
        said = await why("consul:///redis-why?tag=replica", opts(agent))
        assert said == ("no passing instance of service 'redis-why' with tag 'replica': its 1 instance(s) have "
                        "tags primary"), said
    finally:
        agent.deregister("redis-why-1")
    # default-deny ACL and no token: nothing at all is visible, and that is what it says
    said = await why("consul:///secret", opts(acl_agent))
    assert "shows no service at all" in said and "missing --consul-token" in said, said


async def test_instances_that_all_fail_and_https_to_a_plain_http_port_say_so(agent):
    check = agent.register("flaky-why", "flaky-why-1", "127.0.0.2", 7002, ttl_check=True)
    try:
        agent.check_fail(check)
        resolver = parse_spec("consul:///flaky-why").resolver(opts(agent))
        with trio.fail_after(TIMEOUT):
            while await resolver.resolve() != ():  # the check's failure reaches the health API
                await trio.sleep(0.05)
        assert await resolver.explain_empty() == "no passing instance of service 'flaky-why': 1 instance(s), 1 critical"
    finally:
        agent.deregister("flaky-why-1")
    with pytest.raises(TemporaryFailure, match="plain HTTP there, not TLS: use http://"):
        await parse_spec("consul:///flaky-why").resolver(opts(agent, consul_scheme="https")).resolve()


def test_cli_resolve_of_a_misspelled_service_names_the_known_ones(agent, cli_service):
    proc = cli("--consul", agent.http_addr, "consul:///clisvcx")
    assert proc.returncode == 1
    assert "no service named 'clisvcx' (did you mean 'clisvc'?)" in proc.stderr, proc.stderr


async def test_explaining_an_empty_answer_survives_a_garbled_answer(agent, monkeypatch):
    # The explanation is a second look at the registry: garbage there must not break the watch.
    resolver = parse_spec("consul:///garbled-why").resolver(opts(agent))
    monkeypatch.setattr(resolver.client.catalog, "services", lambda **kw: (1, {"garbled-why": []}))
    monkeypatch.setattr(resolver.client.health, "service", lambda **kw: (1, ["not an entry", 5]))
    assert await resolver.explain_empty() == "no passing instance of service 'garbled-why'"


# ---- what Consul says of each backend, in /routes and `status` -------------------------------


def test_routes_and_status_show_each_instance_its_node_and_checks(agent, tmp_path):
    """A real daemon following a real agent: /routes gives each backend its instance ID,
    node and checks, and lists the instances Consul knows but does not offer (critical,
    warning) with their checks' output; `ambassadord status` names those; a check that
    passes again moves its instance back into the set, on /routes too."""
    from tests.admin_client import admin_daemon, get_routes, route
    from tests.daemon import free_port, wait_until

    ids = ("det-1", "det-2", "det-3")
    check = {sid: agent.register("det", sid, f"127.0.0.{i + 2}", 7970 + i, ttl_check=True) for i, sid in enumerate(ids)}
    try:
        agent.check_fail(check["det-2"], "dial tcp 127.0.0.3:7971: connect: connection refused")
        agent.check_warn(check["det-3"], "replication lag 12s")
        admin = free_port()
        args = ["--listen", f"127.0.0.1:{free_port()}", "--map", f"det:{free_port()}=consul:///det",
                "--consul", agent.http_addr]
        with admin_daemon(args, admin, tmp_path) as daemon:
            def view(want_failing: int):
                r = route(get_routes(admin), "det")
                return r if len(r["failing_instances"] or []) == want_failing and r["backends"] else None

            r = wait_until(lambda: view(2), timeout=TIMEOUT, what=daemon.describe)
            (b,) = r["backends"]
            assert b["name"] == "127.0.0.2:7970"
            assert b["instance"]["id"] == "det-1" and b["instance"]["node"] == agent.node
            assert b["instance"]["status"] == "passing"
            assert {c["name"]: (c["status"], c["scope"]) for c in b["instance"]["checks"]} == {
                "Serf Health Status": ("passing", "node"), "det det-1 TTL": ("passing", "service")}
            failing = {i["id"]: i for i in r["failing_instances"]}
            assert (failing["det-2"]["status"], failing["det-2"]["address"], failing["det-2"]["port"]) == (
                "critical", "127.0.0.3", 7971)
            assert any(c["output"] == "dial tcp 127.0.0.3:7971: connect: connection refused"
                       for c in failing["det-2"]["checks"])
            assert failing["det-3"]["status"] == "warning"
            assert r["failing_instances_more"] == 0

            status = subprocess.run([sys.executable, "-m", "ambassadord", "status", "--admin", f"localhost:{admin}"],
                                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            assert (f"route det: instance det-2 on {agent.node} (127.0.0.3:7971) is critical, not offered: "
                    "det det-2 TTL: dial tcp 127.0.0.3:7971: connect: connection refused") in status.stdout, status.stdout
            assert f"instance det-3 on {agent.node} (127.0.0.4:7972) is warning" in status.stdout
            resolved = cli("--consul", agent.http_addr, "consul:///det")  # `resolve` says the same
            assert (resolved.returncode, resolved.stdout) == (0, "127.0.0.2:7970\n"), resolved.stderr
            assert ("ambassadord resolve: instance det-2 on " + agent.node + " (127.0.0.3:7971) is critical, "
                    "not offered: det det-2 TTL: dial tcp 127.0.0.3:7971: connect: connection refused") in resolved.stderr

            agent.check_pass(check["det-2"], "back")
            r = wait_until(lambda: view(1), timeout=TIMEOUT, what=daemon.describe)
            assert sorted(b["instance"]["id"] for b in r["backends"]) == ["det-1", "det-2"]
            assert [i["id"] for i in r["failing_instances"]] == ["det-3"]
            daemon.stop()
    finally:
        for sid in ids:
            agent.deregister(sid)
