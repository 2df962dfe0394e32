"""The Docker Engine API client (ambassadord/docker_api.py).

Three tiers: :func:`endpoint` as a pure table (flag, DOCKER_HOST, the TLS variables with
real PEM files made here); the client against a small fake engine of the test's own (on a
unix socket, or over TLS on loopback) for what a real engine does not do on demand: a
stream that breaks or ends, an event that is no JSON, an HTTP error, no answer, API
versions out of range, a socket the client may not open, client certificates; and against
a real engine (tests/docker_engine.py): version, listing, inspect, events of containers and
networks, cancellation without leaks, and a measurement with 20 containers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from ambassadord.docker_api import (
    TLS,
    DockerClient,
    DockerConfigError,
    DockerError,
    endpoint,
)
from tests.docker_images import TOOLS_IMAGE

# ---------------------------------------------------------------- endpoint(): a pure table

DEFAULT = "unix:///var/run/docker.sock"
UNIX, TCP = {"DOCKER_HOST": "unix:///run/d.sock"}, {"DOCKER_HOST": "tcp://10.0.0.1:2375"}
ENDPOINTS = [
    # flag, env, url, where, what requests go to: a socket path, or a base URL
    (None, {}, DEFAULT, "default", "/var/run/docker.sock"),
    ("", {}, DEFAULT, "default", "/var/run/docker.sock"),
    (None, {"DOCKER_HOST": ""}, DEFAULT, "default", "/var/run/docker.sock"),
    (None, TCP, "tcp://10.0.0.1:2375", "env DOCKER_HOST", "http://10.0.0.1:2375"),
    (None, UNIX, "unix:///run/d.sock", "env DOCKER_HOST", "/run/d.sock"),
    ("unix:///run/e.sock", TCP, "unix:///run/e.sock", "--docker", "/run/e.sock"),
    ("/run/e.sock", UNIX, "/run/e.sock", "--docker", "/run/e.sock"),
    ("tcp://10.0.0.1", {}, "tcp://10.0.0.1", "--docker", "http://10.0.0.1:2375"),
    ("tcp://docker.example:4243/", {}, "tcp://docker.example:4243/", "--docker", "http://docker.example:4243"),
    ("tcp://[fd00::1]:2375", {}, "tcp://[fd00::1]:2375", "--docker", "http://[fd00::1]:2375"),
    # The TLS variables concern tcp:// only; DOCKER_CERT_PATH alone turns no TLS on (the CLI).
    ("/run/e.sock", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/x"}, "/run/e.sock", "--docker", "/run/e.sock"),
    ("tcp://10.0.0.1:2376", {"DOCKER_CERT_PATH": "/x"}, "tcp://10.0.0.1:2376", "--docker", "http://10.0.0.1:2376"),
]


@pytest.mark.parametrize("flag, env, url, where, target", ENDPOINTS)
def test_endpoint(flag, env, url, where, target):
    ep = endpoint(flag, env)
    assert (ep.url, ep.where) == (url, where)
    assert (ep.uds, ep.base_url) == ((target, "http://docker") if target.startswith("/") else (None, target))
    assert ep.tls is None


ENDPOINT_ERRORS = [
    ("ssh://me@host", {}, ["--docker 'ssh://me@host'", "not supported", "ssh -NL /tmp/docker.sock:/var/run/docker.sock",
                           "unix:///tmp/docker.sock"]),
    (None, {"DOCKER_HOST": "ssh://me@host"}, ["env DOCKER_HOST 'ssh://me@host'", "ssh -NL"]),
    (None, {"DOCKER_HOST": "npipe:////./pipe/docker_engine"}, ["env DOCKER_HOST 'npipe:", "named pipe"]),
    ("fd://", {}, ["--docker 'fd://'", "systemd"]),
    (None, {"DOCKER_HOST": "foo"}, ["env DOCKER_HOST 'foo'", "expected unix:///PATH, tcp://HOST[:PORT]"]),
    ("10.0.0.1:2375", {}, ["--docker '10.0.0.1:2375'", "expected unix:///PATH"]),
    ("http://localhost:2375", {}, ["--docker 'http://localhost:2375'", "expected unix:///PATH"]),
    ("unix://run/docker.sock", {}, ["--docker 'unix://run/docker.sock'", "must be absolute"]),
    ("tcp://host:port", {}, ["--docker 'tcp://host:port'", "Port"]),
    ("tcp://:2375", {}, ["--docker 'tcp://:2375'", "not HOST[:PORT]"]),
    ("tcp://host:2375/v1.41", {}, ["not HOST[:PORT]"]),
]


@pytest.mark.parametrize("flag, env, words", ENDPOINT_ERRORS)
def test_endpoint_errors_say_where_and_what(flag, env, words):
    with pytest.raises(DockerConfigError) as caught:
        endpoint(flag, env)
    for word in words:
        assert word in str(caught.value)


@pytest.fixture
def certs(tmp_path) -> Path:
    """A directory with ca.pem, cert.pem and key.pem as DOCKER_CERT_PATH has them (a
    self-signed certificate serves as its own CA)."""
    if not (openssl := subprocess.run(["which", "openssl"], capture_output=True, text=True).stdout.strip()):
        pytest.fail("openssl (Debian package openssl) is needed to make the test's certificates")
    d = tmp_path / "certs"
    d.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem", "-subj", "/CN=docker", "-days", "1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:docker"],
                   check=True, capture_output=True)
    (d / "ca.pem").write_bytes((d / "cert.pem").read_bytes())
    return d


def test_tls_verify_uses_the_cert_path_like_the_cli(certs):
    env = {"DOCKER_HOST": "tcp://10.0.0.1", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
    ep = endpoint(None, env)
    assert ep.base_url == "https://10.0.0.1:2376"  # the CLI's TLS port when none is given
    assert ep.tls == TLS(True, str(certs / "ca.pem"), str(certs / "cert.pem"), str(certs / "key.pem"))
    DockerClient(ep)  # builds its SSL context from the files


def test_tls_files_gone_since_the_start_are_a_docker_error(certs):
    ep = endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)})
    (certs / "ca.pem").unlink()
    with pytest.raises(DockerError, match=r"^tcp://10\.0\.0\.1:2376: TLS files: .*No such file"):
        DockerClient(ep)


def test_docker_tls_encrypts_without_verifying(certs):
    (certs / "cert.pem").unlink()
    (certs / "key.pem").unlink()  # no client certificate: allowed, as by the CLI
    ep = endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS": "1", "DOCKER_CERT_PATH": str(certs)})
    assert ep.base_url == "https://10.0.0.1:2376"
    assert ep.tls == TLS(False, None, None, None)


def test_tls_files_default_to_the_cli_config_dir(certs, tmp_path):
    ep = endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CONFIG": str(certs)})
    assert ep.tls.ca == str(certs / "ca.pem")
    with pytest.raises(DockerConfigError, match=r"/\.docker' \(DOCKER_CERT_PATH is not set\).*ca\.pem"):
        endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "HOME": str(tmp_path)})  # no ~/.docker there


@pytest.mark.parametrize("damage, words", [
    ("no dir", ["env DOCKER_CERT_PATH", "No such file", "ca.pem"]),
    ("no ca", ["env DOCKER_CERT_PATH", "No such file", "ca.pem"]),
    ("no key", ["env DOCKER_CERT_PATH", "No such file", "key.pem"]),
    ("bad ca", ["env DOCKER_CERT_PATH"]),
    ("wrong key", ["env DOCKER_CERT_PATH"]),
])
def test_unusable_tls_files_fail_the_start(certs, tmp_path, damage, words):
    path = certs
    match damage:
        case "no dir":
            path = tmp_path / "typo"
        case "no ca":
            (certs / "ca.pem").unlink()
        case "no key":
            (certs / "key.pem").unlink()
        case "bad ca":
            (certs / "ca.pem").write_text("not a certificate\n")
        case "wrong key":
            subprocess.run(["openssl", "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-out", certs / "key.pem"], check=True, capture_output=True)
    with pytest.raises(DockerConfigError) as caught:
        endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(path)})
    for word in words:
        assert word in str(caught.value)


# ---------------------------------------------------------------- a fake engine

EVENT = {"Type": "container", "Action": "start", "Actor": {"ID": "c0ffee", "Attributes": {"name": "web"}},
         "time": 1700000000, "timeNano": 1700000000000000000}
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(status: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(), len(data), data)


def engine_handler(got: list[str], events_reply: bytes | None, api: str, min_api: str | None):
    """A fake engine's connection handler: /version answers ``api`` (and ``min_api``); any
    other request gets ``events_reply``, then the connection closes (None: no answer
    ever). Each request's target is appended to ``got``."""
    version = {"ApiVersion": api, "Version": "fake"} | ({"MinAPIVersion": min_api} if min_api else {})

    async def handle(stream):
        buffered = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                while b"\r\n\r\n" not in buffered:
                    if not (data := await stream.receive_some()):
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                got.append(head.split(b" ")[1].decode())
                if got[-1] == "/version":
                    await stream.send_all(answer("200 OK", version))
                elif events_reply is None:
                    await trio.sleep_forever()
                else:
                    await stream.send_all(events_reply)
                    await stream.aclose()
                    return

    return handle


