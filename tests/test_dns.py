"""DNS resolvers (backends/dns.py): specs and answer handling (pure), the watch loop's stale
limit in virtual time, then against a real dnsmasq: SRV order and weights, A/AAAA, TTL
refresh, NXDOMAIN, outages; and end to end through a real daemon and real Redis servers."""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time

import pytest
import trio

from ambassadord.balancer import PickState, pick_order
from ambassadord.backends import NotFound, SpecError, TemporaryFailure, parse_spec
from ambassadord.backends.dns import AddressResolver, DnsSpec, SrvRecord, parse_dns_server, srv_backends
from ambassadord.backends.interface import Backend, ResolverOptions
from tests.daemon import Daemon, RedisProcess, connect, free_port, read_to_eof, wait_until
from tests.dns_server import Dnsmasq

# ---- specs and answers (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, fields",
    [
        ("redis.service.consul", "SrvSpec", {"name": "redis.service.consul"}),
        ("srv://_redis._tcp.example.com", "SrvSpec", {"name": "_redis._tcp.example.com"}),
        ("srv://redis.service.consul.", "SrvSpec", {"name": "redis.service.consul"}),
        ("dns://redis.example.com:6379", "DnsSpec", {"name": "redis.example.com", "port": 6379}),
        ("redis", "SrvSpec", {"name": "redis"}),
    ],
)
def test_dns_specs_parse(text, kind, fields):
    spec = parse_spec(text)
    assert type(spec).__name__ == kind
    assert {k: getattr(spec, k) for k in fields} == fields


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("srv://", "bad DNS name ''"),
        ("srv://a:1", "expected srv://NAME"),
        ("srv://a/b", "expected srv://NAME"),
        ("dns://redis.example.com", "expected dns://NAME:PORT"),
        ("dns://redis.example.com:0", "bad port '0'"),
        ("dns://-bad.example:1", "label '-bad' starts or ends with '-'"),
        ("10.0.0.5", "is an IP address, not a DNS name"),
        ("srv://10.0.0.5", "is an IP address"),
        ("a..b", "empty label"),
        ("x" * 64 + ".example", "is 64 characters long (at most 63)"),
        ("srv://" + "abc." * 64 + "example", "263 characters long (a hostname has at most 253)"),
        ("srv://bad!name.example", "label 'bad!name' has the character '!'"),
        ("srv://münchen.example", "not ASCII"),
    ],
)
def test_bad_dns_specs(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:8600", ("127.0.0.1", 8600)), ("::1", ("::1", 53)),
     ("[::1]:8600", ("::1", 8600)), ("[fd00::1]", ("fd00::1", 53))],
)
def test_parse_dns_server(text, expected):
    assert parse_dns_server(text) == expected


@pytest.mark.parametrize("text", ["consul", "127.0.0.1:x", "127.0.0.1:70000", "[::1]x", "", "[::1", "[127.0.0.1]:53"])
def test_bad_dns_server(text):
    with pytest.raises(ValueError, match="bad DNS server"):
        parse_dns_server(text)


def test_srv_backends_from_records():
    records = [
        SrvRecord(10, 60, 6379, "a.test"),
        SrvRecord(10, 30, 6380, "multi.test"),
        SrvRecord(20, 0, 6381, "noaddr.test"),
        SrvRecord(20, 5, 0, "a.test"),
        SrvRecord(0, 0, 1, "."),
    ]
    addrs = {"a.test": ["127.0.0.2"], "multi.test": ["127.0.0.3", "::3"]}
    backends, notes = srv_backends(records, addrs)
    assert backends == [
        Backend("127.0.0.2", 6379, 10, 60),
        Backend("127.0.0.3", 6380, 10, 15.0),  # a target's weight is split among its addresses
        Backend("::3", 6380, 10, 15.0),
    ]
    assert any("noaddr.test: no A/AAAA" in n for n in notes)
    assert any("port 0" in n for n in notes) and any("target '.'" in n for n in notes)


def test_srv_backends_skip_targets_that_are_no_hostname():
    """A DNS name may hold any byte (dnspython writes it as an escape); such a target is
    skipped with a note, never handed to a look-up."""
    records = [SrvRecord(10, 1, 6379, "a.test"), SrvRecord(10, 1, 6380, "bad\\032name.test")]
    backends, notes = srv_backends(records, {"a.test": ["127.0.0.2"], "bad\\032name.test": ["127.0.0.3"]})
    assert backends == [Backend("127.0.0.2", 6379, 10, 1)]
    assert notes == ["target 'bad\\\\032name.test': label 'bad\\\\032name' has the character '\\\\' "
                     "(allowed: letters, digits, '-' and '_'), skipped"]


