"""The image of docker/Dockerfile, built for real and run as the README says.

One Docker engine (tests/docker_engine.py, overlay2) plays host B. The image is built in it
once, offline, by ``scripts/build-image``: a base made by debootstrap from the Debian
mirror of the system's apt sources, tagged as the Dockerfile's base (debian:bookworm-slim),
and the Python packages from a pip wheelhouse (--build-arg WHEELS=docker/wheels); the
build itself is ``docker build -f docker/Dockerfile .``. Host A is a second namespace,
linked to B by a veth with private addresses and no default route anywhere; Redis runs there.

The daemon then runs the way deploy/README.md has it, ``docker run -d --net=host --cap-add
NET_ADMIN IMAGE ...`` (without --cap-add BPF: Docker 20.10 does not know that capability;
the daemon relays in user space), and consumers are containers of the tools image
(tests/docker_images.py) on the engine's default bridge, which dial its gateway.

The compose file (deploy/docker-compose.yml) runs against the same engine with Debian's
docker-compose 1.29 (the ``docker compose`` v2 plugin is not packaged in Debian bookworm):
its host B profile, with the images a registry would give made here instead.

Every container is removed after each test, also when it fails; host A goes with its test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import docker_engine as engines
from tests import netns
from tests.consul import ConsulAgent, consul_binary
from tests.daemon import RedisProcess, connect, ping, wait_until
from tests.docker_engine import DockerEngine, docker_cli
from tests.docker_images import TOOLS_IMAGE, import_image, libraries
from tests.netns import Netns, link, namespaces

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-image"
IMAGE = "ambassadord:test"
DAEMON = "amb-daemon"  # the daemon container's name
# Host A's link to host B (the engine's namespace): a LAN of two hosts.
B_SIDE, A_SIDE = "10.254.7.1", "10.254.7.2"
REDIS_PORT = 6379
ADMIN = ("127.0.0.1", 10001)  # the daemon's default --admin, in B (--net=host)


def require_image_prerequisites() -> None:
    """The engine's and the namespaces' prerequisites, and debootstrap for the base image;
    a failure under CI=true, a skip elsewhere."""
    netns.require_prerequisites()
    engines.require_prerequisites()
    if shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        message = "debootstrap is not installed (the image's base is made with it)"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
        pytest.skip(message)


@dataclass
class Built:
    engine: DockerEngine
    seconds: float  # scripts/build-image: base tar, wheelhouse, import, docker build
    output: str


def script_env(engine: DockerEngine) -> dict[str, str]:
    """The environment in which the docker CLI (and scripts/build-image, docker-compose)
    talk to ``engine`` and nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env.update(DOCKER_HOST=engine.host, DOCKER=docker_cli(), DOCKER_CONFIG=str(engine.dir / "cli"))
    return env


@pytest.fixture(scope="module")
def built(tools_rootfs, tmp_path_factory) -> Iterator[Built]:
    """An overlay2 engine with the tools image and the image built by scripts/build-image."""
    require_image_prerequisites()
    with DockerEngine("dkimg", storage_driver="overlay2", log_dir=tmp_path_factory.mktemp("dockerd")) as engine:
        import_image(engine, tools_rootfs)
        started = time.monotonic()
        proc = subprocess.run([str(BUILD_SCRIPT), "-t", IMAGE], cwd=REPO, env=script_env(engine),
                              capture_output=True, text=True, timeout=900)
        seconds = time.monotonic() - started
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"scripts/build-image exited {proc.returncode}:\n{output[-6000:]}"
        yield Built(engine=engine, seconds=seconds, output=output)


@pytest.fixture
def engine(built) -> Iterator[DockerEngine]:
    """The engine; every container is removed after the test, whatever its outcome."""
    yield built.engine
    left = built.engine.docker("ps", "-aq", check=False).split()
    if left:
        built.engine.docker("rm", "-f", "-v", *left, check=False)


