"""systemd readiness notification (sd_notify(3)) without libsystemd.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading ``@`` means the abstract namespace). It is a few lines, so it is
written here rather than pulled in as a dependency. Without $NOTIFY_SOCKET (not started by
systemd with Type=notify) every call is a no-op. A failure to send is logged once and
never stops the daemon: readiness is a courtesy to the supervisor, not a reason to die.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("ambassadord")

_warned = False


def notify(*lines: str, env=os.environ) -> bool:
    """Send ``lines`` (e.g. "READY=1", "STATUS=...") to systemd; False if not sent."""
    global _warned
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), path)
        return True
    except OSError as exc:
        if not _warned:
            log.warning("sd_notify to NOTIFY_SOCKET=%s failed: %s", env.get("NOTIFY_SOCKET"), exc.strerror or exc)
            _warned = True
        return False


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to this message.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
