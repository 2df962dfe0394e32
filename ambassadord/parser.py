"""The command line's grammar: ``ambassadord run | status | iptables | resolve | check``.

Only parsing: each flag's type turns one word into a value or an argparse error that
quotes it (argparse adds the flag's name, and exits 2). What flags mean together, and
what the environment adds, is settings.py's.
"""

from __future__ import annotations

import argparse
import ipaddress

from . import __version__, logs, netfilter
from .balancer import BALANCE_POLICIES
from .routes import DEFAULT_MAX_CONNECTIONS, MODES, ON_DOWN, Keepalive
from .server import ListenAddress, parse_listen
from .settings import DEFAULT_ADMIN, DEFAULT_PORT

DEFAULT_WORKERS = "auto"


class _Parser(argparse.ArgumentParser):
    """argparse, except that a word starting with a dash and a digit is a value, and that
    an error is one line and a hint, without the usage.

    argparse takes ``--map -1=10.0.0.5:6379`` for an unknown option ``-1=...`` and says
    only "expected one argument", hiding the bad port. No flag here looks like that, so
    the word goes to ``--map``, whose parser then names ``-1``.
    """

    def _parse_optional(self, arg_string):
        if arg_string[:1] == "-" and arg_string[1:2].isdigit():
            return None
        return super()._parse_optional(arg_string)

    def parse_args(self, args=None, namespace=None):
        # argparse reports a word no subcommand took as the top parser's ("ambassadord:
        # error: unrecognized arguments"): name the command whose flags were meant.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            where = commands.get(getattr(parsed, "command", None), self)
            where.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def error(self, message):
        # One line and where to look, as git and ip do: argparse's own error() prints the
        # whole usage first (17 lines for run), which buries the one line that matters.
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


# Numbers on the command line are ASCII: int() and float() also take other scripts'
# digits (６３７９), which nobody reading `ps` or a unit file would take for the value used.
# A duration flag is at most a week (a route's own durations have tighter bounds, checked
# by config.py): more is a slip, and 1e300 seconds overflows what timeouts are made of.
_MAX_SECONDS = 604800


def _seconds(text: str) -> float:
    try:
        if not text.isascii():
            raise ValueError
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds, e.g. 2 or 0.5") from None
    if not 0 <= v <= _MAX_SECONDS:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 to {_MAX_SECONDS} seconds (a week)")
    return v


def _whole(text: str, maximum: int) -> int | None:
    """``text`` as a whole number from 1 to ``maximum`` in ASCII digits, else None."""
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) <= maximum else None


def _port(text: str) -> int:
    if (n := _whole(text, 65535)) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port number 1-65535 in ASCII digits")
    return n


def _count(maximum: int):
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
    return _quoting(Keepalive.parse, text)


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


