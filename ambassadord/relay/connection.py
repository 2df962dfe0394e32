"""Relay one connection: the entry point the proxy calls, which picks the kernel or user space."""

from __future__ import annotations

import errno
import logging
import socket

from .contract import RelayResult, pass_reset
from .kernel import KernelRelay
from .sockmap import SockmapError
from .user import relay_user

_sockmap_warned = False


async def relay(
    client: socket.socket,
    backend: socket.socket,
    *,
    idle_timeout: float | None = None,
    use_splice: bool = False,
    kernel: KernelRelay | None = None,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy bytes both ways until both directions reach EOF, one breaks, or idle expires.

    Args:
        client, backend: connected, non-blocking stdlib sockets. Not closed here; close
            them when this returns.
        idle_timeout: seconds without a byte either way after which the relay ends.
        use_splice: in user space, switch bulky directions to splice(2).
        kernel: relay in the kernel with this KernelRelay (not with an idle timeout:
            no byte passes here to reset it); None: in user space.
        result: where to count bytes (the caller may read it even if cancelled).
    Returns:
        The RelayResult, with ``outcome`` one of "ok", "idle-timeout", "client-reset",
        "backend-reset".
    Raises:
        trio.Cancelled: from an enclosing scope (e.g. shutdown); byte counts are in ``result``.
    """
    if result is None:
        result = RelayResult()
    if kernel is not None and idle_timeout is None:
        # From the first byte: the sockets join the sockmap before this process has read
        # anything from them. (A hand-over after a user-space start was tried and
        # duplicated data: the verdict takes whole skbs from the receive queue, including
        # one that recv() had already read part of.)
        try:
            await kernel.relay(client, backend, result)
        except SockmapError as exc:  # full, or the kernel refused this pair: relay here
            global _sockmap_warned
            # EOPNOTSUPP: a socket no longer established (the client already left): normal.
            if not _sockmap_warned and exc.errno != errno.EOPNOTSUPP:
                logging.getLogger("ambassadord").warning("sockmap: %s; relaying in user space where that happens", exc)
                _sockmap_warned = True
        else:
            if result.outcome is None:
                result.outcome = "ok"
            pass_reset(result, client, backend)
            return result
    await relay_user(client, backend, idle_timeout, use_splice, result)
    pass_reset(result, client, backend)
    return result
