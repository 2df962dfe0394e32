"""A real Docker engine for tests: Debian's dockerd, inside a network namespace of its own.

The namespace plays a Docker host (../shared/RECIPES.md, "Docker"): dockerd's docker0, its
iptables rules, its forwarding sysctl and its containers all stay in it, and the machine's
own networking is never touched. dockerd enters it with ``nsenter --net`` because ``ip netns
exec`` remounts /sys and hides the cgroup mounts ("Devices cgroup isn't mounted").

Everything the engine owns is named after one directory ``D`` = ``/tmp/amb-docker-<pid>-<n>``
(short on purpose: containerd's sockets live under it and a unix socket path has 108 bytes):

- ``D/root`` (data root), ``D/exec`` (exec root), ``D/docker.sock`` (the API), ``D/docker.pid``;
- the cgroup parent ``amb-docker-<pid>-<n>`` in every cgroup hierarchy (dockerd's default,
  ``/docker``, would be shared with any other engine on the machine and is never removed);
- the namespace ``amb-<label>-<pid>`` (tests/netns.py), whose name is kept in ``D/netns``.

:class:`DockerEngine` starts it and, on exit, also when the start or the test failed, takes
it all down again: containers removed, dockerd SIGTERMed (SIGKILLed after a deadline), every
process left in the namespace or the cgroups killed, the mounts under ``D`` unmounted
(dockerd bind-mounts its data root and each container's network namespace file), the cgroup
directories, ``D`` and the namespace deleted. :func:`sweep_stale` does the same for the
engines of a test run that was killed before it could (tests/conftest.py calls it).

Images come from the machine, not a registry: see tests/docker_images.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests import server_logs
from tests.netns import Netns

# containerd and runc come with Debian's docker.io; dockerd starts its own containerd.
REQUIRED_TOOLS = ("dockerd", "containerd", "runc", "nsenter", "umount", "ip", "ldd")
PREFIX = "amb-docker-"
# Debian's docker.io puts the CLI of dockerd's own version here. A newer CLI elsewhere on
# PATH (e.g. a static /usr/local/bin/docker) also works, by negotiating the API version down.
DEBIAN_CLI = "/usr/bin/docker"
_serial = itertools.count()
# Whether /run/containerd existed before this process started its first engine: only then
# is it someone else's (see teardown()).
_run_containerd_was_there: bool | None = None


def docker_cli() -> str | None:
    """The docker CLI to use: $AMBASSADORD_DOCKER_CLI, Debian's, or the first on PATH."""
    chosen = os.environ.get("AMBASSADORD_DOCKER_CLI")
    if chosen:
        return chosen
    if os.access(DEBIAN_CLI, os.X_OK):
        return DEBIAN_CLI
    return shutil.which("docker")


