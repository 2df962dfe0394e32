"""Fault injection on the registry side (issue 12, items 6 and 7, and the Consul-DNS
shuffle): bad values written into a real etcd and a real Consul agent, floods of writes
across the etcd resolver's resync, and Consul's shuffled DNS answers.

What each test holds the resolvers to:

* a value whose hostname has an empty or over-long DNS label (``redis..example:6379``), or
  that is over 253 characters, is skipped like any malformed value: one log line naming
  the key and what is wrong; the other keys keep serving and later changes are followed
  (it used to raise UnicodeError out of the watch loop: the route froze on its last set,
  looking healthy, and the etcd watch never recovered, even after the key was deleted);
* an exception nobody foresaw while making backends of an answer never ends a watch: the
  last set is republished stale with the error, and the next change is followed;
* 1,000 malformed keys and a burst of writes across many etcd resyncs: no crash (a gRPC
  callback used to reach a channel the resync had closed, raising inside trio's run loop:
  TrioInternalError), every valid change followed, and each malformed key logged once
  (it used to be logged again on every update);
* Consul's DNS shuffles the SRV records of every answer (and, to a query without EDNS0,
  answers a random 3 of them): the resolver publishes one set, not one per answer.

Before and after figures are printed (``pytest -s``).
"""

from __future__ import annotations

import base64
import logging
import time

import pytest
import trio

import ambassadord.backends.etcd as etcd_backend
from ambassadord.backends import ResolverOptions, parse_spec
from ambassadord.backends.interface import Backend, canonical, host_problem, hostname_problem
from ambassadord.backends.keyvalues import pairs_from_keys
from tests.consul import ConsulAgent
from tests.etcd_server import EtcdServer, require_etcd
from tests.watch import Watch, addrs, call

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated create function:DeprecationWarning")

P = "/svc/redis"
A, B, C, D = ("127.0.0.2", 7001), ("127.0.0.3", 7002), ("127.0.0.4", 7003), ("127.0.0.5", 7004)
ETCD_LOG, CONSUL_LOG = "ambassadord.resolver.etcd", "ambassadord.resolver.consul"

# Values with a hostname no resolver may hand to getaddrinfo, and the words the log line
# must say about each.
BAD_HOSTS = {
    "empty": ("redis..example:6379", "empty label"),
    "long-label": ("a" * 64 + ".example:6379", "64 characters long"),
    "long-name": (".".join(["abcdefghij"] * 24) + ":6379", "263 characters long"),
    "leading-dot": (".redis.example:6379", "empty label"),
    "space": ("bad host:6379", "the character ' '"),
}


def hp(pair: tuple[str, int]) -> str:
    return f"{pair[0]}:{pair[1]}"


def warnings_about(caplog, logger: str, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno >= logging.WARNING and all(w in r.getMessage() for w in words)]


@pytest.fixture
def etcd():
    require_etcd()
    with EtcdServer(name="amb-etcd-faults") as server:
        yield server


@pytest.fixture(scope="module")
def agent():
    with ConsulAgent(node="amb-faults-registry") as a:
        yield a


def etcd_resolver(etcd: EtcdServer, **kw):
    return parse_spec(f"etcd://{P}").resolver(ResolverOptions(etcd_endpoints=(etcd.endpoint,), **kw))


def consul_resolver(agent: ConsulAgent, spec: str):
    return parse_spec(spec).resolver(ResolverOptions(consul_addr=("127.0.0.1", agent.http_port)))


# ---- item 6: hostnames with bad labels ------------------------------------------------------


@pytest.mark.parametrize("host, problem", [
    ("redis", None),
    ("redis.example.", None),  # a fully qualified name
    ("_redis._tcp.example", None),  # underscores: used in practice, harmless
    ("xn--mnchen-3ya.example", None),
    ("a" * 63 + ".example", None),
    (".".join(["a" * 49] * 5) + ".abc", None),  # 253 characters
    ("", "empty hostname"),
    (".", "empty hostname"),
    ("redis..example", "empty label"),
    (".redis", "empty label"),
    ("a" * 64 + ".example", "is 64 characters long (at most 63)"),
    (".".join(["a" * 49] * 5) + ".abcd", "254 characters long"),
    ("bad host", "the character ' '"),
    ("a/b", "the character '/'"),
    ("münchen.example", "not ASCII"),
    ("-redis.example", "starts or ends with '-'"),
    ("10.0.0.256", "neither an IP address nor a hostname"),
])
def test_hostname_problem(host, problem):
    got = hostname_problem(host)
    assert (got is None) if problem is None else (problem in (got or "")), got