@contextlib.asynccontextmanager
async def fake_engine(path: Path, events_reply: bytes | None = b"", *, api: str = "1.41", min_api: str | None = "1.12"):
    """A fake engine (:func:`engine_handler`) on a unix socket at ``path``; yields the list
    of request targets it got."""
    got: list[str] = []
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, engine_handler(got, events_reply, api, min_api),
                            [trio.SocketListener(sock)])
        yield got
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("api, min_api, prefix", [
    ("1.41", "1.12", "/v1.41"),  # Debian 12's engine: its own version
    ("1.52", "1.44", "/v1.47"),  # a newer engine: the newest this client speaks
    ("1.47", None, "/v1.47"),  # engines before API 1.25 say no MinAPIVersion
])
async def test_version_fixes_the_prefix_of_later_calls(tmp_path, api, min_api, prefix):
    async with fake_engine(tmp_path / "d.sock", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                           api=api, min_api=min_api) as got:
        async with DockerClient(endpoint(f"unix://{tmp_path}/d.sock", {})) as client:
            assert await client.inspect("gone") is None  # asks for the version first
            assert client.api == prefix
    assert got == ["/version", f"{prefix}/containers/gone/json"]


@pytest.mark.parametrize("api, min_api, words", [
    ("1.20", None, ["speaks API ? to 1.20", "this client 1.24 to 1.47"]),
    ("1.60", "1.50", ["speaks API 1.50 to 1.60"]),
    ("", None, ["GET /version: no API version"]),
])
async def test_an_engine_out_of_range_is_an_error(tmp_path, api, min_api, words):
    async with fake_engine(tmp_path / "d.sock", api=api, min_api=min_api):
        async with DockerClient(endpoint(f"unix://{tmp_path}/d.sock", {})) as client:
            with pytest.raises(DockerError) as caught:
                await client.version()
    assert str(caught.value).startswith(f"unix://{tmp_path}/d.sock: ")
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("reply, words", [
    # The engine dies mid-event: the connection closes inside a chunk.
    (STREAM_HEAD + chunk(json.dumps(EVENT).encode() + b"\n") + b"50\r\n{\"Type\"",
     ["GET /v1.41/events: ", "incomplete"]),
    # The engine ends the stream as HTTP allows (the last chunk).
    (STREAM_HEAD + chunk(json.dumps(EVENT).encode() + b"\n") + b"0\r\n\r\n", ["the engine ended the event stream"]),
    (STREAM_HEAD + chunk(json.dumps(EVENT).encode() + b"\nnot json\n"), ["an event is no JSON object: 'not json'"]),
    (STREAM_HEAD + chunk(json.dumps(EVENT).encode() + b"\n[1, 2]\n"), ["an event is no JSON object: '[1, 2]'"]),
])
async def test_a_broken_or_ended_event_stream_raises(tmp_path, reply, words):
    async with fake_engine(tmp_path / "d.sock", reply) as got:
        async with DockerClient(endpoint(str(tmp_path / "d.sock"), {})) as client:
            async with client.events(since=1700000000.5) as stream:
                with trio.fail_after(5):
                    assert await anext(stream) == EVENT
                    with pytest.raises(DockerError) as caught:
                        await anext(stream)
                    with pytest.raises(DockerError) as again:  # and so does every later read
                        await anext(stream)
    assert str(again.value) == str(caught.value)
    assert got[1] == ("/v1.41/events?filters=%7B%22type%22%3A+%5B%22container%22%2C+%22network%22%5D%7D"
                      "&since=1700000000.500000000")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}/d.sock: ") and "\n" not in message
    for word in words:
        assert word in message


