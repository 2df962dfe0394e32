"""What tests/consul.py (:class:`~tests.consul.ConsulAgent`) and tests/etcd_server.py
(:class:`~tests.etcd_server.EtcdServer`) share: one server run as a child process, here or
inside a :class:`tests.netns.Netns`, that a test stops and starts again.

:class:`ServerProcess` owns a temporary directory (removed by :meth:`~ServerProcess.close`)
with the server's log, to which every start appends a ``---- COMMAND`` line and then the
server's stdout and stderr, so the log of every run so far is kept across restarts. It
tells tests/server_logs.py about the log on start and stop, so that tests/conftest.py shows
its tail when a test fails; failures while starting quote that tail too.

A subclass provides :meth:`~ServerProcess.command`, :meth:`~ServerProcess._ready_step`
(None once ready, else what is still missing), ``label`` (``"etcd NAME"``: the server in
messages), ``error`` (the exception it raises) and :meth:`~ServerProcess._addresses` (for
the log's title); optionally :meth:`~ServerProcess._env` and
:meth:`~ServerProcess._on_ready`.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tests import server_logs
from tests.server_logs import tail

if TYPE_CHECKING:
    from tests.netns import Netns

READY_TIMEOUT = 20.0


def url_host(host: str) -> str:
    """``host`` as a URL's host part: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class ServerProcess:
    """One server process; see the module docstring.

    Attributes:
        ns: the network namespace it runs in (None: the test's own).
        log: the file with its stdout and stderr (kept across restarts).
        proc: the running (or last) process, None before the first start.
    """

    label: str  # the server in messages, e.g. "consul agent NODE"
    error: type[RuntimeError] = RuntimeError  # what start() raises
    ready_word = "ready"  # "not <ready_word> within ..."
    ns: Netns | None

    def __init__(self, kind: str):
        """A temporary directory ``amb-KIND-*`` holding the log ``KIND.log``; not started."""
        self._dir = tempfile.TemporaryDirectory(prefix=f"amb-{kind}-")
        self.log = Path(self._dir.name) / f"{kind}.log"
        self.proc: subprocess.Popen | None = None

    def _start_or_close(self, timeout: float) -> None:
        """start(); on failure also close() (for a constructor that starts the server)."""
        try:
            self.start(timeout)
        except BaseException:
            self.close()
            raise

    # ---- what a subclass provides ---------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def _addresses(self) -> str:
        """Where it listens, for the log's title."""
        raise NotImplementedError

    def _ready_step(self) -> str | None:
        """None when ready, else what is still missing."""
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The server's environment (None: the test process's)."""
        return None

    def _on_ready(self) -> None:
        """Run once the server is ready, as part of start()."""

    # ---- life cycle -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server and wait until it is ready; then :meth:`_on_ready`.

        Raises:
            ``error``: it is running already, it exited, or it was not ready within
            ``timeout`` (quoting its log).
        """
        if self.running:
            raise self.error(f"{self.label} is already running (pid {self.proc.pid})")
        with open(self.log, "ab") as out:
            out.write(f"---- {' '.join(self.command())}\n".encode())
            out.flush()
            kw = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                      env=self._env())
            # `ip netns exec` execs the command: the Popen is the server itself, signals reach it
            self.proc = (self.ns.popen(self.command(), **kw) if self.ns is not None
                         else subprocess.Popen(self.command(), **kw))
        where = f" in {self.ns.name}" if self.ns is not None else ""
        server_logs.started(self.log, f"{self.label}{where} ({self._addresses()})")
        try:
            self._wait_ready(timeout)
            self._on_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"{self.label} exited {self.proc.returncode} while starting:\n{tail(self.log)}")
            last = self._ready_step()
            if last is None:
                return
            if time.monotonic() > deadline:
                raise self.error(f"{self.label} not {self.ready_word} within {timeout:g}s ({last}):\n"
                                 f"{tail(self.log)}")
            time.sleep(0.05)  # polling interval, not synchronisation

    def stop(self, timeout: float = 10, *, kill: bool = False) -> int | None:
        """SIGTERM (SIGKILL with ``kill``), wait up to ``timeout``, then SIGKILL. Returns the
        exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        server_logs.finished(self.log)
        return self.proc.returncode

    def restart(self, timeout: float = READY_TIMEOUT, *, kill: bool = False) -> None:
        """stop() then start()."""
        self.stop(kill=kill)
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its temporary directory (log included)."""
        try:
            self.stop()
        finally:
            self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)