def test_host_problem_takes_ip_literals():
    assert [host_problem(h) for h in ("10.0.0.5", "fd00::5", "fe80::1%eth0", "redis")] == [None] * 4
    assert host_problem("fd00::zz") == "not an IPv6 address"


def test_key_values_with_bad_hostnames_are_skipped_with_a_note_naming_the_key():
    items = [("/p/a", b"10.0.0.1:1"), ("/p/b", b"redis..example:6379"), ("/p", b"10.0.0.2:2,x" + b"y" * 70 + b":1")]
    pairs, notes = pairs_from_keys("/p", items)
    assert pairs == [("10.0.0.1", 1), ("10.0.0.2", 2)]
    assert [n.split(":")[0] for n in notes] == ["key '/p/b'", "key '/p'"], notes
    assert "empty label" in notes[0] and "71 characters long" in notes[1]


async def test_etcd_values_with_bad_hostnames_are_skipped_and_changes_followed(etcd, caplog):
    caplog.set_level(logging.INFO, logger=ETCD_LOG)
    etcd.put(f"{P}/a", hp(A))
    for name, (value, _) in BAD_HOSTS.items():
        etcd.put(f"{P}/{name}", value)
    async with Watch(etcd_resolver(etcd), "etcd").running() as watch:
        await watch.fresh({A}, "start")
        for name, (_, words) in BAD_HOSTS.items():
            lines = warnings_about(caplog, ETCD_LOG, f"key '{P}/{name}'", words)
            assert len(lines) == 1, (name, [r.getMessage() for r in caplog.records])
        # later changes are followed: a put, a bad key turning good, the bad keys deleted
        mark = len(watch.published)
        await call(etcd.put, f"{P}/b", hp(B))
        await watch.fresh({A, B}, "a put", start=mark)
        await call(etcd.put, f"{P}/empty", hp(C))
        await watch.fresh({A, B, C}, "a bad key mended", start=mark)
        for name in BAD_HOSTS:
            await call(etcd.delete, f"{P}/{name}")
        await watch.fresh({A, B}, "the bad keys deleted", start=mark)
        await call(etcd.put, f"{P}/empty", "redis..example:6379")  # bad again: reported again
        await call(etcd.put, f"{P}/d", hp(D))
        await watch.fresh({A, B, D}, "a bad key again, then a put", start=mark)
        assert len(warnings_about(caplog, ETCD_LOG, f"key '{P}/empty'", "empty label")) == 2
    assert not any(s.stale or s.error for _, s in watch.published), watch.history()
    assert watch.resolver.failures == 0


async def test_consul_kv_values_with_bad_hostnames_are_skipped_and_changes_followed(agent, caplog):
    caplog.set_level(logging.INFO, logger=CONSUL_LOG)
    path = "faults/kv-hosts"
    agent.kv_delete(path, recurse=True)
    agent.kv_put(f"{path}/a", hp(A))
    for name, (value, _) in BAD_HOSTS.items():
        agent.kv_put(f"{path}/{name}", value)
    async with Watch(consul_resolver(agent, f"consul-kv:///{path}"), "consul-kv").running() as watch:
        await watch.fresh({A}, "start")
        for name, (_, words) in BAD_HOSTS.items():
            assert len(warnings_about(caplog, CONSUL_LOG, f"key '{path}/{name}'", words)) == 1, name
        mark = len(watch.published)
        await call(agent.kv_put, f"{path}/b", hp(B))
        await watch.fresh({A, B}, "a put", start=mark)
        await call(agent.kv_put, f"{path}/empty", hp(C))
        await watch.fresh({A, B, C}, "a bad key mended", start=mark)
    assert not any(s.stale or s.error for _, s in watch.published), watch.history()
    agent.kv_delete(path, recurse=True)


async def test_consul_service_with_a_bad_address_is_skipped(agent, caplog):
    """Consul stores any Service.Address; a bad one skips that instance, not the route."""
    caplog.set_level(logging.INFO, logger=CONSUL_LOG)
    agent.register("faults-web", "web-good", *A)
    agent.register("faults-web", "web-bad", "redis..example", 6379)
    try:
        agent.wait_for_health("faults-web", 2)
        async with Watch(consul_resolver(agent, "consul:///faults-web"), "consul").running() as watch:
            await watch.fresh({A}, "start")
            assert len(warnings_about(caplog, CONSUL_LOG, "'web-bad'", "empty label")) == 1, caplog.text
            mark = len(watch.published)
            await call(agent.register, "faults-web", "web-bad", *B)  # mended
            await watch.fresh({A, B}, "the bad address mended", start=mark)
    finally:
        agent.deregister("web-good")
        agent.deregister("web-bad")


