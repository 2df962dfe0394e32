#!/usr/bin/env python3
"""ambassadord side by side with socat, HAProxy and nginx, in a network namespace of its own.

Usage (root: it creates a network namespace and iptables rules inside it):

    .venv/bin/python bench/compare.py                 # 3 rounds, ~3 minutes on 2 cores
    .venv/bin/python bench/compare.py --quick         # smoke run, ~15 s
    .venv/bin/python bench/compare.py --rounds 5 --bulk-seconds 10 --targets haproxy,ambassadord
    .venv/bin/python bench/compare.py --variant 'w1=--workers 1' --variant 'before@/tmp/old-checkout='

What it builds. A fresh network namespace ``ambbench-<pid>`` that this process moves into
(setns), so every server, client and socket below lives there. It has only ``lo``, with
127.0.0.1 and the "service address" 10.99.0.1/32 (on ``lo``: a dummy link would do the
same, but not every kernel has the dummy driver), no other interface and no route out.
In it:

  * backends: ``redis-server`` on 127.0.0.1:6379 (no persistence, maxclients 10000) and
    ``iperf3 -s`` on 127.0.0.1:5201;
  * targets, each forwarding to both backends and to the never-reading sink on 7000
    (see "Held back" below):

      direct       the client talks to the backend itself (reference, no proxy)
      socat        TCP-LISTEN:36379/35201/37000,fork,reuseaddr (one process per connection)
      haproxy      mode tcp on 16379/15201/17000, default nbthread (= cores), no logging
      nginx        stream module on 26379/25201/27000, worker_processes auto, no access log
      ambassadord  its real configuration: ``run --iptables --iptables-dest 10.99.0.1
                   --listen 127.0.0.1:10000 --map 6379=... --map 5201=... --map 7000=...``. Clients dial
                   10.99.0.1:6379 / :5201; the nat REDIRECT sends that to the daemon, which
                   reads SO_ORIGINAL_DST and connects (with its exempt SO_MARK) to the backend.
      ambassadord-connect  connect mode: ``run --mode connect --cgroup CG --map 46379=...
                   --map 45201=... --map 47000=...``; its clients (and only its clients) run in the cgroup CG
                   made for the run, and dial 127.0.0.1:46379 / :45201 / :47000, where nothing listens:
                   the cgroup program rewrites the connect to the backend. No proxy in the path.

Everything is ready when its ports listen and a Redis PING through it answers +PONG
(polled with a deadline, no fixed sleeps).

Workloads, per round, each target in turn (the target order rotates by one every round,
so no target is always first or last after another one's load):

  * bulk: ``iperf3 -c HOST -p PORT -t T -J``; Gbit/s = end.sum_received.bits_per_second;
  * request/response: ``redis-benchmark -t ping_mbulk -c 50 -n N -k 1 -P 1 --csv``:
    requests/s and p50 latency;
  * connection churn: the same with ``-k 0`` (a new connection per request), requests/s.

During every run the CPU time of the target's processes (the process, its children, and
children it already reaped) is sampled: "CPU %" is of one core, so on this 2-core machine
200 % is the whole box, shared with the client and the backend.

Idle memory, measured once before the rounds (on a daemon warmed by 100 connections
opened and closed): for each proxy, open --idle-conns client connections (default 2,000),
each relayed for real (a PING answered +PONG, and Redis counts the connection), and read
the proxy's memory before and after. Reported in MiB per 1,000 connections, as VmRSS
(/proc/PID/status) and as PSS (/proc/PID/smaps_rollup), both summed over the target's
processes. RSS is the number asked for; PSS is the fair one for socat, whose forked
children share their parent's pages (RSS counts those again in every child).

Held back, measured once before the rounds: through each target, a client pushes into a
backend that accepts and never reads (a socket of this process, 127.0.0.1:7000) for
--held-seconds (default 2), as fast as the path lets it, up to HELD_CAP (256 MiB): the MiB
it got rid of. A relay that passes backpressure on stalls the client after a few MiB (the
buffers on the way); the kernel relay does not (README, "no backpressure"), and the cap
keeps that from eating the machine's memory. The client then aborts (RST), so what is
queued is dropped.

Output: a markdown table on stdout (medians; in brackets each target's ratio to HAProxy,
target ÷ HAProxy: above 1 is better for rates, below 1 is better for latency and memory),
a CPU table, ambassadord against the optimisation goals (ratio ≥ 1.0 on every workload,
bulk ≥ 1.5, p50 ≤ HAProxy's), and a JSON file with the machine, the settings and every raw
sample: bench/results/<UTC timestamp>.json (or --json PATH; --json '' for none).

Caveats. Once ambassadord has installed its nat rules, conntrack tracks every connection
in the namespace, the other targets' too (as on a real host running ambassadord). The
namespace sets net.ipv4.tcp_tw_reuse=1 (redis-benchmark -k 0 asks for it): clients dial
10.99.0.1, which is not a loopback address, so the kernel default (reuse on loopback
only) would run out of ports across churn rounds.

Clean-up: every process is started in its own session and stopped by process group
(SIGTERM, then SIGKILL after 5 s), and the namespace is deleted, in a ``finally`` that
also runs on Ctrl-C, SIGTERM and SIGHUP (and from atexit as a last resort).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import ctypes
import datetime
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

LOOPBACK = "127.0.0.1"
SERVICE_IP = "10.99.0.1"
REDIS, IPERF = 6379, 5201  # the backends' ports (and the service ports ambassadord maps)
STALL = 7000  # the backend that never reads (Sink), for the held-back measurement
MiB = 1024 * 1024
HELD_CAP = 256 * MiB
DAEMON_PORT = 10000
# RLIMIT_NOFILE for this process and (inherited) every server: 65536, or the hard limit if
# that is lower and we may not raise it (no CAP_SYS_RESOURCE, e.g. in a container).
_HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = 65536 if _HARD_NOFILE == resource.RLIM_INFINITY else min(65536, _HARD_NOFILE)
CLONE_NEWNET = 0x40000000
CLK_TCK = os.sysconf("SC_CLK_TCK")
HAPROXY = "haproxy"  # the reference for the ratios

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
REQUIRED = ("ip", "iptables", "ip6tables", "redis-server", "redis-benchmark", "iperf3", "socat", "haproxy", "nginx",
            NGINX_STREAM_MODULE)


class BenchError(Exception):
    """Something the bench cannot go on without; the message is for the user."""


# ---- namespace and processes ----------------------------------------------------------


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class Namespace:
    """A new network namespace that this process moves into; delete() removes its name.

    The namespace itself lives on while a process is in it: this one until it exits, the
    servers until they are stopped (Servers.stop_all runs before delete).
    """

    def __init__(self) -> None:
        self.name = f"ambbench-{os.getpid()}"
        self.created = False

    def enter(self) -> None:
        self.created = True  # first: an interrupt right after the add must still delete it
        sh("ip", "netns", "add", self.name)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
        Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1")

    def delete(self) -> None:
        if self.created:
            sh("ip", "netns", "delete", self.name, check=False)
            self.created = False


class Servers:
    """Long-running processes, each in a session (and process group) of its own."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], cwd: Path = REPO) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=cwd)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited {proc.returncode}; its log:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def logs_with_content(self, names: list[str]) -> dict[str, str]:
        """The last lines of those logs that are not empty."""
        return {name: self.log_tail(name) for name in names if (self.logs / f"{name}.log").stat().st_size}

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            stop_group(proc)