# ---- the watch loop, with a scripted look-up (virtual time) ----------------------------------


class ScriptedAddressResolver(AddressResolver):
    """dns://x.test:1 whose look-ups answer from a script: backends, or an exception to raise.
    Records each look-up's time; when the script runs out, the look-up blocks."""

    def __init__(self, script, **options):
        super().__init__(DnsSpec.parse("dns://x.test:1"), ResolverOptions(**options))
        self.script, self.times, self.done, self.rng = list(script), [], trio.Event(), random.Random(7)

    async def lookup(self):
        self.times.append(trio.current_time())
        if not self.script:
            self.done.set()
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step, 30.0  # TTL 30 s: refreshed after 24


async def test_watch_drops_the_stale_answer_past_dns_stale_for_and_recovers(autojump_clock, caplog):
    a, b = Backend("10.0.0.1", 1), Backend("10.0.0.2", 1)
    down = TemporaryFailure("x.test A: timeout (scripted)")
    r = ScriptedAddressResolver([(a,), (a,)] + [down] * 8 + [(b,)], dns_stale_for=30.0)
    published = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.watch, published.append)
        await r.done.wait()
        nursery.cancel_scope.cancel()
    confirmed = r.times[1]  # the second answer confirmed the first: the stale age counts from it
    failures = r.times[2:10]
    kept = [t - confirmed <= 30 for t in failures]
    assert kept == sorted(kept, reverse=True) and True in kept and False in kept, failures  # kept, then dropped
    n = kept.count(True)
    assert published[0].backends == (a,) and not published[0].stale and len(published) == 1 + 8 + 1
    assert all(s.backends == (a,) and s.stale and s.updated == published[0].updated for s in published[1:1 + n])
    assert all(s.backends == () and s.stale and "timeout" in s.error for s in published[1 + n:9])
    assert published[9].backends == (b,) and not published[9].stale and published[9].error is None
    too_old = [rec for rec in caplog.records if "the last good answer is too old" in rec.getMessage()]
    assert len(too_old) == 1, [rec.getMessage() for rec in caplog.records]


# ---- against a real dnsmasq -------------------------------------------------------------

SRV = [
    ("_redis._tcp.test", "a.test", 6379, 10, 60),
    ("_redis._tcp.test", "b.test", 6380, 10, 30),
    ("_redis._tcp.test", "c.test", 6381, 10, 10),
    ("_redis._tcp.test", "backup.test", 6382, 20, 1),
]
HOSTS = {"a.test": ["127.0.0.2", "::2"], "b.test": ["127.0.0.3"], "c.test": ["127.0.0.4"]}


@pytest.fixture
def dnsmasq():
    with Dnsmasq(srv=SRV, hosts=HOSTS, bare_hosts={"backup.test": "127.0.0.5"}) as server:
        yield server


def options(server: Dnsmasq, **kw) -> ResolverOptions:
    kw.setdefault("dns_timeout", 1.0)  # a dead server costs 1 s per look-up, not 5
    return ResolverOptions(dns_servers=(("127.0.0.1", server.port),), **kw)


async def test_srv_answer_with_and_without_additional_section(dnsmasq):
    got = await parse_spec("srv://_redis._tcp.test").resolver(options(dnsmasq)).resolve()
    assert set(got) == {
        Backend("127.0.0.2", 6379, 10, 30.0), Backend("::2", 6379, 10, 30.0),  # from the additional section
        Backend("127.0.0.3", 6380, 10, 30), Backend("127.0.0.4", 6381, 10, 10),
        Backend("127.0.0.5", 6382, 20, 1),  # not in the additional section: looked up
    }
    assert {b.name for b in got} == {"a.test", "b.test", "c.test", "backup.test"}


async def test_srv_pick_order_follows_priority_and_weight(dnsmasq):
    backends = await parse_spec("_redis._tcp.test").resolver(options(dnsmasq)).resolve()
    state, rng = PickState(), random.Random(11)
    firsts = collections.Counter()
    for _ in range(10000):
        order = pick_order(backends, "random", state, 0, rng)
        assert order[-1].port == 6382  # priority 20 only after every priority-10 backend
        firsts[order[0].name] += 1
    # Weights 60:30:10 -> 6000/3000/1000 expected; binomial sd <= 50, so 300 is > 6 sd:
    # this cannot fail by chance, and an unweighted or inverted order fails it by far.
    for name, expected in (("a.test", 6000), ("b.test", 3000), ("c.test", 1000)):
        assert abs(firsts[name] - expected) < 300, firsts
    assert firsts["backup.test"] == 0


