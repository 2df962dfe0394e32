"""Routes a consumer container declares for itself, read from what Docker says of it. Pure.

The two ways the ambassador world's users know (issue 15):

* gliderlabs/connectable: a label per port, ``connect.<PORT>=<SPEC>``
  (``docker run --label connect.6379=redis.service.consul ...``);
* progrium/ambassadord ("omni" mode): the container's environment, ``BACKEND_<PORT>=<SPEC>``.

:func:`container_routes` turns one container's ``docker inspect`` document into routes
limited to that container's addresses (every network it is attached to, IPv4 and IPv6:
one route per address, each a /32 or /128 source network, so the route table's longest
prefix makes them win over a host-wide route of the same port). A label and a variable
for the same port: the label wins, with a warning. A bad label or value is a warning that
names the container and the key; the container's other routes still count.

The Docker client, its events and the daemon's side are not here: this module only reads
the document it is given (tests feed it real ``docker inspect`` output).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import ConfigError, RouteDefaults, make_route, route_port
from .routes import RouteConfig

_LABEL = re.compile(r"connect\.(?P<port>.*)")
_ENV = re.compile(r"BACKEND_(?P<port>.*)")


@dataclass(frozen=True)
class Container:
    """What the routes need of one container: its name, short id, addresses, labels, env."""

    id: str
    name: str
    addresses: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def describe(self) -> str:
        return f"container {self.name} ({self.short_id})"


def from_inspect(doc: Mapping) -> Container:
    """The Container of one ``docker inspect`` (or ``GET /containers/ID/json``) document.
    Networks without an address (not started, ``--network none``) give none. A part of the
    document of another shape than Docker's gives nothing (an engine's answer is input)."""
    config = mapping(doc.get("Config"))
    env = {}
    items = config.get("Env")
    for item in items if isinstance(items, list) else ():
        name, sep, value = str(item).partition("=")
        if sep:
            env[name] = value
    labels = {str(k): v for k, v in mapping(config.get("Labels")).items()}
    # Not gated on State.Running: dockerd says "running" a little after the process
    # started, and a container's first connection may come in between. Its addresses are
    # given at start and taken back when it stops.
    addresses = _addresses(mapping(doc.get("NetworkSettings")).get("Networks"))
    return Container(id=str(doc.get("Id") or ""), name=str(doc.get("Name") or "").lstrip("/"),
                     addresses=addresses, labels=labels, env=env)


def mapping(value) -> Mapping:
    """``value`` if it is a mapping, else an empty one: a part of an engine's answer of
    another shape than Docker's gives nothing."""
    return value if isinstance(value, Mapping) else {}


def _addresses(networks: Mapping | None) -> tuple[str, ...]:
    """Every IPv4 and global IPv6 address of a container's networks (none for a network
    without an address: not started, ``--network none``, host)."""
    addresses: list[str] = []
    for net in (networks.values() if isinstance(networks, Mapping) else ()):
        for key in ("IPAddress", "GlobalIPv6Address"):
            addr = net.get(key) if isinstance(net, Mapping) else None
            try:
                addr = str(ipaddress.ip_address(addr)) if isinstance(addr, str) and addr else None
            except ValueError:  # not an address: nothing to route from
                continue
            if addr and addr not in addresses:
                addresses.append(addr)
    return tuple(addresses)


def listed_addresses(entry: Mapping) -> tuple[str, ...]:
    """The addresses of one entry of ``GET /containers/json`` (``docker ps``), in the order
    :func:`from_inspect` gives them: the listing says whether an inspect is needed."""
    return _addresses(mapping(entry.get("NetworkSettings")).get("Networks"))


def declared(container: Container) -> tuple[dict[int, tuple[str, str]], list[str]]:
    """``({port: (spec, where)}, warnings)``: the ports the container declares, by label or
    by variable (the label wins), each with the key it came from."""
    found: dict[int, tuple[str, str]] = {}
    warnings: list[str] = []
    for kind, pattern, items in (("env", _ENV, container.env), ("label", _LABEL, container.labels)):
        for key in sorted(items):
            m = pattern.fullmatch(key)
            if not m:
                continue
            where = f"{container.describe()}: {kind} {key}"
            try:
                port = route_port(m["port"], where)
            except ConfigError as exc:
                warnings.append(f"{exc}; ignoring it")
                continue
            if kind == "label" and port in found:
                warnings.append(f"{where} and {found[port][1]} both declare port {port}: the label wins")
            found[port] = (items[key], where)
    return found, warnings


def container_routes(container: Container, defaults: RouteDefaults) -> tuple[list[RouteConfig], list[str]]:
    """The container's routes, one per declared port and address (its source network the
    address alone), and a warning for each bad label or variable (the rest still count)."""
    ports, warnings = declared(container)
    if ports and not container.addresses:
        warnings.append(f"{container.describe()}: declares routes but has no address on any network; ignoring them")
        return [], warnings
    routes: list[RouteConfig] = []
    for port, (spec, where) in sorted(ports.items()):
        try:
            made = [make_route(port, spec, where, defaults, source=ipaddress.ip_network(addr),
                               container=f"{container.name} ({container.short_id})")
                    for addr in container.addresses]
        except ConfigError as exc:
            warnings.append(f"{exc}; ignoring it")
            continue
        routes.extend(made)
    return routes, warnings
