"""What a command runs with, built once from its flags and the environment.

The parser (``parser.py``) turns each word into a value; this module weighs the values
against each other and against the environment (``CONSUL_HTTP_ADDR``, ``ETCDCTL_*``) and
checks what only makes sense together (``--dns-min-ttl`` against ``--dns-max-ttl``,
``--admin`` against ``--listen``). The rest of the program gets frozen, picklable values
and never sees argparse's namespace: the daemon serves a :class:`RunSettings`, and a
``--workers`` helper can be handed the same object over its socket.

Errors are :class:`UsageError` (exit 2), naming the flag or environment variable and the
bad value. Routes are not settings: :class:`RouteSources` says where they come from, and
they are read at the start and again at every reload.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ambassadord.backends import ResolverOptions, SpecError

from .relay import SPLICE_AVAILABLE
from .routes import Keepalive
from .server import ListenAddress
from .sources import LoadedConfig, load_routes


class UsageError(Exception):
    """Exit 2 with this message."""


DEFAULT_PORT = 10000
DEFAULT_LISTEN = (ListenAddress("0.0.0.0", DEFAULT_PORT), ListenAddress("::", DEFAULT_PORT, optional=True))
DEFAULT_ADMIN = ListenAddress("127.0.0.1", 10001)

# Said by run and check alike: a configuration without a route is a mistake, not a daemon.
NO_ROUTES = "no routes: give --map PORT=SPEC, --config FILE, or BACKEND_<PORT>=SPEC"


@dataclass(frozen=True, slots=True)
class RouteFlags:
    """Route options given as ``run`` flags: defaults for every route, above a file's
    ``[defaults]``. None: not given. config.py checks them as it checks a file's."""

    balance: str | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    eject_for: float | None = None
    max_connections: int | None = None
    max_backend_connections: int | None = None
    keepalive: Keepalive | None = None
    check_interval: float | None = None
    check_rise: int | None = None
    check_fall: int | None = None
    mode: str | None = None
    on_down: str | None = None
    drain: float | None = None

    def as_dict(self) -> dict:
        """As sources.load_routes takes them (``flag_defaults``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class RouteSources:
    """Where the routes come from: ``--map``, ``--config``, ``BACKEND_<PORT>`` variables
    and, with ``--link-env``, Docker link variables (each a source in sources.py)."""

    maps: tuple[str, ...] = ()
    config: str | None = None
    link_env: bool = False
    backend_env: bool = True  # read BACKEND_<PORT> (check: only with --env)
    flags: RouteFlags = field(default_factory=RouteFlags)

    def load(self, env: Mapping[str, str], containers: tuple | None = None) -> LoadedConfig:
        """Every route, read now from the file and ``env`` and, with ``--docker``, what
        ``containers`` declare: at the start and at every reload, the same way.

        Raises:
            ConfigError: naming the bad value and its origin.
        """
        return load_routes(maps=self.maps, config_file=self.config, env=env, link_env=self.link_env,
                           backend_env=self.backend_env, flag_defaults=self.flags.as_dict(),
                           containers=containers)


@dataclass(frozen=True, slots=True)
class RedirectInputs:
    """``run --iptables``: what the REDIRECT plan takes from flags. The ports come from
    the routes and the listeners, the bridges from the host, both at the start."""

    dests: tuple  # --iptables-dest, then the addresses of every --iptables-interface
    allow_from: tuple  # ((network, port or None), ...) of every --allow-from


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything ``run`` serves with. The fields from ``listen`` to ``log_level`` are
    also what a ``--workers`` helper needs (workers.py)."""

    routes: RouteSources
    config_poll: float  # seconds between looks at --config (0: only on SIGHUP)
    admin: ListenAddress | None
    resolver: ResolverOptions
    iptables: RedirectInputs | None  # None: no --iptables
    cgroup: str | None  # --cgroup: where connect mode attaches (None: the cgroup2 root)
    catch: tuple  # --iptables-dest/--iptables-interface addresses: connect mode rewrites connects to them too
    workers: int
    listen: tuple[ListenAddress, ...]
    grace: float
    mark: int | None  # SO_MARK of upstream connections: --mark under --iptables, else None
    use_splice: bool
    sockmap: str  # "auto", "on" or "off"
    sockmap_size: int
    log_format: str
    log_level: str
    log_connections: str = "all"  # --log-connections
    docker: object = None  # --docker: a docker_api.Endpoint, or None (off)
    # --docker with --iptables and --docker-redirect all: every port from the container
    # bridges is redirected, and what no route takes passes through (server.passthrough).
    passthrough: bool = False


