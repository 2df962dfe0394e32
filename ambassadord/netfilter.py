"""The iptables rules that send consumers' connections to ambassadord's one port.

A consumer connects to an ordinary local address and a service's usual port
(``127.0.0.1:6379``, or ``172.17.0.1:6379`` from a bridged container). A nat ``REDIRECT``
rule rewrites that destination to the daemon's listening port, and the daemon reads the
original back with :func:`ambassadord.original_dst.original_destination`.

Layout, per daemon port ``TO`` and per address family::

    nat OUTPUT      -p tcp -j AMBASSADORD-TO     host processes, --net=host containers
    nat PREROUTING  -p tcp -j AMBASSADORD-TO-IN  connections arriving from elsewhere
    AMBASSADORD-TO-IN:                           who, of those, may be redirected:
      -i BRIDGE -p tcp [--dport C] -m addrtype --dst-type LOCAL -j REDIRECT --to-ports TO
                                                 --docker: every port (bridge_all), or one
                                                 rule per port C that only containers
                                                 declare; with dests, -d ADDR instead of
                                                 addrtype
      -i BRIDGE -j AMBASSADORD-TO                containers on this host's bridges
      -s CIDR [-p tcp --dport P] -j AMBASSADORD-TO
                                                 networks opened explicitly (--allow-from)
    AMBASSADORD-TO:
      -m mark --mark MARK -j RETURN              the daemon's own upstream connections
      -p tcp -m mark --mark MARK -j REDIRECT --to-ports TO
                                                 the anchor: never matches (see below)
      -p tcp --dport P -m addrtype --dst-type LOCAL -j REDIRECT --to-ports TO
                                                 (one per mapped port P), or with dests:
      -d ADDR -p tcp --dport P -j REDIRECT --to-ports TO
                                                 (one per mapped port P and dest ADDR)

Not open to the LAN. A connection that arrives from another host enters through PREROUTING
like a container's does; without the ``-IN`` chain, any host that can reach this one could
use the mapped ports as an open relay into the backends. So only the interfaces of this
host's container bridges (found by :func:`container_bridges`: bridges whose ports are all
veth pairs, i.e. whose far ends live on this host) and the source networks the user opened
explicitly are let through to the redirect.

The anchor rule, and the order of a stop. The kernel translates the packets of an
established redirected connection only while the namespace holds some REDIRECT rule:
removing the last one breaks every such connection at its next packet (measured with
iptables-nft on Debian 12: removing the chain or flushing it broke an open connection;
removing one port's rule while another REDIRECT remained, or flushing and re-adding the
rules in one transaction, did not). The anchor is a REDIRECT rule that can never match
(marked packets RETURN just before it), so the chain always holds one, whatever ports a
reload leaves. A stop removes the jumps first (:func:`remove_jumps`: no new connection is
redirected, established ones keep working) and the chains only once the last redirected
connection ended or the grace period ran out (:func:`remove`).

Why a chain of our own: the whole rule set is replaced or removed by naming one chain,
without touching, or having to parse, anybody else's rules. Why the mark rule comes
first: the daemon sets ``SO_MARK`` on its upstream sockets, so its connection to a backend
that happens to be local (``127.0.0.1:6379``) is not captured and sent back to itself.

Transactions. Every change is one ``iptables-restore --noflush`` run per family, which the
kernel applies atomically: either the whole chain with its jumps is there, or none of it.
Under ``--noflush``, declaring ``:CHAIN - [0:0]`` creates the chain or, if it exists,
flushes it (checked with iptables 1.8.9, nf_tables backend), so a re-install replaces the
chain's content instead of appending to it. The jump rules live in the built-in chains,
which must not be flushed; they are added only when a listing (``iptables -t nat -S``)
shows them missing, which makes install idempotent. The listing and the restore are two
steps, so two processes installing the same port at the same time could both add a jump:
one daemon per port is assumed.

IPv6 is mirrored with ``ip6tables-restore``. A family that is requested must work: if
``ip6tables`` fails (kernel without IPv6, no ip6 nat table), install fails with its error
and rolls back what it already did for the other family. A caller that wants IPv4 only
says so with ``families=(4,)``. When a plan has ``dests`` and none of them is of a family,
that family still gets the chain, holding only the mark rule: it redirects nothing, but
the state stays uniform, and a re-install never leaves rules of an earlier plan behind.

Errors are :class:`NetfilterError`, whose message is meant for the user: it names the
command, interface or address that failed and carries the tool's own stderr.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MARK",
    "NetfilterError",
    "RedirectPlan",
    "chain_name",
    "check_available",
    "container_bridges",
    "in_chain_name",
    "install",
    "interface_addresses",
    "remove",
    "remove_jumps",
    "render_install",
    "render_remove",
]

# The fwmark (SO_MARK) the daemon puts on its own upstream sockets. Any value works as
# long as nothing else on the host uses it; 0x1a3b is arbitrary and unlikely to collide
# with the small marks that Docker, kube-proxy (0x4000, 0x8000) or Calico use.
DEFAULT_MARK = 0x1A3B

_CHAIN_PREFIX = "AMBASSADORD-"
# OUTPUT sees connections made by host processes (and --net=host containers); PREROUTING
# sees those arriving from a bridge (docker0). Both are needed for the two consumer kinds.
_HOOKS = ("OUTPUT", "PREROUTING")
_FAMILIES = (4, 6)
# (listing tool, restore tool) per family; both come with Debian's package "iptables".
_TOOLS = {4: ("iptables", "iptables-restore"), 6: ("ip6tables", "ip6tables-restore")}
# Long enough for a busy xtables lock (legacy backend, -w waits for it), short enough that
# a wedged tool does not hang the daemon's start or exit forever.
_TIMEOUT = 30.0
# CAP_NET_ADMIN is capability number 12 (<linux/capability.h>).
_CAP_NET_ADMIN = 12

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Linux interface names: at most 15 bytes. Only the characters that real names use are
# accepted, so that a name can never change the meaning of an iptables-restore line.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


class NetfilterError(Exception):
    """Managing the redirect rules failed. The message is for the user, as is."""


@dataclass(frozen=True)
class RedirectPlan:
    """What to redirect where: the complete content of one daemon port's chain.

    Attributes:
      to_port: the daemon's listening port, where connections are redirected to.
      ports: the mapped service ports, whose connections are redirected. Duplicates are
        dropped, order is kept. May be empty (the chain then redirects nothing).
      dests: destination addresses to redirect. Empty means "any local address of this
        host" (``-m addrtype --dst-type LOCAL``); otherwise only these addresses, each in
        the rules of its own family.
      mark: the fwmark of the daemon's own upstream sockets, never redirected. Not 0: an
        unmarked packet has mark 0, so 0 would exempt everything.
      families: which of IPv4 (4) and IPv6 (6) get rules.
      from_interfaces: interfaces (this host's container bridges) whose arriving
        connections are redirected (nat PREROUTING). Host processes (nat OUTPUT) always are.
      allow_from: ``(network, port)`` pairs: connections arriving from ``network`` (any
        interface, another host too) are redirected, to ``port`` only or, with ``None``,
        to every mapped port. ``0.0.0.0/0`` and ``::/0`` open to everyone.
      bridge_ports: ports redirected only for connections arriving on ``from_interfaces``:
        the ports that only containers declare for themselves (``--docker``). A host
        process that connects to such a port reaches whatever listens there, as before.
        Ports also in ``ports`` are dropped from here; with ``bridge_all``, all are.
      bridge_all: redirect every TCP port for connections arriving on ``from_interfaces``
        to this host (``--docker``'s default): a container's first connection reaches the
        daemon even before Docker told it what the container declares; the daemon passes
        on what no route takes (server.py, passthrough). ``bridge_ports`` is then dropped.

    Raises:
      ValueError: a port, mark or family is out of range, a dest is not an
        :class:`ipaddress.IPv4Address` / :class:`ipaddress.IPv6Address`, an interface name
        is not one, or an allow_from entry is not (network, port or None). The message
        quotes it.
    """

    to_port: int
    ports: tuple[int, ...]
    dests: tuple[Address, ...] = ()
    mark: int = DEFAULT_MARK
    families: tuple[int, ...] = _FAMILIES
    from_interfaces: tuple[str, ...] = ()
    allow_from: tuple[tuple[Network, int | None], ...] = ()
    bridge_ports: tuple[int, ...] = ()
    bridge_all: bool = False

    def __post_init__(self) -> None:
        _check_port(self.to_port, "to_port")
        ports = tuple(dict.fromkeys(self.ports))
        for port in ports:
            _check_port(port, "mapped port")
        # Every port from the bridges takes in the declared ones: a plan says it once.
        bridge_ports = () if self.bridge_all else tuple(p for p in dict.fromkeys(self.bridge_ports) if p not in ports)
        for port in bridge_ports:
            _check_port(port, "container port")
        dests = tuple(dict.fromkeys(self.dests))
        for dest in dests:
            if not isinstance(dest, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise ValueError(f"dest {dest!r} is not an IPv4Address or IPv6Address")
        if isinstance(self.mark, bool) or not isinstance(self.mark, int) or not 0 < self.mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {self.mark!r} is not in 1..0xffffffff")
        families = _check_families(self.families)
        interfaces = tuple(dict.fromkeys(self.from_interfaces))
        for name in interfaces:
            if not isinstance(name, str) or not _IFNAME.match(name):
                raise ValueError(f"interface name {name!r} is not a network interface name")
        allow = tuple(dict.fromkeys(tuple(a) for a in self.allow_from))
        for entry in allow:
            if (len(entry) != 2 or not isinstance(entry[0], (ipaddress.IPv4Network, ipaddress.IPv6Network))
                    or not (entry[1] is None or isinstance(entry[1], int))):
                raise ValueError(f"allow_from entry {entry!r} is not (IPv4Network or IPv6Network, port or None)")
            if entry[1] is not None:
                _check_port(entry[1], "allow_from port")
        # Frozen, so normalised values go in through object.__setattr__; lists given by a
        # caller become tuples, which keeps the plan hashable.
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "bridge_ports", bridge_ports)
        object.__setattr__(self, "dests", dests)
        object.__setattr__(self, "families", families)
        object.__setattr__(self, "from_interfaces", interfaces)
        object.__setattr__(self, "allow_from", allow)


def chain_name(to_port: int) -> str:
    """The nat chain of the daemon listening on ``to_port``: ``AMBASSADORD-<to_port>``.

    One chain per daemon port, so that two daemons on different ports never touch each
    other's rules.

    Raises:
      ValueError: ``to_port`` is not in 1..65535.
    """
    _check_port(to_port, "to_port")
    return f"{_CHAIN_PREFIX}{to_port}"


def in_chain_name(to_port: int) -> str:
    """The chain that nat PREROUTING jumps to: who, of the connections arriving from
    elsewhere, may be redirected (``AMBASSADORD-<to_port>-IN``)."""
    return f"{chain_name(to_port)}-IN"


def _hook_targets(to_port: int) -> dict[str, str]:
    """Which of our chains each built-in hook jumps to."""
    return {"OUTPUT": chain_name(to_port), "PREROUTING": in_chain_name(to_port)}


def render_install(plan: RedirectPlan, family: int, existing_jumps: set[str],
                   stale_jumps: Sequence[tuple[str, str]] = ()) -> str:
    """The ``iptables-restore --noflush`` input that installs ``plan`` for one family.

    Pure: no I/O. The ``:CHAIN`` declarations create the chains or flush existing ones,
    so they end up holding exactly this plan's rules (flushing and re-adding in one
    transaction keeps established redirected connections working: see the module's
    docstring). Jumps are inserted at the top of OUTPUT / PREROUTING, because the mapped
    ports belong to ambassadord: a rule earlier in the hook that DNATs or accepts them
    would otherwise take them silently.

    Args:
      plan: what to redirect.
      family: 4 (``iptables-restore``) or 6 (``ip6tables-restore``).
      existing_jumps: which of ``"OUTPUT"``, ``"PREROUTING"`` already jump to the right
        chain (those are not added again).
      stale_jumps: ``(hook, chain)`` jumps of ours that the plan does not want (an older
        layout's), deleted in the same transaction.

    Returns:
      The restore input, one ``*nat`` table ending in ``COMMIT``, newline-terminated.

    Raises:
      ValueError: ``family`` is not 4 or 6, or ``existing_jumps`` names another chain.
    """
    _check_family(family)
    _check_hooks(existing_jumps)
    chain = chain_name(plan.to_port)
    in_chain = in_chain_name(plan.to_port)
    to = plan.to_port
    lines = ["*nat", *(f"-D {hook} {_jump_spec(target)}" for hook, target in stale_jumps),
             f":{chain} - [0:0]", f":{in_chain} - [0:0]",
             f"-A {chain} -m mark --mark {plan.mark:#x} -j RETURN",
             # The anchor: never matches (marked packets returned just above); it is there
             # so that the namespace never loses its last REDIRECT rule while we run.
             f"-A {chain} -p tcp -m mark --mark {plan.mark:#x} -j REDIRECT --to-ports {to}"]
    if plan.dests:
        dests = [d for d in plan.dests if d.version == family]
        for port in plan.ports:
            for dest in dests:
                lines.append(f"-A {chain} -d {dest} -p tcp --dport {port} -j REDIRECT --to-ports {to}")
    else:
        for port in plan.ports:
            lines.append(
                f"-A {chain} -p tcp --dport {port} -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {to}"
            )
    for name in plan.from_interfaces:
        for port in (None,) if plan.bridge_all else plan.bridge_ports:
            only = f" --dport {port}" if port is not None else ""
            if plan.dests:
                lines += [f"-A {in_chain} -i {name} -d {dest} -p tcp{only} -j REDIRECT --to-ports {to}"
                          for dest in plan.dests if dest.version == family]
            else:
                lines.append(f"-A {in_chain} -i {name} -p tcp{only} -m addrtype --dst-type LOCAL "
                             f"-j REDIRECT --to-ports {to}")
        lines.append(f"-A {in_chain} -i {name} -j {chain}")
    for network, port in plan.allow_from:
        if network.version != family:
            continue
        only = f" -p tcp --dport {port}" if port is not None else ""
        lines.append(f"-A {in_chain} -s {network}{only} -j {chain}")
    for hook, target in _hook_targets(plan.to_port).items():
        if hook not in existing_jumps:
            lines.append(f"-I {hook} {_jump_spec(target)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(to_port: int, state: NatState, *, jumps_only: bool = False) -> str:
    """The ``iptables-restore --noflush`` input that removes a daemon port's rules.

    Pure: no I/O. Jumps go first (a chain that is referenced cannot be deleted), then the
    chains are flushed (by declaring them) and deleted, the ``-IN`` chain (which refers to
    the main one) first.

    Args:
      to_port: the daemon port whose rules go.
      state: what of ours is in the nat table now (:func:`_parse_nat_listing`).
      jumps_only: remove only the jumps from the built-in hooks: no new connection is
        redirected, while established ones keep their translation (the chains and their
        REDIRECT rules stay). The first step of a graceful stop.

    Returns:
      The restore input, or ``""`` when there is nothing to remove (the caller then runs
      nothing).

    Raises:
      ValueError: ``to_port`` is out of range, or ``state`` names another hook.
    """
    _check_hooks(state.jumps)
    targets = _hook_targets(to_port)
    lines = [f"-D {hook} {_jump_spec(targets[hook])}" for hook in _HOOKS if hook in state.jumps]
    lines += [f"-D {hook} {_jump_spec(target)}" for hook, target in state.stale_jumps]
    if not jumps_only:
        for chain in (in_chain_name(to_port), chain_name(to_port)):
            if chain in state.chains:
                lines += [f":{chain} - [0:0]", f"-X {chain}"]
    if not lines:
        return ""
    return "\n".join(["*nat", *lines, "COMMIT"]) + "\n"


def install(plan: RedirectPlan, *, previous: RedirectPlan | None = None, netns: str | None = None) -> None:
    """Install (or replace) the redirect rules of ``plan``, for each of its families.

    Idempotent: installing the same plan twice leaves each rule once; installing another
    plan for the same ``to_port`` replaces the chain's content.

    Args:
      plan: what to redirect.
      previous: the plan installed now, if any (a reload): what a family that this call
        already changed goes back to if a later family fails.
      netns: run the tools in this named network namespace (``ip netns exec``) instead
        of the current one. For tests, and for daemons that serve a namespace.

    Error handling:
      Each family is one atomic transaction: a family that fails keeps whatever it had
      before. If a later family fails, the families that this call already installed are
      removed again (best effort), so that a daemon that cannot start does not leave
      rules behind that send connections to a port nobody listens on. With ``previous``
      (a daemon that is running and changes its ports), they are put back to ``previous``
      instead, so a failed change changes nothing.

    Raises:
      NetfilterError: tools missing, no CAP_NET_ADMIN (see :func:`check_available`), or a
        tool failed; the message names the command, family and the tool's stderr.
    """
    check_available(plan.families)
    chain = chain_name(plan.to_port)
    done: list[int] = []
    for family in plan.families:
        try:
            state = _nat_state(family, plan.to_port, netns)
            _restore(family, render_install(plan, family, state.jumps, state.stale_jumps), netns)
        except NetfilterError as exc:
            undo_failures = []
            for installed in done:
                try:
                    if previous is not None:
                        back = _nat_state(installed, plan.to_port, netns)
                        _restore(installed, render_install(previous, installed, back.jumps, back.stale_jumps), netns)
                    else:
                        _remove_family(plan.to_port, installed, netns)
                except NetfilterError as undo_exc:
                    undo_failures.append(str(undo_exc))
            message = f"installing the IPv{family} redirect rules (chain {chain}) failed: {exc}"
            if undo_failures:
                message += f"; undoing the other families failed too: {'; '.join(undo_failures)}"
            elif done:
                undone = "put back as they were" if previous is not None else "removed again"
                message += f"; the IPv{' and IPv'.join(map(str, done))} rules were {undone}"
            raise NetfilterError(message) from exc
        done.append(family)


def remove(to_port: int, families: tuple[int, ...] = _FAMILIES, *, netns: str | None = None,
           if_unused: bool = False) -> None:
    """Remove the redirect rules of daemon port ``to_port``: jumps, then the chains.

    Leaves no trace, and is a no-op (no error) when nothing is installed. Each family is
    one atomic transaction; all families are attempted even when one fails, since this
    runs on the way out. Connections that were redirected and are still open break at
    their next packet if this removes the namespace's last REDIRECT rule (see the
    module's docstring): a graceful stop calls :func:`remove_jumps` first and this only
    once they are over.

    Args:
      to_port: the daemon port whose rules go.
      families: which of IPv4 (4) and IPv6 (6) to clean up.
      netns: as for :func:`install`.
      if_unused: leave a family's rules alone if a jump leads to them: after
        :func:`remove_jumps`, that means another daemon on the same port installed them
        again meanwhile (a restart that did not wait for the old one), and they are its.

    Raises:
      NetfilterError: tools missing, no CAP_NET_ADMIN, a tool failed, or a rule that
        ambassadord did not install still refers to a chain (the message quotes it).
        With several failing families, the message has one part per family.
    """
    _each_family(to_port, families, netns, jumps_only=False, if_unused=if_unused)


def remove_jumps(to_port: int, families: tuple[int, ...] = _FAMILIES, *, netns: str | None = None) -> None:
    """Stop redirecting new connections to ``to_port``, and only that: the jumps from
    OUTPUT and PREROUTING go, the chains stay, so connections already redirected keep
    their translation until :func:`remove` (see the module's docstring). Idempotent.

    Raises:
      NetfilterError: as :func:`remove`.
    """
    _each_family(to_port, families, netns, jumps_only=True)


def _each_family(to_port: int, families: tuple[int, ...], netns: str | None, *, jumps_only: bool,
                 if_unused: bool = False) -> None:
    chain_name(to_port)  # ValueError for a bad port before anything runs
    families = _check_families(families)
    check_available(families)
    failures = []
    for family in families:
        try:
            _remove_family(to_port, family, netns, jumps_only=jumps_only, if_unused=if_unused)
        except NetfilterError as exc:
            failures.append(str(exc))
    if failures:
        raise NetfilterError("; ".join(failures))


def interface_addresses(names: Sequence[str], *, netns: str | None = None) -> list[Address]:
    """The addresses of network interfaces, e.g. for ``--interface docker0``.

    IPv6 link-local addresses (fe80::/10) are skipped: they need a scope (an interface)
    to be reached, and a consumer that dials one is never what a REDIRECT rule is for.
    IPv4 link-local (169.254/16) is kept, since that is what a dummy "ambassador address"
    interface may carry. An interface without addresses contributes nothing; whether that
    deserves a warning is the caller's call.

    Args:
      names: interface names (a single string is taken as one name, not as letters).
      netns: look in this named network namespace instead of the current one.

    Returns:
      The addresses, interfaces in the order given, each interface's in kernel order,
      without duplicates.

    Raises:
      NetfilterError: an interface (or the namespace) does not exist, or netlink failed;
        the message names it.
    """
    # Imported here, not at the top: pyroute2 is sizeable, and the pure renderers above
    # (and their tests) do not need it.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if isinstance(names, str):
        names = [names]
    where = f" in network namespace {netns}" if netns else ""
    found: dict[Address, None] = {}
    try:
        # flags=0: without it pyroute2 *creates* a namespace that does not exist (O_CREAT).
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except OSError as exc:
        raise NetfilterError(f"cannot open netlink{where}: {exc}") from exc
    with ipr:
        for name in names:
            try:
                indexes = ipr.link_lookup(ifname=name)
                if not indexes:
                    raise NetfilterError(f"network interface {name!r} does not exist{where}")
                messages = ipr.get_addr(index=indexes[0])
            except (NetlinkError, OSError) as exc:
                raise NetfilterError(f"cannot read the addresses of interface {name!r}{where}: {exc}") from exc
            for msg in messages:
                # On a point-to-point link IFA_ADDRESS is the peer and IFA_LOCAL ours;
                # otherwise IPv4 has both equal and IPv6 has only IFA_ADDRESS.
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if text is None:
                    continue
                addr = ipaddress.ip_address(text)
                if addr.version == 6 and addr.is_link_local:
                    continue
                found[addr] = None
    return list(found)


def container_bridges(*, netns: str | None = None) -> list[str]:
    """The interfaces of this host's container bridges: bridges (docker0, Docker's
    user-defined ``br-*`` networks, a CNI's ``cni0``) all of whose ports are veth pairs,
    whose far ends therefore live on this host. A bridge with any other port (a physical
    NIC, a bond, a VLAN, a VXLAN tunnel, a VM's tap) reaches other hosts and is left out,
    as are names that are not plain interface names. A bridge with no port yet counts
    (Docker makes docker0 before its first container).

    Args:
      netns: look in this named network namespace instead of the current one.

    Raises:
      NetfilterError: netlink failed; the message names the namespace.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    where = f" in network namespace {netns}" if netns else ""
    try:
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    except OSError as exc:
        raise NetfilterError(f"cannot open netlink{where}: {exc}") from exc
    with ipr:
        try:
            links = ipr.get_links()
        except (NetlinkError, OSError) as exc:
            raise NetfilterError(f"cannot list network interfaces{where}: {exc}") from exc
    kinds: dict[int, str | None] = {}
    names: dict[int, str] = {}
    masters: dict[int, int] = {}
    for msg in links:
        index = msg["index"]
        names[index] = msg.get_attr("IFLA_IFNAME") or ""
        info = msg.get_attr("IFLA_LINKINFO")
        kinds[index] = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        master = msg.get_attr("IFLA_MASTER")
        if master:
            masters[index] = master
    bridges = []
    for index, kind in kinds.items():
        if kind != "bridge" or not _IFNAME.match(names[index]):
            continue
        ports = [port for port, master in masters.items() if master == index]
        if all(kinds.get(port) == "veth" for port in ports):
            bridges.append(names[index])
    return sorted(bridges)


def check_available(families: tuple[int, ...] = _FAMILIES) -> None:
    """Fail early and clearly when the rules cannot be managed at all.

    Checks that the listing and restore tools of each family are on ``PATH`` and that the
    process has CAP_NET_ADMIN in its effective set (``CapEff`` in ``/proc/self/status``).
    It does not check that the kernel supports a family: only running the tool tells.

    Args:
      families: which of IPv4 (4) and IPv6 (6) will be used.

    Raises:
      NetfilterError: a tool is missing (names it and the Debian package ``iptables``) or
        CAP_NET_ADMIN is missing.
    """
    families = _check_families(families)
    missing = [tool for family in families for tool in _TOOLS[family] if shutil.which(tool) is None]
    if missing:
        raise NetfilterError(
            f"{', '.join(missing)} not found on PATH: install Debian package iptables "
            "(ambassadord needs it to redirect connections to its port)"
        )
    cap_eff = _effective_capabilities()
    if cap_eff is not None and not cap_eff >> _CAP_NET_ADMIN & 1:
        raise NetfilterError(
            "missing capability CAP_NET_ADMIN, needed to change iptables rules: run as root, "
            "or give the container NET_ADMIN (docker run --cap-add NET_ADMIN --net=host)"
        )


# ---------------------------------------------------------------------------------------
# Internals


@dataclass(frozen=True)
class NatState:
    """What of one daemon port's rules is in a family's nat table (read by _nat_state)."""

    chains: set[str]  # which of our chains exist
    jumps: set[str]  # which of _HOOKS hold our exact jump rule to the chain they should
    stale_jumps: list[tuple[str, str]] = field(default_factory=list)  # (hook, chain): ours, not wanted
    duplicate_jumps: list[str] = field(default_factory=list)  # a hook once per extra copy of our jump
    foreign: list[str] = field(default_factory=list)  # other rules that refer to our chains


def _remove_family(to_port: int, family: int, netns: str | None, *, jumps_only: bool = False,
                   if_unused: bool = False) -> None:
    state = _nat_state(family, to_port, netns)
    if if_unused and state.jumps:
        return
    if state.foreign and not jumps_only:
        # iptables-nft would only say "line N failed"; say which rule is in the way.
        raise NetfilterError(
            f"cannot delete IPv{family} chain {chain_name(to_port)}: rules not installed by ambassadord "
            f"refer to it: {' | '.join(state.foreign)}; delete those first"
        )
    text = render_remove(to_port, state, jumps_only=jumps_only)
    if state.duplicate_jumps:
        # Two installs racing between listing and restore can each add a jump. The extra
        # copies are ours too, and the chain cannot be deleted while they refer to it:
        # delete them in the same transaction.
        targets = _hook_targets(to_port)
        extra = "".join(f"-D {hook} {_jump_spec(targets[hook])}\n" for hook in state.duplicate_jumps)
        text = text.replace("*nat\n", "*nat\n" + extra, 1)
    if text:
        _restore(family, text, netns)


def _nat_state(family: int, to_port: int, netns: str | None) -> NatState:
    """Read what of ours is in the nat table, from ``iptables -t nat -S``."""
    listing = _run([_TOOLS[family][0], "-w", "-t", "nat", "-S"], netns=netns)
    return _parse_nat_listing(listing, to_port)


def redirects_to(to_port: int, netns: str | None = None) -> bool | None:
    """Does some IPv4 nat rule (ours or anybody's) send connections to local port
    ``to_port`` (REDIRECT, or DNAT to an address and that port)? None when the table cannot
    be read (no iptables, no permission): then nobody can tell."""
    try:
        listing = _run([_TOOLS[4][0], "-w", "-t", "nat", "-S"], netns=netns)
    except NetfilterError:
        return None
    return redirects_in(listing, to_port)


def redirects_in(listing: str, to_port: int) -> bool:
    """:func:`redirects_to` on an ``iptables -t nat -S`` listing. Pure."""
    for line in listing.splitlines():
        words = line.split()
        for flag, value in zip(words, words[1:]):
            if flag == "--to-ports" and str(to_port) in _port_range(value):
                return True
            if flag == "--to-destination" and value.rpartition(":")[2].split("-")[0] == str(to_port):
                return True
    return False


def _port_range(text: str) -> set[str]:
    low, _, high = text.partition("-")
    if low.isdigit() and high.isdigit():
        return {str(p) for p in range(int(low), int(high) + 1)}
    return {low}


def _parse_nat_listing(listing: str, to_port: int) -> NatState:
    # -S prints rules in the canonical form iptables-save uses, so our own jump reads
    # back exactly as "-A OUTPUT -p tcp -j CHAIN".
    targets = _hook_targets(to_port)
    ours = set(targets.values())
    chains: set[str] = set()
    jumps: set[str] = set()
    stale: list[tuple[str, str]] = []
    duplicates: list[str] = []
    foreign: list[str] = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "-N" and words[1] in ours:
            chains.add(words[1])
        elif len(words) >= 2 and words[0] == "-A" and words[1] not in ours:
            hook, rest = words[1], " ".join(words[2:])
            target = next((c for c in ours if rest == _jump_spec(c)), None)
            if hook in _HOOKS and target is not None:
                if target != targets[hook]:
                    stale.append((hook, target))  # an older layout's jump (PREROUTING -> main chain)
                elif hook in jumps:
                    duplicates.append(hook)
                else:
                    jumps.add(hook)
            elif any(_refers_to(words, c) for c in ours):
                foreign.append(line)
    return NatState(chains=chains, jumps=jumps, stale_jumps=stale, duplicate_jumps=duplicates, foreign=foreign)


def _refers_to(words: list[str], chain: str) -> bool:
    return any(w in ("-j", "-g", "--jump", "--goto") and nxt == chain for w, nxt in zip(words, words[1:]))


def _jump_spec(chain: str) -> str:
    return f"-p tcp -j {chain}"


def _restore(family: int, text: str, netns: str | None) -> None:
    # --noflush: touch only what the input names. -w: wait for the xtables lock (legacy
    # backend) instead of failing when another tool holds it.
    _run([_TOOLS[family][1], "-w", "--noflush"], input=text, netns=netns)


# The restore tools name the failing input line in one of these forms (iptables 1.8.9):
#   "Error occurred at line: 3"  (parse error)   "line 2: CHAIN_DEL failed (...)"  (nft
#   commit)   "iptables-restore: line 2 failed: Bad rule (...)"  (legacy / -D)
_FAILED_LINE = re.compile(r"\bline:? (\d+)")


def _run(cmd: list[str], *, input: str | None = None, netns: str | None = None) -> str:
    """Run a tool; return its stdout; any failure becomes a NetfilterError naming it."""
    full = ["ip", "netns", "exec", netns, *cmd] if netns else cmd
    shown = " ".join(full)
    try:
        proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=_TIMEOUT)
    except FileNotFoundError as exc:
        raise NetfilterError(f"{shown}: {full[0]} not found (install Debian package iptables)") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetfilterError(f"{shown}: no answer within {_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise NetfilterError(f"{shown}: {exc}") from exc
    if proc.returncode != 0:
        message = f"{shown} exited with status {proc.returncode}: {proc.stderr.strip() or '(no output)'}"
        # The tools report the failing input line by number only; quote it.
        match = _FAILED_LINE.search(proc.stderr)
        if input is not None and match:
            lines = input.splitlines()
            number = int(match.group(1))
            if 0 < number <= len(lines):
                message += f" (line {number}: {lines[number - 1]!r})"
        raise NetfilterError(message)
    return proc.stdout


def _effective_capabilities() -> int | None:
    """CapEff of this process, or None when /proc does not say (then iptables will)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a TCP port (1..65535)")


def _check_family(family: object) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"address family {family!r} is not 4 or 6")


def _check_families(families: Iterable[int]) -> tuple[int, ...]:
    result = tuple(dict.fromkeys(families))
    if not result:
        raise ValueError("families is empty: give 4, 6 or both")
    for family in result:
        _check_family(family)
    return result


def _check_hooks(hooks: set[str]) -> None:
    unknown = set(hooks) - set(_HOOKS)
    if unknown:
        raise ValueError(f"existing_jumps {sorted(unknown)!r}: only OUTPUT and PREROUTING jump to the chain")
