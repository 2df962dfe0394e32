"""Command line: ``ambassadord run | status | iptables | resolve | check``.

Exit status: 0 success; 1 a runtime failure (no backends, iptables refused, ...);
2 bad usage or configuration (a bad flag, an unreadable config, a bad spec or port), with
a message naming the bad value and where it came from. ``run`` starts nothing unless all
of its configuration is valid, and undoes what it started if a later step fails.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from functools import partial

import trio

from backends import ResolveError, ResolverOptions, SpecError, parse_spec

from . import logs, sdnotify
from .balancer import BALANCE_POLICIES
from .config import ConfigError, load_routes
from .relay import SPLICE_AVAILABLE
from .routes import DEFAULT_MAX_CONNECTIONS, Keepalive, Route, RouteTable
from .server import ListenAddress, Server, StartupError, bind_listeners, parse_listen

log = logging.getLogger("ambassadord")

DEFAULT_PORT = 10000
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How often --iptables looks for new container bridges (a netlink dump: cheap).
BRIDGE_POLL = 1.0
DEFAULT_ADMIN_TEXT = "127.0.0.1:10001"
DEFAULT_ADMIN = ListenAddress("127.0.0.1", 10001)
DEFAULT_WORKERS = "auto"
DEFAULT_LISTEN = [ListenAddress("0.0.0.0", DEFAULT_PORT), ListenAddress("::", DEFAULT_PORT, optional=True)]


class UsageError(Exception):
    """Exit 2 with this message."""


# Said by run and check alike: a configuration without a route is a mistake, not a daemon.
NO_ROUTES = "no routes: give --map PORT=SPEC, --config FILE, or BACKEND_<PORT>=SPEC"


class _Parser(argparse.ArgumentParser):
    """argparse, except that a word starting with a dash and a digit is a value.

    argparse takes ``--map -1=10.0.0.5:6379`` for an unknown option ``-1=...`` and says
    only "expected one argument", hiding the bad port. No flag here looks like that, so
    the word goes to ``--map``, whose parser then names ``-1``.
    """

    def _parse_optional(self, arg_string):
        if arg_string[:1] == "-" and arg_string[1:2].isdigit():
            return None
        return super()._parse_optional(arg_string)


# Numbers on the command line are ASCII: int() and float() also take other scripts'
# digits (６３７９), which nobody reading `ps` or a unit file would take for the value used.
# A duration flag is at most a week (a route's own durations have tighter bounds, checked
# by config.py): more is a slip, and 1e300 seconds overflows what timeouts are made of.
_MAX_SECONDS = 604800


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            if not text.isascii():
                raise ValueError
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds, e.g. 2 or 0.5") from None
        if not 0 <= v <= _MAX_SECONDS:  # also NaN
            raise argparse.ArgumentTypeError(f"{text!r}: expected 0 to {_MAX_SECONDS} seconds (a week)")
        return v

    return parse


def _whole(text: str, maximum: int) -> int | None:
    """``text`` as a whole number from 1 to ``maximum`` in ASCII digits, else None."""
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) <= maximum else None


def _port(flag: str):
    def parse(text: str) -> int:
        if (n := _whole(text, 65535)) is None:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a port number 1-65535 in ASCII digits")
        return n

    return parse


def _count(flag: str, maximum: int):
    def parse(text: str) -> int:
        if (n := _whole(text, maximum)) is None:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to {maximum}")
        return n

    return parse


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 10_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of connections (0 = no limit)")
    return int(text)


def _keepalive(text: str) -> Keepalive:
    try:
        return Keepalive.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_interval(text: str) -> float:
    from .health import MIN_INTERVAL

    try:
        v = float(text) if text.isascii() else float("nan")
    except ValueError:
        v = float("nan")
    if not (v == 0 or MIN_INTERVAL <= v < float("inf")):  # (NaN fails both)
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, at least {MIN_INTERVAL:g} (or 0: no checks)")
    return v


def _workers(text: str) -> int:
    if text == "auto":
        from .workers import default_count

        return default_count()
    if (n := _whole(text, 256)) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a whole number from 1 to 256")
    return n


def _mark(text: str) -> int:
    try:
        if not text.isascii():
            raise ValueError
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer such as 0x1a3b") from None
    if not 0 < v < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to 0xffffffff")
    return v


def _dest(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an IPv4 or IPv6 address") from None


def parse_allow_from(text: str) -> tuple:
    """``[PORT@]CIDR`` or ``[PORT@]any`` -> ((network, port or None), ...): who, besides this
    host's processes and containers, may use the mapped ports (``any``: everyone, both
    families). Raises ValueError quoting the text."""
    port_text, sep, net_text = text.strip().rpartition("@")
    port = None
    if sep:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: {port_text!r} is not a port number 1-65535 (expected [PORT@]CIDR or [PORT@]any)")
        port = int(port_text)
    if net_text == "any":
        return ((ipaddress.ip_network("0.0.0.0/0"), port), (ipaddress.ip_network("::/0"), port))
    try:
        network = ipaddress.ip_network(net_text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(net_text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r}: {net_text!r} is not a network (expected [PORT@]CIDR or [PORT@]any, "
                             "e.g. 10.0.0.0/8 or 6379@any)") from None
        raise ValueError(f"{text!r}: {net_text!r} has host bits set; did you mean {loose}?") from None
    return ((network, port),)


def _allow_from(text: str) -> tuple:
    try:
        return parse_allow_from(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str) -> ListenAddress:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _admin(text: str):
    from .admin import parse_admin

    try:
        return parse_admin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dns_server(text: str) -> tuple[str, int]:
    from backends.dns import parse_dns_server

    try:
        return parse_dns_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_dns_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DNS (srv://, bare names, dns://)")
    g.add_argument("--dns-server", action="append", type=_dns_server, default=[], metavar="HOST[:PORT]",
                   help="DNS server to ask instead of /etc/resolv.conf's; repeatable (e.g. a Consul agent, 127.0.0.1:8600)")
    g.add_argument("--dns-min-ttl", type=_positive_float("--dns-min-ttl"), default=1.0, metavar="SECONDS",
                   help="floor of an answer's TTL (default 1)")
    g.add_argument("--dns-max-ttl", type=_positive_float("--dns-max-ttl"), default=300.0, metavar="SECONDS",
                   help="ceiling of an answer's TTL (default 300)")
    g.add_argument("--dns-stale-for", type=_positive_float("--dns-stale-for"), default=3600.0, metavar="SECONDS",
                   help="how long the last good answer serves while DNS fails (default 3600)")
    g.add_argument("--dns-timeout", type=_positive_float("--dns-timeout"), default=5.0, metavar="SECONDS",
                   help="time limit of one look-up, over every server (default 5; per query at most 2)")


def _add_consul_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Consul (consul://, consul-kv://)")
    g.add_argument("--consul", metavar="[SCHEME://]HOST[:PORT]",
                   help="agent for specs that name none (default: env CONSUL_HTTP_ADDR, else 127.0.0.1:8500); "
                   "https://HOST:PORT for TLS")
    g.add_argument("--consul-token", metavar="TOKEN", help="ACL token (default: env CONSUL_HTTP_TOKEN)")
    g.add_argument("--consul-ca", metavar="FILE", help="CA certificate for an https agent (default: env CONSUL_CACERT)")


def consul_options(args, env) -> dict:
    """Consul settings from flags, else the consul CLI's env vars. Raises UsageError naming the source."""
    text, where = (args.consul, "--consul") if args.consul else (env.get("CONSUL_HTTP_ADDR"), "env CONSUL_HTTP_ADDR")
    scheme = "https" if env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes") else "http"
    addr = ("127.0.0.1", 8500)
    if text:
        from backends.consul import _agent
        from backends.interface import split_http_url

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
    ca, ca_where = (args.consul_ca, "--consul-ca") if args.consul_ca else (env.get("CONSUL_CACERT"), "env CONSUL_CACERT")
    if ca:
        try:
            with open(ca, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"{ca_where}: cannot read CA file {ca}: {exc.strerror}") from None
    return dict(consul_addr=addr, consul_scheme=scheme, consul_token=token, consul_ca=ca or None)


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("etcd (etcd://)")
    g.add_argument("--etcd", action="append", default=[], metavar="[http(s)://]HOST[:PORT]",
                   help="etcd endpoint for specs that name none; repeatable for a cluster "
                   "(default: env ETCDCTL_ENDPOINTS, else 127.0.0.1:2379)")
    g.add_argument("--etcd-user", metavar="USER:PASSWORD", help="etcd authentication (default: env ETCDCTL_USER)")
    g.add_argument("--etcd-ca", metavar="FILE", help="CA certificate for TLS to etcd (default: env ETCDCTL_CACERT)")
    g.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (default: env ETCDCTL_CERT)")
    g.add_argument("--etcd-key", metavar="FILE", help="client key for etcd (default: env ETCDCTL_KEY)")


