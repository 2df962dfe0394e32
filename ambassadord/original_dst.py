"""Where a redirected connection was going: ``SO_ORIGINAL_DST`` on Linux.

An iptables ``REDIRECT`` rule (see :mod:`ambassadord.netfilter`) rewrites the destination
of a consumer's connection to ambassadord's one listening port. Connection tracking keeps
the original tuple, and ``getsockopt(SO_ORIGINAL_DST)`` on the accepted socket reads its
destination back. This module is the only place that knows how; the server hands the
result to the pure routing core as plain data, in the style of mitmproxy's platform
modules.

What the kernel answers depends on conntrack, not on whether *this* connection matched a
rule (checked on Debian 12, kernel 6.x, iptables-nft; see tests/test_original_dst.py):

* Until some rule in the network namespace needs conntrack for the address family, it
  tracks nothing and the call fails with ``ENOENT`` (``ENOPROTOOPT`` when no conntrack
  module registered the option at all): :func:`original_destination` returns ``None``.
  A NAT target (``REDIRECT``, ``DNAT``) or a ``-m conntrack`` match turns tracking on; a
  nat chain holding only ``RETURN`` rules does not.
* Once tracking is on, every connection is tracked, and one that was *not* redirected
  reads back its own local address and port (a direct connection to a listener on
  127.0.0.1:10000 reads back ``("127.0.0.1", 10000)``). So a result whose port is the
  listen port means the connection was meant for that port, redirected or not, and it is
  routed by that port: ``server.intended_port()`` needs no ``getsockname()``. With
  ambassadord's own REDIRECT rules loaded, this is the case that happens.
"""

from __future__ import annotations

import errno
import socket
import struct

__all__ = ["SO_ORIGINAL_DST", "IP6T_SO_ORIGINAL_DST", "original_destination"]

# From <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>; the stdlib
# socket module exports neither. Both are 80, at different levels (SOL_IP / SOL_IPV6).
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

# The kernel fills a struct sockaddr_in (16 bytes) or struct sockaddr_in6 (28 bytes).
# sin_family is in host byte order and known already, so it is skipped; the port and the
# address are in network byte order. Precompiled because this runs once per accepted
# connection: unpack_from then allocates nothing but the result.
#   sockaddr_in:  family(2) port(2) addr(4) zero(8)
#   sockaddr_in6: family(2) port(2) flowinfo(4) addr(16) scope_id(4)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")

# errnos that mean "conntrack has no original destination for this socket", which is an
# answer, not a failure:
#   ENOENT      no conntrack entry for the socket's tuple: nothing in this namespace
#               turned tracking on, or (on an AF_INET6 socket) the IPv6 table was asked
#               about an IPv4 connection;
#   ENOPROTOOPT no conntrack module registered SO_ORIGINAL_DST for this family (module
#               not loaded, IPv6 disabled), or the socket is not TCP/SCTP.
# Anything else (EBADF on a closed socket, ENOTSOCK, EINVAL for a buffer the kernel finds
# too short) is a bug in the caller and propagates.
_NO_ANSWER = frozenset({errno.ENOENT, errno.ENOPROTOOPT})

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_SOL_IP = socket.SOL_IP
_SOL_IPV6 = socket.IPPROTO_IPV6
_inet_ntoa = socket.inet_ntoa
_inet_ntop = socket.inet_ntop


def original_destination(sock) -> tuple[str, int] | None:
    """The destination a connection had before a nat ``REDIRECT`` rewrote it.

    Args:
      sock: an accepted TCP socket: anything with ``.family`` and
        ``.getsockopt(level, option, buflen)``, e.g. a stdlib :class:`socket.socket` or a
        :mod:`trio.socket` socket. The call does not block.

    Returns:
      ``(ip, port)`` with ``ip`` as a string (``"127.0.0.1"``, ``"::1"``), or ``None`` when
      the kernel has no answer (conntrack does not track the connection). On an
      ``AF_INET6`` socket carrying IPv4 (a dual-stack listener), the IPv4 answer is given in
      IPv4-mapped form (``"::ffff:127.0.0.1"``), the form ``getsockname()`` uses, so that
      "result equals own local address" keeps meaning "not redirected".

      Note that once conntrack is on (any REDIRECT rule turns it on), a connection that
      was not redirected returns its own local address rather than ``None``; see the
      module docstring.

    Raises:
      OSError: for errnos other than ``ENOENT`` and ``ENOPROTOOPT``, e.g. ``EBADF``
        (socket closed) or ``ENOTSOCK``.
      ValueError: ``sock.family`` is neither ``AF_INET`` nor ``AF_INET6``.
    """
    family = sock.family
    if family == _AF_INET:
        try:
            raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        except OSError as exc:
            if exc.errno in _NO_ANSWER:
                return None
            raise
        port, addr = _SOCKADDR_IN.unpack_from(raw)
        return _inet_ntoa(addr), port
    if family == _AF_INET6:
        try:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        except OSError as exc:
            if exc.errno not in _NO_ANSWER:
                raise
        else:
            port, addr = _SOCKADDR_IN6.unpack_from(raw)
            return _inet_ntop(_AF_INET6, addr), port
        # A dual-stack AF_INET6 socket may carry an IPv4 connection (local address
        # ::ffff:a.b.c.d). Its conntrack entry is an IPv4 one, which only the SOL_IP query
        # finds (the kernel answers it from the socket's IPv4 fields). Asking only after the
        # IPv6 query came back empty keeps the common cases at one syscall, and spares a
        # getsockname() that mitmproxy's heuristic needs. On a pure IPv6 socket this second
        # query finds nothing and fails with ENOENT as well.
        try:
            raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        except OSError as exc:
            if exc.errno in _NO_ANSWER:
                return None
            raise
        port, addr = _SOCKADDR_IN.unpack_from(raw)
        return "::ffff:" + _inet_ntoa(addr), port
    raise ValueError(f"original_destination: not an IPv4/IPv6 socket (family {family!r})")