@pytest.fixture
def host_a(engine, tmp_path) -> Iterator[str]:
    """Host A: a namespace linked to B, with Redis on A_SIDE:6379; its address."""
    with namespaces("dkimga") as (a,):
        link(engine.ns, [f"{B_SIDE}/24"], a, [f"{A_SIDE}/24"], tag="dkimg")
        with RedisProcess(REDIS_PORT, host=A_SIDE, ns=a, workdir=tmp_path):
            yield A_SIDE


def gateway(engine: DockerEngine) -> str:
    """The default bridge's gateway, docker0's address in B: 172.17.0.1 normally."""
    words = engine.ns.exec(["ip", "-4", "-o", "addr", "show", "dev", "docker0"]).split()
    return words[words.index("inet") + 1].split("/")[0]


def nat_rules(engine: DockerEngine) -> str:
    return engine.ns.exec(["iptables-save", "-t", "nat"])


def jumps(engine: DockerEngine) -> list[str]:
    """The rules that send connections into the daemon's chains (removed first at a stop)."""
    return [line for line in nat_rules(engine).splitlines()
            if line.startswith(("-A PREROUTING", "-A OUTPUT")) and "AMBASSADORD" in line]


def healthz(ns: Netns) -> bool:
    """GET /healthz of the admin API in ``ns`` answers 200."""
    with contextlib.closing(ns.socket()) as sock:
        sock.settimeout(2)
        sock.connect(ADMIN)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.1 200")


@contextlib.contextmanager
def daemon(engine: DockerEngine, *args: str, options: Sequence[str] = (), iptables: bool = True) -> Iterator[str]:
    """``docker run -d --net=host --cap-add NET_ADMIN OPTIONS IMAGE ARGS...``, ready: its admin
    API answers and, with ``iptables``, its nat chain is in B. Yields the container id."""
    with engine.container(IMAGE, *args, name=DAEMON,
                          options=["--net=host", "--cap-add", "NET_ADMIN", *options]) as box:
        def ready() -> bool:
            if engine.docker("inspect", "-f", "{{.State.Running}}", box.id).strip() != "true":
                raise AssertionError(f"the daemon container exited: {logs(engine, box.id)}")
            return healthz(engine.ns) and (not iptables or "AMBASSADORD" in nat_rules(engine))

        wait_until(ready, timeout=30, what=lambda: f"daemon container not ready: {logs(engine, box.id)}")
        yield box.id


def logs(engine: DockerEngine, container: str) -> str:
    """The container's last log lines (the daemon logs to stderr)."""
    proc = engine.cli("logs", "--tail", "40", container, timeout=10)
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class Reply:
    """What a consumer printed: ``out`` (stdout, stripped: "PONG", or "" on an error) and
    ``err`` (its stderr: redis-cli's error message); equal to a string when ``out`` is."""

    out: str
    err: str

    def __eq__(self, other: object) -> bool:
        return self.out == other if isinstance(other, str) else NotImplemented

    def __repr__(self) -> str:
        return repr(self.out) + (f" (stderr: {self.err.strip()!r})" if self.err.strip() else "")


def redis_cli(engine: DockerEngine, host: str, port: int = REDIS_PORT, *, options: Sequence[str] = ()) -> Reply:
    """A consumer container on the default bridge: ``redis-cli -h HOST -p PORT PING``, its
    very first command, bound by ``timeout``; what it printed."""
    proc = engine.cli("run", "--rm", *options, TOOLS_IMAGE, "timeout", "10",
                       "redis-cli", "-h", host, "-p", str(port), "PING", timeout=30)
    return Reply(out=proc.stdout.strip(), err=proc.stderr)


# ---- the image -----------------------------------------------------------------------------


