"""The tests' Docker engine itself (tests/docker_engine.py, tests/docker_images.py): it starts
in a namespace of its own and leaves nothing behind, the machine's own networking untouched;
containers from the locally made tools image reach each other on its bridge, and reach a
server in another namespace through the engine's namespace, masqueraded by dockerd's own rule;
an overlay2 engine builds from a Dockerfile offline; a killed run's engine is swept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import docker_engine as engines
from tests import netns
from tests.daemon import RedisProcess, wait_until
from tests.docker_engine import DockerEngine, DockerError, cgroup_dirs, mounts_under
from tests.docker_images import TOOLS_IMAGE, import_image
from tests.netns import link, namespaces, run

# The far namespace's link to the engine's namespace (a LAN between two hosts).
ENGINE_SIDE, FAR_SIDE = "10.254.0.1", "10.254.0.2"


@pytest.fixture(autouse=True)
def prerequisites():
    netns.require_prerequisites()
    engines.require_prerequisites()


def root_namespace_networking() -> dict[str, object]:
    """What dockerd would change in the namespace it runs in: firewall rules, forwarding
    sysctls, bridges. Read in the machine's own namespace (the test's)."""
    def rules(tool: str) -> list[str]:
        return [line for line in run([tool]).splitlines() if not line.startswith("#")]  # "#" lines: timestamps

    def sysctl(name: str) -> str:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()

    return {
        "iptables": rules("iptables-save"),
        "ip6tables": rules("ip6tables-save"),
        "sysctls": {s: sysctl(s) for s in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")},
        "docker links": sorted(line.split(":")[1].strip() for line in run(["ip", "-o", "link", "show"]).splitlines()
                               if line.split(":")[1].strip().startswith(("docker", "br-", "veth"))),
    }


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def namespace_names() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def test_engine_starts_in_its_namespace_and_leaves_nothing(tools_rootfs, tmp_path):
    before = root_namespace_networking()
    run_containerd_before = os.path.exists("/run/containerd")
    with DockerEngine("dkclean", log_dir=tmp_path) as engine:
        d, ns_name, pid = engine.dir, engine.ns.name, engine.pid
        assert engine.host == f"unix://{d}/docker.sock"
        # dockerd's bridge and rules are in the engine's namespace ...
        assert "docker0" in engine.ns.exec(["ip", "-o", "link", "show"])
        assert "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in engine.ns.exec(["iptables-save"])
        assert engine.ns.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"
        # ... and a running container gives it all there is to clean up: a shim, cgroups,
        # the container's network namespace bind-mounted under the exec root.
        import_image(engine, tools_rootfs)
        with engine.container(TOOLS_IMAGE, "sleep", "300") as box:
            assert box.ip.startswith("172.17.")
            assert any("/exec/netns/" in m for m in mounts_under(d)), mounts_under(d)
            assert cgroup_dirs(d.name)
            assert "running" in engine.docker("inspect", "-f", "{{.State.Status}}", box.id)
            engine.docker("run", "-d", TOOLS_IMAGE, "sleep", "300")  # left running: close() removes it
            assert root_namespace_networking() == before  # while it runs, too
    assert not os.path.exists(f"/proc/{pid}")
    assert processes_mentioning(str(d)) == []
    assert mounts_under(d) == []
    assert not d.exists()
    assert cgroup_dirs(d.name) == []
    assert ns_name not in namespace_names()
    assert os.path.exists("/run/containerd") == run_containerd_before
    assert root_namespace_networking() == before


def test_a_failed_start_leaves_nothing():
    made_before = set(Path("/tmp").glob(f"{engines.PREFIX}{os.getpid()}-*"))
    with pytest.raises(DockerError, match="dockerd exited"):
        DockerEngine("dkbad", extra_args=["--no-such-flag"])
    assert set(Path("/tmp").glob(f"{engines.PREFIX}{os.getpid()}-*")) == made_before
    assert f"amb-dkbad-{os.getpid()}" not in namespace_names()


def test_containers_reach_each_other_on_the_bridge(docker_engine):
    with docker_engine.container(TOOLS_IMAGE, "redis-server", "--save", "", "--protected-mode", "no") as server:
        wait_until(lambda: docker_engine.docker("exec", server.id, "redis-cli", "ping", check=False).strip() == "PONG",
                   timeout=15, what=lambda: f"redis-server in {server.name}: {docker_engine.docker('logs', server.id)}")
        client = docker_engine.docker("run", "--rm", TOOLS_IMAGE, "timeout", "10", "redis-cli", "-h", server.ip, "ping")
        assert client.strip() == "PONG"


def test_a_container_reaches_a_server_in_a_linked_namespace(docker_engine, tmp_path):
    # Container -> docker0 -> the engine's namespace (dockerd turned forwarding on there)
    # -> veth -> the far namespace, which has no route back to 172.17.0.0/16: only the
    # MASQUERADE rule dockerd wrote in the engine's namespace makes the answer come back.
    with namespaces("dkfar") as (far,):
        link(docker_engine.ns, [f"{ENGINE_SIDE}/24"], far, [f"{FAR_SIDE}/24"], tag="dkfar")
        with RedisProcess(6379, host=FAR_SIDE, ns=far, workdir=tmp_path):
            out = docker_engine.docker("run", "--rm", TOOLS_IMAGE, "sh", "-c",
                                       f"timeout 10 redis-cli -h {FAR_SIDE} ping && redis-cli -h {FAR_SIDE} client list")
    pong, clients = out.split("\n", 1)
    assert pong == "PONG"
    assert f"addr={ENGINE_SIDE}:" in clients  # the container's address, masqueraded as the engine's


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from tests.docker_engine import DockerEngine
from tests.docker_images import TOOLS_IMAGE, import_image

engine = DockerEngine("dkkill")
import_image(engine, Path(sys.argv[1]))
engine.docker("run", "-d", TOOLS_IMAGE, "sleep", "300")
print(engine.dir, engine.ns.name, engine.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a test run killed before its clean-up
"""


