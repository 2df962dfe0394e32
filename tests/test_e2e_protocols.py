"""Real servers and their real clients through ambassadord's proxy mode: the promise that
any TCP service works, checked on the protocols its users run.

* PostgreSQL 15 (Debian's): ``psql``, ``pgbench -i`` (a bulk COPY in), ``pgbench -C`` (a
  new connection per transaction, 8 clients), a ``COPY ... TO STDOUT`` of 12 MB compared
  byte for byte with the same query made directly, and a session the server terminates
  in the middle of a query.
* nginx: ``curl`` fetching a 32 MiB file three times over one keep-alive connection, and
  an HTTP/1.0 request (the response ends with the server's close).
* OpenSSH: ``ssh`` sending 16 MiB up to ``sha256sum`` and reading 16 MiB down.
* gRPC (grpcio, HTTP/2, tests/grpc_echo.py): a bidirectional stream of 2,000 messages, 200
  unary calls multiplexed on one connection, a server stream; and a long-lived stream
  that ``on_down = "shutdown"`` ends when a reload takes its backend out of the route,
  while the next call goes to the new backend.

One network namespace with loopback only. The servers listen on 127.0.0.1 at ports of
their own; the daemon runs there with ``--iptables``, mapping each service's usual port
(5432, 80, 22, 50051) to its server, and the clients dial ``127.0.0.1:<usual port>`` as a
consumer would (nat REDIRECT, ``SO_ORIGINAL_DST``). Every test runs twice: relayed in user
space (``--sockmap off``) and in the kernel (``--sockmap on``). After each, the daemon's
open connections (``/routes``) are 0 again and its fds back to what they were.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.admin_client import get_routes, route
from tests.daemon import REPO_ROOT, Daemon, require, sockmap_or_skip, wait_until
from tests.netns import Netns

pytestmark = pytest.mark.netns

ADMIN = 10001  # inside the namespace
PG, HTTP, SSH, GRPC = 15432, 18080, 10022, 15051  # where the servers listen
GRPC_OTHER = 15052  # the gRPC backend a reload moves to
USUAL = {"postgres": 5432, "http": 80, "ssh": 22, "grpc": 50051}  # what consumers dial
BLOB = 32 << 20  # the file nginx serves
SSH_BLOB = 16 << 20
TIMEOUT = 60


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        require(f"/usr/lib/postgresql/*/bin/{name}")  # skip, or fail under CI
    return found[-1]


@dataclass
class Site:
    ns: Netns
    dir: Path  # readable by the postgres user: the servers' files
    blob_sha: str  # of dir/www/blob
    ssh_key: Path
    procs: list[subprocess.Popen]

    def run(self, cmd: list[str], *, input: bytes | None = None, timeout: float = TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
        """A client, in the namespace; its stdout as bytes."""
        proc = subprocess.run(["ip", "netns", "exec", self.ns.name, *cmd], input=input, capture_output=True,
                              timeout=timeout, env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc

    def psql(self, port: int, sql: str, **kw) -> subprocess.CompletedProcess:
        return self.run([pg_bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port),
                         "-U", "postgres", "-d", "postgres", "-c", sql], **kw)

    def ssh(self, command: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["ssh", "-F", "/dev/null", "-i", str(self.ssh_key), "-p", str(USUAL["ssh"]),
                         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                         "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "root@127.0.0.1", command], **kw)

    def grpc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "tests.grpc_echo", *args], **kw)


def _start(site_procs: list, ns: Netns, cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 (closed with the process below)
    try:
        proc = ns.popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    finally:
        out.close()
    site_procs.append(proc)
    return proc


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    netns.require_prerequisites()
    require("nginx", "sshd", "ssh", "curl", "runuser")
    for tool in ("initdb", "postgres", "psql", "pgbench", "pg_isready"):
        pg_bin(tool)
    with contextlib.ExitStack() as stack:
        (ns,) = stack.enter_context(netns.namespaces("proto"))
        # Not pytest's tmp_path: its parents are root's alone, and postgres runs as postgres.
        top = Path(tempfile.mkdtemp(prefix="amb-proto-"))
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        top.chmod(0o755)
        procs: list[subprocess.Popen] = []

        def stop_all():
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        stack.callback(stop_all)

        # nginx: a 32 MiB file
        www = top / "www"
        www.mkdir()
        blob = os.urandom(BLOB)
        (www / "blob").write_bytes(blob)
        (top / "nginx.conf").write_text(
            f"worker_processes 1; user root; pid {top}/nginx.pid; error_log {top}/nginx.log;\n"
            "events {}\n"
            f"http {{ access_log off; server {{ listen 127.0.0.1:{HTTP}; root {www}; keepalive_requests 1000; }} }}\n")
        _start(procs, ns, ["nginx", "-e", str(top / "nginx.log"), "-c", str(top / "nginx.conf"), "-g", "daemon off;"],
               top / "nginx.out")

        # PostgreSQL, as the postgres user, files in top/pg
        pg = top / "pg"
        pg.mkdir()
        postgres_user = pwd.getpwnam("postgres")
        os.chown(pg, postgres_user.pw_uid, postgres_user.pw_gid)
        subprocess.run(["runuser", "-u", "postgres", "--", pg_bin("initdb"), "-D", str(pg / "data"), "-A", "trust",
                        "-U", "postgres", "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        _start(procs, ns, ["runuser", "-u", "postgres", "--", pg_bin("postgres"), "-D", str(pg / "data"), "-p", str(PG),
                           "-k", str(pg), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                           "-c", "max_connections=60"], top / "postgres.log")

        # OpenSSH: a host key, root's key, a config of its own
        (top / "ssh").mkdir()
        key, host_key = top / "ssh" / "id", top / "ssh" / "host"
        for k in (key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True, timeout=30)
        (top / "ssh" / "authorized_keys").write_text((top / "ssh" / "id.pub").read_text())
        (top / "ssh" / "sshd_config").write_text(
            f"Port {SSH}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {top}/ssh/authorized_keys\n"
            f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nPidFile {top}/ssh/sshd.pid\n")
        privsep = Path("/run/sshd")  # sshd's privilege separation directory (made by its service unit)
        if not privsep.exists():
            privsep.mkdir(mode=0o755)
            stack.callback(lambda: privsep.rmdir() if not any(privsep.iterdir()) else None)
        _start(procs, ns, [shutil.which("sshd"), "-D", "-e", "-f", str(top / "ssh" / "sshd_config")], top / "sshd.log")

        # gRPC: two servers (the second is where a reload moves the route)
        for port in (GRPC, GRPC_OTHER):
            _start(procs, ns, [sys.executable, "-m", "tests.grpc_echo", "serve", str(port)], top / f"grpc-{port}.log")

        def up() -> bool:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a server exited: {p.args}; logs in {top}: "
                                       + " | ".join(f.name + ": " + f.read_text(errors="replace")[-300:]
                                                    for f in top.glob("*.log")))
            listening = ns.listening()  # (grpcio listens on a dual-stack socket: [::ffff:127.0.0.1]:PORT)
            return all({f"127.0.0.1:{port}", f"[::ffff:127.0.0.1]:{port}"} & listening
                       for port in (HTTP, PG, SSH, GRPC, GRPC_OTHER))

        wait_until(up, timeout=30, what=lambda: f"the servers to listen; listening: {sorted(ns.listening())}; "
                                               f"logs: {[(f.name, f.read_text(errors='replace')[-300:]) for f in top.glob('*.log')]}")
        yield Site(ns, top, hashlib.sha256(blob).hexdigest(), key, procs)


def write_routes(path: Path, grpc_backend: int) -> None:
    text = ("[routes]\n"
            f'{USUAL["postgres"]} = {{ backend = "127.0.0.1:{PG}", name = "postgres" }}\n'
            f'{USUAL["http"]} = {{ backend = "127.0.0.1:{HTTP}", name = "http" }}\n'
            f'{USUAL["ssh"]} = {{ backend = "127.0.0.1:{SSH}", name = "ssh" }}\n'
            f'{USUAL["grpc"]} = {{ backend = "127.0.0.1:{grpc_backend}", name = "grpc", on_down = "shutdown" }}\n')
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Proxy:
    daemon: Daemon
    config: Path
    fds: int  # the daemon's open fds when idle

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.proc.pid}/fd"))

    def fd_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{self.daemon.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                kind = os.readlink(f"/proc/{self.daemon.proc.pid}/fd/{fd}").split(":")[0]
                kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def routes(self) -> dict:
        return get_routes(ADMIN, ns=self.daemon.ns)


@pytest.fixture(scope="module", params=["user", "kernel"])
def proxy(request, site, tmp_path_factory) -> Iterator[Proxy]:
    if request.param == "kernel":
        sockmap_or_skip().close()
    workdir = tmp_path_factory.mktemp(f"proto-{request.param}")
    config = workdir / "routes.toml"
    write_routes(config, GRPC)
    args = ["--iptables", "--config", str(config), "--config-poll", "0.2", "--admin", f"127.0.0.1:{ADMIN}",
            "--sockmap", "on" if request.param == "kernel" else "off", "--log-connections", "errors"]
    with Daemon(args, ns=site.ns, workdir=workdir) as daemon:
        wait_until(lambda: all(r["resolved"] for r in get_routes(ADMIN, ns=site.ns)["routes"]), timeout=15,
                   what=daemon.describe)
        proxy = Proxy(daemon, config, 0)
        proxy.fds = proxy.open_fds()
        yield proxy
        daemon.stop()


@pytest.fixture
def clean(proxy) -> Iterator[Proxy]:
    """The proxy; afterwards, no connection open through it and its fds back to baseline."""
    yield proxy

    def settled():
        active = {r["name"]: r["active"] for r in proxy.routes()["routes"] if r["active"]}
        return not active and proxy.open_fds() <= proxy.fds

    wait_until(settled, timeout=15, what=lambda: "connections still open: "
               f"{ {r['name']: r['active'] for r in proxy.routes()['routes']} }; fds {proxy.fd_kinds()} (idle: {proxy.fds})")


def outcomes(proxy: Proxy, name: str) -> dict:
    return route(proxy.routes(), name)["outcomes"]


# ---- PostgreSQL -----------------------------------------------------------------------------


COPY_SQL = "COPY (SELECT i, md5(i::text), repeat('x', 20) FROM generate_series(1, 200000) i) TO STDOUT"
# Made directly to the server: wait for the victim's query to run, then end its session.
# (pg_stat_activity is read once per transaction unless its snapshot is cleared)
TERMINATE_VICTIM = """DO $$ BEGIN
  FOR i IN 1..200 LOOP
    PERFORM pg_stat_clear_snapshot();
    IF (SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
        WHERE query LIKE 'SELECT pg_sleep(30)%' AND pid <> pg_backend_pid()) > 0 THEN RETURN; END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END $$"""


def test_postgres(site, clean):
    proxy = clean
    assert site.psql(USUAL["postgres"], "SELECT 40 + 2").stdout == b"42\n"
    pgbench = pg_bin("pgbench")
    common = ["-h", "127.0.0.1", "-p", str(USUAL["postgres"]), "-U", "postgres"]
    site.run([pgbench, "-i", "-q", "-s", "1", *common, "postgres"], timeout=120)  # 100,000 rows COPY'd in
    run = site.run([pgbench, "-C", "-c", "8", "-j", "2", "-t", "40", "-n", *common, "postgres"], timeout=120)
    text = run.stdout.decode()
    assert "number of transactions actually processed: 320/320" in text, text
    assert "number of failed transactions: 0" in text, text

    through = site.psql(USUAL["postgres"], COPY_SQL).stdout
    direct = site.psql(PG, COPY_SQL).stdout
    assert len(through) > 10_000_000 and hashlib.sha256(through).digest() == hashlib.sha256(direct).digest()

    # The server ends a session in the middle of a query: the client hears it, and the
    # proxy lets the connection go (counted by the fixture: nothing left open).
    started = time.monotonic()
    killer = subprocess.Popen(["ip", "netns", "exec", site.ns.name, pg_bin("psql"), "-X", "-At", "-h", "127.0.0.1",
                               "-p", str(PG), "-U", "postgres", "-d", "postgres", "-c", TERMINATE_VICTIM],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ended = site.psql(USUAL["postgres"], "SELECT pg_sleep(30) -- the victim", check=False)
    said = killer.communicate(timeout=30)[0]
    assert ended.returncode != 0 and b"terminat" in ended.stderr, (ended.stderr, said)
    assert time.monotonic() - started < 20
    assert sum(outcomes(proxy, "postgres").values()) >= 320


# ---- nginx ----------------------------------------------------------------------------------


def test_http_keepalive_and_close_delimited(site, clean):
    url = f"http://127.0.0.1:{USUAL['http']}/blob"
    # three downloads, one connection (curl reuses it), each checked
    got = site.run(["curl", "-sS", "--noproxy", "*", "-o", "/dev/stdout", url, url, url, "-w", ""], timeout=120).stdout
    assert len(got) == 3 * BLOB
    for i in range(3):
        assert hashlib.sha256(got[i * BLOB:(i + 1) * BLOB]).hexdigest() == site.blob_sha, f"download {i + 1}"
    connections = route(clean.routes(), "http")["connections"]
    # HTTP/1.0 without keep-alive: the body ends when nginx closes; the close must pass through
    old = site.run(["curl", "-sS", "--noproxy", "*", "--http1.0", "-o", "/dev/stdout", url], timeout=120).stdout
    assert hashlib.sha256(old).hexdigest() == site.blob_sha
    assert route(clean.routes(), "http")["connections"] == connections + 1


# ---- OpenSSH --------------------------------------------------------------------------------


def test_ssh_up_and_down(site, clean):
    up = os.urandom(SSH_BLOB)
    answer = site.ssh("sha256sum", input=up, timeout=120).stdout.decode().split()[0]
    assert answer == hashlib.sha256(up).hexdigest()
    down = site.ssh(f"cat {site.dir}/www/blob | head -c {SSH_BLOB}", timeout=120).stdout
    with open(site.dir / "www" / "blob", "rb") as f:
        assert down == f.read(SSH_BLOB)
    assert site.ssh("echo $SSH_CONNECTION").stdout.split()[2:4] == [b"127.0.0.1", str(SSH).encode()], \
        "sshd should see the connection arrive on its own port, from the proxy"


# ---- gRPC -----------------------------------------------------------------------------------


def test_grpc_streams_and_unary_calls(site, clean):
    result = json.loads(site.grpc("call", str(USUAL["grpc"]), "2000", "4096", timeout=120).stdout)
    assert result == {"echoed": 2000, "echo_ok": True, "hashes_ok": 200, "ticks": list(range(20))}


def test_grpc_stream_is_ended_when_a_reload_takes_its_backend_away(site, clean):
    """on_down = "shutdown": the long stream to the old backend ends (the client sees
    UNAVAILABLE) once the reload has removed it; the next call reaches the new one."""
    proxy = clean
    listener = subprocess.Popen(["ip", "netns", "exec", site.ns.name, sys.executable, "-m", "tests.grpc_echo",
                                 "listen", str(USUAL["grpc"])], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        for line in listener.stdout:  # ticking: the stream is up through the proxy
            if line.startswith("tick 10"):
                break
        assert route(proxy.routes(), "grpc")["active"] == 1
        write_routes(proxy.config, GRPC_OTHER)
        t0 = time.monotonic()
        rest = listener.communicate(timeout=30)[0].splitlines()
        took = time.monotonic() - t0
        assert rest and rest[-1] == "end UNAVAILABLE", rest[-3:]
        assert took < 10, f"the stream ended {took:.1f}s after the reload"
        assert "backend-down" in outcomes(proxy, "grpc")
        result = json.loads(site.grpc("call", str(USUAL["grpc"]), "10", "100").stdout)
        assert result["echo_ok"] and result["hashes_ok"] == 200
        backends = [b["name"] for b in route(proxy.routes(), "grpc")["backends"] if b["in_set"]]
        assert backends == [f"127.0.0.1:{GRPC_OTHER}"]
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
        write_routes(proxy.config, GRPC)
        wait_until(lambda: [b["name"] for b in route(proxy.routes(), "grpc")["backends"] if b["in_set"]]
                   == [f"127.0.0.1:{GRPC}"], timeout=15, what=proxy.daemon.describe)
