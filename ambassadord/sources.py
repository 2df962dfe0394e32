"""Where routes come from, behind one seam, and how what they say becomes one list.

A route source (:class:`RouteSource`) reads its routes when asked and hands back what it
found (:class:`SourceRoutes`); :func:`combine` merges the findings of every source into
one list, purely. The start and every reload (SIGHUP, a changed ``--config``) go through
:func:`read_routes`, so a new source, such as Docker containers' labels and env or a
route table held in Consul or etcd, is one more class here: reload does not change.

Today's sources, read in this order (``settings.RouteSources`` says which are on):

* :class:`ConfigFile`: ``--config FILE``; its ``[defaults]`` (under the flags) are also
  the defaults of every source read after it;
* :class:`FlagMaps`: ``--map PORT=SPEC`` / ``--map PORT@CIDR=SPEC``;
* :class:`EnvVars`: ``BACKEND_<PORT>=SPEC`` and, with ``--link-env``, Docker links'
  ``<ALIAS>_PORT_<PORT>_TCP``: one source, read in the variables' name order, so that
  which error comes first, and the order of a duplicate's two names, stay as they were
  when both kinds were one pass over the environment;
* :class:`ContainerRoutes`: with ``--docker``, what each container declares for itself
  (``connect.<PORT>`` labels, ``BACKEND_<PORT>`` in its environment; containers.py), as
  the Docker watch (docker_watch.py) last saw the containers.

Precedence (:class:`Scope`): routes for everyone the host serves (every source above, and
a KV-held route table to come) form one layer, in which a port (with the same source
network) given twice is an error naming both places: silently preferring one would hide a
mistake. Routes limited to one container's addresses (Docker, to come) are a narrower
layer that wins over a host-wide route for the same port and source network.

Error handling: a source raises only :class:`~ambassadord.config.ConfigError`, whose
message names the bad value and its origin (flag, file and line, variable); so does
:func:`combine`. Parsing and validating values is ``config.py``'s job.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .config import ConfigError, RouteDefaults, load_file, route_defaults, routes_from_env, routes_from_maps
from .routes import RouteConfig


class Scope(enum.IntEnum):
    """Whom a source's routes are for. Where two scopes give the same port and source
    network, the narrower (higher) one wins; within one, that is an error."""

    HOST = 0  # everyone the host serves: flags, the file, the environment (a KV table later)
    CONTAINER = 1  # one container's addresses (Docker's labels and env: ContainerRoutes)


@dataclass(frozen=True)
class SourceRoutes:
    """What one source said when it was read."""

    routes: tuple[RouteConfig, ...] = ()
    warnings: tuple[str, ...] = ()  # logged, not fatal (a BACKEND_ variable that is no route)
    # The defaults this source sets for the sources read after it (a file's [defaults]);
    # None: it sets none.
    defaults: RouteDefaults | None = None
    scope: Scope = Scope.HOST


class RouteSource(Protocol):
    """One place routes come from."""

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        """The routes as the source says now. Synchronous: the daemon runs it in a thread
        (a file on a hung network file system holds that thread, not the daemon).

        Args:
            defaults: the options of a route that does not set them (built-in, the
                flags, and the defaults of the sources read before this one).
        Raises:
            ConfigError: naming the bad value and its origin.
        """
        ...


@dataclass(frozen=True)
class ConfigFile:
    """``--config FILE``: its ``[routes]``; its ``[defaults]`` for the sources after it."""

    path: str

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        routes, file_defaults = load_file(self.path, defaults)
        return SourceRoutes(tuple(routes), defaults=file_defaults)


@dataclass(frozen=True)
class FlagMaps:
    """``--map PORT=SPEC`` and ``--map PORT@CIDR=SPEC``, in the order given."""

    maps: tuple[str, ...]

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        return SourceRoutes(tuple(routes_from_maps(self.maps, defaults)))


@dataclass(frozen=True)
class EnvVars:
    """The process environment: ``BACKEND_<PORT>`` (unless not ``backend``) and, with
    ``links``, Docker link variables (the module's docstring says why one source)."""

    env: Mapping[str, str] = field(default_factory=dict)
    backend: bool = True
    links: bool = False

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        routes, warnings = routes_from_env(self.env, defaults, backend_env=self.backend, link_env=self.links)
        return SourceRoutes(tuple(routes), tuple(warnings))


@dataclass(frozen=True)
class ContainerRoutes:
    """The routes the containers declare (containers.py), each limited to its container's
    addresses; a container without an address (stopped, created) gives none.

    A bad label or variable is no error here: the watch logged it once, when it first saw
    the container, and the container's other routes still count (so nothing is warned
    again at every reload)."""

    containers: tuple = ()  # containers.Container, as last seen

    def read(self, defaults: RouteDefaults) -> SourceRoutes:
        from .containers import container_routes

        routes: list[RouteConfig] = []
        for c in self.containers:
            routes += container_routes(c, defaults)[0]
        return SourceRoutes(tuple(routes), scope=Scope.CONTAINER)


@dataclass
class LoadedConfig:
    routes: list[RouteConfig]
    warnings: list[str] = field(default_factory=list)


def combine(found: Iterable[SourceRoutes]) -> LoadedConfig:
    """Every source's routes in one list, and their warnings; pure (nothing is read).

    Sources of one scope keep their order, and a narrower scope comes after a wider one
    and replaces its route for the same port and source network (:class:`Scope`).

    Raises:
        ConfigError: a port (with the same source network) given twice in one scope:
            "port 6379 is mapped twice: by <first origin> and by <second origin>".
    """
    routes: dict = {}
    scopes: dict = {}
    warnings: list[str] = []
    for got in sorted(found, key=lambda g: g.scope):  # stable: a scope's sources keep their order
        warnings += got.warnings
        for r in got.routes:
            if scopes.get(r.key) == got.scope:
                raise ConfigError(f"port {r.describe()} is mapped twice: by {routes[r.key].origin} and by {r.origin}")
            routes[r.key], scopes[r.key] = r, got.scope
    named: dict = {}
    for r in routes.values():  # a name says one route: metrics and logs must not mix two
        if r.name and named.setdefault(r.name, r) is not r:
            raise ConfigError(f"route name {r.name!r} is given twice: by {named[r.name].origin} and by {r.origin}")
    return LoadedConfig(list(routes.values()), warnings)


def read_routes(sources: Iterable[RouteSource], defaults: RouteDefaults) -> LoadedConfig:
    """Read each source in order, each with the defaults that those before it set; combine.

    Raises:
        ConfigError: from the first source that fails, else from :func:`combine`.
    """
    found = []
    for source in sources:
        got = source.read(defaults)
        found.append(got)
        if got.defaults is not None:
            defaults = got.defaults
    return combine(found)


def load_routes(
    *,
    maps: Iterable[str] = (),
    config_file: str | None = None,
    env: Mapping[str, str] = {},
    link_env: bool = False,
    backend_env: bool = True,
    flag_defaults: Mapping | None = None,
    containers: tuple | None = None,
) -> LoadedConfig:
    """Every route from today's sources: the flags' defaults first (a bad flag is
    reported before the file is read), then the file, ``--map``, the environment and,
    with ``containers`` (``--docker``), what they declare.

    Raises:
        ConfigError: naming the bad value and its origin.
    """
    defaults = route_defaults(flag_defaults or {})
    sources: list[RouteSource] = [ConfigFile(config_file)] if config_file else []
    sources += [FlagMaps(tuple(maps)), EnvVars(env, backend=backend_env, links=link_env)]
    if containers is not None:
        sources.append(ContainerRoutes(tuple(containers)))
    return read_routes(sources, defaults)