def test_the_image_builds_offline_from_the_real_dockerfile(built):
    engine = built.engine
    assert "docker build -f docker/Dockerfile" in BUILD_SCRIPT.read_text()
    assert f"Successfully tagged {IMAGE}" in built.output, built.output[-3000:]
    # The engine's namespace has no route out: nothing came from a registry or PyPI.
    assert "default" not in engine.ns.exec(["ip", "route"])
    config = json.loads(engine.docker("image", "inspect", "-f", "{{json .Config}}", IMAGE))
    assert config["Entrypoint"] == ["ambassadord", "run"] and config["Cmd"] == ["--iptables"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB; scripts/build-image took {built.seconds:.0f} s")
    assert size < 300e6, f"{size} bytes"
    # The image runs: `check` of the CLI, and every backend's imports (grpcio and protobuf
    # are binary wheels: made for the host's Python, they must fit the image's).
    out = engine.docker("run", "--rm", "--entrypoint", "ambassadord", IMAGE, "check", "--map",
                        f"{REDIS_PORT}={A_SIDE}:{REDIS_PORT}")
    assert "1 route(s) OK" in out, out
    probe = ("import sys, grpc, google.protobuf, ambassadord.backends.etcd, ambassadord.backends.consul;"
             "import importlib.util as u; print(sys.version_info[:2], u.find_spec('pip'))")
    assert engine.docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe).strip() == "(3, 11) None"


# ---- the seeds' scenario with real containers ---------------------------------------------


def test_a_consumer_container_reaches_host_a_through_the_bridge_gateway(engine, host_a):
    gw = gateway(engine)
    assert redis_cli(engine, gw) == "", "something answers on the gateway before the daemon runs"
    with daemon(engine, "--iptables", "--map", f"{REDIS_PORT}={host_a}:{REDIS_PORT}"):
        assert redis_cli(engine, gw) == "PONG"


def test_the_socat_ambassadors_flags_work_unchanged(engine, host_a):
    # progrium/ambassadord and the socat ambassador take a Docker link's variable.
    with daemon(engine, "--iptables", "--link-env",
                options=["-e", f"REDIS_PORT_{REDIS_PORT}_TCP=tcp://{host_a}:{REDIS_PORT}"]):
        assert redis_cli(engine, gateway(engine)) == "PONG"


def test_the_images_healthcheck_turns_healthy(engine, host_a):
    # The image's own check command; only its interval is shortened (10 s in the image).
    with daemon(engine, "--iptables", "--map", f"{REDIS_PORT}={host_a}:{REDIS_PORT}",
                options=["--health-interval", "1s"]) as cid:
        status = lambda: engine.docker("inspect", "-f", "{{.State.Health.Status}}", cid).strip()  # noqa: E731
        wait_until(lambda: status() == "healthy", timeout=30, what=lambda: f"health {status()}: "
                   f"{engine.docker('inspect', '-f', '{{json .State.Health}}', cid)}")
        health = json.loads(engine.docker("inspect", "-f", "{{json .State.Health}}", cid))
        assert health["Log"] and health["Log"][-1]["ExitCode"] == 0


def test_docker_stop_lets_an_open_connection_finish_and_removes_the_rules(engine, host_a):
    gw = gateway(engine)
    with daemon(engine, "--iptables", "--map", f"{REDIS_PORT}={host_a}:{REDIS_PORT}") as cid:
        sock = connect(gw, REDIS_PORT, ns=engine.ns)  # a client in B, through the REDIRECT
        with contextlib.closing(sock):
            assert ping(sock) == b"+PONG\r\n"
            stopped: list[float] = []
            started = time.monotonic()

            def stop() -> None:  # more than --grace (10 s), as deploy/README.md says
                engine.docker("stop", "-t", "30", cid, timeout=60)
                stopped.append(time.monotonic() - started)

            stopper = threading.Thread(target=stop)
            stopper.start()
            try:
                # SIGTERM arrived: the jumps to the daemon's chains go first ...
                wait_until(lambda: not jumps(engine), timeout=10,
                           what=lambda: f"nat rules still there after docker stop: {logs(engine, cid)}")
                assert engine.docker("inspect", "-f", "{{.State.Running}}", cid).strip() == "true"
                # ... a new connection is not redirected any more, the open one still works.
                assert redis_cli(engine, gw) == ""
                assert ping(sock) == b"+PONG\r\n"
            finally:
                sock.close()
                stopper.join(60)
        assert stopped, "docker stop did not return"
        # The last connection closed: the daemon exits then, not at the end of --grace.
        assert stopped[0] < 10, f"docker stop took {stopped[0]:.1f}s"
        assert engine.docker("inspect", "-f", "{{.State.ExitCode}}", cid).strip() == "0", logs(engine, cid)
        assert "AMBASSADORD" not in nat_rules(engine)  # and the chains at the exit