def test_the_engine_of_a_killed_run_is_swept(tools_rootfs):
    run_containerd_before = os.path.exists("/run/containerd")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tools_rootfs)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    d, ns_name, pid = proc.stdout.split()
    d = Path(d)
    assert processes_mentioning(str(d))  # its dockerd lives on, and its container
    assert mounts_under(d) and cgroup_dirs(d.name)
    sockets = engines.shim_sockets(d)
    assert sockets and all(os.path.exists(s) for s in sockets)

    assert str(d) in engines.sweep_stale()
    assert processes_mentioning(str(d)) == []
    assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/cmdline").read_bytes() == b""  # gone, or a zombie
    assert mounts_under(d) == []
    assert not d.exists()
    assert cgroup_dirs(d.name) == []
    assert ns_name not in namespace_names()
    assert not any(os.path.exists(s) for s in sockets)  # the killed shim's socket
    if not run_containerd_before:
        assert not os.path.exists("/run/containerd")


def test_overlay2_engine_builds_offline_and_leaves_no_mounts(tools_rootfs, tmp_path):
    # The later image build wants overlay2 (vfs copies the base image for every step); a
    # Dockerfile's RUN must work with nothing but the local image (no registry, no network).
    with DockerEngine("dkover", log_dir=tmp_path, storage_driver="overlay2") as engine:
        d = engine.dir
        assert engine.docker("info", "-f", "{{.Driver}}").strip() == "overlay2"
        import_image(engine, tools_rootfs)
        engine.docker("build", "-q", "-t", "amb-test/built:1", "-",
                      input=f"FROM {TOOLS_IMAGE}\nRUN redis-cli --version > /version\n")
        with engine.container("amb-test/built:1", "sleep", "300") as box:
            assert any(m.endswith("/merged") for m in mounts_under(d))
            assert engine.docker("exec", box.id, "cat", "/version").startswith("redis-cli 7")
    assert mounts_under(d) == []
    assert not d.exists()
