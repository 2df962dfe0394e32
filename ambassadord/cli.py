"""Command line: ``ambassadord run | status | iptables | resolve | check``.

Exit status: 0 success; 1 a runtime failure (no backends, iptables refused, ...);
2 bad usage or configuration (a bad flag, an unreadable config, a bad spec or port), with
a message naming the bad value and where it came from. ``run`` starts nothing unless all
of its configuration is valid, and undoes what it started if a later step fails.

Here each command goes from its parsed flags (parser.py) to settings (settings.py) to
the module that does the work: ``run`` is daemon.py's, ``status`` status.py's; the three
one-shot commands (iptables, resolve, check) are short enough to live here.
"""

from __future__ import annotations

import os
import sys

import trio

from ambassadord.backends import ResolveError, SpecError, parse_spec

from . import logs, status
from .config import ConfigError
from .parser import build_parser
from .settings import NO_ROUTES, UsageError, check_sources, resolver_options, run_settings


def cmd_run(args) -> int:
    from . import daemon

    return daemon.run(run_settings(args))


def cmd_status(args) -> int:
    return status.show(args.admin, timeout=args.timeout, as_json=args.json)


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
            raise UsageError("install needs at least one --port PORT to redirect")
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


def cmd_resolve(args) -> int:
    logs.setup("text", "warning")
    try:
        spec = parse_spec(args.spec)
    except SpecError as exc:
        raise UsageError(str(exc)) from None

    options = resolver_options(args)
    resolver = spec.resolver(options)
    try:
        backends = trio.run(resolver.resolve)
    except ResolveError as exc:
        print(f"ambassadord resolve: {exc}", file=sys.stderr)
        return 1
    # what the registry lists but leaves out (Consul: instances failing a check), and why
    view = resolver.registry_view() or {}
    left_out = [f"ambassadord resolve: {line}" for line in status.failing_lines(view.get("failing") or [],
                                                                         view.get("failing_more") or 0)]
    if not backends:
        why = trio.run(resolver.explain_empty)
        print(f"ambassadord resolve: {args.spec!r} resolves to no backends" + (f": {why}" if why else ""),
              *left_out, sep="\n", file=sys.stderr)
        return 1
    for b in sorted(backends, key=lambda b: (b.priority, -b.weight)):  # the order of preference
        print(b)
    if left_out:
        print(*left_out, sep="\n", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    logs.setup("text", "warning")
    if not (args.config or args.map or args.env or args.link_env):
        raise UsageError("nothing to check: give --config FILE, --map PORT=SPEC, --env or --link-env")
    try:
        routes = check_sources(args).load(os.environ).routes
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not routes:
        raise UsageError(NO_ROUTES)
    # A MODE column only when some route is not proxied: the usual table stays as it was.
    modes = any(r.mode != "proxy" for r in routes)
    names = any(r.name for r in routes)  # a NAME column only when some route is named
    rows = [(*(("NAME",) if names else ()), "PORT", "SOURCE", "BACKEND", *(("MODE",) if modes else ()), "BALANCE",
             "CONNECT", "IDLE", "FROM")]
    for r in sorted(routes, key=lambda r: (r.port, str(r.source))):
        rows.append((*((r.name or "-",) if names else ()), str(r.port), str(r.source or "any"), r.spec.text,
                     *((r.mode,) if modes else ()), r.balance,
                     f"{r.connect_timeout:g}s", f"{r.idle_timeout:g}s" if r.idle_timeout else "-", r.origin))
    print("\n".join(status.columns(rows)))
    print(f"{len(routes)} route(s) OK")
    return 0


COMMANDS = {"run": cmd_run, "status": cmd_status, "iptables": cmd_iptables, "resolve": cmd_resolve, "check": cmd_check}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"ambassadord {args.command}: {exc}", file=sys.stderr)
        return 2
