"""Connect mode at the daemon's start: whether it is wanted, the plane, the addresses it catches.

daemon.py calls these; the plane itself (plane.py) knows nothing of settings or routes.
"""

from __future__ import annotations

import logging

from .. import netfilter

log = logging.getLogger("ambassadord")


class ConnectStartError(Exception):
    """Connect mode cannot start here; the message says why and what to do."""


def wanted(default_mode: str | None, configs) -> bool:
    """Does the daemon need the plane: ``--mode connect``, or a route in connect mode."""
    return default_mode == "connect" or any(c.mode == "connect" for c in configs)


def open_plane(cgroup: str | None):
    """The ConnectPlane, loaded and attached to ``cgroup`` (None: the cgroup2 root).
    Raises ConnectStartError."""
    from .cgroup import cgroup2_mount

    try:
        from .plane import ConnectPlane, ConnectPlaneError
    except OSError as exc:  # no libbpf
        raise ConnectStartError(f"cannot load libbpf: {exc}") from None
    if cgroup is None:
        try:
            cgroup = cgroup2_mount()
        except (OSError, LookupError) as exc:
            raise ConnectStartError(f"cannot find the cgroup v2 hierarchy ({exc}); give --cgroup DIR") from None
    try:
        return ConnectPlane(cgroup)
    except ConnectPlaneError as exc:
        reason = str(exc).removeprefix(f"connect mode on {cgroup}: ")
        raise ConnectStartError(f"--cgroup {cgroup}: {reason}") from None


def catch_addresses(dests=(), bridges=None) -> list[str]:
    """The addresses other namespaces' connects are rewritten for: the host's container
    bridges' (docker0 ...; ``bridges``, or listed now if None) and
    ``--iptables-dest``/``--iptables-interface``'s. Loopback is always caught, in the
    daemon's own namespace only (the plane's program checks it)."""
    found = [str(d) for d in dests]
    try:
        if bridges is None:
            bridges = netfilter.container_bridges()
        found += [str(a) for a in netfilter.interface_addresses(bridges)]
    except netfilter.NetfilterError as exc:
        log.warning("connect mode: cannot list the container bridges' addresses: %s", exc)
    return sorted(set(found))
