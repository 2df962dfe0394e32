"""Run the real daemon (``python -m ambassadord run ...``) as a subprocess, for tests.

:class:`Daemon` starts it, in the current network namespace or inside a
:class:`tests.netns.Netns`, optionally behind a wrapper such as ``prlimit``. Its stderr,
the log, goes to a temporary file that the test reads back (``text()``, ``records()`` for
``--log-format json``, ``wait_for()``); stdout goes to another. Ready means: a TCP
connect to its listen address succeeds and it has logged ``listening on`` (with
``--iptables`` the rules are installed before that line, so a ready daemon is also a
redirecting one). ``stop()`` sends SIGTERM and asserts the exit status; leaving the
``with`` block kills a daemon that is still running, so nothing outlives a failing test.
Its log is recorded in tests/server_logs.py, so a failing test's report ends with it.

Also here, because daemon tests need them: :func:`wait_until` (poll with a deadline, no
sleeps as synchronisation), :func:`free_port`, :func:`connect`, :func:`ping` (one Redis
PING/PONG over a raw socket) and :class:`RedisProcess` (a throw-away ``redis-server``, here
or in a namespace).

No test sleeps to synchronise: everything waits on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import server_logs
from tests.netns import Netns
from tests.server_logs import tail

REPO_ROOT = Path(__file__).resolve().parent.parent


def require(*tools: str) -> None:
    """Skip without these tools, except under CI, where a skip would hide a gap."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"missing: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI: a failure, not a skip)", pytrace=False)
        pytest.skip(message)


def sockmap_or_skip():
    """A small kernel relay map (relay.Sockmap), or a skip where the kernel refuses one;
    under CI a refusal fails (CI's machines have BPF)."""
    from ambassadord.relay import Sockmap, SockmapError

    try:
        return Sockmap(8)
    except SockmapError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no BPF sockmap here: {exc}")


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str | Callable[[], str],
               interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; return that.

    ``condition`` may raise OSError (not yet: try again). On timeout raise TimeoutError
    with ``what`` (or ``what()``, evaluated then, e.g. to show a log).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what() if callable(what) else what}")
        time.sleep(interval)


def _socket(ns: Netns | None, family: int) -> socket.socket:
    return ns.socket(family) if ns is not None else socket.socket(family, socket.SOCK_STREAM)


def connect(host: str, port: int, *, ns: Netns | None = None, timeout: float = 5,
            make: Callable[[int], socket.socket] | None = None) -> socket.socket:
    """A TCP connection to ``host:port`` (IP literal), from inside ``ns`` if given; ``make``
    (family -> socket) makes the socket instead (e.g. in a cgroup: tests/cgroups.dial)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = make(family) if make is not None else _socket(ns, family)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def web_page(body: bytes) -> Iterator[int]:
    """Some other web server on 127.0.0.1: every GET gets ``body`` as text/html, 200. Its
    port; shut down on the way out."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port(host: str = "127.0.0.1", *, ns: Netns | None = None) -> int:
    """A TCP port that is free on ``host`` right now (in ``ns`` if given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(_socket(ns, family)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping(sock: socket.socket) -> bytes:
    """Send one inline Redis PING on a connected socket; return the reply line."""
    sock.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(64)
        if not chunk:
            break
        reply += chunk
    return reply


def refused(host: str, port: int, *, ns: Netns | None = None) -> bool:
    """True when a connection to ``host:port`` is refused (nothing listens)."""
    try:
        connect(host, port, ns=ns, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout``; False if it stays open."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    """Everything the peer sends until it closes (EOF or reset) within ``timeout``;
    TimeoutError if it keeps the connection open."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data


