"""The deployment files: docker/Dockerfile, .dockerignore and deploy/.

No Docker engine, systemd, Nomad or Kubernetes runs here, so each file is tested as far as
the machine allows, against the real daemon:

- every file parses (Dockerfile, YAML, HCL, TOML, the systemd unit), and the compose file
  passes Compose's own schema (``docker compose config`` or docker-compose v1);
- every command line in them (the image's ENTRYPOINT + CMD, compose's command, the unit's
  ExecStart, the Nomad args, the DaemonSet args) is accepted by the real CLI parser, and the
  routes they name pass ``ambassadord check``, so a renamed flag or a bad spec fails here;
- the image is "built" without Docker: the build stage's COPY instructions are applied to
  the repository (filtered by .dockerignore) in a temporary root, and its RUN steps (make the
  venv, pip install) are replayed there with the test's Python (and pip's cache). That root
  then stands in for the image *and* for a host with the systemd install (/opt/ambassadord);
- ``systemd-analyze verify`` (and ``security --offline``) check the unit in that root;
- each deployment's command then really runs: in network namespaces (hosts A and B and a
  container C on B's bridge, tests/topology.py), as root, with --iptables, against Redis on
  host A, with a real Consul agent on B where the deployment uses consul:///redis. The unit
  runs with its capability bounding set and NoNewPrivileges (setpriv), speaks sd_notify to
  a socket of the test, and is reloaded and stopped the way systemd would. The probes and
  health checks are made exactly as the kubelet and Docker would make them;
- the kernel relay (--sockmap, which needs CAP_BPF) works with exactly the unit's
  capabilities (checked in /proc), and not without CAP_BPF; the unit's SystemCallFilter=
  lets bpf(2) through.

Network: only loopback and namespaces the tests create. The namespace tests skip without
root (and fail under CI=true, as tests/netns.py has it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from ambassadord.cli import build_parser
from ambassadord.relay import Sockmap, SockmapError
from tests import server_logs, topology
from tests.consul import ConsulAgent, consul_binary
from tests.daemon import Daemon, RedisProcess, connect, free_port, ping, require, wait_until
from tests.netns import Netns, require_prerequisites
from tests.topology import BRIDGE, HOST_A, RespClient, scenario_topology

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "ambassadord.service"
NOMAD = DEPLOY / "ambassadord.nomad.hcl"
K8S = DEPLOY / "kubernetes"
ROUTES_EXAMPLE = DEPLOY / "routes.example.toml"
GUIDE = DEPLOY / "README.md"

# The console script of the environment running the tests (for `ambassadord check`).
CHECK_SCRIPT = Path(sys.executable).parent / "ambassadord"

# What a daemon started with the default --listen listens on.
DEFAULT_LISTENERS = ("0.0.0.0:10000", "[::]:10000")
REDIS_PORT = 6379
SECOND_REDIS_PORT = 6380  # a second Redis on host A, to see a reload switch backends

# PATH inside the debian:*-slim image before the Dockerfile's ENV prepends to it.
IMAGE_BASE_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


# ---- the command lines --------------------------------------------------------------------


def parse_run(argv: Sequence[str]):
    """``ambassadord run ARGV`` through the real parser; a failure names the bad flag."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(["run", *argv])
    except SystemExit as exc:
        pytest.fail(f"`ambassadord run {shlex.join(argv)}` is refused by the CLI parser (exit {exc.code}):\n"
                    f"{err.getvalue()}", pytrace=False)


def check_routes(*, config: str | Path | None = None, maps: Sequence[str] = (), env: dict | None = None,
                 use_env: bool = False) -> str:
    """``ambassadord check`` (the console script of the test venv) must exit 0; its output."""
    cmd = [str(CHECK_SCRIPT), "check"]
    if config is not None:
        cmd += ["--config", str(config)]
    for m in maps:
        cmd += ["--map", m]
    if use_env:
        cmd.append("--env")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_")}
    environ.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=60)
    assert proc.returncode == 0, f"`{shlex.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert "route(s) OK" in proc.stdout, proc.stdout
    return proc.stdout


def check_command_routes(argv: Sequence[str], *, env: dict | None = None, files: dict[str, Path] | None = None) -> None:
    """The routes a ``run`` command line names (--map, --config, BACKEND_ env) pass ``check``.
    ``files`` maps a --config path of the deployment to the file that will be there."""
    args = parse_run(argv)
    config = args.config
    if config is not None:
        assert files and config in files, f"--config {config}: the test does not know what file goes there"
        config = files[config]
    assert config or args.map or any(k.startswith("BACKEND_") for k in env or {}), \
        f"`ambassadord run {shlex.join(argv)}` has no routes"
    check_routes(config=config, maps=args.map, env=env, use_env=True)


# ---- Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[dict] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def last(self, instruction: str) -> str | None:
        values = self.all(instruction)
        return values[-1] if values else None


def dockerfile_stages() -> list[Stage]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    bases = iter(parser.parent_images)  # FROM images with the ARGs substituted
    stages: list[Stage] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=next(bases), name=name))
        elif stages and ins["instruction"] != "COMMENT":
            stages[-1].instructions.append(ins)
    return stages


def exec_form(value: str, what: str) -> list[str]:
    try:
        argv = json.loads(value)
    except ValueError:
        pytest.fail(f"{what} {value!r} is not in exec form (a JSON array)", pytrace=False)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{what} {value!r}"
    return argv


def healthcheck_command(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    assert value, "the image has no HEALTHCHECK"
    options, sep, cmd = value.partition(" CMD ")
    assert sep, f"HEALTHCHECK {value!r}: expected OPTIONS CMD [...]"
    return exec_form(cmd.strip(), "HEALTHCHECK CMD")


@dataclass
class Image:
    """The final stage of docker/Dockerfile, as the tests use it."""

    stage: Stage
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]  # its ENV, PATH excluded
    path: list[str]  # its PATH, container paths

    def command(self, cmd: Sequence[str] | None = None) -> list[str]:
        """What the container runs: ENTRYPOINT + CMD (or + the arguments of `docker run IMAGE ARGS`)."""
        return [*self.entrypoint, *(self.cmd if cmd is None else cmd)]


def load_image() -> Image:
    final = dockerfile_stages()[-1]
    parser = DockerfileParser(path=str(DOCKERFILE))
    path_value = re.search(r"(?:^|\s)PATH=(\S+)", final.last("ENV") or "")
    assert path_value, "the image's ENV sets no PATH (the venv's bin directory must come first)"
    path = []
    for entry in path_value.group(1).split(":"):
        path.extend(IMAGE_BASE_PATH if entry in ("$PATH", "${PATH}") else [entry])
    env = {k: v for k, v in parser.envs.items() if k != "PATH"}
    return Image(stage=final, entrypoint=exec_form(final.last("ENTRYPOINT") or "null", "ENTRYPOINT"),
                 cmd=exec_form(final.last("CMD") or "[]", "CMD"), env=env, path=path)


def dockerignore_patterns() -> list[tuple[bool, str, re.Pattern]]:
    """.dockerignore as (exclude?, pattern, regex) in order; the last match decides
    (Docker's rule)."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((not negate, pattern, re.compile(regex + r"\Z")))
    return out


def context_excludes(rel: str, patterns) -> bool:
    """Whether the build context leaves out ``rel`` (a path relative to the context): a
    pattern matches a path or any of its parent directories."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, _, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = exclude
    return excluded


