"""What the daemon asks of a data plane: the seam beside which a second one is added.

A data plane is how a consumer's bytes reach a backend. Today there is one, the proxy:
server.py accepts and connects, ``relay`` moves the bytes, in user space or, with a
``relay.KernelRelay``, in the kernel. Issue 14 adds balancing at connect time (a cgroup
program rewrites the consumer's connect() to a backend: no proxy hop at all). Either
holds kernel resources for the daemon's lifetime, and the daemon treats both alike:

* made at start, before anything is served: the constructor raises (naming what is
  missing) where the kernel or the capabilities do not allow it;
* ``run()``: its one task, for as long as the daemon serves (the kernel relay's Watcher;
  a connect-time plane's map updates), cancelled at shutdown;
* ``close()`` at exit, once nothing uses it: every fd released, every program detached.
  Idempotent, and a context manager, so the daemon's exit stack closes it on every path.

The proxy's files do not change for a new plane: it is a module or package of its own,
made and closed by the daemon's life cycle, and told about backend sets through the
Server's ``peers.Peers`` interface (relay/__init__.py says more).
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