def etcd_options(args, env) -> dict:
    """etcd settings from flags, else etcdctl's env vars. Raises UsageError naming the source."""
    from backends.etcd import parse_endpoint

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
    files = {}
    for name, envvar in (("ca", "ETCDCTL_CACERT"), ("cert", "ETCDCTL_CERT"), ("key", "ETCDCTL_KEY")):
        value, src = (getattr(args, f"etcd_{name}"), f"--etcd-{name}")
        if not value and env.get(envvar):
            value, src = env[envvar], f"env {envvar}"
        if value:
            try:
                with open(value, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"{src}: cannot read {value}: {exc.strerror}") from None
        files[name] = value or None
    if bool(files["cert"]) != bool(files["key"]):
        raise UsageError("--etcd-cert and --etcd-key (or ETCDCTL_CERT and ETCDCTL_KEY) go together")
    if (secure or files["cert"]) and not files["ca"]:
        raise UsageError(f"{where or '--etcd-cert'}: TLS to etcd needs --etcd-ca FILE (or ETCDCTL_CACERT)")
    user, user_src = (args.etcd_user, "--etcd-user") if args.etcd_user else (env.get("ETCDCTL_USER"), "env ETCDCTL_USER")
    if user and ":" not in user:
        raise UsageError(f"{user_src}: expected USER:PASSWORD")
    return dict(etcd_endpoints=endpoints, etcd_user=user or None, etcd_ca=files["ca"], etcd_cert=files["cert"],
                etcd_key=files["key"])


