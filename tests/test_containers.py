"""Routes a container declares (labels connect.<PORT>, env BACKEND_<PORT>), from its
``docker inspect`` document: pure logic (containers.py). The Docker engine itself is
tests/test_docker_engine.py's."""

from __future__ import annotations

import ipaddress

import pytest

from ambassadord.config import RouteDefaults
from ambassadord.containers import container_routes, declared, from_inspect
from ambassadord.sources import Scope, SourceRoutes, combine

ID = "4f1c2b9e8d7a6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170615e4d3"


def inspect(labels=None, env=(), networks=None) -> dict:
    """The parts of a real `docker inspect` document that matter here (Docker 20.10's shape)."""
    if networks is None:
        networks = {"bridge": {"IPAddress": "172.17.0.5", "GlobalIPv6Address": ""},
                    "backend": {"IPAddress": "172.18.0.3", "GlobalIPv6Address": "fd00:18::3"}}
    return {"Id": ID, "Name": "/web-1", "Config": {"Labels": labels, "Env": list(env), "Image": "web"},
            "NetworkSettings": {"Networks": networks}}


def test_from_inspect_reads_name_addresses_labels_and_env():
    c = from_inspect(inspect({"connect.6379": "redis.service.consul", "maintainer": "x"},
                             ["PATH=/usr/bin", "BACKEND_5432=db:5432", "EMPTY="]))
    assert (c.name, c.short_id) == ("web-1", ID[:12])
    assert c.addresses == ("172.17.0.5", "172.18.0.3", "fd00:18::3")
    assert c.labels["connect.6379"] == "redis.service.consul" and c.env["BACKEND_5432"] == "db:5432"
    assert c.env["EMPTY"] == ""
    assert from_inspect({"Id": ID, "Name": "/x", "Config": {"Labels": None, "Env": None},
                         "NetworkSettings": {"Networks": {"none": {"IPAddress": ""}}}}).addresses == ()


def test_a_label_and_a_variable_become_routes_limited_to_every_address():
    c = from_inspect(inspect({"connect.6379": "10.0.0.5:6379"}, ["BACKEND_5432=10.0.0.6:5432"]))
    routes, warnings = container_routes(c, RouteDefaults())
    assert warnings == []
    assert [(r.port, str(r.source), r.spec.text) for r in routes] == [
        (5432, "172.17.0.5/32", "10.0.0.6:5432"), (5432, "172.18.0.3/32", "10.0.0.6:5432"),
        (5432, "fd00:18::3/128", "10.0.0.6:5432"),
        (6379, "172.17.0.5/32", "10.0.0.5:6379"), (6379, "172.18.0.3/32", "10.0.0.5:6379"),
        (6379, "fd00:18::3/128", "10.0.0.5:6379")]
    assert routes[3].origin == f"container web-1 ({ID[:12]}): label connect.6379"


@pytest.mark.parametrize("labels, env, ports, warning", [
    # the label wins over the variable for the same port, and says so
    ({"connect.6379": "10.0.0.5:6379"}, ["BACKEND_6379=10.0.0.9:6379"], {6379: "10.0.0.5:6379"},
     "label connect.6379 and container web-1 (4f1c2b9e8d7a): env BACKEND_6379 both declare port 6379: the label wins"),
    # a bad port: named, the rest kept
    ({"connect.http": "10.0.0.5:80", "connect.6379": "10.0.0.5:6379"}, [], {6379: "10.0.0.5:6379"},
     "container web-1 (4f1c2b9e8d7a): label connect.http"),
    ({}, ["BACKEND_99999=10.0.0.5:1"], {}, "env BACKEND_99999"),
    # other labels and variables are not ours
    ({"com.docker.compose.service": "web"}, ["BACKENDS=1", "PATH=/bin"], {}, None),
])
def test_declared(labels, env, ports, warning):
    found, warnings = declared(from_inspect(inspect(labels, env)))
    assert {p: spec for p, (spec, _) in found.items()} == ports
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0], warnings


def test_a_bad_spec_is_a_warning_and_the_other_routes_still_count():
    c = from_inspect(inspect({"connect.6379": "consul//redis", "connect.5432": "10.0.0.6:5432"}))
    routes, warnings = container_routes(c, RouteDefaults())
    assert {r.port for r in routes} == {5432}
    assert len(warnings) == 1 and warnings[0].startswith(f"container web-1 ({ID[:12]}): label connect.6379: ")
    assert warnings[0].endswith("; ignoring it")


def test_a_container_without_an_address_is_said_once():
    c = from_inspect(inspect({"connect.6379": "10.0.0.5:6379"}, networks={"none": {"IPAddress": ""}}))
    routes, warnings = container_routes(c, RouteDefaults())
    assert routes == [] and warnings == [f"container web-1 ({ID[:12]}): declares routes but has no address on any "
                                         "network; ignoring them"]


def test_a_containers_route_sits_beside_the_host_wide_one_and_wins_for_its_address():
    from ambassadord.routes import Route, RouteTable
    from ambassadord.sources import load_routes

    host = load_routes(maps=["6379=10.0.0.1:6379"]).routes
    mine, _ = container_routes(from_inspect(inspect({"connect.6379": "10.0.0.5:6379"})), RouteDefaults())
    loaded = combine([SourceRoutes(tuple(host)), SourceRoutes(tuple(mine), scope=Scope.CONTAINER)])
    table = RouteTable([Route(c) for c in loaded.routes])
    assert table.lookup(6379, "172.18.0.3").config.spec.text == "10.0.0.5:6379"
    assert table.lookup(6379, "172.18.0.4").config.spec.text == "10.0.0.1:6379"  # another container
    assert table.lookup(6379, "127.0.0.1").config.spec.text == "10.0.0.1:6379"
    assert all(isinstance(r.source, ipaddress.IPv4Network | ipaddress.IPv6Network) for r in mine)
