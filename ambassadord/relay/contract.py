"""What every relay keeps, whichever way it moves the bytes.

The same outcomes ("ok", "idle-timeout", "client-reset", "backend-reset"), bytes counted
each way, EOF passed on as EOF (``half_close``) and a reset passed on as a reset
(``pass_reset``). The user-space pumps (user.py) and the kernel relay (kernel.py) both
report through a RelayResult and end a broken direction by raising Broken.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .tcp_abi import LINGER_RESET


@dataclass(slots=True, eq=False)  # eq=False: hashable by identity (kept in a set while open)
class RelayResult:
    up: int = 0  # bytes client -> backend
    down: int = 0  # bytes backend -> client
    outcome: str | None = None  # None while running; "ok", "idle-timeout", "client-reset", ...
    backend: str | None = None  # which backend (for the admin API's live per-backend bytes)
    # While the kernel relays (sockmap), no byte passes through here: this reads the
    # counts from the sockets (TCP_INFO) when someone asks (stats.py).
    refresh: object = None


class Broken(Exception):
    """A direction cannot go on: ``outcome`` says which side ("client-reset", ...)."""

    def __init__(self, outcome: str):
        self.outcome = outcome


def half_close(sock: socket.socket, name: str) -> None:
    """Pass an EOF on. Each direction does this once, to its destination, and we close
    nothing ourselves: so ENOTCONN (the socket is in state CLOSE) means its peer reset it."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise Broken(f"{name}-reset") from exc


def pass_reset(result: RelayResult, client: socket.socket, backend: socket.socket) -> None:
    """After one side reset, make the caller's close() of the other side a reset too."""
    other = {"client-reset": backend, "backend-reset": client}.get(result.outcome)
    if other is not None:
        try:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass  # not possible on a socket that is gone already; nothing to tell it then