# ---- routes declared by the consumer containers (run --docker) -------------------------------


def docker_daemon_options(engine: DockerEngine) -> list[str]:
    """The engine's API socket where the daemon's --docker looks by default."""
    return ["-v", f"{engine.dir}/docker.sock:/var/run/docker.sock"]


def test_a_consumer_declaring_connect_label_gets_its_route_on_its_first_command(engine, host_a):
    gw = gateway(engine)
    with daemon(engine, "--iptables", "--docker", options=docker_daemon_options(engine), iptables=False):
        labelled = ["--label", f"connect.{REDIS_PORT}={host_a}:{REDIS_PORT}"]
        assert redis_cli(engine, gw, options=labelled) == "PONG"
        assert redis_cli(engine, gw) == "", "a container without the label must get no relay"


def test_a_consumer_declaring_backend_env_gets_its_route_on_its_first_command(engine, host_a):
    gw = gateway(engine)
    with daemon(engine, "--iptables", "--docker", options=docker_daemon_options(engine), iptables=False):
        declared = ["-e", f"BACKEND_6380={host_a}:{REDIS_PORT}"]
        assert redis_cli(engine, gw, 6380, options=declared) == "PONG"
        assert redis_cli(engine, gw, 6380) == "", "a container without the variable must get no relay"


# ---- deploy/docker-compose.yml, host B -------------------------------------------------------

COMPOSE = REPO / "deploy" / "docker-compose.yml"
# What hashicorp/consul's docker-entrypoint.sh does for `agent`, the part the compose file uses.
CONSUL_ENTRYPOINT = """#!/bin/sh
if [ "$1" = agent ]; then shift; set -- agent -data-dir=/consul/data -config-dir=/consul/config "$@"; fi
exec consul "$@"
"""


def compose_cli() -> list[str]:
    """The compose implementation: ``docker compose`` (v2) where the plugin is installed,
    else Debian's docker-compose (v1, 1.29; bookworm packages no v2 plugin). None: a
    failure under CI=true, a skip elsewhere."""
    if subprocess.run([docker_cli(), "compose", "version"], capture_output=True).returncode == 0:
        return [docker_cli(), "compose"]
    found = shutil.which("docker-compose")
    if found is None:
        message = "neither `docker compose` nor docker-compose (Debian package docker-compose) is installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
        pytest.skip(message)
    return [found]