async def test_address_records_both_families(dnsmasq):
    got = await parse_spec("dns://a.test:8080").resolver(options(dnsmasq)).resolve()
    assert sorted(map(str, got)) == ["127.0.0.2:8080", "[::2]:8080"]


async def test_nxdomain_and_empty_answers_are_not_found(dnsmasq):
    with pytest.raises(NotFound, match="NXDOMAIN"):
        await parse_spec("srv://nothing.test").resolver(options(dnsmasq)).resolve()
    with pytest.raises(NotFound, match="no A or AAAA"):
        await parse_spec("dns://nothing.test:1").resolver(options(dnsmasq)).resolve()


async def test_dead_server_is_a_temporary_failure():
    dead = free_port()  # nothing listens: queries time out or are refused by ICMP
    resolver = parse_spec("srv://_redis._tcp.test").resolver(
        ResolverOptions(dns_servers=(("127.0.0.1", dead),), dns_timeout=1.0))
    with trio.fail_after(15):
        with pytest.raises(TemporaryFailure):
            await resolver.resolve()


async def test_second_dns_server_answers_when_the_first_is_dead(dnsmasq):
    opts = ResolverOptions(dns_servers=(("127.0.0.1", free_port()), ("127.0.0.1", dnsmasq.port)), dns_timeout=3.0)
    with trio.fail_after(15):
        got = await parse_spec("dns://b.test:1").resolver(opts).resolve()
    assert [str(b) for b in got] == ["127.0.0.3:1"]


class Published:
    """Collects what a resolver's watch() publishes; wait_for() polls with a deadline."""

    def __init__(self):
        self.sets = []

    def __call__(self, backend_set):
        self.sets.append((time.monotonic(), backend_set))

    async def wait_for(self, predicate, timeout=10):
        with trio.fail_after(timeout):
            while True:
                for t, s in self.sets:
                    if predicate(s):
                        return t, s
                await trio.sleep(0.02)


async def test_watch_follows_record_changes_within_the_ttl(dnsmasq):
    published = Published()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parse_spec("srv://_redis._tcp.test").resolver(options(dnsmasq)).watch, published)
        await published.wait_for(lambda s: len(s.backends) == 5)
        dnsmasq.restart(srv=[("_redis._tcp.test", "b.test", 7000, 1, 1)], hosts=HOSTS)
        changed = time.monotonic()
        t, s = await published.wait_for(lambda s: [str(b) for b in s.backends] == ["127.0.0.3:7000"])
        # refreshed at 80% of the 2 s TTL: the change shows within the TTL (plus query time)
        assert t - changed <= dnsmasq.ttl + 0.5, t - changed
        assert not s.stale and s.error is None
        nursery.cancel_scope.cancel()


async def test_watch_serves_stale_while_dns_is_down_then_recovers(dnsmasq):
    published = Published()
    resolver = parse_spec("dns://b.test:1").resolver(options(dnsmasq))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.watch, published)
        _, good = await published.wait_for(lambda s: s.backends and not s.stale)
        dnsmasq.stop()
        _, stale = await published.wait_for(lambda s: s.stale, timeout=15)
        assert stale.backends == good.backends and stale.error and "timeout" in stale.error
        assert resolver.failures >= 1
        dnsmasq.start(hosts={"b.test": ["127.0.0.9"]})
        _, fresh = await published.wait_for(lambda s: not s.stale and [str(b) for b in s.backends] == ["127.0.0.9:1"],
                                            timeout=20)
        nursery.cancel_scope.cancel()


async def test_stale_answer_expires_after_dns_stale_for(dnsmasq):
    published = Published()
    resolver = parse_spec("dns://b.test:1").resolver(options(dnsmasq, dns_stale_for=0.5))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.watch, published)
        await published.wait_for(lambda s: s.backends and not s.stale)
        dnsmasq.stop()
        _, expired = await published.wait_for(lambda s: s.stale and not s.backends, timeout=20)
        assert "timeout" in expired.error
        nursery.cancel_scope.cancel()


async def test_watch_publishes_no_backends_for_nxdomain(dnsmasq):
    published = Published()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parse_spec("srv://gone.test").resolver(options(dnsmasq)).watch, published)
        _, s = await published.wait_for(lambda s: True)
        assert s.backends == () and not s.stale and "NXDOMAIN" in s.error
        nursery.cancel_scope.cancel()


# ---- end to end: the daemon with an SRV route ---------------------------------------------


def redis_get(host: str, port: int, key: bytes) -> bytes:
    with contextlib.closing(connect(host, port)) as s:
        s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
        data = b""
        while not data.endswith(b"\r\n") or data.startswith(b"$") and data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n")[1] if data.startswith(b"$") else data


