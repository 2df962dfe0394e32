"""scripts/demo's Docker part: real containers declare their own routes (``run --docker``).

A Docker engine of the demo's own starts in a network namespace of its own (host B; the
tests' tests/docker_engine.py, which leaves nothing behind), with an image made from this
machine's redis-cli (tests/docker_images.py: no registry is needed). Host A is another
namespace with Redis. ambassadord runs on B with ``--iptables --docker``; three consumer
containers ask for Redis at the bridge's gateway: one with a label, one with an env
variable, one with neither.

Exit status: 0 done, 1 a step failed, 3 no Docker engine can be started here (it says why).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests import docker_engine as engines  # noqa: E402
from tests import docker_images  # noqa: E402
from tests.netns import Netns, link  # noqa: E402

HOST_A, ENGINE_SIDE = "10.252.0.1", "10.252.0.2"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(what: str, answer: str) -> None:
    print(f"    {what:<72} -> {answer}", flush=True)


def consumer(engine, *options: str, command: str) -> str:
    proc = engine._cli("run", "--rm", *options, docker_images.TOOLS_IMAGE, "sh", "-c", command, timeout=60)
    return (proc.stdout + proc.stderr).strip().replace("\n", " / ") or f"(exit {proc.returncode})"


def main() -> int:
    missing = engines.missing_prerequisites()
    if missing:
        print(f"\n==> Skipping the Docker part: no Docker engine can be started here (missing: {', '.join(missing)})")
        return 3
    work = Path(tempfile.mkdtemp(prefix="ambassadord-demo-docker-"))
    step("Docker: a Docker engine of its own in a network namespace (host B), an image made from this machine's "
         "redis-cli, Redis on host A")
    tar = docker_images.rootfs_tar(work / "tools.tar")
    a = daemon = redis = None
    try:
        with engines.DockerEngine("demo", log_dir=work) as engine:
            docker_images.import_image(engine, tar)
            a = Netns("demo-dka")
            link(engine.ns, [f"{ENGINE_SIDE}/24"], a, [f"{HOST_A}/24"], tag="demodk")
            redis = a.popen(["redis-server", "--port", "6379", "--bind", HOST_A, "--save", "", "--appendonly", "no",
                             "--protected-mode", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
            gateway = engine.docker("network", "inspect", "bridge", "-f",
                                    "{{(index .IPAM.Config 0).Gateway}}").strip() or "172.17.0.1"
            step(f"Host B: ambassadord run --iptables --docker (no route of its own; consumers dial {gateway})")
            log = open(work / "ambassadord.log", "wb")
            daemon = engine.ns.popen([str(REPO / ".venv/bin/ambassadord"), "run", "--iptables", "--docker", engine.host,
                                      "--admin", "127.0.0.1:10001"], stdout=log, stderr=log)
            deadline = time.monotonic() + 20
            while b"docker: following" not in (work / "ambassadord.log").read_bytes():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print((work / "ambassadord.log").read_text(), file=sys.stderr)
                    print("error: ambassadord did not start following the engine", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            cli = f"timeout 10 redis-cli -h {gateway}"
            show(f"docker run --label connect.6379={HOST_A}:6379 ... redis-cli -h {gateway} ping",
                 consumer(engine, "--label", f"connect.6379={HOST_A}:6379", command=f"{cli} ping"))
            show(f"docker run -e BACKEND_6380={HOST_A}:6379 ... redis-cli -h {gateway} -p 6380 ping",
                 consumer(engine, "-e", f"BACKEND_6380={HOST_A}:6379", command=f"{cli} -p 6380 ping"))
            show(f"docker run ... redis-cli -h {gateway} ping   (declares nothing)",
                 consumer(engine, command=f"{cli} ping"))
            with engine.container(docker_images.TOOLS_IMAGE, "sleep", "60", name="demo-consumer",
                                  options=["--label", f"connect.6379={HOST_A}:6379"]):
                deadline = time.monotonic() + 10
                while True:
                    status = engine.ns.exec([str(REPO / ".venv/bin/ambassadord"), "status"], check=False)
                    if "demo-consumer" in status or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                step("ambassadord status, with a consumer container running:")
                print("\n".join("    " + line for line in status.splitlines()))
            step("What ambassadord logged:")
            print("\n".join("    " + line for line in (work / "ambassadord.log").read_text().splitlines()))
            daemon.terminate()
            daemon.wait(timeout=20)
            daemon = None
    finally:
        for proc in (daemon, redis):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if a is not None:
            a.delete()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    step("Docker: done; the engine, its namespace and host A are gone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