async def test_an_http_error_at_subscribing_raises_with_the_engines_message(tmp_path):
    async with fake_engine(tmp_path / "d.sock", answer("500 Internal Server Error", {"message": "out of\nmemory"})):
        async with DockerClient(endpoint(f"unix://{tmp_path}/d.sock", {})) as client:
            with pytest.raises(DockerError) as caught:
                async with client.events():
                    pass
    assert str(caught.value) == f"unix://{tmp_path}/d.sock: GET /v1.41/events: HTTP 500 out of memory"


async def test_an_engine_that_does_not_answer(tmp_path):
    async with fake_engine(tmp_path / "d.sock", None):
        async with DockerClient(endpoint(f"unix://{tmp_path}/d.sock", {}), timeout=0.3) as client:
            await client.version()
            with pytest.raises(DockerError) as caught:
                await client.containers()
    assert str(caught.value) == f"unix://{tmp_path}/d.sock: GET /v1.41/containers/json: no answer within 0.3s"


def socket_path_kinds(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    return {"missing": tmp_path / "missing.sock", "file": tmp_path / "file", "dir": tmp_path / "dir"}


@pytest.mark.parametrize("kind, reason", [
    ("missing", "[Errno 2] No such file or directory "
                "(in a container, mount it: -v /var/run/docker.sock:/var/run/docker.sock)"),
    ("file", "[Errno 111] Connection refused (no engine listens there)"),
    ("dir", "[Errno 111] Connection refused (no engine listens there)"),
])
async def test_no_engine_at_the_socket_path(tmp_path, kind, reason):
    path = socket_path_kinds(tmp_path)[kind]
    async with DockerClient(endpoint(f"unix://{path}", {})) as client:
        with pytest.raises(DockerError) as caught:
            await client.containers()
    assert str(caught.value) == f"cannot connect to unix://{path}: {reason}"


async def test_no_engine_at_a_tcp_address():
    with socket.socket() as unused:  # bound, never listening: refused
        unused.bind(("127.0.0.1", 0))
        url = "tcp://127.0.0.1:%d" % unused.getsockname()[1]
        async with DockerClient(endpoint(url, {})) as client:
            with pytest.raises(DockerError) as caught:
                await client.version()
    assert str(caught.value) == f"cannot connect to {url}: [Errno 111] Connection refused"


PERMISSION_PROBE = """
import sys, trio
from ambassadord.docker_api import DockerClient, DockerError, endpoint
async def main():
    async with DockerClient(endpoint(sys.argv[1], {})) as client:
        try:
            await client.version()
        except DockerError as exc:
            print(exc)
trio.run(main)
"""


async def test_a_socket_the_daemon_may_not_open(tmp_path):
    # Mode 000 stops no process with CAP_DAC_OVERRIDE: as root, the probe runs without it
    # (setpriv drops every capability; uid 0 then gets the owner's bits, like anyone).
    async with fake_engine(tmp_path / "d.sock"):
        os.chmod(tmp_path / "d.sock", 0)
        drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
        probe = await trio.run_process([*drop, sys.executable, "-c", PERMISSION_PROBE, f"unix://{tmp_path}/d.sock"],
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       cwd=Path(__file__).parent.parent)
    assert probe.stdout.decode().strip() == (f"cannot connect to unix://{tmp_path}/d.sock: permission denied "
                                              "(run as root or in the socket's group, e.g. docker)"), probe.stderr


# ---------------------------------------------------------------- a real engine

async def docker(engine, *args: str) -> str:
    """``docker ARGS`` against the test engine, in a thread (the test's trio loop, and the
    event stream it reads, keep running)."""
    return await trio.to_thread.run_sync(lambda: engine.docker(*args))


@pytest.fixture
async def client(docker_engine):
    async with DockerClient(endpoint(docker_engine.host, {})) as made:
        yield made


async def next_event(stream, want, timeout: float = 30) -> dict:
    """The first event for which ``want(event)`` holds (events before it are skipped)."""
    with trio.fail_after(timeout):
        async for event in stream:
            if want(event):
                return event
    raise AssertionError("unreachable: the stream raises when it ends")


async def test_version_of_a_real_engine(client, docker_engine):
    info = await client.version()
    assert info["ApiVersion"] == docker_engine.docker("version", "-f", "{{.Server.APIVersion}}").strip()
    assert client.api == "/v%d.%d" % min(tuple(map(int, info["ApiVersion"].split("."))), (1, 47))


async def test_running_containers_their_labels_env_and_addresses(client, docker_engine):
    created = docker_engine.docker("create", TOOLS_IMAGE, "sleep", "300").strip()  # never started: not listed
    try:
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300", options=[
                "--label", "connect.6379=redis.service.consul", "-e", "BACKEND_6380=10.0.0.5:6380"]) as box:
            listed = await client.containers()
            assert created not in [c["Id"] for c in listed]
            (mine,) = [c for c in listed if c["Id"] == box.id]
            assert mine["Names"] == [f"/{box.name}"]
            assert mine["Labels"] == {"connect.6379": "redis.service.consul"}
            assert mine["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == box.ip != ""
            assert "GlobalIPv6Address" in mine["NetworkSettings"]["Networks"]["bridge"]

            details = await client.inspect(box.id)
            assert details["Id"] == box.id and details["State"]["Running"]
            assert "BACKEND_6380=10.0.0.5:6380" in details["Config"]["Env"]
            assert details["Config"]["Labels"] == {"connect.6379": "redis.service.consul"}
            assert details["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == box.ip
            assert (await client.inspect(box.name))["Id"] == box.id
        assert await client.inspect(box.id) is None  # removed
        assert box.id not in [c["Id"] for c in await client.containers()]
    finally:
        docker_engine.docker("rm", "-f", created, check=False)


async def test_events_a_container_started_after_subscribing(client, docker_engine):
    async with client.events() as stream:
        cid = await docker(docker_engine, "run", "-d", "--label", "connect.6379=x:1", TOOLS_IMAGE, "sleep", "300")
        cid = cid.strip()
        try:
            started = await next_event(stream, lambda e: e["Type"] == "container" and e["Action"] == "start")
            assert started["Actor"]["ID"] == cid
            assert started["Actor"]["Attributes"]["connect.6379"] == "x:1"  # labels come along
            assert isinstance(started["time"], int) and isinstance(started["timeNano"], int)
            await docker(docker_engine, "rm", "-f", cid)
            died = await next_event(stream, lambda e: e["Actor"]["ID"] == cid and e["Action"] in ("die", "kill"))
            assert died["Type"] == "container"
        finally:
            docker_engine.docker("rm", "-f", cid, check=False)


async def test_events_since_replays_what_came_before_the_subscription(client, docker_engine):
    since = time.time()
    with docker_engine.container(TOOLS_IMAGE, "sleep", "300") as box:
        async with client.events(since=since) as stream:
            started = await next_event(stream, lambda e: e["Action"] == "start")
            assert started["Actor"]["ID"] == box.id


async def test_events_of_network_connect_and_disconnect(client, docker_engine):
    network = f"amb-api-{os.getpid()}"
    docker_engine.docker("network", "create", network)
    try:
        with docker_engine.container(TOOLS_IMAGE, "sleep", "300") as box:
            async with client.events() as stream:
                await docker(docker_engine, "network", "connect", network, box.id)
                joined = await next_event(stream, lambda e: e["Type"] == "network")
                assert joined["Action"] == "connect"
                assert joined["Actor"]["Attributes"]["container"] == box.id
                assert joined["Actor"]["Attributes"]["name"] == network
                details = await client.inspect(box.id)
                assert details["NetworkSettings"]["Networks"][network]["IPAddress"]
                await docker(docker_engine, "network", "disconnect", network, box.id)
                left = await next_event(stream, lambda e: e["Type"] == "network")
                assert (left["Action"], left["Actor"]["Attributes"]["container"]) == ("disconnect", box.id)
    finally:
        docker_engine.docker("network", "rm", network, check=False)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_cancelling_the_event_stream_is_prompt_and_leaks_nothing(docker_engine):
    before = open_fds()
    async with DockerClient(endpoint(docker_engine.host, {})) as client:
        await client.version()
        with_pool = open_fds()
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                async def read(task_status=trio.TASK_STATUS_IGNORED):
                    async with client.events() as stream:
                        task_status.started()
                        await next_event(stream, lambda e: False)

                await nursery.start(read)
                await trio.testing.wait_all_tasks_blocked()  # the reader waits for an event
                cancelled_at = time.monotonic()
                nursery.cancel_scope.cancel()
            assert time.monotonic() - cancelled_at < 0.5
            assert open_fds() <= with_pool  # the stream's connection is closed (it may have been the pool's one)
        assert (await client.version())["ApiVersion"]  # the client still works
    assert open_fds() == before


async def test_a_cancelled_read_ends_the_stream_loudly(client):
    async with client.events() as stream:
        with trio.move_on_after(0.2):  # no event comes: the read is cancelled
            await stream.__anext__()
        with pytest.raises(DockerError, match="a read was cancelled, which ends it"):
            await stream.__anext__()


async def test_listing_and_inspecting_20_containers(client, docker_engine, capsys):
    def start(n: int) -> list[str]:
        return [docker_engine.docker("run", "-d", "--label", f"connect.{6000 + i}=x:1", TOOLS_IMAGE,
                                     "sleep", "300").strip() for i in range(n)]

    ids = await trio.to_thread.run_sync(start, 20)
    try:
        await client.version()
        t0 = time.perf_counter()
        listed = await client.containers()
        details = [await client.inspect(c["Id"]) for c in listed]
        sequential = time.perf_counter() - t0

        t0 = time.perf_counter()
        listed = await client.containers()
        concurrent: dict[str, dict] = {}

        async def one(cid: str) -> None:
            concurrent[cid] = await client.inspect(cid)

        async with trio.open_nursery() as nursery:
            for c in listed:
                nursery.start_soon(one, c["Id"])
        parallel = time.perf_counter() - t0
        assert {d["Id"] for d in details} == set(concurrent) >= set(ids)
        with capsys.disabled():
            print(f"\n[measure] containers() + inspect() of {len(listed)} containers: "
                  f"{sequential * 1000:.1f} ms one after another, {parallel * 1000:.1f} ms concurrently")
    finally:
        await docker(docker_engine, "rm", "-f", *ids)


@contextlib.asynccontextmanager
async def tls_engine(certs: Path):
    """The fake engine over TLS on 127.0.0.1 (a free port), as ``dockerd --tlsverify``:
    it presents cert.pem and wants a client certificate signed by ca.pem. Yields the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs / "ca.pem")
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(
            trio.serve_ssl_over_tcp, engine_handler([], b"", "1.41", "1.12"), 0, context, host="127.0.0.1"))
        yield listeners[0].transport_listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_tls_verify_talks_to_an_engine_with_client_certificates(certs):
    async with tls_engine(certs) as port:
        ep = endpoint(f"tcp://127.0.0.1:{port}", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)})
        async with DockerClient(ep) as client:
            assert (await client.version())["Version"] == "fake"


async def test_tls_verify_refuses_an_engine_its_ca_did_not_sign(certs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", other / "ca-key.pem", "-out", other / "ca.pem", "-subj", "/CN=other", "-days", "1"],
                   check=True, capture_output=True)
    async with tls_engine(certs) as port:
        url = f"tcp://127.0.0.1:{port}"
        async with DockerClient(endpoint(url, {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(other)})) as client:
            with pytest.raises(DockerError) as caught:
                await client.version()
    assert str(caught.value).startswith(f"cannot connect to {url}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


@pytest.mark.parametrize("args, env, says", [
    (["--docker", "ssh://user@host"], {}, "--docker 'ssh://user@host'"),
    (["--docker"], {"DOCKER_HOST": "npipe:////./pipe/docker_engine"}, "env DOCKER_HOST"),
    (["--docker", "tcp://10.0.0.1:2376"], {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/nonexistent"},
     "/nonexistent"),
])
def test_run_refuses_a_bad_docker_endpoint_before_starting_anything(args, env, says):
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")} | env
    proc = subprocess.run([sys.executable, "-m", "ambassadord", "run", "--map", "6379=127.0.0.1:6379",
                           "--admin", "off", "--listen", "127.0.0.1:1", *args],
                          capture_output=True, text=True, env=environ, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "listening" not in proc.stderr, proc.stderr