def resolver_options(args) -> ResolverOptions:
    if args.dns_min_ttl > args.dns_max_ttl:
        raise UsageError(f"--dns-min-ttl {args.dns_min_ttl:g} is above --dns-max-ttl {args.dns_max_ttl:g}")
    if args.dns_timeout <= 0:
        raise UsageError("--dns-timeout must be above 0")
    if args.dns_min_ttl <= 0:
        raise UsageError("--dns-min-ttl must be above 0 (a TTL-0 answer would be looked up in a busy loop)")
    return ResolverOptions(dns_servers=tuple(args.dns_server), dns_min_ttl=args.dns_min_ttl,
                           dns_max_ttl=args.dns_max_ttl, dns_stale_for=args.dns_stale_for,
                           dns_timeout=args.dns_timeout, **consul_options(args, os.environ),
                           **etcd_options(args, os.environ))


def build_parser() -> argparse.ArgumentParser:
    from . import netfilter

    p = _Parser(
        prog="ambassadord",
        description="One host-wide service ambassador: consumers connect to a local address and the "
        "service's usual port; an iptables REDIRECT sends the connection here; ambassadord relays it "
        "to a live backend.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy", description="Run the proxy.")
    g = run.add_argument_group("routes")
    g.add_argument("--map", action="append", default=[], metavar="PORT[@CIDR]=SPEC",
                   help="route connections for PORT (from sources in CIDR) to SPEC; repeatable")
    g.add_argument("--config", metavar="FILE", help="TOML file with a [routes] table (and optional [defaults]); "
                   "re-read on SIGHUP and when it changes")
    g.add_argument("--config-poll", type=_positive_float("--config-poll"), default=1.0, metavar="SECONDS",
                   help="how often to check --config for changes (default 1; 0 = only on SIGHUP)")
    g.add_argument("--link-env", action="store_true",
                   help="also read Docker link variables <ALIAS>_PORT_<PORT>_TCP=tcp://HOST:PORT")
    g = run.add_argument_group("listening")
    g.add_argument("--listen", action="append", type=_listen, metavar="ADDR:PORT",
                   help=f"address to accept on; repeatable (default 0.0.0.0:{DEFAULT_PORT} and [::]:{DEFAULT_PORT})")
    g = run.add_argument_group("balancing and failover (defaults for every route)")
    g.add_argument("--balance", choices=BALANCE_POLICIES, help="pick order within a priority (default random)")
    g.add_argument("--connect-timeout", type=_positive_float("--connect-timeout"), metavar="SECONDS",
                   help="per-attempt connect timeout before trying the next backend (default 2)")
    g.add_argument("--idle-timeout", type=_positive_float("--idle-timeout"), metavar="SECONDS",
                   help="close a connection idle this long both ways (default: never; 0 = never)")
    g.add_argument("--eject-for", type=_positive_float("--eject-for"), metavar="SECONDS",
                   help="how long a backend that failed stays at the back of the order (default 10)")
    g.add_argument("--max-connections", type=_limit, metavar="N",
                   help=f"connections one route holds open at once, per process; more are closed at once "
                   f"(outcome limit; default {DEFAULT_MAX_CONNECTIONS}; 0 = no limit)")
    g.add_argument("--max-backend-connections", type=_limit, metavar="N",
                   help="connections open or connecting to one backend of a route at once, per process; a backend "
                   "at its limit is passed over for the next (default 0 = no limit)")
    g.add_argument("--keepalive", type=_keepalive, metavar="IDLE[,INTVL,CNT]|off",
                   help="TCP keepalive on both sides: probe after IDLE s of silence, every INTVL s, give up after "
                   "CNT probes (default 60,10,6: a vanished peer is noticed in about 2 minutes)")
    g = run.add_argument_group("active health checks (defaults for every route; off unless --check-interval)")
    g.add_argument("--check-interval", type=_check_interval, metavar="SECONDS",
                   help="TCP connect to every backend this often; a backend that is down is not picked "
                   "(default: no checks; 0 = none)")
    g.add_argument("--check-rise", type=_count("--check-rise", 100), metavar="N",
                   help="checks in a row that must pass before a down backend is up again (default 2)")
    g.add_argument("--check-fall", type=_count("--check-fall", 100), metavar="N",
                   help="checks in a row that must fail before an up backend is down (default 3)")
    _add_dns_flags(run)
    _add_consul_flags(run)
    _add_etcd_flags(run)
    g = run.add_argument_group("iptables")
    g.add_argument("--iptables", action="store_true",
                   help="install REDIRECT rules for the mapped ports on start, remove them on exit")
    g.add_argument("--iptables-dest", action="append", type=_dest, default=[], metavar="ADDR",
                   help="redirect only connections to ADDR (default: any local address); repeatable")
    g.add_argument("--iptables-interface", action="append", default=[], metavar="IFACE",
                   help="redirect only connections to IFACE's addresses (e.g. docker0); repeatable")
    g.add_argument("--allow-from", action="append", type=_allow_from, default=[], metavar="[PORT@]CIDR|any",
                   help="also redirect connections that arrive from CIDR (another host, a CNI without a "
                   "bridge), to PORT or every mapped port; any = everyone. Default: only this host's "
                   "processes and the containers on its bridges; repeatable")
    g.add_argument("--mark", type=_mark, default=netfilter.DEFAULT_MARK, metavar="N",
                   help=f"SO_MARK on upstream connections, exempted from the redirect (default {netfilter.DEFAULT_MARK:#x})")
    g.add_argument("--admin", type=_admin, default=DEFAULT_ADMIN, metavar="ADDR:PORT|off",
                   help=f"admin HTTP API: /, /healthz, /routes, /metrics (default {DEFAULT_ADMIN_TEXT}; off = none)")
    g = run.add_argument_group("process")
    g.add_argument("--grace", type=_positive_float("--grace"), default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long open connections may take to finish (default 10)")
    g.add_argument("--splice", choices=("auto", "on", "off"), default="auto",
                   help="relay with splice(2) (zero-copy) instead of recv/send; auto = where available (default auto)")
    g.add_argument("--sockmap", choices=("auto", "on", "off"), default="auto",
                   help="relay established connections inside the kernel with a BPF sockmap (needs CAP_BPF "
                   "or CAP_SYS_ADMIN); auto = where the kernel allows it (default auto)")
    g.add_argument("--sockmap-size", type=_count("--sockmap-size", 1_000_000), default=32768, metavar="CONNECTIONS",
                   help="connections the kernel relays at once; more are relayed here (default 32768)")
    g.add_argument("--workers", type=_workers, default=DEFAULT_WORKERS, metavar="N|auto",
                   help="processes accepting on the listen port (SO_REUSEPORT); the first also resolves, "
                   f"the others get its backend sets; auto = one per core (default {DEFAULT_WORKERS})")
    g.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format (default text)")
    g.add_argument("--log-level", choices=logs.LEVELS, default="info", help="(default info)")

    st = sub.add_parser("status", help="print a running daemon's routes and backends (from its admin API)",
                        description="Print the route table of a running ambassadord, read from its admin API.")
    st.add_argument("--admin", type=_admin, default=DEFAULT_ADMIN, metavar="ADDR:PORT",
                    help=f"the daemon's admin address (default {DEFAULT_ADMIN_TEXT})")
    st.add_argument("--json", action="store_true", help="print the admin API's /routes JSON as it is")
    st.add_argument("--timeout", type=_positive_float("--timeout"), default=5.0, metavar="SECONDS",
                    help="how long to wait for the daemon (default 5)")

    ipt = sub.add_parser("iptables", help="install or remove the REDIRECT rules by hand",
                         description="Install or remove the nat REDIRECT rules that send connections for "
                         "--port to ambassadord's --to-port. Atomic and idempotent.")
    ipt.add_argument("action", choices=("install", "remove"))
    ipt.add_argument("--to-port", type=_port("--to-port"), default=DEFAULT_PORT, help=f"ambassadord's port (default {DEFAULT_PORT})")
    ipt.add_argument("--port", action="append", type=_port("--port"), default=[], help="a port to redirect; repeatable (install)")
    ipt.add_argument("--dest", action="append", type=_dest, default=[], metavar="ADDR",
                     help="redirect only connections to ADDR (default: any local address); repeatable")
    ipt.add_argument("--interface", action="append", default=[], metavar="IFACE",
                     help="redirect only connections to IFACE's addresses; repeatable")
    ipt.add_argument("--allow-from", action="append", type=_allow_from, default=[], metavar="[PORT@]CIDR|any",
                     help="also redirect connections arriving from CIDR (default: only this host's processes and "
                     "the containers on the bridges it has now); repeatable (install)")
    ipt.add_argument("--mark", type=_mark, default=netfilter.DEFAULT_MARK, metavar="N",
                     help=f"mark of ambassadord's own connections, never redirected (default {netfilter.DEFAULT_MARK:#x})")
    fam = ipt.add_mutually_exclusive_group()
    fam.add_argument("--ipv4-only", action="store_true", help="only iptables, not ip6tables")
    fam.add_argument("--ipv6-only", action="store_true", help="only ip6tables, not iptables")

    res = sub.add_parser("resolve", help="print the backends a spec resolves to now")
    res.add_argument("spec", metavar="SPEC")
    _add_dns_flags(res)
    _add_consul_flags(res)
    _add_etcd_flags(res)

    chk = sub.add_parser("check", help="validate routes and print the route table")
    chk.add_argument("--config", metavar="FILE", help="TOML file to check")
    chk.add_argument("--map", action="append", default=[], metavar="PORT[@CIDR]=SPEC", help="also check these")
    chk.add_argument("--link-env", action="store_true", help="also read Docker link variables")
    chk.add_argument("--env", action="store_true", help="also read BACKEND_<PORT> variables")
    return p


# ---- run ---------------------------------------------------------------------------


def _route_defaults(args) -> dict:
    return {"balance": args.balance, "connect_timeout": args.connect_timeout,
            "idle_timeout": args.idle_timeout, "eject_for": args.eject_for,
            "max_connections": args.max_connections, "max_backend_connections": args.max_backend_connections,
            "keepalive": args.keepalive, "check_interval": args.check_interval,
            "check_rise": args.check_rise, "check_fall": args.check_fall}


def _load(args, *, env: bool = True):
    loaded = load_routes(maps=args.map, config_file=args.config, env=os.environ if env else {},
                         link_env=args.link_env, flag_defaults=_route_defaults(args) if hasattr(args, "balance") else None)
    for w in loaded.warnings:
        log.warning("%s", w)
    return loaded.routes


def cmd_run(args) -> int:
    logs.setup(args.log_format, args.log_level)
    try:
        configs = _load(args)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not configs:
        raise UsageError(NO_ROUTES)
    if args.splice == "on" and not SPLICE_AVAILABLE:
        raise UsageError("--splice on: os.splice is not available on this platform")
    options = resolver_options(args)
    listen = args.listen or DEFAULT_LISTEN
    if args.admin is not None and any(_overlap(a, args.admin) for a in listen):
        raise UsageError(f"--admin {args.admin}: the same address and port as a --listen address")

    plan = None
    if args.iptables:
        from . import netfilter

        dests = list(args.iptables_dest)
        if args.iptables_interface:
            try:
                dests += netfilter.interface_addresses(args.iptables_interface)
            except netfilter.NetfilterError as exc:
                raise UsageError(f"--iptables-interface: {exc}") from None
        listen_ports = sorted({a.port for a in listen})
        if len(listen_ports) > 1:
            log.warning("listeners use ports %s; REDIRECT goes to the first, %d", listen_ports, listen_ports[0])
        try:
            bridges = tuple(netfilter.container_bridges())
        except netfilter.NetfilterError as exc:
            log.error("iptables: %s", exc)
            return 1
        plan = netfilter.RedirectPlan(to_port=listen_ports[0], ports=_redirect_ports(configs, listen), dests=tuple(dests),
                                      mark=args.mark, families=_families_for(listen), from_interfaces=bridges,
                                      allow_from=tuple(a for group in args.allow_from for a in group))

    kernel = None
    if args.sockmap != "off":
        from .relay import KernelRelay, SockmapError

        try:
            kernel = KernelRelay(args.sockmap_size)
            log.info("sockmap: established connections are relayed in the kernel")
        except SockmapError as exc:
            if args.sockmap == "on":
                log.error("--sockmap on: %s", exc)
                return 1
            log.info("sockmap not available (%s); relaying in user space", exc)

    # From here until the event loop's signal handler is up, SIGTERM/SIGINT/SIGHUP wait
    # (blocked, not lost): a stop that arrives while the rules are being installed must
    # still remove them, and a SIGHUP must not kill the process with its default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    admin_sock = None
    pool = guard = None
    try:
        if args.workers > 1:
            guard = _instance_guard(listen)
        sockets = bind_listeners(listen, reuseport=args.workers > 1)
        if args.admin is not None:
            from .admin import bind_admin

            admin_sock = bind_admin(args.admin)
    except StartupError as exc:
        log.error("%s", exc)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        if kernel is not None:
            kernel.close()
        return 1
    use_splice = args.splice == "on" or (args.splice == "auto" and SPLICE_AVAILABLE)
    mark = args.mark if args.iptables else None
    server = Server(RouteTable([Route(c) for c in configs]), sockets,
                    options=options, grace=args.grace, kernel=kernel,
                    mark=mark, use_splice=use_splice)
    if args.workers > 1:
        from .workers import Settings, WorkerPool

        bound = tuple(ListenAddress(*s.getsockname()[:2]) for s in sockets)
        # The server's peers; the pool reaches the server only through the two callables.
        server.peers = pool = WorkerPool(
            args.workers, Settings(listen=bound, grace=args.grace, mark=mark, use_splice=use_splice,
                                   sockmap="on" if kernel is not None else "off",
                                   sockmap_size=args.sockmap_size, log_format=args.log_format,
                                   log_level=args.log_level),
            table=lambda: server.table, apply_ejection=server.apply_ejection)
    daemon = None
    try:
        if plan is not None:
            from . import netfilter

            try:
                netfilter.install(plan)
            except netfilter.NetfilterError as exc:
                log.error("iptables: %s", exc)
                return 1
            log.info("iptables: redirecting ports %s to %d", ",".join(map(str, plan.ports)) or "(none)", plan.to_port)
            _log_exposure(plan)
        daemon = _Daemon(args, server, plan, admin_sock, pool)
        admin_sock = None  # the daemon's now
        try:
            trio.run(daemon.serve)
        except KeyboardInterrupt:
            pass
        except BaseExceptionGroup as group:
            from .workers import WorkerStartError

            failed = group.subgroup(WorkerStartError)
            if failed is None:
                raise
            for exc in _leaves(failed):
                log.error("%s", exc)
            return 1
    finally:
        for g in guard or ():
            g.close()
        if admin_sock is not None:
            admin_sock.close()
        for s in sockets:
            s.close()
        if kernel is not None:
            kernel.close()
        if plan is not None:
            _remove_rules(daemon.plan if daemon is not None else plan, after_stop=daemon is not None and daemon.stopping)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    log.info("stopped")
    return 0


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _instance_guard(listen: list[ListenAddress]) -> list[socket.socket]:
    """With SO_REUSEPORT a second daemon on the same port would not fail: it would share
    the connections. An abstract unix socket per listen port (per network namespace, like
    the port) is held while running, and makes a second one fail instead."""
    guards: list[socket.socket] = []
    for port in sorted({a.port for a in listen}):
        guard = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            guard.bind(f"\0ambassadord port {port}")
        except OSError as exc:
            guard.close()
            for g in guards:
                g.close()
            raise StartupError(f"cannot listen on port {port}: another ambassadord --workers is serving it "
                               f"({exc.strerror})") from None
        guards.append(guard)
    return guards


def _overlap(a: ListenAddress, b: ListenAddress) -> bool:
    """Would binding both fail? Same port, same family, and the same or a wildcard address."""
    return a.port == b.port and a.family == b.family and (a.host == b.host or a.host in ("0.0.0.0", "::")
                                                          or b.host in ("0.0.0.0", "::"))


def _redirect_ports(configs, listen: list[ListenAddress]) -> tuple[int, ...]:
    return tuple(sorted({c.port for c in configs} - {a.port for a in listen}))


def _families_for(listen: list[ListenAddress]) -> tuple[int, ...]:
    fams = []
    if any(a.family == 2 for a in listen):
        fams.append(4)
    if any(a.family != 2 for a in listen):
        fams.append(6)
    return tuple(fams)


_removed: set[int] = set()


def _remove_jumps(plan) -> None:
    """The first step of a stop: no new connection is redirected; established ones keep
    working until _remove_rules (netfilter.py says why)."""
    from . import netfilter

    try:
        netfilter.remove_jumps(plan.to_port, plan.families)
        log.info("iptables: no longer redirecting new connections; the rules go once open ones are over")
    except netfilter.NetfilterError as exc:
        log.error("iptables: could not remove the jumps to our chains: %s", exc)


def _remove_rules(plan, *, after_stop: bool = False) -> None:
    """Remove run --iptables' rules, once (at exit, after the grace period). ``after_stop``:
    the jumps went at the stop; if they are back, a new daemon installed the rules while
    this one was draining, and they are left to it."""
    from . import netfilter

    if plan.to_port in _removed:
        return
    _removed.add(plan.to_port)
    try:
        netfilter.remove(plan.to_port, plan.families, if_unused=after_stop)
        log.info("iptables: rules removed")
    except netfilter.NetfilterError as exc:
        log.error("iptables: could not remove rules: %s", exc)


def _log_exposure(plan) -> None:
    """Say plainly who can use the mapped ports: a relay open to the LAN is a finding."""
    who = ["this host's processes"]
    if plan.from_interfaces:
        who.append(f"containers on {', '.join(plan.from_interfaces)}")
    for network, port in plan.allow_from:
        who.append(f"{'everyone' if network.prefixlen == 0 else network}{f' (port {port})' if port else ''}")
    log.info("iptables: mapped ports are open to %s", "; ".join(dict.fromkeys(who)))


class _Daemon:
    """``run`` once everything is bound: the server, the admin API, signals and reloads.

    Stopping (SIGTERM, SIGINT), in order:

    1. a reload in progress is cancelled (reading a file may block: a FIFO, a hung network
       file system), so nothing the stop needs waits on it for longer than the grace;
    2. under ``--iptables``, the jumps to our chains go: no new connection is redirected,
       while established ones keep their translation (netfilter.py says why);
    3. the server stops accepting and gives open connections the grace period;
    4. only then, in cmd_run, the chains go.
    """

    def __init__(self, args, server: Server, plan, admin_sock, pool=None):
        from .admin import ConfigState

        self.args = args
        self.server = server
        self.pool = pool  # the WorkerPool (--workers N > 1), or None
        self.plan = plan
        self.admin_sock = admin_sock
        self.config = ConfigState(file=os.path.abspath(args.config) if args.config else None)
        # Held by whatever changes the rules or the table (a reload, a bridge change).
        self._reload_lock = trio.Lock()
        self._reload_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.stopping = False

    async def serve(self) -> None:
        server = self.server
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._on_signals)
            await nursery.start(self._run_server)
            if self.admin_sock is not None:
                from .admin import admin_url, make_app, serve_admin

                sock, self.admin_sock = self.admin_sock, None
                await nursery.start(serve_admin, make_app(server, self.config, self.pool), sock)
                log.info("admin API on %s", admin_url(self.args.admin))
            if self.args.config and self.args.config_poll > 0:
                nursery.start_soon(self._watch_config_file)
            if self.plan is not None:
                nursery.start_soon(self._watch_bridges)
            sdnotify.ready(f"serving {len(server.table)} route(s)")

    async def _run_server(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Returns once shutdown() was called and the grace period is over; then the admin
        # API, the file watch and the signal handler go too.
        await self.server.run(task_status=task_status)
        self._nursery.cancel_scope.cancel()

    async def _on_signals(self) -> None:
        server = self.server
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            # Blocked since before the rules went in (cmd_run): any that came meanwhile
            # are delivered now, to this receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            first = True
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if first:
                        self._nursery.start_soon(self.reload, "SIGHUP")
                    continue
                if first:
                    first = False
                    log.info("%s: stopping (grace %gs; send again to stop at once)", name, server.grace)
                    sdnotify.stopping()
                    self.stopping = True
                    if self._reload_scope is not None:
                        self._reload_scope.cancel()
                    if self.plan is not None:
                        # After a rules change in progress (a subprocess with its own time
                        # limit), but never for longer than the grace period.
                        with trio.move_on_after(server.grace):
                            async with self._reload_lock:
                                await trio.to_thread.run_sync(_remove_jumps, self.plan)
                    server.shutdown()
                else:
                    log.warning("%s again: closing open connections now", name)
                    server.abort()

    async def _watch_config_file(self) -> None:
        """Reload when --config changes: (device, inode, size, mtime) is polled, and a change
        must hold still for one more poll (a file being written is not read half-way).
        stat() runs in a thread: on a hung network file system it blocks."""
        path, interval = self.args.config, self.args.config_poll

        async def signature():
            return await trio.to_thread.run_sync(_file_signature, path, abandon_on_cancel=True)

        seen = await signature()
        while True:
            await trio.sleep(interval)
            now = await signature()
            if now == seen:
                continue
            while True:  # settle: wait until two looks agree
                await trio.sleep(min(interval, 0.25))
                again = await signature()
                if again == now:
                    break
                now = again
            seen = now
            await self.reload(f"{path} changed")

    async def _watch_bridges(self) -> None:
        """Follow this host's container bridges (a ``docker network create`` after start):
        their containers' connections are redirected, other hosts' are not (netfilter.py)."""
        from dataclasses import replace

        from . import netfilter

        while True:
            await trio.sleep(BRIDGE_POLL)
            try:
                bridges = tuple(await trio.to_thread.run_sync(netfilter.container_bridges, abandon_on_cancel=True))
            except netfilter.NetfilterError as exc:
                log.warning("iptables: cannot list the container bridges: %s", exc)
                continue
            if bridges == self.plan.from_interfaces:
                continue
            async with self._reload_lock:
                if self.stopping:
                    return
                new_plan = replace(self.plan, from_interfaces=bridges)
                try:
                    await trio.to_thread.run_sync(partial(netfilter.install, new_plan, previous=self.plan))
                except netfilter.NetfilterError as exc:
                    log.error("iptables: could not follow the container bridges (%s): %s",
                              ", ".join(bridges) or "none", exc)
                    continue
                self.plan = new_plan
                _log_exposure(new_plan)

    async def reload(self, why: str) -> None:
        """Re-read the routes; apply them all, or none if anything is wrong."""
        from . import netfilter

        async with self._reload_lock:
            if self.stopping:
                return
            sdnotify.reloading()
            log.info("reloading (%s)", why)
            try:
                with trio.CancelScope() as self._reload_scope:
                    try:
                        # Abandoned if a stop cancels it: a file that blocks (a FIFO, a hung
                        # NFS mount) holds a thread, never the daemon.
                        configs = await trio.to_thread.run_sync(_load, self.args, abandon_on_cancel=True)
                    except ConfigError as exc:
                        raise _Rejected(str(exc)) from None
                    except Exception as exc:  # a bug of ours or a library's: the old routes stay
                        log.exception("reload (%s): reading the configuration failed", why)
                        raise _Rejected(f"{self.args.config or 'the configuration'}: cannot be read: "
                                        f"{type(exc).__name__}: {exc}") from None
                if self._reload_scope.cancelled_caught or self.stopping:
                    return
                if not configs:
                    raise _Rejected(f"{self.args.config or 'the configuration'}: no routes in the new configuration")
                new_plan = None
                if self.plan is not None:
                    from dataclasses import replace

                    new_plan = replace(self.plan, ports=_redirect_ports(configs, self.args.listen or DEFAULT_LISTEN))
                    if new_plan.ports != self.plan.ports:
                        # A port that goes keeps its established connections: the chain
                        # always holds a REDIRECT rule (netfilter.py, "the anchor").
                        try:
                            await trio.to_thread.run_sync(partial(netfilter.install, new_plan, previous=self.plan))
                        except netfilter.NetfilterError as exc:
                            raise _Rejected(f"iptables: {exc}") from None
                        log.info("iptables: redirecting ports %s to %d",
                                 ",".join(map(str, new_plan.ports)) or "(none)", new_plan.to_port)
                        self.plan = new_plan
                if self.stopping:  # SIGTERM came while the rules were changing
                    return
                summary = self.server.reload(configs)
                if self.pool is not None:
                    # Over (and READY=1) only once every process serves the new table.
                    await self.pool.synced()
            except _Rejected as exc:
                self.config.failed(str(exc))
                log.error("reload (%s) rejected: %s; still serving the previous configuration", why, exc,
                          extra={"fields": {"event": "reload", "ok": False, "error": str(exc)}})
            else:
                self.config.succeeded(str(summary))
                log.info("reloaded (%s): %s", why, summary,
                         extra={"fields": {"event": "reload", "ok": True, "added": summary.added,
                                           "removed": summary.removed, "changed": summary.changed}})
            finally:
                self._reload_scope = None
                if not self.stopping:
                    sdnotify.ready(f"serving {len(self.server.table)} route(s)")


class _Rejected(Exception):
    pass


def _file_signature(path: str):
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ---- iptables ----------------------------------------------------------------------


def cmd_iptables(args) -> int:
    from . import netfilter

    logs.setup("text", "info")
    families = (4,) if args.ipv4_only else (6,) if args.ipv6_only else (4, 6)
    try:
        if args.action == "remove":
            netfilter.remove(args.to_port, families)
            print(f"removed {netfilter.chain_name(args.to_port)}")
            return 0
        if not args.port:
            raise UsageError("iptables install: give at least one --port P")
        dests = list(args.dest)
        if args.interface:
            dests += netfilter.interface_addresses(args.interface)
        plan = netfilter.RedirectPlan(to_port=args.to_port, ports=tuple(sorted(set(args.port))), dests=tuple(dests),
                                      mark=args.mark, families=families,
                                      from_interfaces=tuple(netfilter.container_bridges()),
                                      allow_from=tuple(a for group in args.allow_from for a in group))
        netfilter.install(plan)
    except netfilter.NetfilterError as exc:
        print(f"ambassadord iptables: {exc}", file=sys.stderr)
        return 1
    print(f"installed {netfilter.chain_name(args.to_port)}: ports {','.join(map(str, plan.ports))} -> {plan.to_port}")
    return 0


# ---- resolve / check ---------------------------------------------------------------


def cmd_resolve(args) -> int:
    logs.setup("text", "warning")
    try:
        spec = parse_spec(args.spec)
    except SpecError as exc:
        raise UsageError(str(exc)) from None

    options = resolver_options(args)

    async def once():
        return await spec.resolver(options).resolve()

    try:
        backends = trio.run(once)
    except ResolveError as exc:
        print(f"ambassadord resolve: {exc}", file=sys.stderr)
        return 1
    if not backends:
        print(f"ambassadord resolve: {args.spec!r} resolves to no backends", file=sys.stderr)
        return 1
    for b in sorted(backends, key=lambda b: (b.priority, -b.weight)):  # the order of preference
        print(b)
    return 0


def cmd_check(args) -> int:
    logs.setup("text", "warning")
    if not (args.config or args.map or args.env or args.link_env):
        raise UsageError("check: give --config FILE (and/or --map, --env, --link-env)")
    args.balance = args.connect_timeout = args.idle_timeout = args.eject_for = None
    try:
        routes = load_routes(maps=args.map, config_file=args.config,
                             env={k: v for k, v in os.environ.items() if args.env or not k.startswith("BACKEND_")},
                             link_env=args.link_env).routes
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not routes:
        raise UsageError(NO_ROUTES)
    rows = [("PORT", "SOURCE", "BACKEND", "BALANCE", "CONNECT", "IDLE", "FROM")]
    for r in sorted(routes, key=lambda r: (r.port, str(r.source))):
        rows.append((str(r.port), str(r.source or "any"), r.spec.text, r.balance, f"{r.connect_timeout:g}s",
                     f"{r.idle_timeout:g}s" if r.idle_timeout else "-", r.origin))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"{len(routes)} route(s) OK")
    return 0


