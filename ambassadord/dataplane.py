"""What the daemon asks of a data plane: the seam beside which a second one is added.

A data plane is how a consumer's bytes reach a backend. There are two. The proxy:
server.py accepts and connects, ``relay`` moves the bytes, in user space or, with a
``relay.KernelRelay``, in the kernel. Connect mode (the ``connect`` package): a cgroup
program rewrites the consumer's connect() to a backend, and no proxy is in the path at
all. Either holds kernel resources for the daemon's lifetime, and the daemon treats both
alike:

* made at start, before anything is served: the constructor raises (naming what is
  missing) where the kernel or the capabilities do not allow it;
* one task for as long as the daemon serves (the kernel relay's Watcher; connect mode's
  ``ConnectFeed.run``, which reads the kernel's events), cancelled at shutdown;
* ``close()`` at exit, once nothing uses it: every fd released, every program detached.
  Idempotent, and a context manager, so the daemon's exit stack closes it on every path.

Connect mode was added this way without touching the proxy's files: it is a package of
its own, made and closed by the daemon's life cycle (daemon.py), and told about backend
sets, health checks and reloads through the Server's ``peers.Peers`` interface, beside
the ``--workers`` pool (``peers.fanout``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DataPlane(Protocol):
    async def run(self) -> None:
        """Serve until cancelled (one task for the daemon's lifetime)."""

    def close(self) -> None:
        """Release every kernel resource; idempotent."""

    def __enter__(self): ...

    def __exit__(self, *exc_info) -> None: ...