class RedisProcess:
    """A throw-away ``redis-server`` on ``host:port`` (and on ``also_on``, more addresses),
    in ``ns`` if given, no persistence. Its files go to a directory under ``workdir``, kept
    for pytest to clean up, and its log is recorded for a failure report (tests/server_logs.py);
    without ``workdir``, to a temporary directory that :meth:`stop` removes."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", also_on: Sequence[str] = (),
                 ns: Netns | None = None, workdir: Path | None = None, timeout: float = 15):
        self.host, self.port, self.ns = host, port, ns
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="amb-redis-")
        folder = tempfile.mkdtemp(prefix="redis-", dir=workdir) if workdir is not None else self._tmp.name
        self.log = Path(folder) / "redis.log"
        cmd = ["redis-server", "--port", str(port), "--bind", host, *also_on, "--save", "", "--appendonly", "no",
               "--protected-mode", "no", "--daemonize", "no", "--dir", folder]
        with open(self.log, "wb") as out:
            kw = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self.proc = ns.popen(cmd, **kw) if ns is not None else subprocess.Popen(cmd, **kw)
        where = f" in {ns.name}" if ns is not None else ""
        if self._tmp is None:
            server_logs.started(self.log, f"redis-server{where} on {' '.join([host, *also_on])} port {port}")
        try:
            wait_until(self._answers, timeout=timeout,
                       what=lambda: f"redis-server{where} on {host}:{port}: {tail(self.log)}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.proc.returncode}: {tail(self.log)}")
        with contextlib.closing(connect(self.host, self.port, ns=self.ns, timeout=1)) as s:
            return ping(s) == b"+PONG\r\n"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        server_logs.finished(self.log)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DaemonExited(RuntimeError):
    """The daemon exited while a test waited for it."""


class Daemon:
    """``python -m ambassadord run ARGS... --log-format FMT`` as a subprocess: the one
    harness for the real daemon, in the test's namespace or in one of tests/netns.py's
    (the end-to-end scenarios of tests/topology.py included).

    Args:
        args: the ``run`` arguments (routes, ``--listen``, ...), without ``run``.
        listen: where readiness is probed with a TCP connect; should match ``--listen``.
            None: do not probe (then only the ``listening on`` log line counts).
        ns: run inside this network namespace (``ip netns exec``, which execs, so the
            Popen is the daemon itself and signals reach it).
        prefix: a wrapper command that execs the daemon, e.g. ``["prlimit", "--nofile=40:40", "--"]``.
        log_format: added as ``--log-format``; "json" makes :meth:`records` work.
        env: extra environment variables.
        workdir: where the log file goes (a fresh temporary file in it).
        wait: wait for readiness in the constructor.

    A harness for a daemon started another way (a deployment's own command line, as in
    tests/test_deploy.py) subclasses it: it calls :meth:`_start` with its command and
    overrides :meth:`ready`.
    """

    CHAIN = "AMBASSADORD"  # what its nat chains' names start with (``run --iptables``)

    def __init__(self, args: Sequence[str], *, listen: tuple[str, int] | None = ("127.0.0.1", 10000),
                 ns: Netns | None = None, prefix: Sequence[str] = (), log_format: str = "json",
                 env: dict[str, str] | None = None, workdir: Path | None = None,
                 ready_timeout: float = 15, wait: bool = True):
        self.listen = listen
        # No admin API unless a test asks for one: the default port would collide.
        admin = () if any(a == "--admin" or a.startswith("--admin=") for a in args) else ("--admin", "off")
        self.args = ["run", *args, *admin, "--log-format", log_format]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_")}
        environ.update(env or {}, PYTHONUNBUFFERED="1")
        self._start([*prefix, sys.executable, "-m", "ambassadord", *self.args], title=f"`{self.command}`",
                    ns=ns, env=environ, cwd=REPO_ROOT, workdir=workdir, ready_timeout=ready_timeout if wait else None)

    def _start(self, cmd: Sequence[str], *, title: str, ns: Netns | None, env: dict[str, str], cwd: Path,
               workdir: Path | None, ready_timeout: float | None) -> None:
        """Run ``cmd`` (in ``ns``), its stderr to :attr:`log` and its stdout to :attr:`stdout`
        (fresh files in ``workdir``), record the log (tests/server_logs.py), and wait until
        it is :meth:`ready` unless ``ready_timeout`` is None; if that fails, kill it.
        ``title`` names it in :meth:`describe`."""
        self.ns, self.title = ns, title
        fd, name = tempfile.mkstemp(prefix="ambassadord-", suffix=".log", dir=workdir)
        self.log = Path(name)  # stderr: the log
        out_fd, out_name = tempfile.mkstemp(prefix="ambassadord-", suffix=".out", dir=workdir)
        self.stdout = Path(out_name)
        kw = dict(cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=fd)
        try:
            self.proc = ns.popen(cmd, **kw) if ns is not None else subprocess.Popen(cmd, **kw)
        finally:
            os.close(fd)
            os.close(out_fd)
        server_logs.started(self.log, title + (f" in {ns.name}" if ns is not None else ""))
        if ready_timeout is not None:
            try:
                self.wait_ready(ready_timeout)
            except BaseException:
                self.kill()
                raise

    # ---- state -------------------------------------------------------------------

    @property
    def command(self) -> str:
        return "python -m ambassadord " + " ".join(self.args)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        where = f" in {self.ns.name}" if self.ns is not None else ""
        return f"{self.title}{where} ({state}); its log:\n{tail(self.log)}"

    def _check_alive(self) -> None:
        if not self.alive():
            raise DaemonExited(self.describe())

    def ready(self) -> bool:
        """It logged ``listening on`` and (``listen`` given) accepts a connection there.
        Raises DaemonExited once it exited."""
        self._check_alive()
        if "listening on" not in self.text():
            return False
        if self.listen is not None:
            self.connect(*self.listen, timeout=1).close()
        return True

    def wait_ready(self, timeout: float = 15) -> None:
        wait_until(self.ready, timeout=timeout, what=self.describe)

    # ---- talking to it -----------------------------------------------------------

    def connect(self, host: str, port: int, *, timeout: float = 5) -> socket.socket:
        """A client connection from the daemon's namespace."""
        return connect(host, port, ns=self.ns, timeout=timeout)

    def nat_rules(self, tool: str = "iptables") -> str:
        """``iptables-save -t nat`` (or ``ip6tables-save``) in the daemon's namespace."""
        return self.ns.exec([f"{tool}-save", "-t", "nat"])

    # ---- its log -----------------------------------------------------------------

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def records(self) -> list[dict]:
        """Every log line, parsed as JSON (``--log-format json``). A line that is not JSON
        raises ValueError quoting it."""
        out = []
        for n, line in enumerate(self.lines(), 1):
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"log line {n} is not JSON ({exc}): {line!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"log line {n} is not a JSON object: {line!r}")
            out.append(rec)
        return out

    def connection_records(self) -> list[dict]:
        return [r for r in self.records() if r.get("event") == "connection"]

    def wait_for(self, predicate: Callable[[dict], bool] | str, *, timeout: float = 10) -> dict | str:
        """Wait until a log record satisfies ``predicate`` (JSON logs), or until a log
        line contains the string ``predicate``; return that record or line. Fails early
        if the daemon exits."""

        def found():
            if isinstance(predicate, str):
                hit = next((line for line in self.lines() if predicate in line), None)
            else:
                hit = next((r for r in self._records_so_far() if predicate(r)), None)
            if hit is None:
                self._check_alive()
            return hit

        what = predicate if isinstance(predicate, str) else "a matching log record"
        return wait_until(found, timeout=timeout, what=lambda: f"{what}; {self.describe()}")

    def _records_so_far(self) -> list[dict]:
        # A line may be half-written while we read: skip one that does not parse (yet).
        out = []
        for line in self.lines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    # ---- stopping ----------------------------------------------------------------

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit; its status. TimeoutError (with the log) if not."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"did not exit within {timeout:g}s: {self.describe()}") from None
        server_logs.finished(self.log)
        return code

    def stop(self, *, expect: int | None = 0, timeout: float = 10) -> int:
        """SIGTERM, wait up to ``timeout`` s, assert the exit status is ``expect``."""
        self._check_alive()
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if expect is not None:
            assert code == expect, f"exit status {code}, expected {expect}: {self.describe()}"
        return code

    def kill(self) -> None:
        """Make sure it is gone (SIGKILL if still running). Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        server_logs.finished(self.log)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