# ---- status ------------------------------------------------------------------------


def cmd_status(args) -> int:
    import json
    import urllib.error
    import urllib.request

    from .admin import admin_url

    if args.admin is None:
        raise UsageError("--admin off: status needs the daemon's admin address")
    url = admin_url(args.admin) + "/routes"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        print(f"ambassadord status: {url}: HTTP {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        print(f"ambassadord status: cannot reach the admin API at {url}: {reason} "
              f"(is ambassadord running with --admin {args.admin}?)", file=sys.stderr)
        return 1
    try:
        data = json.loads(body)
        if not isinstance(data["routes"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        print(f"ambassadord status: {url} did not answer with ambassadord's /routes JSON", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(render_status(data))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _ago(ts, now) -> str:
    if ts is None:
        return "never"
    d = max(0.0, now - ts)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.0f}h ago"


def render_status(data: dict) -> str:
    """The /routes JSON as a table: one line per backend, route columns on its first line."""
    now = data.get("now") or 0
    head = ("ROUTE", "SPEC", "BACKEND", "STATE", "ACTIVE", "CONNS", "FAILS", "UP", "DOWN", "UPDATED")
    rows = [head]
    notes = []
    for r in data["routes"]:
        route_cols = (r["name"], r["spec"])
        backends = r["backends"]
        if not backends:
            state = "not resolved" if not r["resolved"] else "no backends"
            rows.append((*route_cols, "-", state, str(r["active"]), str(r["connections"]), "-",
                         _size(r["bytes_up"]), _size(r["bytes_down"]), _ago(r["updated_at"], now)))
        for i, b in enumerate(backends):
            state = b["state"]
            if state == "ejected" and b.get("ejected_for") is not None:
                state = f"ejected {b['ejected_for']:.0f}s"
            if r["stale"] and b["in_set"]:
                state += " (stale)"
            rows.append((*(route_cols if i == 0 else ("", "")), b["name"], state, str(b["active"]),
                         str(b["connections"]), str(b["failures"]), _size(b["bytes_up"]), _size(b["bytes_down"]),
                         _ago(r["updated_at"], now) if i == 0 else ""))
        if r["error"]:
            notes.append(f"route {r['name']}: {'stale: ' if r['stale'] else ''}{r['error']}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    conns = data.get("connections", {})
    cfg = data.get("config", {})
    lines.append("")
    lines.append(f"{len(data['routes'])} route(s), {conns.get('active', 0)} open connection(s), "
                 f"{conns.get('total', 0)} since start; config loaded {_ago(cfg.get('loaded_at'), now)}"
                 + (f" from {cfg['file']}" if cfg.get("file") else ""))
    workers = data.get("workers")
    if workers and workers.get("count", 1) > 1:
        lines.append(f"{workers['count']} worker processes" + (
            f"; only {workers['answered']} answered, counts are partial" if workers["answered"] < workers["count"]
            else "") + (f"; {workers['restarts']} restarted" if workers.get("restarts") else ""))
    last = cfg.get("last_reload")
    if last and not last.get("ok"):
        notes.append(f"last reload ({_ago(last.get('at'), now)}) was rejected: {last.get('error')}")
    lines += notes
    return "\n".join(lines)


COMMANDS = {"run": cmd_run, "status": cmd_status, "iptables": cmd_iptables, "resolve": cmd_resolve, "check": cmd_check}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"ambassadord {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
