"""The messages between the main process and its helpers (ambassadord/workers/protocol.py),
over a real socketpair: every kind round-trips, a frame that is not a message for its
receiver is a clear error that leaves the stream readable, and both receiving sides act
on what they get (a helper on a real Server; the pool passes a helper's ejection on).

The daemon-level behaviour of --workers (real processes, real Redis) is in test_workers.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from ambassadord.sources import load_routes
from ambassadord.routes import Route, RouteTable
from ambassadord.server import ListenAddress, Server, bind_listeners
from ambassadord.workers import Settings, WorkerPool, helper
from ambassadord.workers.channel import Channel
from ambassadord.workers.protocol import (
    HEADER,
    TO_HELPER,
    TO_MAIN,
    Abort,
    Backends,
    Down,
    Eject,
    Failed,
    Init,
    Looked,
    Lookup,
    ProtocolError,
    Ready,
    Routes,
    RoutesOk,
    SpecText,
    StatsReply,
    StatsRequest,
    Stop,
    encode,
    light_configs,
)
from ambassadord.backends.interface import Backend, BackendSet
from tests.daemon import REPO_ROOT

A, B = Backend("127.0.0.1", 6379), Backend("::1", 6380, priority=1, weight=5, name="cache-b")
SETTINGS = Settings(listen=(ListenAddress("127.0.0.1", 7000),), grace=3.0, mark=None, use_splice=True,
                    sockmap="off", sockmap_size=1024, log_format="json", log_level="info")


def _configs(*maps: str):
    return load_routes(maps=list(maps), env={}).routes


def _key():
    return _configs("6379=127.0.0.1:6379")[0].key


# One of every kind, in the direction it travels. The test below fails if a kind is added
# to the protocol without a sample here.
TO_HELPER_SAMPLES = [
    Init(SETTINGS, 2),
    Routes(light_configs(_configs("6379=127.0.0.1:6379", "6380=consul://127.0.0.1:8500/cache")),
           {_key(): BackendSet((A, B), source="static", updated=1.5)}, 7),
    Backends(_key(), BackendSet((B,), source="dns", updated=2.0, stale=True, error="SERVFAIL")),
    Eject(_key(), A, 30.0),
    Down(_key(), frozenset({A, B})),
    StatsRequest(41),
    Stop(),
    Abort(),
    Looked(5),
]
TO_MAIN_SAMPLES = [
    Ready(4242),
    Failed("cannot listen on 127.0.0.1:7000: Address already in use"),
    RoutesOk(7),
    Eject(_key(), B, 0.5),
    StatsReply(41, {"pid": 4242, "active": 1, "total": 3, "unrouted": {"no-route": 1}, "routes": {}}),
    Lookup("172.17.0.5", 5),
]


def test_every_kind_of_message_has_a_sample():
    assert {type(m) for m in TO_HELPER_SAMPLES} == set(TO_HELPER)
    assert {type(m) for m in TO_MAIN_SAMPLES} == set(TO_MAIN)


def test_a_helper_gets_each_spec_as_its_text_only():
    (consul,) = light_configs(_configs("6380=consul://127.0.0.1:8500/cache"))
    assert consul.spec == SpecText("consul://127.0.0.1:8500/cache")


def _pair() -> tuple[Channel, Channel]:
    """(the main process's end, a helper's end) of a real socketpair."""
    main, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(main, TO_MAIN), Channel(helper_end, TO_HELPER)


async def test_every_message_round_trips_both_ways():
    main, child = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(main.run_writer)
        nursery.start_soon(child.run_writer)
        for msg in TO_HELPER_SAMPLES:
            main.send(msg)
        for msg in TO_MAIN_SAMPLES:
            child.send(msg)
        with trio.fail_after(5):
            assert [await child.recv() for _ in TO_HELPER_SAMPLES] == TO_HELPER_SAMPLES
            assert [await main.recv() for _ in TO_MAIN_SAMPLES] == TO_MAIN_SAMPLES
        nursery.cancel_scope.cancel()


async def test_a_table_larger_than_one_read_arrives_whole():
    """A table of 3000 routes is a frame of several reads (recv takes 64 KiB at a time)."""
    main, child = _pair()
    configs = light_configs(_configs(*(f"{10000 + i}=10.0.{i // 250}.{i % 250 + 1}:6379" for i in range(3000))))
    big = Routes(configs, {c.key: BackendSet((A,), updated=1.0) for c in configs}, 1)
    assert len(encode(big)) > 4 * (1 << 16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(main.run_writer)
        main.send(big)
        main.send(Stop())
        with trio.fail_after(5):
            assert await child.recv() == big
            assert await child.recv() == Stop()
        nursery.cancel_scope.cancel()


def _raw(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


@pytest.mark.parametrize("payload, error", [
    (b"\x80\x05garbage", "cannot decode a 9-byte message: UnpicklingError"),
    (pickle.dumps(("routes", [], {}, 3)), "tuple ('routes', [], {}, 3) is not a worker message"),
    (pickle.dumps("x" * 200), "str 'xxxx"),  # named, and cut short
    (pickle.dumps(Ready(1)), "Ready is not one of Init, Routes, Backends, Eject, Down, StatsRequest, Stop, Abort, Looked"),
], ids=["garbage", "old-tuple", "long-repr", "wrong-direction"])
async def test_a_frame_that_is_no_message_for_its_receiver_is_a_clear_error(payload, error):
    main, child = _pair()
    main.sock.send(_raw(payload) + encode(StatsRequest(9)))
    with trio.fail_after(5):
        with pytest.raises(ProtocolError, match="^" + re.escape(error)) as caught:
            await child.recv()
        assert len(str(caught.value)) < 200, caught.value
        assert await child.recv() == StatsRequest(9)  # the frame was consumed: in step


async def test_the_peer_gone_is_eof():
    main, child = _pair()
    main.sock.send(encode(Stop())[:3])  # and half a header: the peer died mid-frame
    main.sock.close()
    with trio.fail_after(5):
        with pytest.raises(EOFError):
            await child.recv()
    assert child.closed


# ---- a helper's side: its messages applied to a real Server --------------------------------


async def test_a_helper_applies_what_the_main_process_sends(caplog):
    main, child = _pair()
    first = _configs("7101=127.0.0.1:1", "7102=127.0.0.1:2")
    server = Server(RouteTable([Route(c) for c in light_configs(first)]),
                    bind_listeners([ListenAddress("127.0.0.1", 0)]), resolve=False, peers=helper.Link(child))
    k1, k2 = (c.key for c in first)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(main.run_writer)
        nursery.start_soon(child.run_writer)
        await nursery.start(server.run)
        nursery.start_soon(helper.follow, child, server)
        (r1, r2) = server.table.routes
        with trio.fail_after(5):
            main.send(Backends(k1, BackendSet((A, B), updated=1.0)))
            main.send(Down(k1, frozenset({B})))
            main.send(Eject(k1, A, 60.0))
            main.send(StatsRequest(5))
            reply = await main.recv()
            assert isinstance(reply, StatsReply) and reply.req == 5, reply
            assert reply.snapshot["pid"] == os.getpid()
            assert r1.backends.backends == (A, B) and r1.pick.down == frozenset({B})
            assert 59 < reply.snapshot["routes"][r1.name]["ejected"][str(A)] <= 60

            # This helper's own ejection goes to the main process.
            server.peers.ejected(k2, B, 5.0)
            assert await main.recv() == Eject(k2, B, 5.0)

            # A reload: the new table and its sets, then the confirmation.
            new = light_configs(_configs("7101=127.0.0.1:1", "7103=127.0.0.1:3"))
            main.send(Routes(new, {new[1].key: BackendSet((B,), updated=2.0)}, 3))
            assert await main.recv() == RoutesOk(3)
            assert [r.config.port for r in server.table.routes] == [7101, 7103]
            assert server.table.routes[1].backends.backends == (B,)

            # Garbage and a message for the other direction: logged, and the helper goes on.
            main.sock.send(_raw(b"junk"))
            main.send(Init(SETTINGS, 1))  # valid to a helper, but not once it runs
            main.send(StatsRequest(6))
            assert (await main.recv()).req == 6
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert errors == ["bad message from the main process: cannot decode a 4-byte message: "
                              "UnpicklingError: pickle data was truncated; ignored",
                              "Init from the main process once running; ignored"], errors

            main.send(Stop())
            while not server.stopping:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_helper_whose_main_process_goes_away_stops():
    main, child = _pair()
    server = Server(RouteTable([]), bind_listeners([ListenAddress("127.0.0.1", 0)]), resolve=False,
                    peers=helper.Link(child), grace=0.1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            nursery.start_soon(helper.follow, child, server)
            main.sock.close()
        # server.run returned: shutdown() came from follow() at EOF


def test_the_helper_process_names_a_wrong_first_message():
    """``python -m ambassadord.workers FD`` (how pool.py starts helpers) sent Routes before
    Init: it answers Failed with the reason (the main process logs "did not start: ...")."""
    main, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with main:
        proc = subprocess.Popen([sys.executable, "-m", "ambassadord.workers", str(child.fileno())],
                                pass_fds=(child.fileno(),), cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
        child.close()
        try:
            main.sendall(encode(Routes((), {}, 0)))
            main.settimeout(20)
            data = b""
            while chunk := main.recv(1 << 16):
                data += chunk
            assert proc.wait(10) == 1
        finally:
            proc.kill()
            proc.wait()
    (n,) = HEADER.unpack_from(data)
    assert pickle.loads(data[HEADER.size:HEADER.size + n]) == Failed("expected Init first, got Routes")


# ---- the main process's side: the pool acts on each helper's messages ----------------------


async def test_the_pool_passes_a_helpers_ejection_on_to_the_others(caplog):
    """Two helpers on real socketpairs (no processes): an ejection from helper 1 is applied
    in the main process and reaches helper 2, not helper 1 again; readiness, the table
    confirmation and counters land on the helper that sent them."""
    applied = []
    pool = WorkerPool(3, SETTINGS, table=lambda: RouteTable([]), apply_ejection=lambda *a: applied.append(a))
    h1, h2 = pool.helpers
    ends = {}
    for h in pool.helpers:
        main_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        h.channel, ends[h.index] = Channel(main_end, TO_MAIN), Channel(child_end, TO_HELPER)
    async with trio.open_nursery() as nursery:
        for h in pool.helpers:
            nursery.start_soon(h.channel.run_writer)
            nursery.start_soon(ends[h.index].run_writer)
        with trio.fail_after(5):
            ends[1].send(Ready(111))
            ends[1].send(RoutesOk(4))
            ends[1].send(Eject(_key(), A, 30.0))
            for _ in range(3):
                assert await pool._next(h1)
            assert h1.ready and not h2.ready and h1.routes_seq == 4
            assert applied == [(_key(), A, 30.0)]
            assert await ends[2].recv() == Eject(_key(), A, 30.0)
            news = Backends(_key(), BackendSet((B,), updated=1.0))
            pool.backends(news.key, news.bset)  # to both; helper 1 got nothing before it
            assert await ends[1].recv() == news and await ends[2].recv() == news

            # Counters: the answer to a request lands where collect() waits for it.
            h2.ready = True
            ends[1].send(StatsReply(99, {"pid": 111}))  # a late answer to an old request: dropped
            assert await pool._next(h1)
            assert h1.answers == {}

            # Garbage from a helper: logged with the helper's number, and the pool reads on.
            h1.channel.sock.close()
            ends[1].sock.close()
            ends[2].sock.send(_raw(pickle.dumps(Stop())))  # a main -> helper message, backwards
            assert await pool._next(h2)
            assert "worker 2 sent a bad message: Stop is not one of Ready, Failed, RoutesOk, Eject, StatsReply, Lookup; " \
                   "ignored" in caplog.text
            # Helper 1 is gone: the next ejection goes to helper 2 alone, and nothing fails.
            pool.ejected(_key(), B, 1.0)
            assert await ends[2].recv() == Eject(_key(), B, 1.0)
        nursery.cancel_scope.cancel()


async def test_collect_sums_only_the_helpers_that_answer(autojump_clock):
    # Virtual time: collect() gives up on the silent helper after its 0.5 s timeout at once
    # (socketpairs in one process are ready as soon as the other end writes).
    pool = WorkerPool(3, SETTINGS, table=lambda: RouteTable([]), apply_ejection=lambda *a: None)
    ends = {}
    for h in pool.helpers:
        main_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        h.channel, ends[h.index] = Channel(main_end, TO_MAIN), Channel(child_end, TO_HELPER)
        h.ready = True

    async def answering(index: int) -> None:  # helper 1 answers; helper 2 never does
        req = await ends[index].recv()
        ends[index].send(StatsReply(req.req, {"pid": 1000 + index}))

    async with trio.open_nursery() as nursery:
        for h in pool.helpers:
            nursery.start_soon(h.channel.run_writer)
            nursery.start_soon(ends[h.index].run_writer)
            nursery.start_soon(_follow_pool, pool, h)
        nursery.start_soon(answering, 1)
        with trio.fail_after(5):
            assert await pool.collect(timeout=0.5) == [{"pid": 1001}]
        nursery.cancel_scope.cancel()


async def _follow_pool(pool: WorkerPool, h) -> None:
    while await pool._next(h):
        pass


async def test_a_helper_asks_once_per_unknown_address_and_learns_from_the_table():
    """--docker in a helper (workers/helper.Link): a connection from an address no container
    route of its table has waits for the main process's Looked; the next table teaches it."""
    import trio

    from ambassadord.workers.helper import Link

    class Channel:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(msg)

    ch = Channel()
    link = Link(ch)
    assert link.first_seen("127.0.0.1") is None and link.first_seen("::1") is None
    ask = link.first_seen("::ffff:172.17.0.5")
    assert ask is not None
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three first connections, one question
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert ch.sent == [Lookup("172.17.0.5", 1)]
        from dataclasses import replace
        import ipaddress

        (route,) = _configs("6379=127.0.0.1:6379")
        link.routes([replace(route, source=ipaddress.ip_network("172.17.0.5/32"), container="web (abc)")])
        link.looked(1)
    assert link.first_seen("172.17.0.5") is None  # its route is in the table now
    stranger = link.first_seen("10.1.1.1")
    link.looked(99)  # an answer to nothing: ignored
    with trio.move_on_after(0.05):
        pass
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stranger)
        await trio.testing.wait_all_tasks_blocked()
        link.looked(2)
    assert link.first_seen("10.1.1.1") is None  # no route came: a stranger until the next table
    link.routes([])
    assert link.first_seen("10.1.1.1") is not None
