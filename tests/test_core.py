"""The pure core, table-driven: spec parsing, route lookup, pick order, ejection, config."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from ambassadord.balancer import Ejections, PickState, pick_order, weighted_order
from ambassadord.config import ConfigError
from ambassadord.routes import Route, RouteConfig, RouteTable
from ambassadord.sources import load_routes
from ambassadord.backends import SpecError, parse_spec
from ambassadord.backends.interface import Backend, BackendSet

# ---- specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, entries",
    [
        ("10.0.0.5:6379", [("10.0.0.5", 6379)]),
        (" a:1 , b:2 ", [("a", 1), ("b", 2)]),
        ("[fd00::5]:6379", [("fd00::5", 6379)]),
        ("redis-1.example.com:6379,[::1]:1", [("redis-1.example.com", 6379), ("::1", 1)]),
        ("a:1,a:1", [("a", 1)]),  # duplicates collapse
        ("my_host:80", [("my_host", 80)]),
    ],
)
def test_static_spec_parses(text, entries):
    assert list(parse_spec(text).entries) == entries


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("host:1,other", "expected HOST:PORT"),  # a bare name is SRV, but not inside a list
        ("bad name!", "bad DNS name 'bad name!'"),
        ("host:", "bad port ''"),
        ("host:0", "bad port '0'"),
        ("host:65536", "bad port '65536'"),
        ("host:http", "bad port 'http'"),
        ("fd00::5:6379", "IPv6 addresses go in brackets"),
        ("[fd00::5]6379", "expected [IPv6]:PORT"),
        ("[nothex]:1", "bad IPv6 address 'nothex'"),
        ("a:1,,b:2", "empty backend"),
        ("bad host:1", "bad host 'bad host'"),
        ("gopher://x", "unknown scheme 'gopher'"),
        ("etcd://", "expected etcd://[ENDPOINT]/PREFIX"),
        ("etcd://h:0/x", "bad port '0'"),
        ("consul:///a/b", "expected consul://[AGENT]/SERVICE"),
        ("consul:///redis?near=_agent", "unknown parameter(s) near"),
        ("consul-kv://", "expected consul-kv://[AGENT]/PATH"),
    ],
)
def test_bad_specs_say_what_is_wrong(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert fragment in str(err.value)


# A typo in a spec gets what was probably meant, not the error of the form it fell into
# (consul//redis used to say "expected srv://NAME": it has no ":", so it read as a SRV name).
@pytest.mark.parametrize("text, meant", [
    ("consul//redis", "did you mean consul:///redis? (consul specs start with consul://; the third slash: "
                      "the default agent)"),
    ("consul:/redis", "did you mean consul:///redis?"),
    ("consul:redis", "did you mean consul:///redis?"),
    ("consul//redis?tag=primary", "did you mean consul:///redis?tag=primary?"),
    ("consul//10.0.0.2:8500/redis", "did you mean consul://10.0.0.2:8500/redis? (consul specs start with consul://)"),
    ("consul-kv//services/redis", "did you mean consul-kv:///services/redis?"),
    ("etcd:/services/redis", "did you mean etcd:///services/redis? (etcd specs start with etcd://; the third "
                             "slash: the default endpoint)"),
    ("srv//_redis._tcp.example.com", "did you mean srv://_redis._tcp.example.com?"),
    ("dns:/redis.example.com:6379", "did you mean dns://redis.example.com:6379?"),
    # the likely meaning is wrong too: both said
    ("consul//re dis", "did you mean consul:///re dis? (consul specs start with consul://; the third slash: "
                       "the default agent); but that is no valid spec either: spec 'consul:///re dis': expected"),
    # a path's first segment where the host goes (one word, no port): not a host to connect to
    ("etcd://services/redis", "did you mean etcd:///services/redis (three slashes: the path /services/redis on "
                              "the default endpoint)? As written, 'services' would be the endpoint's host; a one-word "
                              "host needs its port, e.g. etcd://services:2379/redis"),
    ("consul-kv://services/redis", "did you mean consul-kv:///services/redis (three slashes: the path "
                                   "/services/redis on the default agent)?"),
    # the name where the host goes, and no path at all
    ("consul://redis", "did you mean consul:///redis (three slashes: the default agent)?"),
    ("consul://redis?dc=dc2", "did you mean consul:///redis?dc=dc2 (three slashes"),
    ("consul-kv://services", "did you mean consul-kv:///services (three slashes: the default agent)?"),
    ("etcd://services", "did you mean etcd:///services (three slashes: the default endpoint)?"),
    # a scheme spelt almost right
    ("Consul:///redis", "unknown scheme 'Consul'; did you mean consul://?"),
    ("consull:///redis", "unknown scheme 'consull'; did you mean consul://?"),
])
def test_spec_typos_say_what_was_probably_meant(text, meant):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert str(err.value).startswith(f"spec {text!r}: "), str(err.value)
    assert meant in str(err.value), str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("consul://10.0.0.2:8500", "expected consul://[AGENT]/SERVICE"),  # an agent with a port: only the name is missing
    ("etcd://10.0.0.5", "expected etcd://[ENDPOINT]/PREFIX"),
    ("http://x", "unknown scheme 'http' (known schemes"),  # nothing close
])
def test_no_hint_where_nothing_was_probably_meant(text, fragment):
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert fragment in str(err.value) and "did you mean" not in str(err.value), str(err.value)


@pytest.mark.parametrize("text, parsed", [
    # what looks like a typo but is valid stays valid: a host called consul, port 8500
    ("consul:8500", ("StaticSpec", "entries", (("consul", 8500),))),
    # one-word hosts with a port, localhost, names with a dot: hosts, as written
    ("etcd://etcd:2379/services/redis", ("EtcdSpec", "endpoint", ("etcd", 2379))),
    ("etcd://localhost/services/redis", ("EtcdSpec", "endpoint", ("localhost", 2379))),
    ("consul-kv://consul:8500/services/redis", ("ConsulKVSpec", "agent", ("consul", 8500))),
    ("consul-kv://consul.local/services/redis", ("ConsulKVSpec", "agent", ("consul.local", 8500))),
    # a service name has no slash: the word before it can only be the agent
    ("consul://consul/redis", ("ConsulServiceSpec", "agent", ("consul", 8500))),
])
def test_specs_that_only_look_like_typos_parse(text, parsed):
    spec = parse_spec(text)
    kind, field, value = parsed
    assert (type(spec).__name__, getattr(spec, field)) == (kind, value)


def test_literal_spec_needs_no_resolution():
    assert parse_spec("10.0.0.1:1,[::1]:2").literal
    assert not parse_spec("10.0.0.1:1,localhost:2").literal


async def test_static_resolver_resolves_literals_and_localhost():
    got = await parse_spec("10.0.0.1:1,[::1]:2").resolver(None).resolve()
    assert [str(b) for b in got] == ["10.0.0.1:1", "[::1]:2"]
    got = await parse_spec("localhost:7").resolver(None).resolve()
    assert {b.address for b in got} <= {"127.0.0.1", "::1"} and got


# ---- route lookup ------------------------------------------------------------------


def _route(port, source=None, spec="10.0.0.1:1"):
    net = ipaddress.ip_network(source) if source else None
    return Route(RouteConfig(port=port, spec=parse_spec(spec), source=net, origin="test"))


LOOKUP_TABLE = [_route(6379), _route(5432, "10.0.0.0/8"), _route(5432, "10.1.0.0/16"), _route(5432, "fd00::/8"),
                _route(80, "192.168.0.0/16"), _route(80)]


@pytest.mark.parametrize(
    "port, source, expected",
    [
        (6379, "1.2.3.4", (6379, None)),
        (6379, "::1", (6379, None)),
        (5432, "10.9.9.9", (5432, "10.0.0.0/8")),
        (5432, "10.1.2.3", (5432, "10.1.0.0/16")),  # most specific wins
        (5432, "11.0.0.1", None),  # no catch-all for 5432
        (5432, "fd12::1", (5432, "fd00::/8")),
        (5432, "::ffff:10.1.0.9", (5432, "10.1.0.0/16")),  # v4-mapped treated as v4
        (80, "192.168.1.1", (80, "192.168.0.0/16")),
        (80, "8.8.8.8", (80, None)),  # catch-all after the specific one
        (81, "1.2.3.4", None),
    ],
)
def test_route_lookup_most_specific_source_wins(port, source, expected):
    table = RouteTable(LOOKUP_TABLE)
    route = table.lookup(port, source)
    if expected is None:
        assert route is None
    else:
        assert (route.port, str(route.config.source) if route.config.source else None) == expected


def test_route_update_forgets_ejections_of_removed_backends():
    r = _route(1)
    a, b = Backend("10.0.0.1", 1), Backend("10.0.0.2", 1)
    r.pick.ejections.eject(a, 0, 10)
    r.pick.ejections.eject(b, 0, 10)
    r.update(BackendSet((b,)))
    assert r.resolved and set(r.pick.ejections.until) == {b}


# ---- pick order --------------------------------------------------------------------

A, B, C, D = (Backend(f"10.0.0.{i}", 80) for i in range(1, 5))


def test_round_robin_rotates():
    state = PickState()
    orders = [pick_order([A, B, C], "round-robin", state, 0, random.Random(1)) for _ in range(4)]
    assert orders == [[A, B, C], [B, C, A], [C, A, B], [A, B, C]]


def test_random_first_choice_is_uniform():
    rng = random.Random(7)
    firsts = collections.Counter(pick_order([A, B, C, D], "random", PickState(), 0, rng)[0] for _ in range(8000))
    # Each expected 2000; binomial sd ~39: a 200 margin is >5 sd, so this cannot fail by chance
    # with any reasonable rng, and a biased picker (e.g. always A) fails it.
    assert all(abs(n - 2000) < 200 for n in firsts.values()), firsts
    assert len(firsts) == 4


def test_every_backend_once_and_lower_priority_first():
    hi = [Backend(f"10.0.1.{i}", 80, priority=10) for i in range(3)]
    lo = [Backend(f"10.0.2.{i}", 80, priority=20) for i in range(3)]
    for policy in ("random", "round-robin"):
        state = PickState()
        for _ in range(20):
            order = pick_order(lo + hi, policy, state, 0, random.Random())
            assert sorted(order, key=str) == sorted(lo + hi, key=str)
            assert set(order[:3]) == set(hi) and set(order[3:]) == set(lo)


def test_ejected_backends_go_last_until_they_expire():
    state = PickState()
    state.ejections.eject(A, now=100, duration=10)
    for _ in range(50):
        order = pick_order([A, B, C], "random", state, 105, random.Random())
        assert order[-1] == A and set(order) == {A, B, C}
    # expired: A is an ordinary candidate again (and its state is dropped)
    firsts = {pick_order([A, B, C], "random", state, 111, random.Random(i))[0] for i in range(50)}
    assert A in firsts and A not in state.ejections.until


def test_all_ejected_still_tried_in_order():
    state = PickState()
    for b in (A, B):
        state.ejections.eject(b, 0, 10)
    assert sorted(pick_order([A, B], "round-robin", state, 1, random.Random()), key=str) == [A, B]


def test_weighted_order_follows_weights():
    # RFC 2782: the first pick is proportional to weight. Weights 1:3:6 over 10000 draws:
    # expected 1000/3000/6000, sd at most ~49; a 300 margin is > 6 sd.
    heavy = [Backend("10.0.0.1", 1, weight=1), Backend("10.0.0.2", 1, weight=3), Backend("10.0.0.3", 1, weight=6)]
    rng = random.Random(3)
    firsts = collections.Counter(weighted_order(heavy, rng)[0].address for _ in range(10000))
    for addr, expected in (("10.0.0.1", 1000), ("10.0.0.2", 3000), ("10.0.0.3", 6000)):
        assert abs(firsts[addr] - expected) < 300, firsts


def test_weight_zero_is_almost_always_last():
    zero, one = Backend("10.0.0.1", 1, weight=0), Backend("10.0.0.2", 1, weight=50)
    rng = random.Random(5)
    firsts = collections.Counter(weighted_order([zero, one], rng)[0] for _ in range(5000))
    # P(zero first) = 1/51 per RFC 2782 (draw of exactly 0): expected ~98, well under 300.
    assert 0 < firsts[zero] < 300


def test_ejections_expire():
    e = Ejections()
    e.eject(A, 0, 5)
    assert e.is_ejected(A, 4.9) and not e.is_ejected(A, 5.0)


# ---- config ------------------------------------------------------------------------


def test_routes_from_every_source(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text(
        '[defaults]\nconnect_timeout = 1.5\n\n[routes]\n'
        '6379 = "10.0.0.5:6379"\n'
        '5432 = { backend = "db:5432", balance = "round-robin", idle_timeout = 60 }\n'
        '80 = [ { backend = "a:80", source = "10.0.0.0/8" }, { backend = "b:80" } ]\n'
    )
    env = {"BACKEND_11211": "[fd00::1]:11211", "REDIS_PORT_7000_TCP": "tcp://10.0.0.9:7000", "PATH": "/bin"}
    loaded = load_routes(maps=["8080@172.17.0.0/16=c:80"], config_file=str(f), env=env, link_env=True,
                         flag_defaults={"balance": "random", "eject_for": 3})
    by = {(r.port, str(r.source)): r for r in loaded.routes}
    assert set(by) == {(6379, "None"), (5432, "None"), (80, "10.0.0.0/8"), (80, "None"), (8080, "172.17.0.0/16"),
                       (11211, "None"), (7000, "None")}
    assert by[(5432, "None")].balance == "round-robin" and by[(5432, "None")].idle_timeout == 60
    assert by[(6379, "None")].connect_timeout == 1.5 and by[(6379, "None")].eject_for == 3
    assert by[(7000, "None")].spec.text == "10.0.0.9:7000"
    assert by[(6379, "None")].origin.startswith(f"{f}:5:")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[routes]\n6379 = 'nope:http'\n", ":2: [routes] 6379: bad port 'http'"),
        ("[routes]\nredis = '1.2.3.4:1'\n", ":2: [routes] redis"),
        ("[routes]\n6379 = { backend = '1.2.3.4:1', speed = 3 }\n", "unknown option(s) speed"),
        ("[routes]\n6379 = { balance = 'random' }\n", "missing backend"),
        ("[routes]\n6379 = { backend = '1.2.3.4:1', balance = 'fastest' }\n", "bad balance 'fastest'"),
        ("[routes]\n6379 = { backend = '1.2.3.4:1', connect_timeout = -1 }\n", "bad duration -1"),
        ("[routes]\n6379 = { backend = '1.2.3.4:1', source = '10.0.0.0/33' }\n", "bad source '10.0.0.0/33'"),
        ("[routs]\n", "unknown top-level key(s) routs"),
        ("[routes\n", "not valid TOML"),
        ("[defaults]\nwhatever = 1\n", "[defaults] whatever: unknown option"),
        ("[routes]\n6379 = 5\n", "expected a spec string"),
    ],
)
def test_config_file_errors_name_file_line_and_value(tmp_path, content, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_routes(config_file=str(f))
    assert str(f) in str(err.value) and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(maps=["6379"]), "--map 6379: expected PORT=SPEC"),
        (dict(maps=["6379@nope=1.2.3.4:1"]), "bad source 'nope'"),
        (dict(maps=["1=1.1.1.1:1", "1=1.1.1.1:2"]), "port 1 is mapped twice: by --map 1=1.1.1.1:1 and by --map 1=1.1.1.1:2"),
        (dict(env={"BACKEND_6379": "x:y"}), "env BACKEND_6379=x:y"),
        (dict(env={"BACKEND_0": "1.2.3.4:1"}), "env BACKEND_0"),
        (dict(env={"R_PORT_1_TCP": "udp://1.2.3.4:1"}, link_env=True), "env R_PORT_1_TCP=udp://1.2.3.4:1 (--link-env)"),
        (dict(config_file="/nonexistent/routes.toml"), "cannot read config file /nonexistent/routes.toml"),
    ],
)
def test_config_errors_name_their_origin(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        load_routes(**kwargs)
    assert fragment in str(err.value), str(err.value)


def test_link_env_is_opt_in_and_non_port_backend_vars_warn():
    env = {"R_PORT_1_TCP": "tcp://1.2.3.4:1", "BACKEND_URL": "x"}
    loaded = load_routes(env=env)
    assert loaded.routes == [] and any("BACKEND_URL" in w for w in loaded.warnings)


def test_notes_are_logged_once_each_and_at_most_twenty_new_ones_per_answer(caplog):
    import logging

    from ambassadord.backends.interface import Notes

    log = logging.getLogger("ambassadord.test-notes")
    notes = Notes(log, "consul-kv:///bad")
    with caplog.at_level(logging.WARNING, logger="ambassadord.test-notes"):
        notes.report([f"key k{i}: bad value" for i in range(1000)])  # a registry filled with garbage at once
        first = [r.getMessage() for r in caplog.records]
        notes.report([f"key k{i}: bad value" for i in range(1000)])  # the same answer again: nothing new
    assert len(first) == 21 and first[-1] == ("consul-kv:///bad: and 980 more such problems in this answer "
                                              "(not logged one by one)"), first[-3:]
    assert len(caplog.records) == 21