def route_flags(args) -> RouteFlags:
    return RouteFlags(**{f.name: getattr(args, f.name) for f in fields(RouteFlags)})


def run_settings(args, env: Mapping[str, str] = os.environ) -> RunSettings:
    """``run``'s flags, checked together and against ``env``. Raises UsageError."""
    if args.splice == "on" and not SPLICE_AVAILABLE:
        raise UsageError("--splice on: os.splice is not available on this platform")
    resolver = resolver_options(args, env)
    listen = tuple(args.listen or DEFAULT_LISTEN)
    if args.admin is not None and any(_overlap(a, args.admin) for a in listen):
        raise UsageError(f"--admin {args.admin}: the same address and port as a --listen address")
    return RunSettings(
        routes=RouteSources(maps=tuple(args.map), config=args.config, link_env=args.link_env, flags=route_flags(args)),
        config_poll=args.config_poll,
        admin=args.admin,
        resolver=resolver,
        iptables=_redirect_inputs(args) if args.iptables else None,
        cgroup=args.cgroup,
        catch=_redirect_inputs(args).dests if args.iptables_dest or args.iptables_interface else (),
        workers=args.workers,
        listen=listen,
        grace=args.grace,
        mark=args.mark if args.iptables else None,
        use_splice=args.splice == "on" or (args.splice == "auto" and SPLICE_AVAILABLE),
        sockmap=args.sockmap,
        sockmap_size=args.sockmap_size,
        log_format=args.log_format,
        log_level=args.log_level,
        log_connections=args.log_connections,
        docker=_docker(args, env),
        passthrough=bool(args.iptables and getattr(args, "docker", None) is not None
                         and getattr(args, "docker_redirect", "all") == "all"),
    )


def _docker(args, env: Mapping[str, str]):
    """--docker's endpoint (docker_api.Endpoint), or None without the flag."""
    if getattr(args, "docker", None) is None:
        return None
    from .docker_api import DockerConfigError, endpoint

    try:
        return endpoint(args.docker or None, env)
    except DockerConfigError as exc:
        raise UsageError(str(exc)) from None


def check_sources(args) -> RouteSources:
    """``check``'s routes: like run's, without route flags, BACKEND_ only with --env."""
    return RouteSources(maps=tuple(args.map), config=args.config, link_env=args.link_env, backend_env=args.env)


def _overlap(a: ListenAddress, b: ListenAddress) -> bool:
    """Would binding both fail? Same port, same family, and the same or a wildcard address."""
    return a.port == b.port and a.family == b.family and (a.host == b.host or a.host in ("0.0.0.0", "::")
                                                          or b.host in ("0.0.0.0", "::"))


def _redirect_inputs(args) -> RedirectInputs:
    from . import netfilter

    dests = list(args.iptables_dest)
    if args.iptables_interface:
        try:
            dests += netfilter.interface_addresses(args.iptables_interface)
        except netfilter.NetfilterError as exc:
            raise UsageError(f"--iptables-interface: {exc}") from None
    return RedirectInputs(dests=tuple(dests), allow_from=tuple(a for group in args.allow_from for a in group))


# ---- resolvers: flags, then the environment of each registry's own CLI ---------------------


