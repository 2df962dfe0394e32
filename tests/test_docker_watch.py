"""docker_watch.ContainerWatch's logic against a scripted engine: which events change what,
a burst applied as one reload, a container's first connection, a lost engine.

Unit tests of pure logic with a fake client (the seam ``client=``); the real engine, real
containers and real connections are tests/test_e2e_docker.py's.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import trio
import trio.testing

from ambassadord import docker_watch
from ambassadord.docker_api import DockerError, Endpoint
from ambassadord.docker_watch import ContainerWatch

ENDPOINT = Endpoint(url="unix:///fake/docker.sock", where="--docker")


def doc(cid: str, name: str, addrs=("172.17.0.5",), labels=None, env=(), running=True) -> dict:
    """A ``docker inspect`` document as the engine gives it (the parts the watch reads)."""
    return {"Id": cid, "Name": "/" + name, "State": {"Running": running},
            "Config": {"Labels": labels or {}, "Env": list(env)},
            "NetworkSettings": {"Networks": {f"net{i}": {"IPAddress": a} for i, a in enumerate(addrs)}}}


class Engine:
    """What the fake clients see: containers (id -> inspect doc), an event channel per
    subscription, and a switch that makes every call fail (the engine is away)."""

    def __init__(self):
        self.docs: dict[str, dict] = {}
        self.down = False
        self.subscribers: list[trio.MemorySendChannel] = []
        self.calls: list[str] = []

    def event(self, kind: str, action: str, cid: str) -> None:
        actor = {"ID": cid} if kind == "container" else {"ID": "netid", "Attributes": {"container": cid}}
        for send in self.subscribers:
            send.send_nowait({"Type": kind, "Action": action, "Actor": actor})

    def break_streams(self) -> None:
        for send in self.subscribers:
            send.close()
        self.subscribers.clear()


class FakeClient:
    def __init__(self, engine: Engine, endpoint: Endpoint):
        self.engine = engine

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def _call(self, what: str) -> None:
        self.engine.calls.append(what)
        if self.engine.down:
            raise DockerError(f"cannot connect to {ENDPOINT.url}: [Errno 111] Connection refused")

    async def version(self) -> dict:
        self._call("version")
        return {"Version": "99.0", "ApiVersion": "1.99"}

    async def containers(self) -> list[dict]:
        self._call("containers")
        await trio.lowlevel.checkpoint()
        return [{"Id": d["Id"], "NetworkSettings": d["NetworkSettings"]} for d in self.engine.docs.values()
                if d["State"]["Running"]]

    async def inspect(self, cid: str) -> dict | None:
        self._call(f"inspect {cid}")
        await trio.lowlevel.checkpoint()
        return self.engine.docs.get(cid)

    @contextlib.asynccontextmanager
    async def events(self, since=None):
        self._call("events")
        send, receive = trio.open_memory_channel(100)
        self.engine.subscribers.append(send)

        async def stream():
            async for ev in receive:
                yield ev
            raise DockerError("the event stream ended")

        yield stream()


class Harness:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.applied: list[str] = []
        self.watch = ContainerWatch(ENDPOINT, self.apply, client=lambda ep: FakeClient(engine, ep))

    async def apply(self, why: str) -> None:
        self.applied.append(why)
        await trio.lowlevel.checkpoint()

    def routes(self) -> dict:
        return {c.name: c.addresses for c in self.watch.snapshot()}


@contextlib.asynccontextmanager
async def watching(engine: Engine):
    h = Harness(engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(h.watch.run)
        yield h
        nursery.cancel_scope.cancel()


async def settle(h: Harness, condition, what: str, timeout: float = 5) -> None:
    with trio.move_on_after(timeout) as scope:
        while not condition():
            await trio.sleep(0.01)
    assert not scope.cancelled_caught, f"{what}: {h.routes()}, applied {h.applied}"


async def test_start_lists_running_containers_and_applies_once():
    engine = Engine()
    engine.docs["a" * 64] = doc("a" * 64, "web", labels={"connect.6379": "10.0.0.1:6379"})
    engine.docs["b" * 64] = doc("b" * 64, "stopped", running=False)
    async with watching(engine) as h:
        assert h.routes() == {"web": ("172.17.0.5",)}
        assert h.applied == ["docker: containers listed"]  # started only once applied
        assert h.watch.declared_ports() == {6379}
        assert engine.calls.index("events") < engine.calls.index("containers")  # subscribed before listing


async def test_events_create_start_die_destroy_and_networks():
    engine = Engine()
    async with watching(engine) as h:
        cid = "c" * 64
        engine.docs[cid] = doc(cid, "app", addrs=(), running=False, env=["BACKEND_6380=10.0.0.1:6379"])
        engine.event("container", "create", cid)
        await settle(h, lambda: h.watch.declared_ports() == {6380}, "ports known at create, before start")
        assert h.routes() == {"app": ()}
        engine.docs[cid] = doc(cid, "app", env=["BACKEND_6380=10.0.0.1:6379"])
        engine.event("container", "start", cid)
        await settle(h, lambda: h.routes() == {"app": ("172.17.0.5",)}, "addresses at start")
        engine.docs[cid] = doc(cid, "app", addrs=("172.17.0.5", "172.18.0.2"), env=["BACKEND_6380=10.0.0.1:6379"])
        engine.event("network", "connect", cid)
        await settle(h, lambda: h.routes() == {"app": ("172.17.0.5", "172.18.0.2")}, "network connect")
        engine.event("container", "exec_start: sh", cid)  # ignored: no inspect
        await settle(h, lambda: not h.watch._inspecting, "no inspection in flight")
        n = len(engine.calls)
        engine.event("container", "die", cid)
        await settle(h, lambda: h.routes() == {"app": ()}, "die: addresses go, ports stay")
        assert h.watch.declared_ports() == {6380}
        assert not any(c.startswith("inspect") for c in engine.calls[n:])
        engine.event("container", "destroy", cid)
        await settle(h, lambda: h.routes() == {}, "destroy: gone")
        await settle(h, lambda: h.applied[-1].endswith("removed"), "applied")


async def test_a_burst_is_one_reload():
    engine = Engine()
    applying = trio.Event()
    async with watching(engine) as h:
        release = trio.Event()

        async def slow_apply(why: str) -> None:
            h.applied.append(why)
            applying.set()
            await release.wait()

        h.watch._apply = slow_apply
        for i in range(10):
            cid = f"{i:064d}"
            engine.docs[cid] = doc(cid, f"c{i}", addrs=(f"172.17.0.{10 + i}",), labels={"connect.80": "10.0.0.1:80"})
            engine.event("container", "start", cid)
        await applying.wait()
        await settle(h, lambda: len(h.routes()) == 10, "all ten known")
        release.set()
        await settle(h, lambda: h.watch._applied == h.watch._changes, "all applied")
        assert len(h.applied) <= 3, h.applied  # the first change, then the rest together
        assert "more" in h.applied[-1] or len(h.applied) == 2


async def test_first_seen_looks_up_an_unknown_address_once():
    engine = Engine()
    async with watching(engine) as h:
        w = h.watch
        assert w.first_seen("127.0.0.1") is None
        cid = "d" * 64
        engine.docs[cid] = doc(cid, "early", addrs=("172.17.0.9",), labels={"connect.6379": "10.0.0.1:6379"})
        ask = w.first_seen("172.17.0.9")  # its start event has not come yet
        assert ask is not None
        await ask()
        assert h.routes() == {"early": ("172.17.0.9",)}
        assert w._applied == w._changes  # applied before the connection goes on
        assert w.first_seen("172.17.0.9") is None
        assert w.first_seen("::ffff:172.17.0.9") is None
        # An address no container has: one listing, then remembered until the next change.
        stranger = w.first_seen("10.9.9.9")
        await stranger()
        listings = engine.calls.count("containers")
        assert w.first_seen("10.9.9.9") is None
        engine.docs["e" * 64] = doc("e" * 64, "other", addrs=("172.17.0.10",))
        engine.event("container", "start", "e" * 64)
        await settle(h, lambda: "other" in h.routes(), "a change")
        assert w.first_seen("10.9.9.9") is not None
        assert engine.calls.count("containers") == listings


async def test_many_first_connections_share_one_listing():
    engine = Engine()
    async with watching(engine) as h:
        engine.docs["f" * 64] = doc("f" * 64, "busy", addrs=("172.17.0.7",))
        before = engine.calls.count("containers")
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(h.watch.first_seen("172.17.0.7"))
        assert engine.calls.count("containers") - before == 1


async def test_a_lost_engine_keeps_the_routes_logs_once_and_resyncs(caplog, autojump_clock):
    caplog.set_level(logging.INFO, "ambassadord")
    engine = Engine()
    engine.docs["a" * 64] = doc("a" * 64, "kept")
    engine.docs["g" * 64] = doc("g" * 64, "goes", addrs=("172.17.0.6",))
    async with watching(engine) as h:
        engine.down = True
        engine.break_streams()
        await settle(h, lambda: not h.watch.connected, "lost")
        assert h.routes() == {"kept": ("172.17.0.5",), "goes": ("172.17.0.6",)}  # kept meanwhile
        assert h.watch.first_seen("172.17.0.99") is None  # no lookups while away
        await trio.sleep(30)  # several retries, under the backoff
        retries = engine.calls.count("version")
        assert 3 <= retries <= 2 + 30 / docker_watch.BACKOFF[0]
        lost = [r for r in caplog.records if "lost the engine" in r.getMessage()]
        assert len(lost) == 1
        del engine.docs["g" * 64]
        engine.docs["n" * 64] = doc("n" * 64, "new", addrs=("172.17.0.8",))
        engine.down = False
        await settle(h, lambda: h.watch.connected, "reconnected", timeout=docker_watch.BACKOFF[1] + 1)
        assert h.routes() == {"kept": ("172.17.0.5",), "new": ("172.17.0.8",)}
        assert any("reconnected" in r.getMessage() for r in caplog.records)


async def test_an_engine_away_at_start_does_not_hold_the_start(autojump_clock):
    engine = Engine()
    engine.down = True
    async with watching(engine) as h:
        assert not h.watch.connected and "Connection refused" in h.watch.error
        assert h.watch.status()["connected"] is False


@pytest.mark.parametrize("labels, env, problems", [
    ({"connect.6379": "consul//redis"}, [], 1),
    ({"connect.http": "x:1"}, ["BACKEND_6380=10.0.0.1:1"], 1),
    ({}, ["BACKEND_6380=10.0.0.1:1"], 0),
])
async def test_bad_declarations_are_logged_once(caplog, labels, env, problems):
    caplog.set_level(logging.INFO, "ambassadord")
    engine = Engine()
    cid = "h" * 64
    engine.docs[cid] = doc(cid, "sloppy", labels=labels, env=env)
    async with watching(engine) as h:
        for n in range(2, 6):
            engine.event("container", "start" if n % 2 else "rename", cid)
            await settle(h, lambda: engine.calls.count(f"inspect {cid}") >= n, "inspected again")
    bad = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(bad) == problems, bad
    assert all("sloppy" in m for m in bad)


async def test_create_redirects_labelled_ports_while_dockerd_holds_the_inspect():
    # dockerd answers an inspect of a starting container only after its start: the labels
    # in the create event are enough for its ports, and later events do not queue behind.
    engine = Engine()
    async with watching(engine) as h:
        gate = trio.Event()
        cid = "k" * 64
        slow = FakeClient.inspect

        async def held(self, c):
            if c == cid:
                await gate.wait()
            return await slow(self, c)

        FakeClient.inspect = held
        try:
            engine.docs[cid] = doc(cid, "quick", labels={"connect.6379": "10.0.0.1:6379"})
            for send in engine.subscribers:
                send.send_nowait({"Type": "container", "Action": "create",
                                  "Actor": {"ID": cid, "Attributes": {"name": "quick", "image": "x",
                                                                      "connect.6379": "10.0.0.1:6379"}}})
            await settle(h, lambda: h.watch.declared_ports() == {6379}, "ports from the event's labels")
            other = "m" * 64
            engine.docs[other] = doc(other, "other", addrs=("172.17.0.3",))
            engine.event("container", "start", other)
            await settle(h, lambda: "other" in h.routes(), "the next event is not held up")
            gate.set()
            await settle(h, lambda: h.routes().get("quick") == ("172.17.0.5",), "the inspect, once answered")
        finally:
            FakeClient.inspect = slow


async def test_containers_that_declare_nothing_cause_no_reload():
    engine = Engine()
    async with watching(engine) as h:
        applied = len(h.applied)
        cid = "p" * 64
        engine.docs[cid] = doc(cid, "plain", addrs=("172.17.0.4",))
        engine.event("container", "create", cid)
        engine.event("container", "start", cid)
        await settle(h, lambda: "plain" in h.routes(), "known")
        assert h.watch.first_seen("172.17.0.4") is None  # known: no lookup, no wait
        engine.event("container", "die", cid)
        engine.event("container", "destroy", cid)
        await settle(h, lambda: "plain" not in h.routes(), "gone")
        assert len(h.applied) == applied, h.applied


@pytest.mark.parametrize("garbage", [
    {"Id": "q" * 64, "Name": None, "Config": None, "NetworkSettings": None, "State": None},
    {"Id": "q" * 64, "Name": ["x"], "Config": "text", "NetworkSettings": [1, 2], "State": {}},
    {"Id": "q" * 64, "Config": {"Labels": ["connect.6379=x"], "Env": "BACKEND_6379=x"},
     "NetworkSettings": {"Networks": ["172.17.0.30"]}},
    {"Id": "q" * 64, "Config": {"Labels": None, "Env": [None, 5, "NOEQUALS", "BACKEND_6379"]},
     "NetworkSettings": {"Networks": {"x": None, "y": {"IPAddress": None}}}},
    {"Id": "q" * 64, "Config": {"Labels": {"connect.6379": None, "connect.6380": 7}, "Env": []},
     "NetworkSettings": {"Networks": {"x": {"IPAddress": "not-an-address"}}}},
])
async def test_an_engine_answer_full_of_garbage_harms_nothing_else(caplog, garbage):
    caplog.set_level(logging.INFO, "ambassadord")
    engine = Engine()
    good = "r" * 64
    engine.docs[good] = doc(good, "good", addrs=("172.17.0.20",), labels={"connect.6379": "10.0.0.1:6379"})
    async with watching(engine) as h:
        engine.docs["q" * 64] = {**garbage, "State": {"Running": True}} if garbage.get("State") is None else garbage
        engine.event("container", "start", "q" * 64)
        engine.event("container", "create", "")  # no id: ignored
        for send in engine.subscribers:
            send.send_nowait({"Type": None, "Action": None, "Actor": None})
        await settle(h, lambda: not h.watch._inspecting and engine.calls.count(f"inspect {'q' * 64}") >= 1,
                     "the garbage inspected")
        assert h.watch.connected  # the stream goes on
        assert h.routes()["good"] == ("172.17.0.20",)
        other = "s" * 64
        engine.docs[other] = doc(other, "after", addrs=("172.17.0.21",))
        engine.event("container", "start", other)
        await settle(h, lambda: "after" in h.routes(), "events after the garbage")


def test_garbage_addresses_and_labels_never_break_the_routes():
    from ambassadord.containers import from_inspect
    from ambassadord.sources import ContainerRoutes
    from ambassadord.config import RouteDefaults

    c = from_inspect({"Id": "q" * 64, "Name": "/g", "Config": {"Labels": {"connect.6379": None, "connect.6380": 7,
                                                                          "connect.6381": "10.0.0.1:1"}},
                      "NetworkSettings": {"Networks": {"a": {"IPAddress": "not-an-address"},
                                                       "b": {"IPAddress": "172.17.0.9", "GlobalIPv6Address": 5}}}})
    assert c.addresses == ("172.17.0.9",)
    routes = ContainerRoutes((c,)).read(RouteDefaults()).routes
    assert [(r.port, str(r.source)) for r in routes] == [(6381, "172.17.0.9/32")]


async def test_events_of_another_shape_are_ignored_and_the_stream_goes_on():
    engine = Engine()
    async with watching(engine) as h:
        for garbage in ({"Type": "container", "Action": "start", "Actor": "x"},
                        {"Type": "network", "Action": "connect", "Actor": {"Attributes": ["container"]}},
                        {"Type": "container", "Action": "create", "Actor": {"ID": "z" * 64, "Attributes": 5}}):
            for send in engine.subscribers:
                send.send_nowait(garbage)
        cid = "t" * 64
        engine.docs[cid] = doc(cid, "after", addrs=("172.17.0.22",))
        engine.event("container", "start", cid)
        await settle(h, lambda: "after" in h.routes(), "the event after the garbage")
        assert h.watch.connected
        assert engine.calls.count("version") == 1  # never lost, never reconnected