def missing_prerequisites() -> list[str]:
    """What a Docker engine test needs and this machine lacks (empty when all is there)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if docker_cli() is None:
        missing.append("docker (the CLI)")
    if os.geteuid() != 0:
        missing.append("root (dockerd, network namespaces and cgroups need it)")
    return missing


def require_prerequisites() -> None:
    """Skip when prerequisites are missing, but fail under CI, where a skip would hide a gap."""
    import pytest

    missing = missing_prerequisites()
    if not missing:
        return
    message = "Docker engine test prerequisites missing: " + ", ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


class DockerError(RuntimeError):
    """A docker CLI command failed, or the engine did not start."""


@dataclass(frozen=True)
class Container:
    """A running container: its id, its name and its IPv4 address on its first network
    ("" when it has none)."""

    id: str
    name: str
    ip: str


class DockerEngine:
    """dockerd in a fresh network namespace; a context manager.

    Args:
      label: names the namespace (``amb-<label>-<pid>``); two engines alive at once need two.
      start_timeout: seconds for ``docker info`` to answer after dockerd was started.
      stop_timeout: seconds dockerd gets after SIGTERM before SIGKILL.
      log_dir: where dockerd's log (containerd's included) goes; it is kept there for a
        failure report (tests/server_logs.py). Without it, the log lives in ``D`` and dies
        with it.
      storage_driver: ``vfs`` (RECIPES' choice: works on any file system, but copies an
        image's whole tree for every container and build step) or ``overlay2`` (checked
        here too, on the ext4 under /tmp: its mounts go under ``D`` and are removed with it;
        worth it for builds on a large base image).
      extra_args: more dockerd flags.

    Attributes: ``ns`` (the tests/netns.py namespace), ``dir`` (``D``), ``host`` (the
    DOCKER_HOST URL, ``unix://D/docker.sock``), ``pid`` (dockerd's), ``log``.

    Resource handling: everything listed in the module docstring is removed by
    :meth:`close` (also called by ``__exit__`` and when the start fails), which tries every
    step even when an earlier one failed and raises the first error at the end.
    """

    def __init__(self, label: str = "dock", *, start_timeout: float = 60, stop_timeout: float = 15,
                 log_dir: Path | None = None, storage_driver: str = "vfs", extra_args: Sequence[str] = ()):
        self.stop_timeout = stop_timeout
        self.storage_driver = storage_driver
        self.extra_args = tuple(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{next(_serial)}-", dir="/tmp"))
        self.cgroup_parent = self.dir.name
        self.host = f"unix://{self.dir}/docker.sock"
        self.log = (Path(log_dir) if log_dir is not None else self.dir) / f"{self.dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.ns: Netns | None = None
        global _run_containerd_was_there
        if _run_containerd_was_there is None:
            _run_containerd_was_there = os.path.exists("/run/containerd")
        try:
            self.ns = Netns(label)
            (self.dir / "netns").write_text(self.ns.name)
            self._start(start_timeout, extra_args)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _start(self, timeout: float, extra_args: Sequence[str]) -> None:
        d = self.dir
        # An empty config of its own: a /etc/docker/daemon.json of the machine's (hosts,
        # bridge, registry mirrors ...) must not change or break the test engine.
        (d / "daemon.json").write_text("{}\n")
        cmd = ["nsenter", f"--net=/run/netns/{self.ns.name}", "dockerd",
               "--data-root", f"{d}/root", "--exec-root", f"{d}/exec", "-H", self.host,
               "--pidfile", f"{d}/docker.pid", "--storage-driver", self.storage_driver,
               "--config-file", f"{d}/daemon.json", "--cgroup-parent", self.cgroup_parent,
               *extra_args]
        with open(self.log, "wb") as out:
            # nsenter execs dockerd: self.proc.pid is dockerd's pid. A session of its own, so
            # that a Ctrl-C meant for pytest reaches dockerd only through close().
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        server_logs.started(self.log, f"dockerd in {self.ns.name}")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited {self.proc.returncode} at start: {server_logs.tail(self.log, 15)}")
            probe = self._cli("info", "--format", "{{.ServerVersion}}", timeout=10)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DockerError(f"dockerd did not answer within {timeout:g}s: {probe.stderr.strip()}; "
                                  f"log: {server_logs.tail(self.log, 15)}")
            time.sleep(0.05)

    def _cli(self, *args: str, input: bytes | str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.dir / "cli")  # not the user's contexts and credentials
        return subprocess.run([docker_cli(), "-H", self.host, *args], input=input, capture_output=True,
                              text=True, timeout=timeout, env=env)

    def cli(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """``docker -H HOST ARGS...`` against this engine, whatever its exit status: the
        completed process (``returncode``, ``stdout``, ``stderr`` as text)."""
        return self._cli(*args, input=input, timeout=timeout)

    def docker(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        """Run ``docker -H HOST ARGS...`` against this engine; return its stdout.

        Raises:
          DockerError: the command exited non-zero (with ``check``), quoting its stderr.
        """
        proc = self._cli(*args, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def ipv4_addresses(self, container: str) -> list[str]:
        """The IPv4 addresses of ``container`` (id or name), one per network it is on
        (none with ``--network host`` or ``none``)."""
        networks = json.loads(self.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))
        return [n["IPAddress"] for n in (networks or {}).values() if n.get("IPAddress")]

    @contextlib.contextmanager
    def container(self, image: str, *cmd: str, name: str | None = None,
                  options: Sequence[str] = ()) -> Iterator[Container]:
        """``docker run -d [OPTIONS] IMAGE CMD...``; removed (``rm -f``) on exit."""
        args = ["run", "-d", *(["--name", name] if name else []), *options, image, *cmd]
        cid = self.docker(*args).strip()
        try:
            name = self.docker("inspect", "-f", "{{.Name}}", cid).strip().lstrip("/")
            yield Container(id=cid, name=name, ip=next(iter(self.ipv4_addresses(cid)), ""))
        finally:
            self.docker("rm", "-f", "-v", cid, check=False)

    def close(self) -> None:
        """Take everything down (see the class docstring); safe to call more than once."""
        errors: list[BaseException] = []

        def step(fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # every step runs; the first error is raised at the end
                errors.append(exc)

        if self.proc is not None and self.proc.poll() is None:
            step(self._remove_containers)
            step(self._stop_dockerd)
        if self.proc is not None:
            server_logs.finished(self.log)
        step(teardown, self.dir, self.ns.name if self.ns else None, not _run_containerd_was_there)
        if errors:
            raise errors[0]

    def _remove_containers(self) -> None:
        ids = self.docker("ps", "-aq", timeout=30).split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, timeout=60)

    def restart(self, timeout: float = 60) -> None:
        """Stop dockerd (SIGTERM: it stops the containers, as a restart or an upgrade of the
        engine does) and start it again on the same data; containers with a restart policy
        come back."""
        self._stop_dockerd()
        self._start(timeout, self.extra_args)

    def _stop_dockerd(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # teardown() then kills its containerd, shims and containers
            self.proc.wait()

    def __enter__(self) -> DockerEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- taking an engine's remains down (also those of a killed test run) ---------------------


def _cgroup_mounts() -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy."""
    with open("/proc/mounts", encoding="utf-8") as f:
        return [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def cgroup_dirs(parent: str) -> list[str]:
    """The directories named ``parent`` under every cgroup hierarchy that exist now."""
    return [p for p in (os.path.join(m, parent) for m in _cgroup_mounts()) if os.path.isdir(p)]


def _pids_in_cgroups(dirs: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for top in dirs:
        for here, _, _ in os.walk(top):
            with contextlib.suppress(OSError), open(os.path.join(here, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
    return pids


def _pids_in_netns(ns_name: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", ns_name], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    top = str(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _kill_all(pids_now, what: str, timeout: float = 10) -> None:
    """SIGKILL every pid ``pids_now()`` names until it names none (or the deadline)."""
    deadline = time.monotonic() + timeout
    while pids := pids_now() - {os.getpid()}:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise DockerError(f"processes {sorted(pids)} in {what} survive SIGKILL")
        time.sleep(0.02)


def _rmdir_cgroup(path: str, timeout: float = 5) -> None:
    """Remove an empty cgroup directory (its files go with it). Right after its last process
    died the kernel may still say EBUSY for a moment: retry until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def shim_sockets(d: Path) -> list[str]:
    """The paths of the shim sockets of the containers the engine in ``d`` knows.

    containerd 1.6 (shim.SocketAddress) names them /run/containerd/s/<hex sha256 of
    "<its GRPC socket>/<namespace>/<container id>">; dockerd's namespace is "moby".
    """
    grpc = f"{d}/exec/containerd/containerd.sock"
    ids: set[str] = set()
    for folder in (d / "root" / "containers", d / "exec/containerd/daemon/io.containerd.runtime.v2.task/moby"):
        with contextlib.suppress(OSError):
            ids.update(os.listdir(folder))
    return [f"/run/containerd/s/{hashlib.sha256(f'{grpc}/moby/{cid}'.encode()).hexdigest()}" for cid in sorted(ids)]


def teardown(d: Path, ns_name: str | None, remove_run_containerd: bool = False) -> None:
    """Remove what an engine in directory ``d`` left: processes in its namespace or cgroups
    (SIGKILL), mounts under ``d``, its cgroup directories, ``d`` and the namespace.

    Its dockerd must be gone or be allowed to die. containerd puts its shims' sockets in
    /run/containerd/s whatever its own directories (a path compiled in); a shim removes its
    socket when it exits, a killed one does not: those of this engine's containers are
    removed here, and with ``remove_run_containerd`` also /run/containerd when it is empty.
    """
    groups = cgroup_dirs(d.name)
    sockets = shim_sockets(d)
    _kill_all(lambda: _pids_in_cgroups(groups) | (_pids_in_netns(ns_name) if ns_name else set()),
              f"{ns_name} or cgroup {d.name}")
    for socket_path in sockets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    for point in mounts_under(d):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)  # busy: detach now, free later
    if left := mounts_under(d):
        raise DockerError(f"mounts under {d} survive umount -l: {left}")
    for top in groups:
        for here, _, _ in os.walk(top, topdown=False):  # children first
            _rmdir_cgroup(here)
    if remove_run_containerd:
        for empty in ("/run/containerd/s", "/run/containerd"):
            with contextlib.suppress(OSError):
                os.rmdir(empty)
    shutil.rmtree(d, ignore_errors=True)
    if d.exists():
        raise DockerError(f"cannot remove {d}")
    if ns_name:
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)


def sweep_stale() -> list[str]:
    """Take down the engines of earlier test runs killed before their clean-up ran:
    ``/tmp/amb-docker-<pid>-*`` whose pid is gone. Returns their directories."""
    swept = []
    for d in sorted(Path("/tmp").glob(f"{PREFIX}*-*-*")):
        owner = d.name[len(PREFIX):].split("-")[0]
        if not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((d / "docker.pid").read_text())
            if f"{d}/docker.sock".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        ns_name = (d / "netns").read_text().strip() if (d / "netns").exists() else None
        # /run/containerd holding nothing but shim sockets is what test engines leave; a
        # containerd of the machine's would have its containerd.sock there.
        only_shims = set(os.listdir("/run/containerd")) <= {"s"} if os.path.isdir("/run/containerd") else False
        with contextlib.suppress(DockerError, OSError):
            teardown(d, ns_name, remove_run_containerd=only_shims)
            swept.append(str(d))
    return swept
