"""Route sources and how their findings are combined (ambassadord/sources.py): pure
tables for :func:`combine` (order, duplicates, scope precedence), and :func:`read_routes`
with sources made here, which is how a new source (Docker, a KV table) plugs in."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from ambassadord.backends import parse_spec
from ambassadord.config import ConfigError, RouteDefaults, route_defaults
from ambassadord.routes import RouteConfig
from ambassadord.sources import (
    ConfigFile,
    EnvVars,
    FlagMaps,
    Scope,
    SourceRoutes,
    combine,
    load_routes,
    read_routes,
)


def r(key: str, origin: str) -> RouteConfig:
    """A route for ``PORT`` or ``PORT@CIDR``, read from ``origin``."""
    port, _, source = key.partition("@")
    return RouteConfig(port=int(port), spec=parse_spec("10.0.0.1:1"), origin=origin,
                       source=ipaddress.ip_network(source) if source else None)


def host(*routes: RouteConfig, warnings=()) -> SourceRoutes:
    return SourceRoutes(tuple(routes), tuple(warnings))


def container(*routes: RouteConfig) -> SourceRoutes:
    return SourceRoutes(tuple(routes), scope=Scope.CONTAINER)


# (what each source found, the origins of the combined routes in order | the error)
COMBINE = [
    pytest.param([], [], id="no-sources"),
    pytest.param([host(r("1", "a"), r("2", "a")), host(r("3", "b"))], ["a", "a", "b"], id="sources-keep-order"),
    pytest.param([host(r("80", "a"), r("80@10.0.0.0/8", "b"))], ["a", "b"], id="other-source-network-is-no-dup"),
    pytest.param([host(r("1", "a")), host(r("1", "b"))], "port 1 is mapped twice: by a and by b", id="dup-across"),
    pytest.param([host(r("1", "a"), r("1", "b"))], "port 1 is mapped twice: by a and by b", id="dup-within"),
    pytest.param([host(r("80@10.0.0.0/8", "a")), host(r("80@10.0.0.0/8", "b"))],
                 "port 80 from 10.0.0.0/8 is mapped twice: by a and by b", id="dup-with-source"),
    # A container's route wins over a host-wide one for the same port and network,
    # wherever the two sources stand in the list, and takes the host route's place.
    pytest.param([host(r("1", "h"), r("2", "h")), container(r("1", "c"))], ["c", "h"], id="container-wins"),
    pytest.param([container(r("1", "c")), host(r("1", "h"))], ["c"], id="container-wins-read-first"),
    pytest.param([host(r("1", "h")), container(r("1@172.17.0.5/32", "c"))], ["h", "c"],
                 id="container-address-beside-host-route"),
    pytest.param([container(r("1", "c")), container(r("1", "d"))], "port 1 is mapped twice: by c and by d",
                 id="dup-within-container-scope"),
]


@pytest.mark.parametrize("found, expected", COMBINE)
def test_combine(found, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as err:
            combine(found)
        assert str(err.value) == expected
    else:
        assert [route.origin for route in combine(found).routes] == expected


def test_combine_keeps_every_sources_warnings_in_order():
    loaded = combine([host(warnings=["w1"]), container(), host(r("1", "a"), warnings=["w2", "w3"])])
    assert loaded.warnings == ["w1", "w2", "w3"]


@dataclass(frozen=True)
class Fixed:
    """A source made here: what a Docker or KV source would be to read_routes."""

    found: SourceRoutes
    seen: list

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        self.seen.append(defaults)
        return self.found


def test_a_source_sets_defaults_for_the_sources_after_it(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text("[defaults]\nconnect_timeout = 1.5\nbalance = 'round-robin'\n[routes]\n6379 = '10.0.0.5:6379'\n")
    seen: list = []
    flags = route_defaults({"balance": "random", "eject_for": 3})
    loaded = read_routes([Fixed(SourceRoutes(), seen), ConfigFile(str(f)), FlagMaps(("80=10.0.0.6:80",)),
                          Fixed(container(r("9", "c")), seen)], flags)
    before, after = seen
    assert before == flags
    # The file's [defaults] under the flags: balance stays the flag's, connect_timeout is the file's.
    assert (after.balance, after.connect_timeout, after.eject_for) == ("random", 1.5, 3.0)
    by = {route.port: route for route in loaded.routes}
    assert sorted(by) == [9, 80, 6379]
    assert (by[80].balance, by[80].connect_timeout) == ("random", 1.5)


def test_a_failing_source_stops_the_read_with_its_error():
    seen: list = []
    with pytest.raises(ConfigError, match="--map nope"):
        read_routes([FlagMaps(("nope",)), Fixed(SourceRoutes(), seen)], RouteDefaults())
    assert seen == []


@pytest.mark.parametrize("backend, links, ports", [
    (True, False, [6379]),
    (False, True, [7000]),
    (True, True, [6379, 7000]),
    (False, False, []),
])
def test_env_vars_read_backend_and_link_variables_as_asked(backend, links, ports):
    env = {"BACKEND_6379": "10.0.0.5:6379", "R_PORT_7000_TCP": "tcp://10.0.0.9:7000", "BACKEND_URL": "x"}
    got = EnvVars(env, backend=backend, links=links).read(RouteDefaults())
    assert sorted(route.port for route in got.routes) == ports
    assert bool(got.warnings) == backend  # BACKEND_URL is no route: said only when BACKEND_ is read


def test_env_duplicates_name_the_variables_in_name_order():
    # One pass over the environment in name order, as before sources were split out.
    env = {"A_PORT_1_TCP": "tcp://10.0.0.1:1", "BACKEND_1": "10.0.0.2:1"}
    with pytest.raises(ConfigError) as err:
        load_routes(env=env, link_env=True)
    assert str(err.value) == ("port 1 is mapped twice: by env A_PORT_1_TCP=tcp://10.0.0.1:1 (--link-env) "
                              "and by env BACKEND_1=10.0.0.2:1")


def test_file_then_maps_then_env_in_duplicate_messages(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text("[routes]\n1 = '10.0.0.1:1'\n")
    with pytest.raises(ConfigError) as err:
        load_routes(maps=["1=10.0.0.2:1"], config_file=str(f))
    assert str(err.value) == f"port 1 is mapped twice: by {f}:2: [routes] 1 and by --map 1=10.0.0.2:1"
    with pytest.raises(ConfigError) as err:
        load_routes(maps=["1=10.0.0.2:1"], env={"BACKEND_1": "10.0.0.3:1"})
    assert str(err.value) == "port 1 is mapped twice: by --map 1=10.0.0.2:1 and by env BACKEND_1=10.0.0.3:1"


def test_a_bad_flag_is_reported_before_the_file_is_read():
    with pytest.raises(ConfigError, match="^--eject-for: bad duration"):
        load_routes(config_file="/nonexistent/routes.toml", flag_defaults={"eject_for": 0.0})