def redis_set(port: int, key: bytes, value: bytes) -> None:
    with contextlib.closing(connect("127.0.0.1", port)) as s:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
        assert s.recv(100) == b"+OK\r\n"


def test_e2e_srv_route_follows_records_and_survives_dns_outage(tmp_path):
    with contextlib.ExitStack() as stack:
        r1 = stack.enter_context(RedisProcess(free_port()))
        r2 = stack.enter_context(RedisProcess(free_port()))
        redis_set(r1.port, b"whoami", b"r1")
        redis_set(r2.port, b"whoami", b"r2")
        dns = stack.enter_context(Dnsmasq(srv=[("_redis._tcp.test", "r.test", r1.port, 1, 1)],
                                          hosts={"r.test": ["127.0.0.1"]}, ttl=2))
        port = free_port()
        daemon = stack.enter_context(Daemon(
            ["--listen", f"127.0.0.1:{port}", "--map", f"{port}=srv://_redis._tcp.test",
             "--dns-server", dns.server, "--dns-timeout", "1"], listen=("127.0.0.1", port), workdir=tmp_path))
        # the consumer reaches the backend the SRV records name
        assert redis_get("127.0.0.1", port, b"whoami") == b"r1"
        # the records change: new connections follow within the TTL
        dns.restart(srv=[("_redis._tcp.test", "r.test", r2.port, 1, 1)], hosts={"r.test": ["127.0.0.1"]})
        changed = time.monotonic()
        wait_until(lambda: redis_get("127.0.0.1", port, b"whoami") == b"r2", timeout=10, what=daemon.describe)
        assert time.monotonic() - changed <= dns.ttl + 1.0
        # DNS goes away: connections keep working on the stale set, well past the TTL
        dns.stop()
        daemon.wait_for(lambda r: "serving the last good answer" in r.get("msg", ""), timeout=15)
        for _ in range(3):
            assert redis_get("127.0.0.1", port, b"whoami") == b"r2"
        daemon.stop()


def test_e2e_weights_spread_connections(tmp_path):
    """600 real connections through the daemon; SRV weights 10:30:60 at priority 1."""
    names = ["w10", "w30", "w60", "backup"]
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in names]
    stop = threading.Event()

    def serve(lsock, name):
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            with c:
                c.sendall(name.encode())

    threads = [threading.Thread(target=serve, args=(s, n), daemon=True) for s, n in zip(servers, names)]
    for t in threads:
        t.start()
    ports = [s.getsockname()[1] for s in servers]
    srv = [("_w._tcp.test", "h.test", ports[0], 1, 10), ("_w._tcp.test", "h.test", ports[1], 1, 30),
           ("_w._tcp.test", "h.test", ports[2], 1, 60), ("_w._tcp.test", "h.test", ports[3], 2, 100)]
    try:
        with Dnsmasq(srv=srv, hosts={"h.test": ["127.0.0.1"]}) as dns:
            port = free_port()
            with Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=srv://_w._tcp.test",
                         "--dns-server", dns.server],
                        listen=("127.0.0.1", port), workdir=tmp_path) as daemon:
                counts = collections.Counter()
                for _ in range(600):
                    with contextlib.closing(connect("127.0.0.1", port)) as c:
                        counts[read_to_eof(c, 5).decode()] += 1
                daemon.stop()
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in servers:
            s.close()
    # expected 60/180/360; sd 7.3/11.2/12.0: a 60 margin is at least 5 sd for each.
    assert counts["backup"] == 0, counts
    for name, expected in (("w10", 60), ("w30", 180), ("w60", 360)):
        assert abs(counts[name] - expected) < 60, counts


def test_e2e_nxdomain_route_refuses_with_a_log_line_naming_the_route(tmp_path):
    with Dnsmasq() as dns:
        port = free_port()
        with Daemon(["--listen", f"127.0.0.1:{port}", "--map", f"{port}=srv://missing.test",
                     "--dns-server", dns.server], listen=("127.0.0.1", port), workdir=tmp_path) as daemon:
            daemon.wait_for(lambda r: r.get("event") == "backends" and "NXDOMAIN" in (r.get("error") or ""))
            with contextlib.closing(connect("127.0.0.1", port)) as c:
                assert read_to_eof(c, 5) == b""
            rec = daemon.wait_for(lambda r: r.get("event") == "connection")
            assert rec["outcome"] == "no-backends" and rec["route"] == str(port) and "NXDOMAIN" in rec["error"]
            daemon.stop()
