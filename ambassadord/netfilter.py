"""The iptables rules that send consumers' connections to ambassadord's one port.

A consumer connects to an ordinary local address and a service's usual port
(``127.0.0.1:6379``, or ``172.17.0.1:6379`` from a bridged container). A nat ``REDIRECT``
rule rewrites that destination to the daemon's listening port, and the daemon reads the
original back with :func:`ambassadord.original_dst.original_destination`.

Layout, per daemon port ``TO`` and per address family::

    nat OUTPUT      -p tcp -j AMBASSADORD-TO     host processes, --net=host containers
    nat PREROUTING  -p tcp -j AMBASSADORD-TO     containers on a bridge
    AMBASSADORD-TO:
      -m mark --mark MARK -j RETURN              the daemon's own upstream connections
      -p tcp --dport P -m addrtype --dst-type LOCAL -j REDIRECT --to-ports TO
                                                 (one per mapped port P), or with dests:
      -d ADDR -p tcp --dport P -j REDIRECT --to-ports TO
                                                 (one per mapped port P and dest ADDR)

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
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MARK",
    "NetfilterError",
    "RedirectPlan",
    "chain_name",
    "check_available",
    "install",
    "interface_addresses",
    "remove",
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

    Raises:
      ValueError: a port, mark or family is out of range, or a dest is not an
        :class:`ipaddress.IPv4Address` / :class:`ipaddress.IPv6Address`. The message quotes it.
    """

    to_port: int
    ports: tuple[int, ...]
    dests: tuple[Address, ...] = ()
    mark: int = DEFAULT_MARK
    families: tuple[int, ...] = _FAMILIES

    def __post_init__(self) -> None:
        _check_port(self.to_port, "to_port")
        ports = tuple(dict.fromkeys(self.ports))
        for port in ports:
            _check_port(port, "mapped port")
        dests = tuple(dict.fromkeys(self.dests))
        for dest in dests:
            if not isinstance(dest, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise ValueError(f"dest {dest!r} is not an IPv4Address or IPv6Address")
        if isinstance(self.mark, bool) or not isinstance(self.mark, int) or not 0 < self.mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {self.mark!r} is not in 1..0xffffffff")
        families = _check_families(self.families)
        # Frozen, so normalised values go in through object.__setattr__; lists given by a
        # caller become tuples, which keeps the plan hashable.
        object.__setattr__(self, "ports", ports)
        object.__setattr__(self, "dests", dests)
        object.__setattr__(self, "families", families)


def chain_name(to_port: int) -> str:
    """The nat chain of the daemon listening on ``to_port``: ``AMBASSADORD-<to_port>``.

    One chain per daemon port, so that two daemons on different ports never touch each
    other's rules.

    Raises:
      ValueError: ``to_port`` is not in 1..65535.
    """
    _check_port(to_port, "to_port")
    return f"{_CHAIN_PREFIX}{to_port}"


def render_install(plan: RedirectPlan, family: int, existing_jumps: set[str]) -> str:
    """The ``iptables-restore --noflush`` input that installs ``plan`` for one family.

    Pure: no I/O. The ``:CHAIN`` declaration creates the chain or flushes an existing one,
    so the chain ends up holding exactly this plan's rules. Jumps are inserted at the top
    of OUTPUT / PREROUTING, because the mapped ports belong to ambassadord: a rule earlier
    in the hook that DNATs or accepts them would otherwise take them silently.

    Args:
      plan: what to redirect.
      family: 4 (``iptables-restore``) or 6 (``ip6tables-restore``).
      existing_jumps: which of ``"OUTPUT"``, ``"PREROUTING"`` already jump to the chain
        (those are not added again).

    Returns:
      The restore input, one ``*nat`` table ending in ``COMMIT``, newline-terminated.

    Raises:
      ValueError: ``family`` is not 4 or 6, or ``existing_jumps`` names another chain.
    """
    _check_family(family)
    _check_hooks(existing_jumps)
    chain = chain_name(plan.to_port)
    to = plan.to_port
    lines = ["*nat", f":{chain} - [0:0]", f"-A {chain} -m mark --mark {plan.mark:#x} -j RETURN"]
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
    for hook in _HOOKS:
        if hook not in existing_jumps:
            lines.append(f"-I {hook} {_jump_spec(chain)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_remove(to_port: int, existing_jumps: set[str], chain_exists: bool) -> str:
    """The ``iptables-restore --noflush`` input that removes a daemon port's rules.

    Pure: no I/O. Jumps go first (a chain that is referenced cannot be deleted), then the
    chain is flushed (by declaring it) and deleted.

    Args:
      to_port: the daemon port whose chain goes.
      existing_jumps: which of ``"OUTPUT"``, ``"PREROUTING"`` jump to the chain now.
      chain_exists: whether the chain exists now.

    Returns:
      The restore input, or ``""`` when there is nothing to remove (the caller then runs
      nothing).

    Raises:
      ValueError: ``to_port`` is out of range, or ``existing_jumps`` names another chain.
    """
    _check_hooks(existing_jumps)
    chain = chain_name(to_port)
    lines = [f"-D {hook} {_jump_spec(chain)}" for hook in _HOOKS if hook in existing_jumps]
    if chain_exists:
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
            state = _nat_state(family, chain, netns)
            _restore(family, render_install(plan, family, state.jumps), netns)
        except NetfilterError as exc:
            undo_failures = []
            for installed in done:
                try:
                    if previous is not None:
                        back = _nat_state(installed, chain, netns)
                        _restore(installed, render_install(previous, installed, back.jumps), netns)
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


def remove(to_port: int, families: tuple[int, ...] = _FAMILIES, *, netns: str | None = None) -> None:
    """Remove the redirect rules of daemon port ``to_port``: jumps, then the chain.

    Leaves no trace, and is a no-op (no error) when nothing is installed. Each family is
    one atomic transaction; all families are attempted even when one fails, since this
    runs on the way out.

    Args:
      to_port: the daemon port whose rules go.
      families: which of IPv4 (4) and IPv6 (6) to clean up.
      netns: as for :func:`install`.

    Raises:
      NetfilterError: tools missing, no CAP_NET_ADMIN, a tool failed, or a rule that
        ambassadord did not install still refers to the chain (the message quotes it).
        With several failing families, the message has one part per family.
    """
    chain_name(to_port)  # ValueError for a bad port before anything runs
    families = _check_families(families)
    check_available(families)
    failures = []
    for family in families:
        try:
            _remove_family(to_port, family, netns)
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
class _NatState:
    chain_exists: bool
    jumps: set[str]  # which of _HOOKS hold our exact jump rule
    duplicate_jumps: list[str]  # a hook once per extra copy of our jump (racing installs)
    foreign: list[str]  # other rules that refer to the chain (outside the chain itself)


def _remove_family(to_port: int, family: int, netns: str | None) -> None:
    chain = chain_name(to_port)
    state = _nat_state(family, chain, netns)
    if state.foreign:
        # iptables-nft would only say "line N failed"; say which rule is in the way.
        raise NetfilterError(
            f"cannot delete IPv{family} chain {chain}: rules not installed by ambassadord refer "
            f"to it: {' | '.join(state.foreign)}; delete those first"
        )
    text = render_remove(to_port, state.jumps, state.chain_exists)
    if state.duplicate_jumps:
        # Two installs racing between listing and restore can each add a jump. The extra
        # copies are ours too, and the chain cannot be deleted while they refer to it:
        # delete them in the same transaction.
        extra = "".join(f"-D {hook} {_jump_spec(chain)}\n" for hook in state.duplicate_jumps)
        text = text.replace("*nat\n", "*nat\n" + extra, 1)
    if text:
        _restore(family, text, netns)


def _nat_state(family: int, chain: str, netns: str | None) -> _NatState:
    """Read what of ours is in the nat table, from ``iptables -t nat -S``."""
    listing = _run([_TOOLS[family][0], "-w", "-t", "nat", "-S"], netns=netns)
    return _parse_nat_listing(listing, chain)


def _parse_nat_listing(listing: str, chain: str) -> _NatState:
    # -S prints rules in the canonical form iptables-save uses, so our own jump reads
    # back exactly as "-A OUTPUT -p tcp -j CHAIN".
    jumps: set[str] = set()
    duplicates: list[str] = []
    foreign: list[str] = []
    exists = False
    spec = _jump_spec(chain)
    for line in listing.splitlines():
        words = line.split()
        if words[:2] == ["-N", chain]:
            exists = True
        elif len(words) >= 2 and words[0] == "-A" and words[1] != chain:
            if " ".join(words[2:]) == spec and words[1] in _HOOKS:
                if words[1] in jumps:
                    duplicates.append(words[1])
                else:
                    jumps.add(words[1])
            elif _refers_to(words, chain):
                foreign.append(line)
    return _NatState(chain_exists=exists, jumps=jumps, duplicate_jumps=duplicates, foreign=foreign)


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