def build_context() -> list[str]:
    """The files (relative paths) the builder gets: the repository minus .dockerignore."""
    patterns = dockerignore_patterns()
    exceptions = [p for exclude, p, _ in patterns if not exclude]

    def prune(rel: str) -> bool:  # an excluded directory that no exception reaches into
        return context_excludes(rel, patterns) and not any(
            "*" in p or "?" in p or "[" in p or p.startswith(rel + "/") for p in exceptions)

    files = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel_dir = os.path.relpath(dirpath, REPO)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not prune(rel_dir + d)]
        files += [rel_dir + f for f in filenames if not context_excludes(rel_dir + f, patterns)]
    return sorted(files)


def container_path(root: Path, path: str) -> Path:
    """Where a path of the image (or of a host with the systemd install) is in ``root``."""
    assert path.startswith("/"), path
    return root / path.lstrip("/")


def apply_copy(value: str, context: set[str], root: Path) -> None:
    """One build-stage COPY: sources from the build context into ``root``, as Docker does."""
    words = shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    assert not flags, f"COPY {value}: the test does not replay flags {flags}"
    *sources, dest = words
    into_dir = dest.endswith("/") or len(sources) > 1
    for src in sources:
        src = src.rstrip("/")
        below = [f for f in context if f == src or f.startswith(src + "/")]
        assert below, f"COPY {value}: {src} is not in the build context (missing, or excluded by .dockerignore)"
        for rel in below:
            if rel == src:  # a file
                target = container_path(root, dest.rstrip("/") + "/" + Path(src).name) if into_dir \
                    else container_path(root, dest)
            else:  # a directory's contents go to dest (or dest/NAME/ with several sources)
                sub = rel[len(src) + 1:]
                base = dest.rstrip("/") + ("/" + Path(src).name if len(sources) > 1 else "")
                target = container_path(root, base + "/" + sub)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, target)


def expand_args(value: str, args: dict[str, str]) -> str:
    """``value`` with the build arguments' references (``$NAME``, ``${NAME}``,
    ``${NAME:-word}``, ``${NAME:+word}``) replaced as Docker and the shell would, given
    ``args`` (the ARG defaults: the build the test replays passes none)."""
    def one(m: re.Match) -> str:
        name, op, word = m.group("name") or m.group("bare"), m.group("op"), m.group("word")
        if name not in args:
            return m.group(0)
        have = args[name]
        if op == ":-":
            return have or word
        if op == ":+":
            return word if have else ""
        return have
    return re.sub(r"\$(?:\{(?P<name>\w+)(?:(?P<op>:[-+])(?P<word>[^}]*))?\}|(?P<bare>\w+))", one, value)


def stage_args(stage: Stage) -> dict[str, str]:
    """The stage's ARGs and their defaults."""
    args = {}
    for value in stage.all("ARG"):
        name, _, default = value.partition("=")
        args[name.strip()] = default.strip().strip('"')
    return args


def replay_run(value: str, root: Path, log: Path) -> None:
    """The build stage's RUN, with the test's Python: only the steps this test knows
    (python3 -m venv, the venv's pip); paths of the image are mapped into ``root``. A RUN
    that installs Debian packages is not replayed: this machine has its own Python. Two
    deviations, to keep the test affordable: pip's cache is used (no --no-cache-dir), and
    pip writes no .pyc files (PIP_NO_COMPILE: 6 s of the 26 s)."""
    if "apt-get install" in value:
        return
    for part in value.split("&&"):
        argv = shlex.split(part)
        if not argv:
            continue
        mapped = [str(container_path(root, a)) if a.startswith("/") else a for a in argv]
        if argv[:3] == ["python3", "-m", "venv"]:
            cmd = [sys.executable, *mapped[1:]]
        elif argv[0].endswith("/bin/pip") and argv[1] in ("install", "uninstall"):
            cmd = [a for a in mapped if a != "--no-cache-dir"]
        else:
            pytest.fail(f"the build stage runs {part.strip()!r}, which this test cannot replay", pytrace=False)
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=900, cwd=root, env={**os.environ, "PIP_NO_COMPILE": "1"})
        assert proc.returncode == 0, f"build step `{shlex.join(cmd)}` failed:\n{server_logs.tail(log, 60)}"


@dataclass
class Built:
    """The image's file system (and a host's, for the systemd install) in a directory."""

    root: Path
    image: Image

    def resolve(self, argv0: str) -> str:
        """argv[0] as the image's PATH finds it (its own directories mapped into root)."""
        if argv0.startswith("/"):
            return str(container_path(self.root, argv0))
        for entry in self.image.path:
            candidate = container_path(self.root, entry) / argv0
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        found = shutil.which(argv0, path=":".join(IMAGE_BASE_PATH))
        assert found, f"{argv0}: not on the image's PATH {self.image.path}"
        return found

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [self.resolve(argv[0]), *argv[1:]]

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A container's environment: the image's ENV and PATH (mapped), nothing of ours."""
        path = [str(container_path(self.root, p)) if p not in IMAGE_BASE_PATH else p for p in self.image.path]
        return {**self.image.env, "PATH": ":".join(path), "LANG": "C.UTF-8", **(extra or {})}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """docker/Dockerfile's build stage, replayed without Docker into a fresh root: one
    clean venv at ROOT/opt/ambassadord, from exactly the files the Dockerfile copies."""
    stages = dockerfile_stages()
    final = stages[-1]
    copies = [v for v in final.all("COPY") if v.startswith("--from=")]
    assert len(copies) == 1, f"the final stage should copy the venv from the build stage: {final.all('COPY')}"
    from_name, *rest = shlex.split(copies[0])
    build = next((s for s in stages if s.name == from_name.split("=", 1)[1]), None)
    assert build is not None, f"COPY {copies[0]}: no stage of that name"
    assert rest[0] == rest[1], f"COPY {copies[0]}: the venv must keep its path (its scripts name it)"

    root = tmp_path_factory.mktemp("image-root")
    log = root.parent / "build.log"
    context = set(build_context())
    args = stage_args(build)
    for ins in build.instructions:
        if ins["instruction"] == "COPY":
            apply_copy(expand_args(ins["value"], args), context, root)
        elif ins["instruction"] == "RUN":
            replay_run(expand_args(ins["value"], args), root, log)
        elif ins["instruction"] not in ("ARG", "ENV", "WORKDIR", "LABEL"):
            pytest.fail(f"build stage: {ins['instruction']} {ins['value']}: not replayed by this test")
    venv = container_path(root, rest[0])
    assert (venv / "bin" / "ambassadord").is_file(), f"no console script in {venv}/bin:\n{server_logs.tail(log)}"
    return Built(root=root, image=load_image())


# ---- processes in the namespaces ------------------------------------------------------------


class Deployed(Daemon):
    """A deployment's daemon: ``argv`` in ``ns`` with exactly ``env``, in ``workdir``; the
    harness of tests/daemon.py otherwise (log, describe(), kill()).

    Ready when it listens on ``listening`` (``ss``) and, with --iptables, its nat chains are
    in iptables and ip6tables; ``ready=False`` leaves waiting to the caller.
    """

    def __init__(self, ns: Netns, argv: Sequence[str], env: dict[str, str], workdir: Path, *,
                 title: str, listening: Sequence[str] = DEFAULT_LISTENERS, iptables: bool = True,
                 ready: bool = True, timeout: float = 20):
        self.argv, self.listening, self.iptables = list(argv), set(listening), iptables
        self._start(self.argv, title=f"{title}: `{shlex.join(self.argv)}`", ns=ns, env=env, cwd=workdir,
                    workdir=workdir, ready_timeout=timeout if ready else None)

    def listeners(self) -> set[str]:
        return self.ns.listening()

    def has_chain(self) -> bool:
        return all(self.CHAIN in self.nat_rules(tool) for tool in ("iptables", "ip6tables"))

    def ready(self) -> bool:
        self._check_alive()
        return self.listening <= self.listeners() and (not self.iptables or self.has_chain())

    def stop(self, timeout: float, *, signalled: bool = False) -> int:
        """SIGTERM (what docker stop, systemd, Nomad and the kubelet send; once: a second
        one would cut the grace period short), unless ``signalled`` already; the exit
        status within ``timeout``, which is the deployment's own stop timeout."""
        if not signalled:
            self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if self.iptables:
            assert not self.has_chain(), f"nat rules left behind after exit: {self.describe()}"
        return code