def resolver_options(args, env: Mapping[str, str] = os.environ) -> ResolverOptions:
    """``run`` and ``resolve``: the DNS flags, and Consul's and etcd's flags weighed
    against their env vars. Raises UsageError naming the source."""
    if args.dns_min_ttl > args.dns_max_ttl:
        raise UsageError(f"--dns-min-ttl {args.dns_min_ttl:g} is above --dns-max-ttl {args.dns_max_ttl:g}")
    if args.dns_timeout <= 0:
        raise UsageError("--dns-timeout must be above 0")
    if args.dns_min_ttl <= 0:
        raise UsageError("--dns-min-ttl must be above 0 (a TTL-0 answer would be looked up in a busy loop)")
    return ResolverOptions(dns_servers=tuple(args.dns_server), dns_min_ttl=args.dns_min_ttl,
                           dns_max_ttl=args.dns_max_ttl, dns_stale_for=args.dns_stale_for,
                           dns_timeout=args.dns_timeout, **consul_options(args, env), **etcd_options(args, env))


def _flag_or_env(value, flag: str, env: Mapping[str, str], var: str) -> tuple:
    """(value, where it came from): the flag if given, else the env var (maybe None)."""
    return (value, flag) if value else (env.get(var), f"env {var}")


def _readable(path: str | None, where: str, what: str = "") -> str | None:
    """``path`` if given and readable now (a typo fails the start, not the first TLS call)."""
    if path:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"{where}: cannot read {what}{path}: {exc.strerror}") from None
    return path or None


def consul_options(args, env: Mapping[str, str]) -> dict:
    """Consul settings from flags, else the consul CLI's env vars. Raises UsageError naming the source."""
    text, where = _flag_or_env(args.consul, "--consul", env, "CONSUL_HTTP_ADDR")
    scheme = "https" if env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes") else "http"
    addr = ("127.0.0.1", 8500)
    if text:
        from ambassadord.backends.consul import _agent
        from ambassadord.backends.interface import split_http_url

        try:
            given, rest = split_http_url(text)
        except ValueError as exc:
            raise UsageError(f"{where} {text!r}: {exc} (unix sockets are not supported)") from None
        scheme = given or scheme
        try:
            addr = _agent(rest, text)
        except SpecError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if addr is None or "/" in rest:
            raise UsageError(f"{where} {text!r}: expected [http(s)://]HOST[:PORT]")
    token = args.consul_token or env.get("CONSUL_HTTP_TOKEN") or None
    ca = _readable(*_flag_or_env(args.consul_ca, "--consul-ca", env, "CONSUL_CACERT"), "CA file ")
    return dict(consul_addr=addr, consul_scheme=scheme, consul_token=token, consul_ca=ca)


def etcd_options(args, env: Mapping[str, str]) -> dict:
    """etcd settings from flags, else etcdctl's env vars. Raises UsageError naming the source."""
    from ambassadord.backends.etcd import parse_endpoint

    if args.etcd:
        texts, where = args.etcd, "--etcd"
    elif env.get("ETCDCTL_ENDPOINTS"):
        texts, where = [t for t in env["ETCDCTL_ENDPOINTS"].split(",") if t.strip()], "env ETCDCTL_ENDPOINTS"
    else:
        texts, where = [], ""
    try:
        endpoints = tuple(parse_endpoint(t, context=where) for t in texts) or (("127.0.0.1", 2379),)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    secure = any(t.strip().startswith("https://") for t in texts)
    ca, cert, key = (_readable(*_flag_or_env(getattr(args, f"etcd_{name}"), f"--etcd-{name}", env, var))
                     for name, var in (("ca", "ETCDCTL_CACERT"), ("cert", "ETCDCTL_CERT"), ("key", "ETCDCTL_KEY")))
    if bool(cert) != bool(key):
        raise UsageError("--etcd-cert and --etcd-key (or ETCDCTL_CERT and ETCDCTL_KEY) go together")
    if (secure or cert) and not ca:
        raise UsageError(f"{where or '--etcd-cert'}: TLS to etcd needs --etcd-ca FILE (or ETCDCTL_CACERT)")
    user, user_src = _flag_or_env(args.etcd_user, "--etcd-user", env, "ETCDCTL_USER")
    if user and ":" not in user:
        raise UsageError(f"{user_src}: expected USER:PASSWORD")
    return dict(etcd_endpoints=endpoints, etcd_user=user or None, etcd_ca=ca, etcd_cert=cert, etcd_key=key)