def stop_group(proc: subprocess.Popen, patience: float = 5.0) -> None:
    """SIGTERM the process group, wait up to ``patience`` s, then SIGKILL what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=patience)


def wait_until(what: str, ready, servers: Servers, timeout: float = 20.0) -> None:
    """Poll ``ready()`` (an OSError counts as "not yet") until true, a server dies, or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servers.check_alive()
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.02)
    raise BenchError(f"{what} not ready after {timeout:g}s")


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# ---- process tree accounting (CPU, memory) --------------------------------------------


def process_tree(roots: list[int]) -> list[int]:
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(entry.path, "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime: reaped children (socat's forks) count in their parent."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def memory_kib(pids: list[int]) -> dict[str, int]:
    """VmRSS and Pss, in KiB, summed over ``pids``."""
    total = {"rss": 0, "pss": 0}
    for pid in pids:
        for key, path, label in (("rss", "status", "VmRSS:"), ("pss", "smaps_rollup", "Pss:")):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                    if line.startswith(label):
                        total[key] += int(line.split()[1])
                        break
    return total


# ---- Redis over a plain socket ---------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def redis_ping(sock: socket.socket) -> None:
    sock.sendall(b"PING\r\n")
    if (reply := recv_exactly(sock, 7)) != b"+PONG\r\n":
        raise ConnectionError(f"PING answered {reply!r}")


def ping_through(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=2) as sock:
        redis_ping(sock)
    return True


def ping_target(target) -> bool:
    with target.connect(target.redis_port, timeout=2) as sock:
        redis_ping(sock)
    return True


def redis_connected_clients(sock: socket.socket) -> int:
    sock.sendall(b"INFO clients\r\n")
    header = b""
    while not header.endswith(b"\r\n"):
        header += recv_exactly(sock, 1)
    body = recv_exactly(sock, int(header[1:]) + 2).decode()
    return int(body.split("connected_clients:", 1)[1].split()[0])


# ---- targets ----------------------------------------------------------------------------


@dataclass
class Target:
    """Where clients connect for each backend, and how to start what serves it."""

    name: str = "direct"
    host: str = LOOPBACK
    redis_port: int = REDIS
    iperf_port: int = IPERF
    stall_port: int = STALL

    def listen_ports(self) -> set[int]:
        return {self.redis_port, self.iperf_port, self.stall_port}

    def routes(self) -> list[tuple[int, int]]:
        """(front port, backend port) pairs."""
        return [(self.redis_port, REDIS), (self.iperf_port, IPERF), (self.stall_port, STALL)]

    def commands(self, work: Path) -> list[list[str]]:
        """The processes to start (none: the direct path is the backends themselves)."""
        return []

    def cwd(self) -> Path:
        return REPO

    def addresses(self) -> list[str]:
        """Addresses to put on lo for this target (besides 127.0.0.1)."""
        return []

    # The cgroup v2 directory its clients must be in (connect mode), set by Bench.
    client_cgroup: str | None = None

    def connect(self, port: int, timeout: float = 10) -> socket.socket:
        """A client connection to ``port`` of this target, made as its clients make them."""
        if self.client_cgroup is None:
            return socket.create_connection((self.host, port), timeout=timeout)
        # A socket belongs to the cgroup its creator was in at socket(): step in and out.
        home = own_cgroup()
        move_to_cgroup(os.getpid(), self.client_cgroup)
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        finally:
            move_to_cgroup(os.getpid(), home)
        try:
            sock.settimeout(timeout)
            sock.connect((self.host, port))
        except BaseException:
            sock.close()
            raise
        return sock


class Socat(Target):
    def __init__(self) -> None:
        super().__init__("socat", LOOPBACK, 36379, 35201, 37000)

    def commands(self, work: Path) -> list[list[str]]:
        return [["socat", f"TCP-LISTEN:{front},bind={LOOPBACK},fork,reuseaddr,backlog=4096", f"TCP:{LOOPBACK}:{back}"]
                for front, back in self.routes()]


class HAProxy(Target):
    def __init__(self) -> None:
        super().__init__(HAPROXY, LOOPBACK, 16379, 15201, 17000)

    def commands(self, work: Path) -> list[list[str]]:
        listens = "".join(f"listen p{front}\n    bind {LOOPBACK}:{front}\n    server s {LOOPBACK}:{back}\n"
                          for front, back in self.routes())
        config = work / "haproxy.cfg"
        config.write_text(f"global\n    maxconn {NOFILE // 2 - 100}\n\n"
                          "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
                          f"    timeout server 1h\n\n{listens}")
        return [["haproxy", "-db", "-f", str(config)]]


class Nginx(Target):
    def __init__(self) -> None:
        super().__init__("nginx", LOOPBACK, 26379, 25201, 27000)

    def commands(self, work: Path) -> list[list[str]]:
        servers = "".join(f"    server {{ listen {LOOPBACK}:{front} backlog=4096; proxy_pass {LOOPBACK}:{back}; }}\n"
                          for front, back in self.routes())
        config = work / "nginx.conf"
        config.write_text(f"load_module {NGINX_STREAM_MODULE};\nworker_processes auto;\n"
                          f"worker_rlimit_nofile {NOFILE};\npid {work}/nginx.pid;\nerror_log stderr warn;\n"
                          f"events {{ worker_connections {NOFILE // 2}; }}\n"
                          f"stream {{\n    access_log off;\n{servers}}}\n")
        return [["nginx", "-p", str(work), "-e", "stderr", "-c", str(config), "-g", "daemon off;"]]


class Ambassadord(Target):
    """ambassadord; a variant (--variant) has a service address and a daemon port of its
    own, extra flags, and may run from another source tree (started with that as cwd, so
    ``python -m ambassadord`` imports it from there)."""

    def __init__(self, name: str = "ambassadord", index: int = 0, flags: tuple[str, ...] = (),
                 source: Path | None = None) -> None:
        super().__init__(name, f"10.99.0.{1 + index}", REDIS, IPERF)
        self.port = DAEMON_PORT + index
        self.flags = flags
        self.source = source

    def listen_ports(self) -> set[int]:
        return {self.port}

    def addresses(self) -> list[str]:
        return [self.host] if self.host != SERVICE_IP else []

    def cwd(self) -> Path:
        return self.source or REPO

    def commands(self, work: Path) -> list[list[str]]:
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
        maps = [arg for front, back in self.routes() for arg in ("--map", f"{front}={LOOPBACK}:{back}")]
        return [[python, "-m", "ambassadord", "run", "--iptables", "--iptables-dest", self.host,
                 "--listen", f"{LOOPBACK}:{self.port}", *maps, "--admin", "off", "--log-level", "warning",
                 *self.flags]]


class AmbassadordConnect(Target):
    """ambassadord in connect mode: ``run --mode connect --cgroup CG``, the clients in CG.
    They dial 127.0.0.1:46379 / :45201, where nothing listens: the cgroup program rewrites
    the connect to the backend, and no proxy is in the path."""

    def __init__(self) -> None:
        super().__init__("ambassadord-connect", LOOPBACK, 46379, 45201, 47000)
        self.port = DAEMON_PORT + 99

    def listen_ports(self) -> set[int]:
        return {self.port}

    def commands(self, work: Path) -> list[list[str]]:
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
        maps = [arg for front, back in self.routes() for arg in ("--map", f"{front}={LOOPBACK}:{back}")]
        return [[python, "-m", "ambassadord", "run", "--mode", "connect", "--cgroup", str(self.client_cgroup),
                 "--listen", f"{LOOPBACK}:{self.port}", *maps, "--admin", "off", "--log-level", "warning",
                 "--workers", "1"]]


def parse_variant(text: str, index: int) -> Ambassadord:
    """``NAME[@DIR]=FLAGS``: ambassadord with FLAGS added (shell words), from DIR if given."""
    import shlex

    head, sep, flags = text.partition("=")
    name, _, source = head.partition("@")
    if not sep or not name or name in TARGETS:
        raise ValueError(f"--variant {text!r}: expected NAME[@DIR]=FLAGS with a new NAME, e.g. w1=--workers 1")
    path = Path(source).resolve() if source else None
    if path is not None and not (path / "ambassadord" / "__main__.py").exists():
        raise ValueError(f"--variant {text!r}: {path} holds no ambassadord source tree")
    return Ambassadord(name, index, tuple(shlex.split(flags)), path)


TARGETS = {t.name: t for t in (Target(), Socat(), HAProxy(), Nginx(), Ambassadord(), AmbassadordConnect())}


# ---- cgroups (connect mode's clients) -----------------------------------------------------


def cgroup2_root() -> str:
    # The daemon's own reader of /proc/mounts (it unescapes \040 and friends in paths);
    # imported here, so that runs without the connect target need no ambassadord.
    from ambassadord.connect.cgroup import cgroup2_mount

    try:
        return cgroup2_mount()
    except LookupError as exc:
        raise BenchError(f"{exc}: connect mode cannot be measured") from None


def own_cgroup() -> str:
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(cgroup2_root(), line[3:].strip().lstrip("/"))
    raise BenchError("this process is in no cgroup v2")


def move_to_cgroup(pid: int, cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def remove_cgroup(path: str) -> None:
    """Move what is left in ``path`` back to our cgroup, then remove it (its BPF goes with it)."""
    home, deadline = own_cgroup(), time.monotonic() + 10
    while os.path.isdir(path):
        with contextlib.suppress(OSError):
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    move_to_cgroup(int(pid), home)
            os.rmdir(path)
        if os.path.isdir(path):
            if time.monotonic() > deadline:
                raise BenchError(f"cannot remove cgroup {path}")
            time.sleep(0.05)


# ---- workloads -------------------------------------------------------------------------


def run_client(argv: list[str], timeout: float, cgroup: str | None = None) -> str:
    enter = None if cgroup is None else (lambda: move_to_cgroup(os.getpid(), cgroup))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=enter)
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout


def bulk(target: Target, opts) -> dict:
    out = run_client(["iperf3", "-c", target.host, "-p", str(target.iperf_port), "-t", str(opts.bulk_seconds), "-J"],
                     timeout=opts.bulk_seconds + 30, cgroup=target.client_cgroup)
    return {"gbps": json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9}


def redis_benchmark(target: Target, opts, keepalive: bool) -> dict:
    requests = opts.rr_requests if keepalive else opts.churn_requests
    out = run_client(["redis-benchmark", "-h", target.host, "-p", str(target.redis_port), "-t", "ping_mbulk",
                      "-c", str(opts.clients), "-n", str(requests), "-k", str(int(keepalive)), "-P", "1", "--csv"],
                     timeout=300, cgroup=target.client_cgroup)
    rows = list(csv.DictReader(line for line in out.splitlines() if line.startswith('"')))
    if not rows:
        raise BenchError(f"redis-benchmark printed no CSV: {out[-400:]!r}")
    row = rows[0]
    return {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"])}


WORKLOADS = {
    "bulk": bulk,
    "rr": lambda target, opts: redis_benchmark(target, opts, keepalive=True),
    "churn": lambda target, opts: redis_benchmark(target, opts, keepalive=False),
}

# Table rows: (label, workload, metric, unit format)
ROWS = [
    ("bulk: iperf3, Gbit/s", "bulk", "gbps", "{:.1f}"),
    ("request/response: redis-benchmark -k 1, requests/s", "rr", "rps", "{:,.0f}"),
    ("request/response: p50, ms", "rr", "p50_ms", "{:.3f}"),
    ("connection churn: redis-benchmark -k 0, requests/s", "churn", "rps", "{:,.0f}"),
    ("idle: RSS, MiB per 1,000 connections", "idle", "rss_mib_per_1k", "{:.2f}"),
    ("idle: PSS, MiB per 1,000 connections", "idle", "pss_mib_per_1k", "{:.2f}"),
    ("held back: MiB a client got in toward a backend that reads nothing (256 = the cap)", "held", "mib", "{:,.0f}"),
]
# ambassadord's goals: (workload, metric, what ambassadord ÷ HAProxy must reach, higher is better)
GOALS = [("bulk", "gbps", 1.5, True), ("rr", "rps", 1.0, True), ("rr", "p50_ms", 1.0, False),
         ("churn", "rps", 1.0, True)]


# ---- the bench ---------------------------------------------------------------------------


class Sink:
    """A backend that accepts connections and never reads from them (held-back measurement).

    Resource handling: the listening socket and every accepted one are closed by close();
    the accepting thread ends with the listening socket.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, STALL), backlog=64)
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self.conns.append(conn)

    def drop_connections(self) -> None:
        with self._lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            conn.close()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.drop_connections()


class Bench:
    def __init__(self, opts, targets: list[Target], work: Path) -> None:
        self.opts = opts
        self.targets = targets
        self.work = work
        self.ns = Namespace()
        self.servers = Servers(work)
        self.roots: dict[str, list[int]] = {}  # target -> the pids it started
        self.target_procs: list[str] = []  # their names in Servers (and their logs')
        self.samples: list[dict] = []
        self.idle: dict[str, dict] = {}
        self.held: dict[str, dict] = {}
        self.redis_admin: socket.socket | None = None
        self.cgroup: str | None = None  # connect mode's clients' cgroup, made by start()
        self.sink: Sink | None = None

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        if self.redis_admin is not None:
            self.redis_admin.close()
            self.redis_admin = None
        self.servers.stop_all()
        self.ns.delete()
        if self.cgroup is not None:
            remove_cgroup(self.cgroup)
            self.cgroup = None

    def start(self) -> None:
        self.ns.enter()
        self.servers.start("redis", ["redis-server", "--bind", LOOPBACK, "--port", str(REDIS), "--save", "",
                                     "--appendonly", "no", "--maxclients", "10000", "--protected-mode", "no",
                                     "--daemonize", "no", "--dir", str(self.work)])
        self.servers.start("iperf3", ["iperf3", "-s", "-B", LOOPBACK, "-p", str(IPERF)])
        wait_until("redis and iperf3", lambda: {REDIS, IPERF} <= listening_ports() and ping_through(LOOPBACK, REDIS),
                   self.servers)
        self.redis_admin = socket.create_connection((LOOPBACK, REDIS), timeout=10)
        if any(isinstance(t, AmbassadordConnect) for t in self.targets):
            self.cgroup = os.path.join(cgroup2_root(), f"ambbench-{os.getpid()}")
            os.mkdir(self.cgroup)
            for t in self.targets:
                if isinstance(t, AmbassadordConnect):
                    t.client_cgroup = self.cgroup
        self.sink = Sink()
        for target in self.targets:
            self.roots[target.name] = []
            for address in target.addresses():
                sh("ip", "addr", "add", f"{address}/32", "dev", "lo")
            for i, argv in enumerate(target.commands(self.work)):
                self.target_procs.append(name := f"{target.name}-{i}")
                self.roots[target.name].append(self.servers.start(name, argv, target.cwd()).pid)
            wait_until(target.name, lambda t=target: t.listen_ports() <= listening_ports()
                       and ping_target(t), self.servers)

    def tree(self, target: Target) -> list[int]:
        return process_tree(self.roots[target.name])

    def wait_for_clients(self, n: int) -> None:
        """Until Redis counts exactly ``n`` clients besides our admin connection."""
        wait_until(f"{n} Redis clients", lambda: redis_connected_clients(self.redis_admin) == n + 1, self.servers, 60)

    def measure_idle(self, target: Target) -> dict:
        with contextlib.ExitStack() as conns:
            for _ in range(100):  # warm-up: first-time allocations are not per-connection costs
                redis_ping(conns.enter_context(target.connect(target.redis_port)))
        self.wait_for_clients(0)
        before = memory_kib(self.tree(target))
        with contextlib.ExitStack() as conns:
            for _ in range(self.opts.idle_conns):
                redis_ping(conns.enter_context(target.connect(target.redis_port)))
            self.wait_for_clients(self.opts.idle_conns)
            after = memory_kib(self.tree(target))
        self.wait_for_clients(0)
        per_1k = 1000 / self.opts.idle_conns / 1024
        return {"connections": self.opts.idle_conns, "before_kib": before, "after_kib": after,
                "rss_mib_per_1k": (after["rss"] - before["rss"]) * per_1k,
                "pss_mib_per_1k": (after["pss"] - before["pss"]) * per_1k}

    def measure_held(self, target: Target) -> dict:
        """What a client gets into the path toward the Sink in --held-seconds (HELD_CAP at most)."""
        sent = 0
        with target.connect(target.stall_port) as conn:
            conn.setblocking(False)
            chunk = bytes(MiB)
            deadline = time.monotonic() + self.opts.held_seconds
            while sent < HELD_CAP and (left := deadline - time.monotonic()) > 0:
                try:
                    sent += conn.send(chunk)
                except BlockingIOError:
                    select.select([], [conn], [], min(left, 0.05))
            # An RST: every relay drops what it still holds for this connection.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sink.drop_connections()
        return {"mib": min(sent, HELD_CAP) / MiB, "capped": sent >= HELD_CAP, "seconds": self.opts.held_seconds}

    def run_one(self, rnd: int, workload: str, target: Target) -> dict:
        pids = self.tree(target)
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        sample = {"round": rnd, "workload": workload, "target": target.name}
        try:
            sample.update(WORKLOADS[workload](target, self.opts))
        except (BenchError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            sample["error"] = str(exc)
        wall = time.monotonic() - t0
        # Processes that came and went (socat's forks) are in their parent's cutime/cstime.
        sample["seconds"] = round(wall, 3)
        sample["cpu_pct"] = round(100 * (cpu_seconds(self.tree(target)) - cpu0) / wall, 1) if pids else None
        with contextlib.suppress(OSError):
            sample["conntrack"] = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
        self.servers.check_alive()
        return sample

    def run(self) -> None:
        self.start()
        for target in self.targets:
            if self.roots[target.name] and self.opts.idle_conns:
                self.idle[target.name] = self.measure_idle(target)
                mib = self.idle[target.name]["rss_mib_per_1k"]
                progress(f"idle {target.name}: {mib:.2f} MiB RSS per 1,000 connections")
        for target in self.targets:
            if self.opts.held_seconds > 0:
                self.held[target.name] = held = self.measure_held(target)
                progress(f"held back {target.name}: {held['mib']:,.0f} MiB in" + (" (the cap)" if held["capped"] else ""))
        for rnd in range(self.opts.rounds):
            order = self.targets[rnd % len(self.targets):] + self.targets[:rnd % len(self.targets)]
            for workload in WORKLOADS:
                for target in order:
                    sample = self.run_one(rnd, workload, target)
                    self.samples.append(sample)
                    progress(f"round {rnd + 1}/{self.opts.rounds} {workload:<5} {target.name:<11} " + describe(sample))


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe(sample: dict) -> str:
    if "error" in sample:
        return f"ERROR {sample['error']}"
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sample.items()
                    if k not in ("round", "workload", "target"))


# ---- results ----------------------------------------------------------------------------


def medians(samples: list[dict], idle: dict[str, dict],
            held: dict[str, dict] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """{(workload, metric): {target: median}}, including the idle and held-back
    measurements as one sample each."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in samples:
        for metric, v in s.items():
            if isinstance(v, (int, float)) and metric not in ("round", "conntrack", "seconds"):
                values.setdefault((s["workload"], metric), {}).setdefault(s["target"], []).append(v)
    for target, m in idle.items():
        for metric in ("rss_mib_per_1k", "pss_mib_per_1k"):
            values.setdefault(("idle", metric), {})[target] = [m[metric]]
    for target, m in (held or {}).items():
        values.setdefault(("held", "mib"), {})[target] = [m["mib"]]
    return {key: {t: statistics.median(v) for t, v in per.items()} for key, per in values.items()}


def ratio(med: dict[tuple[str, str], dict[str, float]], workload: str, metric: str, target: str) -> float | None:
    row = med.get((workload, metric), {})
    ref = row.get(HAPROXY)
    return row[target] / ref if target in row and ref else None


def render(med, targets: list[str]) -> str:
    lines = ["| metric (median; in brackets ÷ HAProxy) | " + " | ".join(targets) + " |",
             "|---|" + "---:|" * len(targets)]
    for label, workload, metric, fmt in ROWS:
        cells = []
        for t in targets:
            value = med.get((workload, metric), {}).get(t)
            r = ratio(med, workload, metric, t)
            cells.append("–" if value is None else fmt.format(value) + ("" if r is None else f" ({r:.2f}×)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| CPU of the target, % of one core (median) | " + " | ".join(targets) + " |",
              "|---|" + "---:|" * len(targets)]
    for workload in WORKLOADS:
        cells = [f"{v:.0f}" if (v := med.get((workload, "cpu_pct"), {}).get(t)) is not None else "–" for t in targets]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    if "ambassadord" not in targets or HAPROXY not in targets:
        return "\n".join(lines)
    lines += ["", "ambassadord against the goals (ambassadord ÷ HAProxy):", ""]
    labels = {(workload, metric): label for label, workload, metric, _ in ROWS}
    for workload, metric, goal, higher in GOALS:
        r = ratio(med, workload, metric, "ambassadord")
        met = r is not None and (r >= goal if higher else r <= goal)
        lines.append(f"- {labels[workload, metric]}: {'–' if r is None else f'{r:.2f}×'} "
                     f"(goal {'≥' if higher else '≤'} {goal:.1f}×): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def version(argv: list[str], pick: str = "") -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"({exc.strerror})"
    lines = (proc.stdout + proc.stderr).splitlines()
    return next((line.strip() for line in lines if pick in line), "?")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "python": version([str(VENV_PYTHON), "-V"]),
        "ambassadord": version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "haproxy": version(["haproxy", "-v"], "version"), "nginx": version(["nginx", "-v"], "version"),
        "socat": version(["socat", "-V"], "socat version"), "redis": version(["redis-server", "-v"]),
        "iperf3": version(["iperf3", "-v"], "iperf"), "loadavg": loadavg(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every workload on every target (default 3)")
    ap.add_argument("--bulk-seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--rr-requests", type=int, default=100_000, help="redis-benchmark -n with -k 1 (default 100000)")
    ap.add_argument("--churn-requests", type=int, default=20_000, help="redis-benchmark -n with -k 0 (default 20000)")
    ap.add_argument("--clients", type=int, default=50, help="redis-benchmark -c (default 50)")
    ap.add_argument("--idle-conns", type=int, default=2000, help="idle connections for the memory measurement "
                                                                  "(default 2000; 0 = skip it)")
    ap.add_argument("--held-seconds", type=float, default=2.0,
                    help="how long a client pushes toward a backend that reads nothing, per target "
                         "(default 2; 0 = skip it)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--json", default=None, help="where to write the raw results "
                                                 "(default bench/results/<UTC time>.json; '' = nowhere)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[@DIR]=FLAGS",
                    help="also run ambassadord as NAME with FLAGS added (e.g. w1='--workers 1'), from the source "
                         "tree DIR if given (e.g. a git worktree of an older commit); repeatable")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s bulk, 5000/1000 requests, "
                                                         "300 idle connections (~15 s)")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.bulk_seconds, opts.idle_conns, opts.held_seconds = 1, 1, 300, 0.5
        opts.rr_requests, opts.churn_requests = 5_000, 1_000  # a smoke run: the shape of the table, not figures
    unknown = set(opts.targets.split(",")) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    try:
        opts.variants = [parse_variant(text, i) for i, text in enumerate(opts.variant, 1)]
    except ValueError as exc:
        ap.error(str(exc))
    if len({v.name for v in opts.variants}) < len(opts.variants):
        ap.error("--variant: each NAME once")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/compare.py needs root (a network namespace and iptables rules)")
    missing = [what for what in REQUIRED if not (Path(what).exists() if what.startswith("/") else shutil.which(what))]
    if missing:
        raise SystemExit(f"bench/compare.py: missing {', '.join(missing)} (see bench/README.md for the packages)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    targets = [TARGETS[name] for name in opts.targets.split(",")] + opts.variants
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine()

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally below

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    with tempfile.TemporaryDirectory(prefix="ambbench-") as work:
        bench = Bench(opts, targets, Path(work))
        atexit.register(bench.close)
        try:
            bench.run()
        except BenchError as exc:
            raise SystemExit(f"bench/compare.py: {exc}") from None
        finally:
            bench.close()
        # The proxies' logs should be empty (ambassadord runs with --log-level warning).
        logs = bench.servers.logs_with_content(bench.target_procs)
    # Other load on the machine skews everything: the load average tells whether there was some.
    info["loadavg"] = {"start": info["loadavg"], "end": loadavg()}
    return report(opts, bench, info, started, logs)


def report(opts, bench: Bench, info: dict, started: datetime.datetime, logs: dict[str, str]) -> int:
    """Print the tables, write the JSON; 1 if any run failed."""
    med = medians(bench.samples, bench.idle, bench.held)
    names = [t.name for t in bench.targets]
    settings = {k: v for k, v in vars(opts).items() if k not in ("json", "variants")}
    table = render(med, names)
    print(f"{info['nproc']} cores ({info['cpu']}), Linux {info['kernel']}, {info['python']}, ambassadord "
          f"{info['ambassadord']}; " + "; ".join(info[k] for k in ("haproxy", "nginx", "socat", "redis", "iperf3")))
    print(f"settings: {json.dumps(settings)}; load average {info['loadavg']['start']} before, "
          f"{info['loadavg']['end']} after\n")
    print(table)
    errors = [s for s in bench.samples if "error" in s]
    if errors:
        print(f"\n{len(errors)} run(s) failed: "
              + "; ".join(f"{s['workload']} {s['target']}: {s['error']}" for s in errors))
    for name, tail in logs.items():
        progress(f"--- {name}'s log (last lines) ---\n{tail}")
    path = opts.json if opts.json is not None else str(RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}.json")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "started": started.isoformat(), "machine": info, "settings": settings, "targets": names,
            "samples": bench.samples, "idle": bench.idle, "held": bench.held, "server_logs": logs,
            "medians": {f"{w}.{m}": per for (w, m), per in sorted(med.items())}, "table": table,
        }, indent=1) + "\n")
        print(f"\nraw samples: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything is cleaned up by then (finally, atexit)
        sys.exit("bench/compare.py: interrupted")