def http_get(host: str, port: int, path: str, *, ns: Netns | None = None, timeout: float = 3) -> tuple[int, bytes]:
    """One HTTP/1.1 GET as a probe makes it (kubelet's headers); (status, body)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = ns.socket(family) if ns is not None else socket.socket(family, socket.SOCK_STREAM)
    with contextlib.closing(sock):
        sock.settimeout(timeout)
        sock.connect((host, port))
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: kube-probe/1.32\r\n"
                     f"Accept: */*\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line = data.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2 and status_line[0].startswith(b"HTTP/"), f"not an HTTP answer: {data[:200]!r}"
    return int(status_line[1]), data.partition(b"\r\n\r\n")[2]


def wait_healthz(host: str, port: int, path: str, *, ns: Netns | None, daemon: Deployed | None = None,
                 timeout: float = 15) -> None:
    def ok() -> bool:
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(daemon.describe())
        return http_get(host, port, path, ns=ns)[0] == 200

    wait_until(ok, timeout=timeout, what=lambda: f"GET http://{host}:{port}{path} -> 200"
               + (f"; {daemon.describe()}" if daemon else ""))


def redis_roundtrip(ns: Netns, host: str, port: int = REDIS_PORT, *, key: str = "deploy:test") -> bytes:
    """PING, SET, GET through ``host:port`` from ``ns``; returns the value of ``whoami``
    (which Redis instance answered)."""
    with RespClient.connect(ns, host, port, timeout=5) as redis:
        assert redis.command("PING") == "PONG"
        value = f"{ns.name}:{time.monotonic_ns()}"
        assert redis.command("SET", key, value) == "OK"
        assert redis.command("GET", key) == value.encode()
        return redis.command("GET", "whoami")


@contextlib.contextmanager
def resp_on(host: str, port: int) -> Iterator[RespClient]:
    """A RespClient over a connection from the test's own namespace."""
    sock = socket.create_connection((host, port), timeout=3)
    client = RespClient(sock)
    try:
        yield client
    finally:
        client._reader.close()
        sock.close()