async def test_an_unforeseen_exception_never_ends_the_etcd_watch(etcd, monkeypatch, caplog):
    """A safety net behind the validation: whatever raises while backends are made of the
    values, the route is marked stale with the error (not left looking healthy), the watch
    goes on, and the change that mends it is followed. (A stand-in for backends_of raises
    for one value: the only seam in this test; etcd and the watch are real.)"""
    caplog.set_level(logging.INFO, logger=ETCD_LOG)
    real = etcd_backend.backends_of

    async def backends_of(pairs, **kw):
        if ("127.0.0.66", 1) in pairs:
            raise UnicodeError("label empty or too long")
        return await real(pairs, **kw)

    monkeypatch.setattr(etcd_backend, "backends_of", backends_of)
    etcd.put(f"{P}/a", hp(A))
    async with Watch(etcd_resolver(etcd), "etcd").running() as watch:
        await watch.fresh({A}, "start")
        mark = len(watch.published)
        await call(etcd.put, f"{P}/x", "127.0.0.66:1")
        _, stale = await watch.until(lambda s: s.stale, "stale after the unforeseen exception", start=mark)
        assert addrs(stale) == {A} and "UnicodeError" in stale.error, watch.history()
        await call(etcd.put, f"{P}/b", hp(B))  # still broken: not published again, logged once
        await call(etcd.delete, f"{P}/x")
        await watch.fresh({A, B}, "the value deleted", start=mark)
    assert len(warnings_about(caplog, ETCD_LOG, "UnicodeError")) == 1, caplog.text
    assert watch.resolver.failures == 0


# ---- item 7: many malformed keys, a burst of writes across resyncs --------------------------

BAD_KEYS = 1000
WRITES_PER_S = 30
BURST_S = 4.0
RESYNC = 0.2  # s: the resolver's etcd_resync, so that the burst spans about 20 resyncs


