"""Routes limited to a source network, in connect mode: which network namespaces they cover.

At connect() the consumer's source address is not chosen yet, so the kernel cannot match
it against a route's ``source`` as the proxy does. What it knows is the consumer's network
namespace (its cookie). So the daemon looks at the host's network namespaces (those that
some process is in: containers, pods) and their addresses, and writes a route limited to
``172.18.0.0/16`` once for each namespace with an address in that network, keyed by the
namespace's cookie; the kernel prefers such a route to the host-wide one (connect.bpf.c).

The daemon's own namespace is not scoped: its processes' loopback connects come from
127.0.0.1, and the host's own addresses (172.17.0.1 on docker0, say) would otherwise make
every host process a member of the containers' network.

:func:`assign` is the pure part (table-tested); :func:`scan` reads the namespaces (I/O:
/proc, setns in a thread of its own, netlink). The daemon calls scan() every second, so a
namespace made after start is covered about a second later; until then its connects take
the host-wide route of the port, if any, else pass untouched.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping

from .cgroup import in_netns, netns_cookie


def assign(namespaces: Mapping[int, Iterable], routes: Iterable) -> dict:
    """``{route key: {netns cookie, ...}}`` for every route key ``(port, source network)``
    whose source is not None: the namespaces (``{cookie: addresses}``) with an address in
    it, each namespace only in the most specific matching route of each port (as the
    proxy's table picks the longest prefix)."""
    scoped = [key for key in routes if key[1] is not None]
    out: dict = {key: set() for key in scoped}
    for cookie, addrs in namespaces.items():
        addrs = [ipaddress.ip_address(a) for a in addrs]
        best: dict[int, tuple] = {}
        for key in scoped:
            port, net = key
            if any(a.version == net.version and a in net for a in addrs):
                if port not in best or net.prefixlen > best[port][1].prefixlen:
                    best[port] = key
        for key in best.values():
            out[key].add(cookie)
    return out


def scan(skip_cookie: int | None = None, denied: list | None = None) -> dict[int, list[str]]:
    """``{netns cookie: [addresses]}`` of the network namespaces some process is in,
    without ``skip_cookie`` (the daemon's own). Link-local and loopback addresses are left
    out. A namespace that vanishes meanwhile is skipped; one this process may not enter
    (setns needs CAP_SYS_ADMIN) is skipped and its error appended to ``denied``."""
    from pyroute2.netlink.exceptions import NetlinkError

    seen: set[tuple[int, int]] = set()
    found: dict[int, list[str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        path = f"/proc/{pid}/ns/net"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            result = in_netns(path, lambda: (netns_cookie(), _addresses()))
        except (OSError, NetlinkError) as exc:  # gone meanwhile, or not ours to enter
            if denied is not None and isinstance(exc, PermissionError):
                denied.append(exc)
            continue
        if result[0] != skip_cookie:
            found[result[0]] = result[1]
    return found


def _addresses() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addrs = [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr()]
    keep = []
    for a in addrs:
        if not a:
            continue
        ip = ipaddress.ip_address(a.split("%")[0])
        if not (ip.is_loopback or ip.is_link_local):
            keep.append(str(ip))
    return keep