def setpriv_prefix(capabilities: Sequence[str], *, no_new_privs: bool) -> list[str]:
    """``setpriv`` arguments that give a root process only these capabilities (the bounding
    set, as systemd's CapabilityBoundingSet= or a container's cap-drop ALL + cap-add)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is missing", pytrace=False)
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in capabilities)
    return [setpriv, f"--bounding-set=-all,{caps}", "--inh-caps=-all",
            *(["--no-new-privs"] if no_new_privs else []), "--"]


@dataclass
class Site:
    topo: topology.Topology
    workdir: Path

    @property
    def b(self) -> Netns:
        return self.topo.host_b

    @property
    def c(self) -> Netns:
        return self.topo.container


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """Hosts A and B and container C (tests/topology.py); on A two Redis servers, each
    knowing its name under the key ``whoami``."""
    require_prerequisites()
    workdir = tmp_path_factory.mktemp("deploy-site")
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(scenario_topology("dep"))
        for port in (REDIS_PORT, SECOND_REDIS_PORT):
            stack.enter_context(RedisProcess(port, host=HOST_A.v4, ns=topo.host_a, workdir=workdir))
            with RespClient.connect(topo.host_a, HOST_A.v4, port) as redis:
                assert redis.command("SET", "whoami", f"redis-{port}") == "OK"
        yield Site(topo=topo, workdir=workdir)


@pytest.fixture(scope="module")
def consul_on_b(site) -> Iterator[ConsulAgent]:
    """A Consul agent on host B at the default address (127.0.0.1:8500), where host A's
    Redis is registered as Registrator registers it (-ip host A, a TCP check)."""
    consul_binary()
    with ConsulAgent(node="host-b", ns=site.b, ports={"http": 8500}) as agent:
        agent.put("/v1/agent/service/register", body={
            "Name": "redis", "ID": f"host-a:redis:{REDIS_PORT}", "Address": HOST_A.v4, "Port": REDIS_PORT,
            "Check": {"TCP": f"{HOST_A.v4}:{REDIS_PORT}", "Interval": "5s", "Timeout": "2s"}})
        agent.wait_for_health("redis", 1, timeout=20)
        yield agent


# ---- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_builds_a_slim_debian_image_with_python_and_iptables_and_runs_ambassadord_run():
    stages = dockerfile_stages()
    for stage in stages:
        # Debian's slim base, which an air-gapped build can make itself (scripts/build-image)
        assert re.fullmatch(r"debian:\w+-slim", stage.base), f"base image {stage.base}: want debian:*-slim"
    image = load_image()
    final = image.stage
    installs = " ".join(final.all("RUN"))
    assert re.search(r"apt-get install\b.*\bpython3\b.*\biptables\b", installs), \
        "the image must install python3 and iptables"
    # ... only when the base lacks them: a base made for an air-gapped build has them.
    assert re.search(r"if ! dpkg -s python3 iptables\b", installs), installs
    assert "rm -rf /var/lib/apt/lists" in installs, "apt lists left in the image"
    assert image.entrypoint == ["ambassadord", "run"]
    assert "--iptables" in image.cmd, "the default command is meant for --net=host --cap-add NET_ADMIN"
    parse_run(image.cmd)
    # Root in the container: Docker's --cap-add gives capabilities to root only.
    users = final.all("USER")
    assert not users or users[-1] in ("root", "0"), f"USER {users[-1]}: NET_ADMIN would not be effective"
    assert image.path[0] == "/opt/ambassadord/bin", image.path
    assert final.last("STOPSIGNAL") in (None, "SIGTERM", "TERM", "15")
    health = healthcheck_command(final)
    assert any("/healthz" in part for part in health), health


def test_dockerignore_sends_what_the_build_copies_and_little_else():
    context = build_context()
    for top in (".venv", ".git", ".cache", "tests", "ambassadord.egg-info"):
        assert not any(f == top or f.startswith(top + "/") for f in context), f"{top} is in the build context"
    assert not any("__pycache__" in f for f in context)
    for must in ("pyproject.toml", "README.md", "LICENSE", "constraints.txt", "ambassadord/cli.py",
                 "backends/__init__.py"):
        assert must in context
    # docker/wheels/, an air-gapped build's wheelhouse, is there only when made (scripts/build-image).
    size = sum((REPO / f).stat().st_size for f in context if not f.startswith("docker/wheels/"))
    assert size < 5_000_000, f"build context of {size} bytes"


def test_the_installed_package_owns_no_top_level_name_but_its_own(built, tmp_path):
    """Issue 13, packaging: backends/ installs as ambassadord.backends, so installing
    ambassadord beside PyPI's unrelated ``backends`` package breaks neither."""
    python = built.resolve("/opt/ambassadord/bin/python")
    code = ("import importlib.util, ambassadord.backends as b, ambassadord.backends.consul;"
            "print(importlib.util.find_spec('backends'), b.__file__)")
    proc = subprocess.run([python, "-c", code], env=built.environ(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    spec, path = proc.stdout.split()
    assert spec == "None", proc.stdout
    assert "/opt/ambassadord/" in path and "/site-packages/ambassadord/backends/" in path, path


def test_image_entrypoint_runs_from_a_clean_venv_on_loopback(built, tmp_path):
    """Needs no root: the image's entrypoint with a loopback listener and route instead of
    --iptables (which its default command adds), against a real redis-server."""
    image = built.image
    listen, admin = free_port(), free_port()
    with RedisProcess(free_port()) as redis:
        with resp_on("127.0.0.1", redis.port) as client:
            assert client.command("SET", "whoami", "loopback-redis") == "OK"
        argv = built.argv(image.command([
            "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
            "--map", f"{listen}=127.0.0.1:{redis.port}"]))
        out = tmp_path / "daemon.log"
        with open(out, "wb") as log:
            proc = subprocess.Popen(argv, env=built.environ(), cwd=tmp_path, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            def describe() -> str:
                return f"`{shlex.join(argv)}`: {proc.poll()}; log:\n{server_logs.tail(out)}"

            def answers() -> bool:
                assert proc.poll() is None, describe()
                with resp_on("127.0.0.1", listen) as client:
                    assert client.command("PING") == "PONG"
                    assert client.command("SET", "deploy:k", "v1") == "OK"
                    assert client.command("GET", "deploy:k") == b"v1"
                    return client.command("GET", "whoami") == b"loopback-redis"

            wait_until(answers, timeout=20, what=describe)
            wait_until(lambda: http_get("127.0.0.1", admin, "/healthz")[0] == 200, timeout=10,
                       what=lambda: "GET /healthz on the admin port -> 200; " + describe())
            # The rest of the admin API, from the installed package alone (its data files
            # and declared dependencies, not the repository's).
            status, body = http_get("127.0.0.1", admin, "/")
            assert status == 200 and b"<html" in body.lower(), (status, body[:200])
            status, body = http_get("127.0.0.1", admin, "/metrics")
            assert status == 200 and b"ambassadord_connections_total" in body, (status, body[:200])
            status, body = http_get("127.0.0.1", admin, "/routes")
            assert status == 200 and str(listen) in json.dumps(json.loads(body)), (status, body[:200])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, describe()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.netns
def test_image_default_command_with_backend_env_serves_host_and_bridge(built, site):
    """`docker run --net=host --cap-add NET_ADMIN --cap-add BPF -e BACKEND_6379=A:6379
    ambassadord`: ENTRYPOINT + CMD exactly, on host B; a host process and a container on
    B's bridge reach host A's Redis at 127.0.0.1:6379 and the gateway, relayed in the
    kernel; Docker's HEALTHCHECK passes."""
    image = built.image
    env = built.environ({f"BACKEND_{REDIS_PORT}": f"{HOST_A.v4}:{REDIS_PORT}"})
    check_command_routes(image.cmd, env={f"BACKEND_{REDIS_PORT}": f"{HOST_A.v4}:{REDIS_PORT}"})
    # Docker's default capabilities plus NET_ADMIN and BPF, with no-new-privileges as a
    # hardened daemon would add.
    caps = ["CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
            "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE", "NET_ADMIN", "BPF"]
    argv = setpriv_prefix(caps, no_new_privs=True) + built.argv(image.command())
    with Deployed(site.b, argv, env, site.workdir, title="the image's default command") as daemon:
        assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6379"
        assert redis_roundtrip(site.c, BRIDGE.v4) == b"redis-6379"
        if sockmap_available():
            assert "established connections are relayed in the kernel" in daemon.log.read_text(), daemon.describe()
        health = built.argv(healthcheck_command(image.stage))
        wait_until(lambda: _exit_ok(site.b, health), timeout=15,
                   what=lambda: f"HEALTHCHECK {health} exits 0; {daemon.describe()}")
        assert daemon.stop(timeout=30) == 0, daemon.describe()


def sockmap_available() -> bool:
    """Whether this test process can make a BPF sockmap (root, Linux 5.8+): then a daemon
    with CAP_BPF among its capabilities relays in the kernel."""
    try:
        Sockmap(8).close()
    except SockmapError:
        return False
    return True


def _exit_ok(ns: Netns, argv: Sequence[str]) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, timeout=10).returncode == 0


# ---- docker-compose.yml ----------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def test_compose_file_describes_both_hosts_of_the_scenario():
    doc = compose()
    services = doc["services"]
    by_profile: dict[str, set[str]] = {}
    for name, svc in services.items():
        for profile in svc.get("profiles", []):
            by_profile.setdefault(profile, set()).add(name)
    assert set(by_profile) == {"host-a", "host-b"}, by_profile
    images = {name: services[name].get("image", "") for name in services}
    host_a, host_b = by_profile["host-a"], by_profile["host-b"]
    assert {"consul", "registrator", "redis"} <= {n.split("-")[0] for n in host_a}, host_a
    assert any("consul" in images[n] for n in host_a) and any("consul" in images[n] for n in host_b)
    assert any("registrator" in images[n] for n in host_a)
    assert any(images[n].startswith("redis") for n in host_a)
    assert not any("registrator" in images[n] for n in host_b)

    amb = services["ambassadord"]
    assert "ambassadord" in host_b and "ambassadord" not in host_a
    assert amb["network_mode"] == "host"
    assert "NET_ADMIN" in amb["cap_add"]
    assert "BPF" in amb["cap_add"], "the kernel relay (--sockmap auto) needs CAP_BPF"
    build = amb["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    args = parse_run(amb["command"])
    assert args.iptables and f"{REDIS_PORT}=consul:///redis" in args.map
    check_command_routes(amb["command"])
    grace = args.grace
    assert _seconds(amb["stop_grace_period"]) > grace, "docker stop would kill before --grace is over"

    registrator = next(services[n] for n in host_a if "registrator" in images[n])
    assert registrator["network_mode"] == "host"
    assert "-ip" in registrator["command"], "Registrator must advertise the host's address (-ip)"
    assert any("docker.sock" in v for v in registrator["volumes"])
    redis = next(services[n] for n in host_a if images[n].startswith("redis"))
    assert any(str(p).split(":")[-2:] == ["6379", "6379"] or str(p) == "6379:6379" for p in redis["ports"])

    consumer = next(services[n] for n in host_b if images[n].startswith("redis"))
    assert consumer.get("network_mode") == "bridge" and "redis:host-gateway" in consumer["extra_hosts"]
    assert consumer["depends_on"]["ambassadord"]["condition"] == "service_healthy"


def _seconds(text: str | int) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text))
    assert m, text
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


@pytest.mark.parametrize("profile", ["host-a", "host-b"])
def test_compose_file_passes_compose_validation(profile):
    tool = compose_tool()
    if tool is None:
        message = "neither `docker compose` nor docker-compose is installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k not in ("HOST_IP", "HOST_A_IP")}
    base = [*tool, "-f", str(COMPOSE), "--profile", profile]
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0 and "HOST_IP" in missing.stderr + missing.stdout, \
        "the file must refuse to run without HOST_IP (the address Consul binds to)"
    env.update(HOST_IP="192.0.2.6", HOST_A_IP="192.0.2.5")
    proc = subprocess.run([*base, "config"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert "ambassadord" in resolved["services"]


@pytest.mark.netns
def test_compose_host_b_ambassadord_serves_the_consumer_from_consul(built, site, consul_on_b):
    """Host B of the compose scenario: the ambassadord service's command (after the image's
    entrypoint), with host B's local Consul agent at 127.0.0.1:8500 knowing host A's Redis:
    the consumer on the bridge reaches it at the gateway ("redis:host-gateway"), and so
    does a host process at 127.0.0.1; the health check the consumer waits on passes."""
    amb = compose()["services"]["ambassadord"]
    env = built.environ({k: str(v) for k, v in (amb.get("environment") or {}).items()})
    argv = built.argv(built.image.command(amb["command"]))
    with Deployed(site.b, argv, env, site.workdir, title="compose service ambassadord") as daemon:
        def consumer_works() -> bool:
            with RespClient.connect(site.c, BRIDGE.v4, REDIS_PORT, timeout=3) as redis:
                return isinstance(redis.command("INCR", "consumer:hits"), int)

        wait_until(consumer_works, timeout=15, what=daemon.describe)  # the route's first Consul answer
        assert redis_roundtrip(site.c, BRIDGE.v4) == b"redis-6379"
        assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6379"
        health = built.argv(healthcheck_command(built.image.stage))
        wait_until(lambda: _exit_ok(site.b, health), timeout=15, what=daemon.describe)
        assert daemon.stop(timeout=_seconds(amb["stop_grace_period"])) == 0, daemon.describe()


# ---- systemd ---------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file: section -> [(key, value)], in order (keys repeat), continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit, section: str, key: str) -> list[str]:
    """Every value of a key, an empty assignment resetting the list (as systemd does)."""
    values: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            values = [] if v == "" else [*values, v]
    return values


def unit_value(unit, section: str, key: str) -> str | None:
    values = unit_values(unit, section, key)
    return values[-1] if values else None


def exec_argv(value: str) -> list[str]:
    return shlex.split(value.lstrip("@-:+!"))


# Where the unit expects the routes file, and what deploy/README.md installs there.
UNIT_FILES = {"/etc/ambassadord/routes.toml": ROUTES_EXAMPLE}


def test_systemd_unit_is_a_notify_service_with_a_checked_reload():
    unit = parse_unit(UNIT)
    svc = "Service"
    assert unit_value(unit, svc, "Type") == "notify"
    start = exec_argv(unit_value(unit, svc, "ExecStart"))
    assert start[0] == "/opt/ambassadord/bin/ambassadord" and start[1] == "run", start
    args = parse_run(start[2:])
    assert args.iptables
    check_command_routes(start[2:], files=UNIT_FILES)
    reloads = [exec_argv(v) for v in unit_values(unit, svc, "ExecReload")]
    assert reloads[-1][-2:] == ["-HUP", "$MAINPID"] and Path(reloads[-1][0]).name == "kill", reloads
    for before in reloads[:-1]:
        assert before[:2] == [start[0], "check"] and "--config" in before, before
        assert before[before.index("--config") + 1] == args.config, "the reload checks another file than it runs"
    assert "2" in (unit_value(unit, svc, "RestartPreventExitStatus") or "").split()
    assert unit_value(unit, svc, "Restart") in ("on-failure", "always")
    assert _seconds(unit_value(unit, svc, "TimeoutStopSec")) > args.grace
    caps = set((unit_value(unit, svc, "CapabilityBoundingSet") or "").split())
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= caps, "iptables needs CAP_NET_ADMIN (and CAP_NET_RAW, legacy)"
    assert "CAP_BPF" in caps, "the kernel relay (--sockmap auto) needs CAP_BPF"
    user = unit_value(unit, svc, "User")
    if user not in (None, "root", "0"):
        assert {"CAP_NET_ADMIN", "CAP_NET_RAW"} <= set((unit_value(unit, svc, "AmbientCapabilities") or "").split())
    assert unit_value(unit, svc, "NoNewPrivileges") in ("yes", "true", "1")


def install_unit_in_root(built: Built) -> list[str]:
    """The unit as deploy/README.md installs it, in the built root (where
    /opt/ambassadord is the clean venv), with systemd's own units beside it and the
    commands it runs; the unit's Exec commands (argv lists)."""
    root = built.root
    systemd_units = Path("/usr/lib/systemd/system")
    target = container_path(root, str(systemd_units))
    if not target.exists():
        shutil.copytree(systemd_units, target, symlinks=True)
    unit_dir = container_path(root, "/etc/systemd/system")
    unit_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(UNIT, unit_dir / UNIT.name)
    for where, source in UNIT_FILES.items():
        container_path(root, where).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, container_path(root, where))
    unit = parse_unit(UNIT)
    commands = [exec_argv(v) for k, v in unit.get("Service", []) if k.startswith("Exec") and v]
    for argv in commands:
        if argv[0].startswith("/opt/ambassadord/"):
            continue
        host = argv[0] if argv[0].startswith("/") else shutil.which(argv[0], path="/usr/bin:/bin:/usr/sbin:/sbin")
        assert host and os.path.exists(host), f"{argv[0]}: not on this machine either"
        dest = container_path(root, argv[0] if argv[0].startswith("/") else "/usr/bin/" + argv[0])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy2(host, dest)
    return commands


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def test_systemd_unit_passes_systemd_analyze_verify(built):
    tool = systemd_analyze()
    install_unit_in_root(built)
    proc = subprocess.run([tool, "verify", f"--root={built.root}", "--man=no", UNIT.name],
                          capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, f"systemd-analyze verify exited {proc.returncode}:\n{output}"
    # The check is real: without the venv's script the same call fails.
    script = container_path(built.root, "/opt/ambassadord/bin/ambassadord")
    moved = script.with_name("ambassadord.away")
    script.rename(moved)
    try:
        proc = subprocess.run([tool, "verify", f"--root={built.root}", "--man=no", UNIT.name],
                              capture_output=True, text=True, timeout=60)
        assert "/opt/ambassadord/bin/ambassadord" in proc.stdout + proc.stderr
    finally:
        moved.rename(script)


def test_systemd_unit_sandbox_exposure_is_low(built):
    tool = systemd_analyze()
    install_unit_in_root(built)
    probe = subprocess.run([tool, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    proc = subprocess.run([tool, "security", "--offline=yes", f"--root={built.root}", "--threshold=35",
                           "--no-pager", UNIT.name], capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert level, proc.stdout + proc.stderr
    assert proc.returncode == 0 and float(level.group(1)) <= 3.5, f"exposure {level.group(1)}:\n{proc.stdout}"


class NotifySocket:
    """$NOTIFY_SOCKET, as systemd's manager receives it: datagrams of KEY=VALUE lines."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="amb-notify-")
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str, *, timeout: float, daemon: Deployed) -> dict[str, str]:
        """The next message (not seen before) that sets key=value. Fails once nothing is
        pending and the daemon has exited, or at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if daemon.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no {key}={value} on $NOTIFY_SOCKET within {timeout:g}s "
                                         f"(got {self.seen}); {daemon.describe()}") from None
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.seen.append(message)
            if message.get(key) == value:
                return message

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _unit_environment(unit) -> dict[str, str]:
    env = {}
    for value in unit_values(unit, "Service", "Environment"):
        for assignment in shlex.split(value):
            k, _, v = assignment.partition("=")
            env[k] = v
    return env


@pytest.mark.netns
def test_systemd_unit_start_reload_and_stop_as_systemd_would(built, site):
    """ExecStart on host B with the unit's capability bounding set and NoNewPrivileges:
    READY=1 arrives when it already serves; ExecReload (check, then SIGHUP) switches to a
    changed routes file; a broken file fails the reload at the check and the old routes
    stay; SIGTERM gives STOPPING=1, an open connection is still served, then the rules are
    gone and the exit is 0; a bad file at start is exit 2, which RestartPreventExitStatus
    names. (ExecStartPre, which only touches /run/xtables.lock, is not run.)"""
    install_unit_in_root(built)
    unit = parse_unit(UNIT)
    routes = container_path(built.root, "/etc/ambassadord/routes.toml")
    routes.write_text(f'[routes]\n{REDIS_PORT} = "{HOST_A.v4}:{REDIS_PORT}"\n')

    def mapped(argv: Sequence[str]) -> list[str]:
        return [str(container_path(built.root, a)) if a.startswith(("/opt/ambassadord/", "/etc/ambassadord/"))
                else a for a in argv]

    start = mapped(exec_argv(unit_value(unit, "Service", "ExecStart")))
    caps = (unit_value(unit, "Service", "CapabilityBoundingSet") or "").split()
    nnp = unit_value(unit, "Service", "NoNewPrivileges") in ("yes", "true", "1")
    argv = setpriv_prefix(caps, no_new_privs=nnp) + start
    notify = NotifySocket()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           **_unit_environment(unit), "NOTIFY_SOCKET": notify.path}
    try:
        with Deployed(site.b, argv, env, site.workdir, title="systemd ExecStart", ready=False) as daemon:
            notify.wait_for("READY", "1", timeout=float(_seconds(unit_value(unit, "Service", "TimeoutStartSec") or 90)),
                            daemon=daemon)
            assert daemon.ready(), f"READY=1 before it listens with its rules in: {daemon.describe()}"
            assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6379"
            assert redis_roundtrip(site.c, BRIDGE.v4) == b"redis-6379"

            def reload() -> list[int]:
                """ExecReload= lines in order, stopping at the first failure (systemd's rule)."""
                codes = []
                for value in unit_values(unit, "Service", "ExecReload"):
                    cmd = [str(daemon.proc.pid) if a == "$MAINPID" else a for a in mapped(exec_argv(value))]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
                    codes.append(proc.returncode)
                    if proc.returncode != 0:
                        break
                return codes

            routes.write_text(f'[routes]\n{REDIS_PORT} = "{HOST_A.v4}:{SECOND_REDIS_PORT}"\n')
            assert reload() == [0] * len(unit_values(unit, "Service", "ExecReload"))
            notify.wait_for("RELOADING", "1", timeout=15, daemon=daemon)
            notify.wait_for("READY", "1", timeout=15, daemon=daemon)
            assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6380", "READY=1 after a reload, old routes"

            routes.write_text(f'[routes]\n{REDIS_PORT} = "{HOST_A.v4}"\n')  # no port: invalid
            assert reload() == [2], "a broken routes file must fail `systemctl reload` at the check"
            time.sleep(1.5)  # the daemon may also notice the file by itself: it must keep its routes
            assert daemon.proc.poll() is None, daemon.describe()
            assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6380"

            # systemctl stop with a client connected: it is served until it leaves.
            with RespClient.connect(site.b, "127.0.0.1", REDIS_PORT, timeout=5) as client:
                assert client.command("PING") == "PONG"
                daemon.proc.send_signal(signal.SIGTERM)
                notify.wait_for("STOPPING", "1", timeout=10, daemon=daemon)
                assert client.command("GET", "whoami") == b"redis-6380", "cut off during --grace"
            stop_timeout = _seconds(unit_value(unit, "Service", "TimeoutStopSec"))
            assert daemon.stop(timeout=stop_timeout, signalled=True) == 0, daemon.describe()

        # Exit 2 on a bad file: RestartPreventExitStatus keeps systemd from retrying it.
        with Deployed(site.b, argv, env, site.workdir, title="systemd ExecStart, bad routes", ready=False) as bad:
            code = bad.proc.wait(30)
            assert code == 2, bad.describe()
            assert str(code) in unit_value(unit, "Service", "RestartPreventExitStatus").split()
            assert not bad.has_chain(), "a refused start must install no rules"
    finally:
        notify.close()


# ---- systemd: the kernel relay under the unit's sandbox ----------------------------------------

# The kernel's capability numbers (linux/capability.h), by name as systemd spells them.
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]


def capability_mask(names: Sequence[str]) -> int:
    unknown = [n for n in names if n not in CAPABILITIES]
    assert not unknown, f"capabilities this test does not know: {unknown}"
    return sum(1 << CAPABILITIES.index(n) for n in set(names))


def capability_names(mask: int) -> list[str]:
    return [n for i, n in enumerate(CAPABILITIES) if mask >> i & 1] + \
        [str(i) for i in range(len(CAPABILITIES), 64) if mask >> i & 1]


def process_capabilities(pid: int) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb (masks) and NoNewPrivs of a running process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    caps = {k: int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    caps["NoNewPrivs"] = int(fields["NoNewPrivs"])
    return caps


def sockmap_or_skip() -> None:
    """Skip when this test process (root, with its own capabilities) cannot make a BPF
    sockmap at all: no test of a smaller set can say anything then. Fails under CI."""
    try:
        Sockmap(8).close()
    except SockmapError as exc:  # sockmap_available(), with the reason
        message = f"no BPF sockmap for this test process (root, with CAP_BPF, Linux 5.8+ needed): {exc}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI: a failure, not a skip)", pytrace=False)
        pytest.skip(message)


def syscall_group(name: str, tool: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group (@name), nested groups expanded."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run([tool, "syscall-filter", "--no-pager", name], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"systemd-analyze syscall-filter {name}: {out.stderr}"
    calls: set[str] = set()
    for line in out.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            continue  # the group's own name, or a message
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= syscall_group(word, tool, seen) if word.startswith("@") else {word}
    return calls


def test_systemd_unit_lets_the_kernel_relay_through_its_syscall_filter():
    """SystemCallFilter= as systemd merges it (allow-lists add up, "~" lists take away):
    bpf(2), which the kernel relay loads its program and makes its maps with, must be
    allowed. (@system-service does not have it.) And the maps' locked memory must not be
    limited, for Linux 5.8-5.10, which count BPF maps against RLIMIT_MEMLOCK."""
    tool = systemd_analyze()
    unit = parse_unit(UNIT)
    filters = unit_values(unit, "Service", "SystemCallFilter")
    assert filters and not filters[0].startswith("~"), f"expected an allow-list: {filters}"
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        calls: set[str] = set()
        for word in value.lstrip("~").split():
            word = word.split(":", 1)[0]  # "name:errno"
            calls |= syscall_group(word, tool) if word.startswith("@") else {word}
        allowed = allowed - calls if deny else allowed | calls
    assert "bpf" in allowed, f"SystemCallFilter={filters} blocks bpf(2): the kernel relay could not start"
    assert {"socket", "accept4", "connect", "setsockopt"} <= allowed, "the expansion went wrong"
    assert unit_value(unit, "Service", "LimitMEMLOCK") == "infinity"


def test_systemd_unit_capabilities_are_enough_for_the_kernel_relay(tmp_path):
    """The daemon with exactly the unit's capabilities (CapabilityBoundingSet=, as root,
    with NoNewPrivileges: setpriv drops every other one from the bounding set, so the
    permitted and effective sets after exec are the unit's set; checked in /proc), with
    --sockmap on: it relays in the kernel (the log says so, a PING is answered, and keeps
    being answered while the daemon is stopped with SIGSTOP). With the same set minus
    CAP_BPF (and CAP_SYS_ADMIN, the other way to bpf(2)), --sockmap on refuses to start
    (exit 1), naming the bpf(2) error: the test can fail, and CAP_BPF is what makes the
    difference."""
    require("setpriv")
    sockmap_or_skip()
    unit = parse_unit(UNIT)
    caps = (unit_value(unit, "Service", "CapabilityBoundingSet") or "").split()
    nnp = unit_value(unit, "Service", "NoNewPrivileges") in ("yes", "true", "1")

    with RedisProcess(free_port(), workdir=tmp_path) as redis:
        def args(port: int) -> list[str]:
            return ["--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{redis.port}",
                    "--sockmap", "on", "--workers", "1"]

        # The unit's set: the kernel relay.
        listen = free_port()
        with Daemon(args(listen), listen=("127.0.0.1", listen), prefix=setpriv_prefix(caps, no_new_privs=nnp),
                    workdir=tmp_path) as daemon:
            want = capability_mask(caps)
            got = process_capabilities(daemon.proc.pid)
            assert (got["CapEff"], got["CapPrm"], got["CapBnd"]) == (want, want, want), (
                f"not the unit's capabilities {sorted(caps)}: the daemon has "
                f"{capability_names(got['CapEff'] & ~want)} more, {capability_names(want & ~got['CapEff'])} fewer "
                f"(CapEff {got['CapEff']:016x}, CapPrm {got['CapPrm']:016x}, CapBnd {got['CapBnd']:016x}; "
                f"want {want:016x})")
            assert (got["CapInh"], got["CapAmb"], got["NoNewPrivs"]) == (0, 0, int(nnp)), got
            assert "established connections are relayed in the kernel" in daemon.text(), daemon.describe()
            assert "sockmap not available" not in daemon.text(), daemon.describe()
            with contextlib.closing(connect("127.0.0.1", listen)) as client:
                assert ping(client) == b"+PONG\r\n", daemon.describe()
                # The proof that the kernel relays it: the daemon cannot run, and still.
                os.kill(daemon.proc.pid, signal.SIGSTOP)
                try:
                    for _ in range(3):
                        assert ping(client) == b"+PONG\r\n"
                except TimeoutError:
                    pytest.fail("no answer while the daemon was stopped: not relayed in the kernel", pytrace=False)
                finally:
                    os.kill(daemon.proc.pid, signal.SIGCONT)
            daemon.stop()

        # The same set without CAP_BPF: the kernel refuses bpf(2), and --sockmap on says so.
        without = [c for c in caps if c not in ("CAP_BPF", "CAP_SYS_ADMIN")]
        prefix = setpriv_prefix(without, no_new_privs=nnp)
        probe = subprocess.run([*prefix, sys.executable, "-c", "print(open('/proc/self/status').read())"],
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        eff = int(re.search(r"^CapEff:\s*(\w+)", probe.stdout, re.M).group(1), 16)
        assert eff == capability_mask(without), f"without CAP_BPF: {capability_names(eff)}"
        listen = free_port()
        with Daemon(args(listen), listen=None, prefix=prefix, workdir=tmp_path, wait=False) as refused:
            code = refused.wait_exit(30)
            log = refused.text()
            assert code == 1, refused.describe()
            assert "--sockmap on:" in log and "bpf(" in log and "Operation not permitted" in log, refused.describe()
            assert "listening on" not in log, refused.describe()


# ---- Nomad -----------------------------------------------------------------------------------------


def nomad_job() -> dict:
    import hcl2

    try:
        from hcl2 import SerializationOptions
    except ImportError:  # python-hcl2 < 7: plain strings already
        return hcl2.loads(NOMAD.read_text())
    return hcl2.loads(NOMAD.read_text(), serialization_options=SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False))


def _one(blocks: list[dict]) -> tuple[str, dict]:
    assert len(blocks) == 1, blocks
    (name, body), = blocks[0].items()
    return name, body


def heredoc(text: str) -> str:
    """The value of an HCL heredoc (<<EOF or the indented <<-EOF) as Nomad reads it."""
    m = re.fullmatch(r"<<(-?)([A-Za-z_][\w.-]*)\r?\n(.*?)\n[ \t]*\2\s*", text, re.S)
    if not m:
        return text
    body = m.group(3) + "\n"
    return textwrap.dedent(body) if m.group(1) else body


@dataclass
class NomadTask:
    job: dict
    group: dict
    task: dict

    @property
    def config(self) -> dict:
        return self.task["config"][0]

    def templates(self) -> dict[str, str]:
        return {t["destination"]: heredoc(t["data"]) for t in self.task.get("template", [])}


def nomad_task() -> NomadTask:
    doc = nomad_job()
    _, job = _one(doc["job"])
    _, group = _one(job["group"])
    _, task = _one(group["task"])
    return NomadTask(job=job, group=group, task=task)


def test_nomad_job_is_a_host_network_system_job():
    nt = nomad_task()
    assert nt.job["type"] == "system"
    assert nt.group["network"][0]["mode"] == "host"
    assert nt.task["driver"] == "docker"
    config = nt.config
    assert config["network_mode"] == "host"
    assert "NET_ADMIN" in config["cap_add"]
    assert "BPF" in config["cap_add"], "the kernel relay (--sockmap auto) needs CAP_BPF"
    args = parse_run(config["args"])
    assert args.iptables
    # The routes come from the template at the path the args name (task dir local/ is /local).
    templates = nt.templates()
    assert args.config and args.config.startswith("/local/"), args.config
    dest = args.config.lstrip("/")
    assert dest in templates, f"--config {args.config}: no template renders local/{Path(dest).name}"
    template = next(t for t in nt.task["template"] if t["destination"] == dest)
    assert template["change_mode"] == "signal" and template["change_signal"] == "SIGHUP"
    with tempfile.TemporaryDirectory() as d:
        routes = Path(d) / "routes.toml"
        routes.write_text(templates[dest])
        tomllib.loads(templates[dest])
        check_command_routes(config["args"], files={args.config: routes}, env=nt.task.get("env", [{}])[0])
    assert nt.task.get("kill_signal", "SIGINT") == "SIGTERM"
    assert _seconds(nt.task["kill_timeout"]) > args.grace, "Nomad would kill before --grace is over"


@pytest.mark.netns
def test_nomad_task_serves_from_consul_on_host_b(built, site, consul_on_b, tmp_path):
    """The task as the docker driver runs it on host B: image entrypoint + args, its env,
    the template rendered into the task's local/ (mounted at /local)."""
    nt = nomad_task()
    local = tmp_path / "local"
    local.mkdir()
    for dest, text in nt.templates().items():
        (tmp_path / dest).write_text(text)
    args = [str(local) + a[len("/local"):] if a.startswith("/local/") else a for a in nt.config["args"]]
    env = built.environ({k: str(v) for k, v in nt.task.get("env", [{}])[0].items()})
    argv = built.argv(built.image.command(args))
    with Deployed(site.b, argv, env, site.workdir, title="Nomad task") as daemon:
        wait_until(lambda: redis_roundtrip(site.c, BRIDGE.v4) == b"redis-6379", timeout=15, what=daemon.describe)
        assert redis_roundtrip(site.b, "127.0.0.1") == b"redis-6379"
        assert daemon.stop(timeout=_seconds(nt.task["kill_timeout"])) == 0, daemon.describe()


# ---- Kubernetes ----------------------------------------------------------------------------------


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def k8s_object(kind: str) -> dict:
    found = [d for d in k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects in {K8S}"
    return found[0]


def k8s_routes() -> tuple[dict, str, str]:
    """The container, the --config path its args name, and that file's text from the
    ConfigMap mounted there."""
    ds = k8s_object("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container, = pod["containers"]
    args = parse_run(container["args"])
    assert args.config, "the DaemonSet's args name no --config"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if args.config.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert "subPath" not in mount, "a subPath mount is never updated: reloads would not happen"
            cm_name = volumes[mount["name"]]["configMap"]["name"]
            cm = k8s_object("ConfigMap")
            assert cm["metadata"]["name"] == cm_name
            assert cm["metadata"].get("namespace") == ds["metadata"].get("namespace")
            key = args.config[len(mount["mountPath"].rstrip("/")) + 1:]
            return container, args.config, cm["data"][key]
    pytest.fail(f"--config {args.config} is not on a mounted volume", pytrace=False)


def admin_address(args) -> tuple[str, int]:
    """The admin API's address from the parsed args (default 127.0.0.1:10001)."""
    value = getattr(args, "admin", None) or "127.0.0.1:10001"
    if not isinstance(value, str):  # a parsed address object
        return str(getattr(value, "host")), int(getattr(value, "port"))
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def test_daemonset_runs_on_the_node_network_with_net_admin():
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    ds = k8s_object("DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    container, config_path, routes_text = k8s_routes()
    ctx = container["securityContext"]
    assert "ALL" in ctx["capabilities"]["drop"]
    assert "NET_ADMIN" in ctx["capabilities"]["add"]
    assert "BPF" in ctx["capabilities"]["add"], "the kernel relay (--sockmap auto) needs CAP_BPF"
    assert ctx.get("runAsUser", 0) == 0 and ctx.get("runAsNonRoot") is not True, "capabilities need root"
    args = parse_run(container["args"])
    assert args.iptables
    admin_host, admin_port = admin_address(args)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/healthz", kind
        assert probe["port"] == admin_port, f"{kind} probes port {probe['port']}, the admin API is on {admin_port}"
        # The kubelet probes the pod IP (the node's address) unless told a host: the admin
        # API listens on loopback, which the kubelet shares with a hostNetwork pod.
        assert probe.get("host") == admin_host, f"{kind}: host {probe.get('host')} but --admin {admin_host}"
    grace = pod.get("terminationGracePeriodSeconds", 30)
    assert grace > args.grace, "the kubelet would kill before --grace is over"
    with tempfile.TemporaryDirectory() as d:
        routes = Path(d) / "routes.toml"
        routes.write_text(routes_text)
        check_command_routes(container["args"], files={config_path: routes})


class ConfigMapVolume:
    """A configMap volume as the kubelet writes it (its atomic writer): each file is a
    symlink through ``..data`` to a timestamped directory; an update writes a new
    directory and swaps ``..data`` with one rename."""

    def __init__(self, path: Path, files: dict[str, str]):
        self.path, self._generation = path, 0
        path.mkdir()
        self.update(files)
        for name in files:
            (path / name).symlink_to(f"..data/{name}")

    def update(self, files: dict[str, str]) -> None:
        self._generation += 1
        new = self.path / f"..2025_01_01_00_00_00.{self._generation}"
        new.mkdir()
        for name, text in files.items():
            (new / name).write_text(text)
        data, tmp = self.path / "..data", self.path / "..data_tmp"
        old = self.path / os.readlink(data) if data.is_symlink() else None
        tmp.symlink_to(new.name)
        os.rename(tmp, data)
        if old is not None:
            shutil.rmtree(old)


@pytest.mark.netns
def test_daemonset_container_answers_its_probes_and_follows_its_configmap(built, site, tmp_path):
    """The container as the kubelet runs it on a node (host B): image entrypoint + args,
    the ConfigMap mounted where --config points, only the capabilities the securityContext
    leaves (drop ALL, add NET_ADMIN) and no privilege escalation. Its probes, made as the
    kubelet makes them from the node's network namespace, get 200. An update of the
    ConfigMap, written as the kubelet writes it, reaches the routes without a restart."""
    container, config_path, routes_text = k8s_routes()
    name = Path(config_path).name
    volume = ConfigMapVolume(tmp_path / "configmap", {name: routes_text})
    args = [a.replace(config_path, str(volume.path / name)) for a in container["args"]]
    ctx = container["securityContext"]
    caps = ctx["capabilities"]["add"] if "ALL" in ctx["capabilities"].get("drop", []) else []
    argv = setpriv_prefix(caps, no_new_privs=ctx.get("allowPrivilegeEscalation") is False)
    argv += built.argv(built.image.command(args))
    env = built.environ({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    with Deployed(site.b, argv, env, site.workdir, title="DaemonSet container") as daemon:
        if sockmap_available():
            assert "established connections are relayed in the kernel" in daemon.log.read_text(), daemon.describe()
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                probe = container[kind]["httpGet"]
                wait_healthz(probe.get("host", "127.0.0.1"), probe["port"], probe["path"], ns=site.b, daemon=daemon)

        updated, n = re.subn(rf"^{REDIS_PORT} = .*$", f'{REDIS_PORT} = "{HOST_A.v4}:{SECOND_REDIS_PORT}"',
                             routes_text, flags=re.M)
        assert n == 1, f"the ConfigMap's routes.toml has no `{REDIS_PORT} = ...` line to change"
        volume.update({name: updated})
        wait_until(lambda: redis_roundtrip(site.b, "127.0.0.1") == b"redis-6380", timeout=15,
                   what=lambda: "the updated ConfigMap's route; " + daemon.describe())
        assert daemon.stop(timeout=ds_grace()) == 0, daemon.describe()


def ds_grace() -> float:
    return float(k8s_object("DaemonSet")["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))


# ---- the routes example and the guide ------------------------------------------------------


def test_routes_example_passes_check():
    tomllib.loads(ROUTES_EXAMPLE.read_text())
    out = check_routes(config=ROUTES_EXAMPLE)
    assert "5 route(s) OK" in out


def docker_run_examples(path: Path) -> list[list[str]]:
    """The arguments after the image name of every `docker run ... ambassadord ARGS` in a
    Markdown file's code (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    examples = []
    for line in text.splitlines():
        m = re.search(r"docker run (.*)", line)
        if not m:
            continue
        words = shlex.split(m.group(1).strip("`"))
        for i, word in enumerate(words):
            if word == "ambassadord" and words[i - 1] != "--name":
                examples.append(words[i + 1:])
                break
    return examples


@pytest.mark.parametrize("doc", [GUIDE, REPO / "README.md"], ids=["deploy/README.md", "README.md"])
def test_docker_run_examples_fit_the_image_entrypoint(doc):
    """`docker run IMAGE ARGS` runs ENTRYPOINT + ARGS: ARGS are `run` flags, without `run`."""
    examples = docker_run_examples(doc)
    assert examples, f"{doc.name} shows no `docker run ... ambassadord`"
    image = load_image()
    for args in examples:
        full = image.command(args or None)  # no arguments: the default CMD
        assert full[:2] == ["ambassadord", "run"]
        parse_run(full[2:])


def test_deploy_guide_covers_every_target():
    text = GUIDE.read_text()
    for needle in ("docker/Dockerfile", "--net=host", "NET_ADMIN", "docker-compose.yml", "--profile host-a",
                   "--profile host-b", "HOST_IP", "HOST_A_IP", "ambassadord.service", "systemctl reload",
                   "/opt/ambassadord", "ambassadord.nomad.hcl", "allow_caps", "daemonset.yaml", "hostNetwork",
                   "/healthz", "IPTABLES_BACKEND", "CAP_BPF", "--cap-add BPF"):
        assert needle in text, f"deploy/README.md does not mention {needle}"