def stand_in_images(engine: DockerEngine, tmp_path: Path) -> None:
    """The compose file's host B images, made here (no registry): ambassadord:latest is the
    image built from docker/Dockerfile; the consumer's redis:7-alpine is the tools image
    (sh, redis-cli, sleep: all its command needs); hashicorp/consul:1.20 is the tools image
    with this machine's consul (1.8) and the official image's entrypoint behaviour."""
    engine.docker("tag", IMAGE, "ambassadord:latest")
    engine.docker("tag", TOOLS_IMAGE, "redis:7-alpine")
    context = tmp_path / "consul-image"
    consul = consul_binary()
    # consul and its libraries, at the paths they have here with the directories resolved
    # (/lib -> usr/lib on a merged-/usr system, as in the tools image).
    for source, name in ((consul, "/usr/bin/consul"), *((lib, lib) for lib in libraries(consul))):
        target = context / "root" / os.path.realpath(os.path.dirname(name)).lstrip("/") / os.path.basename(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (context / "docker-entrypoint.sh").write_text(CONSUL_ENTRYPOINT)
    (context / "docker-entrypoint.sh").chmod(0o755)
    (context / "Dockerfile").write_text(
        f"FROM {TOOLS_IMAGE}\nCOPY root/ /\nCOPY docker-entrypoint.sh /usr/local/bin/\n"
        "WORKDIR /consul/config\nWORKDIR /consul/data\nENTRYPOINT [\"/usr/local/bin/docker-entrypoint.sh\"]\n")
    engine.docker("build", "-q", "-t", "hashicorp/consul:1.20", str(context), timeout=120)


def compose_for_docker_20(tmp_path: Path) -> Path:
    """deploy/docker-compose.yml as its comment says to use it on Docker before 23.0: without
    BPF in cap_add (this engine is 20.10). Also, to save the test 10 s, the image's health
    check runs every second instead of every 10 s (the consumer waits for it); the build
    context is made absolute. Nothing else changes."""
    doc = yaml.safe_load(COMPOSE.read_text())
    amb = doc["services"]["ambassadord"]
    assert "BPF" in amb["cap_add"]
    amb["cap_add"] = [c for c in amb["cap_add"] if c != "BPF"]
    assert "healthcheck" not in amb  # the image's
    amb["healthcheck"] = {"interval": "1s"}
    amb["build"]["context"] = str((COMPOSE.parent / amb["build"]["context"]).resolve())
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_compose_host_b_runs_and_its_consumer_reaches_redis_on_host_a(engine, tmp_path):
    """Host B of deploy/docker-compose.yml, run by docker-compose against the engine: the
    Consul client agent joins host A's Consul server, ambassadord resolves consul:///redis
    through it, turns healthy, and the consumer container (started only then) INCRs host A's
    Redis through the bridge gateway."""
    compose = compose_cli()
    env = {**script_env(engine), "HOST_IP": B_SIDE, "HOST_A_IP": A_SIDE}
    checked = subprocess.run([*compose, "-f", str(COMPOSE), "--profile", "host-b", "config", "-q"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    stand_in_images(engine, tmp_path)
    project = [*compose, "-p", "ambtest", "-f", str(compose_for_docker_20(tmp_path)), "--profile", "host-b"]
    with namespaces("dkcmpa") as (a,):
        link(engine.ns, [f"{B_SIDE}/24"], a, [f"{A_SIDE}/24"], tag="dkcmp")
        # Host A: Redis, and the Consul server on its LAN address (the default Serf and
        # RPC ports, where host B's agent joins), Redis registered in it as Registrator would.
        with RedisProcess(REDIS_PORT, host=A_SIDE, ns=a, workdir=tmp_path), \
                ConsulAgent("host-a", ns=a, bind=A_SIDE, ports={"serf-lan": 8301, "server": 8300}) as server:
            server.register("redis", "host-a:redis:6379", A_SIDE, REDIS_PORT, ttl_check=True, ttl="10m")
            try:
                up = subprocess.run([*project, "up", "-d"], env=env, capture_output=True, text=True, timeout=180)
                assert up.returncode == 0, f"docker-compose up: {up.stdout}{up.stderr}"
                hits = lambda: a.exec(["redis-cli", "-h", A_SIDE, "get", "consumer:hits"]).strip()  # noqa: E731
                wait_until(lambda: hits().isdigit() and int(hits()) >= 1, timeout=60,
                           what=lambda: "consumer:hits on host A: " + hits() + "\n" + subprocess.run(
                               [*project, "logs", "--tail", "30"], env=env, capture_output=True, text=True).stdout)
                amb = subprocess.run([*project, "ps", "-q", "ambassadord"], env=env, capture_output=True,
                                     text=True, timeout=60).stdout.strip()
                assert engine.docker("inspect", "-f", "{{.State.Health.Status}}", amb).strip() == "healthy"
            finally:
                # The consumer's shell, its PID 1, ignores SIGTERM: kill it rather than wait
                # for the stop timeout. The rest stops as `down` says.
                subprocess.run([*project, "kill", "consumer"], env=env, capture_output=True, timeout=60)
                subprocess.run([*project, "down", "-v", "-t", "30"], env=env, capture_output=True, timeout=120)