def _quoting(parse, text: str):
    """``parse(text)``, its ValueError (which quotes the text) made argparse's error."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _allow_from(text: str) -> tuple:
    return _quoting(parse_allow_from, text)


def _listen(text: str) -> ListenAddress:
    return _quoting(parse_listen, text)


def _admin(text: str) -> ListenAddress | None:
    from .admin import parse_admin  # (Starlette: only when the flag is given)

    return _quoting(parse_admin, text)


def _status_admin(text: str) -> ListenAddress:
    from .status import parse_admin_address

    return _quoting(parse_admin_address, text)


def _dns_server(text: str) -> tuple[str, int]:
    from ambassadord.backends.dns import parse_dns_server

    return _quoting(parse_dns_server, text)


def _add_dns_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DNS (srv://, bare names, dns://)")
    g.add_argument("--dns-server", action="append", type=_dns_server, default=[], metavar="HOST[:PORT]",
                   help="DNS server to ask instead of /etc/resolv.conf's; repeatable (e.g. a Consul agent, 127.0.0.1:8600)")
    g.add_argument("--dns-min-ttl", type=_seconds, default=1.0, metavar="SECONDS",
                   help="floor of an answer's TTL (default 1)")
    g.add_argument("--dns-max-ttl", type=_seconds, default=300.0, metavar="SECONDS",
                   help="ceiling of an answer's TTL (default 300)")
    g.add_argument("--dns-stale-for", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="how long the last good answer serves while DNS fails (default 3600)")
    g.add_argument("--dns-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                   help="time limit of one look-up, over every server (default 5; per query at most 2)")


def _add_consul_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Consul (consul://, consul-kv://)")
    g.add_argument("--consul", metavar="[SCHEME://]HOST[:PORT]",
                   help="agent for specs that name none (default: env CONSUL_HTTP_ADDR, else 127.0.0.1:8500); "
                   "https://HOST:PORT for TLS")
    g.add_argument("--consul-token", metavar="TOKEN", help="ACL token (default: env CONSUL_HTTP_TOKEN)")
    g.add_argument("--consul-ca", metavar="FILE", help="CA certificate for an https agent (default: env CONSUL_CACERT)")


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("etcd (etcd://)")
    g.add_argument("--etcd", action="append", default=[], metavar="[http(s)://]HOST[:PORT]",
                   help="etcd endpoint for specs that name none; repeatable for a cluster "
                   "(default: env ETCDCTL_ENDPOINTS, else 127.0.0.1:2379)")
    g.add_argument("--etcd-user", metavar="USER:PASSWORD", help="etcd authentication (default: env ETCDCTL_USER)")
    g.add_argument("--etcd-ca", metavar="FILE", help="CA certificate for TLS to etcd (default: env ETCDCTL_CACERT)")
    g.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (default: env ETCDCTL_CERT)")
    g.add_argument("--etcd-key", metavar="FILE", help="client key for etcd (default: env ETCDCTL_KEY)")


def _add_resolver_flags(parser: argparse.ArgumentParser) -> None:
    _add_dns_flags(parser)
    _add_consul_flags(parser)
    _add_etcd_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ambassadord",
        description="One host-wide service ambassador: consumers connect to a local address and the "
        "service's usual port; an iptables REDIRECT sends the connection here; ambassadord relays it "
        "to a live backend.",
    )
    p.add_argument("--version", action="version", version=f"ambassadord {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub.add_parser("run", help="run the proxy", description="Run the proxy."))
    _add_status(sub.add_parser("status", help="print a running daemon's routes and backends (from its admin API)",
                               description="Print the route table of a running ambassadord, read from its admin API."))
    _add_iptables(sub.add_parser("iptables", help="install or remove the REDIRECT rules by hand",
                                 description="Install or remove the nat REDIRECT rules that send connections for "
                                 "--port to ambassadord's --to-port. Atomic and idempotent."))
    res = sub.add_parser("resolve", help="print the backends a spec resolves to now",
                         description="Resolve SPEC once, as a route would, and print its backends, one HOST:PORT "
                         "a line in order of preference. Exits 1 if there are none.")
    res.add_argument("spec", metavar="SPEC", help="a route's value, e.g. consul:///redis or srv://_redis._tcp.example.com")
    _add_resolver_flags(res)
    _add_check(sub.add_parser("check", help="validate routes and print the route table",
                              description="Validate routes as run would read them (--config, --map, --env, "
                              "--link-env) and print the route table; nothing is started. Exits 2 with run's "
                              "message if a route is wrong, or if there is none."))
    return p


def _add_run(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("routes")
    g.add_argument("--map", action="append", default=[], metavar="PORT[@CIDR]=SPEC",
                   help="route connections for PORT (from sources in CIDR) to SPEC; repeatable")
    g.add_argument("--config", metavar="FILE", help="TOML file with a [routes] table (and optional [defaults]); "
                   "re-read on SIGHUP and when it changes")
    g.add_argument("--config-poll", type=_seconds, default=1.0, metavar="SECONDS",
                   help="how often to check --config for changes (default 1; 0 = only on SIGHUP)")
    g.add_argument("--link-env", action="store_true",
                   help="also read Docker link variables <ALIAS>_PORT_<PORT>_TCP=tcp://HOST:PORT")
    g.add_argument("--docker", nargs="?", const="", default=None, metavar="URL",
                   help="also route what each container declares for itself (label connect.<PORT>=SPEC, "
                   "env BACKEND_<PORT>=SPEC), from its own addresses; URL: the engine's API "
                   "(default $DOCKER_HOST, else unix:///var/run/docker.sock)")
    g.add_argument("--docker-redirect", choices=("all", "declared"), default="all",
                   help="with --docker and --iptables, which ports of this host's addresses the containers' "
                   "connections are redirected for: all (default: race-free from a container's first "
                   "millisecond; what no route takes goes on to where it was headed) or only the ports "
                   "that routes and containers declare (from the container's create event on)")
    g = run.add_argument_group("listening")
    g.add_argument("--listen", action="append", type=_listen, metavar="ADDR:PORT",
                   help=f"address to accept on; repeatable (default 0.0.0.0:{DEFAULT_PORT} and [::]:{DEFAULT_PORT})")
    _add_route_default_flags(run)
    _add_resolver_flags(run)
    _add_iptables_and_admin_flags(run)
    _add_connect_flags(run)
    _add_process_flags(run)


def _add_route_default_flags(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("balancing and failover (defaults for every route)")
    g.add_argument("--balance", choices=BALANCE_POLICIES, help="pick order within a priority (default random)")
    g.add_argument("--connect-timeout", type=_seconds, metavar="SECONDS",
                   help="per-attempt connect timeout before trying the next backend (default 2)")
    g.add_argument("--idle-timeout", type=_seconds, metavar="SECONDS",
                   help="close a connection idle this long both ways (default: never; 0 = never)")
    g.add_argument("--eject-for", type=_seconds, metavar="SECONDS",
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
    g.add_argument("--on-down", choices=ON_DOWN,
                   help="a connection whose backend leaves the set, is ejected or is down by the checks: keep it "
                   "(default) or shut it down after --drain (HAProxy's on-marked-down shutdown-sessions)")
    g.add_argument("--drain", type=_seconds, metavar="SECONDS",
                   help="with --on-down shutdown: how long such a connection may go on first (default 0: at once)")
    g = run.add_argument_group("active health checks (defaults for every route; off unless --check-interval)")
    g.add_argument("--check-interval", type=_check_interval, metavar="SECONDS",
                   help="TCP connect to every backend this often; a backend that is down is not picked "
                   "(default: no checks; 0 = none)")
    g.add_argument("--check-rise", type=_count(100), metavar="N",
                   help="checks in a row that must pass before a down backend is up again (default 2)")
    g.add_argument("--check-fall", type=_count(100), metavar="N",
                   help="checks in a row that must fail before an up backend is down (default 3)")


def _add_iptables_and_admin_flags(run: argparse.ArgumentParser) -> None:
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
    g = run.add_argument_group("admin API")
    g.add_argument("--admin", type=_admin, default=DEFAULT_ADMIN, metavar="ADDR:PORT|off",
                   help=f"admin HTTP API: /, /healthz, /routes, /metrics, on this IP address and port "
                   f"(default {DEFAULT_ADMIN}; off = none)")


def _add_connect_flags(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("connect mode (balancing in the kernel at connect(); no proxy in the path)")
    g.add_argument("--mode", choices=MODES,
                   help="how routes are served, unless a route says otherwise: proxy = REDIRECT to the listener "
                   "and relay; connect = a cgroup BPF program rewrites the consumer's connect() to a backend "
                   "(default proxy)")
    g.add_argument("--cgroup", metavar="DIR",
                   help="cgroup v2 directory whose processes connect mode covers, containers included "
                   "(default: the root of the cgroup2 mount, from /proc/mounts)")


def _add_process_flags(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("process")
    g.add_argument("--grace", type=_seconds, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long open connections may take to finish (default 10)")
    g.add_argument("--splice", choices=("auto", "on", "off"), default="auto",
                   help="relay with splice(2) (zero-copy) instead of recv/send; auto = where available (default auto)")
    g.add_argument("--sockmap", choices=("auto", "on", "off"), default="auto",
                   help="relay established connections inside the kernel with a BPF sockmap (needs CAP_BPF "
                   "or CAP_SYS_ADMIN); auto = where the kernel allows it (default auto)")
    g.add_argument("--sockmap-size", type=_count(1_000_000), default=32768, metavar="CONNECTIONS",
                   help="connections the kernel relays at once; more are relayed here (default 32768)")
    g.add_argument("--workers", type=_workers, default=DEFAULT_WORKERS, metavar="N|auto",
                   help="processes accepting on the listen port (SO_REUSEPORT); the first also resolves, "
                   f"the others get its backend sets; auto = one per core (default {DEFAULT_WORKERS})")
    g.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format (default text)")
    g.add_argument("--log-level", choices=logs.LEVELS, default="info", help="(default info)")
    g.add_argument("--log-connections", choices=logs.CONNECTION_LINES, default="all",
                   help="which connections get their one log line: all (default), errors (every outcome but ok), "
                   "none; unrouted ones are at most one line a second per port either way")


def _add_status(st: argparse.ArgumentParser) -> None:
    st.add_argument("--admin", type=_status_admin, default=DEFAULT_ADMIN, metavar="HOST:PORT",
                    help=f"the daemon's admin address (default {DEFAULT_ADMIN})")
    st.add_argument("--json", action="store_true", help="print the admin API's /routes JSON as it is")
    st.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS",
                    help="how long to wait for the daemon (default 5)")


def _add_iptables(ipt: argparse.ArgumentParser) -> None:
    ipt.add_argument("action", choices=("install", "remove"))
    ipt.add_argument("--to-port", type=_port, default=DEFAULT_PORT, help=f"ambassadord's port (default {DEFAULT_PORT})")
    ipt.add_argument("--port", action="append", type=_port, default=[], help="a port to redirect; repeatable (install)")
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


def _add_check(chk: argparse.ArgumentParser) -> None:
    chk.add_argument("--config", metavar="FILE", help="TOML file to check")
    chk.add_argument("--map", action="append", default=[], metavar="PORT[@CIDR]=SPEC", help="also check these")
    chk.add_argument("--link-env", action="store_true", help="also read Docker link variables")
    chk.add_argument("--env", action="store_true", help="also read BACKEND_<PORT> variables")