async def test_etcd_many_malformed_keys_and_a_write_burst_across_resyncs(etcd, caplog):
    import etcd3

    caplog.set_level(logging.INFO, logger=ETCD_LOG)
    client = etcd3.client(*etcd.endpoint)
    try:
        def fill():
            for i in range(BAD_KEYS):
                client.put(f"{P}/bad/{i:04d}", f"not-a-backend-{i}")
            client.put(f"{P}/live", hp(A))

        await call(fill)
        async with Watch(etcd_resolver(etcd, etcd_resync=RESYNC), "etcd").running() as watch:
            await watch.fresh({A}, "start", timeout=20)
            started = time.monotonic()

            def burst() -> int:
                # every write changes the live key's value, or rewrites a bad key as it was
                n = 0
                values = [hp(p) for p in (B, C, D, A)]
                while time.monotonic() - started < BURST_S:
                    if n % 2:
                        client.put(f"{P}/bad/{n % BAD_KEYS:04d}", f"not-a-backend-{n % BAD_KEYS}")
                    else:
                        client.put(f"{P}/live", values[(n // 2) % len(values)])
                    n += 1
                    time.sleep(max(0.0, started + n / WRITES_PER_S - time.monotonic()))
                return n

            writes = await call(burst)
            sessions = watch.resolver.sessions
            mark = len(watch.published)
            await call(client.put, f"{P}/live", hp(D))
            await call(client.put, f"{P}/end", hp(C))
            await watch.fresh({C, D}, "the burst, then two puts", start=mark)
    finally:
        client.close()
    malformed = warnings_about(caplog, ETCD_LOG, "not-a-backend-")
    total = [r for r in caplog.records if r.name == ETCD_LOG]
    print(f"{writes} writes in {BURST_S:g}s across {sessions} watch sessions (resync {RESYNC:g}s); "
          f"{len(malformed)} log lines about {BAD_KEYS} malformed keys, {len(total)} lines in all")
    assert writes >= WRITES_PER_S * BURST_S * 0.8
    assert sessions >= 5, "the burst spanned too few resyncs to test them"
    assert len(malformed) <= BAD_KEYS, f"{len(malformed)} lines for {BAD_KEYS} bad keys"
    assert not any(s.stale for _, s in watch.published), watch.history()
    assert watch.resolver.failures == 0


async def test_consul_kv_logs_each_malformed_key_once(agent, caplog):
    caplog.set_level(logging.INFO, logger=CONSUL_LOG)
    path = "faults/kv-many"
    bad = 200
    agent.kv_delete(path, recurse=True)
    for first in range(0, bad, 64):  # Consul's transactions take 64 operations at most
        agent.put("/v1/txn", body=[{"KV": {"Verb": "set", "Key": f"{path}/bad/{i:04d}",
                                           "Value": base64.b64encode(f"oops-{i}".encode()).decode()}}
                                   for i in range(first, min(first + 64, bad))])
    agent.kv_put(f"{path}/live", hp(A))
    async with Watch(consul_resolver(agent, f"consul-kv:///{path}"), "consul-kv").running() as watch:
        await watch.fresh({A}, "start")
        for i, pair in enumerate([B, C, D, A, B]):
            mark = len(watch.published)
            await call(agent.kv_put, f"{path}/live", hp(pair))
            await watch.fresh({pair}, f"update {i}", start=mark)
        await call(agent.kv_put, f"{path}/bad/0000", "oops-again")  # a new bad value: one more line
        mark = len(watch.published)
        await call(agent.kv_put, f"{path}/live", hp(C))
        await watch.fresh({C}, "after a bad value changed", start=mark)
    lines = warnings_about(caplog, CONSUL_LOG, "oops")
    print(f"consul-kv: {len(lines)} log lines about {bad} malformed keys over 7 updates")
    # Once each while they hold, and at most 20 new ones per answer (then one line says how
    # many more): the first answer's 20 and a summary, then the one that changed.
    assert len(lines) == 20 + 1, len(lines)
    assert len(warnings_about(caplog, CONSUL_LOG, f"and {bad - 20} more such problems")) == 1, caplog.text
    agent.kv_delete(path, recurse=True)


# ---- Consul's DNS shuffles its answers: one set, not one per answer ---------------------------


def test_canonical_order_depends_only_on_the_set():
    a, b, c = Backend("10.0.0.2", 1), Backend("10.0.0.10", 1), Backend("fd00::1", 1, priority=0, weight=5)
    d = Backend("10.0.0.1", 1, priority=1)
    assert canonical((a, b, c, d)) == canonical((d, c, b, a, b)) == (c, a, b, d)


async def test_consul_dns_shuffled_answers_make_no_change_events(agent):
    import dns.message
    import dns.query

    # (five: more than Consul's udp_answer_limit of 3, which is what a plain UDP query gets,
    # a random 3 each time, a change of set; the resolver asks with EDNS0 and gets all)
    ids = [f"shuffle-{i}" for i in range(5)]
    for i, sid in enumerate(ids):
        agent.register("faults-shuffle", sid, f"127.0.1.{i + 1}", 7000 + i)
    try:
        agent.wait_for_health("faults-shuffle", len(ids))
        name = "faults-shuffle.service.consul"
        # Consul does shuffle: the same question, answered in several orders
        orders = set()
        for _ in range(20):
            query = dns.message.make_query(name, "SRV", use_edns=0, payload=1232)
            answer = await call(dns.query.udp, query, agent.dns_server[0], port=agent.dns_server[1], timeout=2)
            orders.add(tuple(rd.target.to_text() for rd in answer.answer[0]))
        assert len(orders) > 1, "Consul answered in one order only: nothing to test"
        options = ResolverOptions(dns_servers=(agent.dns_server,), dns_min_ttl=0.05)
        async with Watch(parse_spec(name).resolver(options), name).running() as watch:
            expected = {(f"127.0.1.{i + 1}", 7000 + i) for i in range(len(ids))}
            await watch.fresh(expected, "start")
            # Consul's TTL is 0: an answer every 0.05 x 0.8 s; give it 40 or more of them
            resolver = watch.resolver
            answers = 0
            real_lookup = resolver.lookup

            async def counted():
                nonlocal answers
                answers += 1
                return await real_lookup()

            resolver.lookup = counted
            with trio.move_on_after(10):
                while answers < 40:
                    await trio.sleep(0.05)
        print(f"{name}: {len(orders)} orders in 20 answers; {len(watch.published)} sets published "
              f"over {answers + 1} look-ups")
        assert answers >= 40
        assert len(watch.published) == 1, watch.history()
    finally:
        for sid in ids:
            agent.deregister(sid)
