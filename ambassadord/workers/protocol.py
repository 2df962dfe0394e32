"""The messages between the main process and its helpers, and their frames (sans I/O).

One frozen dataclass per kind of message; the receiving side dispatches with ``match``
(pool.py for the main process, helper.py for a helper). channel.py moves the frames over
the socketpair; this module owns no socket.

======================  ==========================================================
main -> helper          Init (settings; first), Routes (the table and current sets;
                        second, then after each reload), Backends (one route's new
                        set), Eject (a backend failed in another process), Down (a
                        route's backends that health checks say are down),
                        StatsRequest, Stop, Abort, Looked (the answer to a Lookup,
                        after the Routes it brought)
helper -> main          Ready, Failed (why it cannot start), RoutesOk (it serves the
                        table of that Routes), Eject, StatsReply (its counters),
                        Lookup (--docker: a client address it knows no container of)
======================  ==========================================================

A frame is a 4-byte big-endian length and a pickle. Pickle, because both ends are this
program on one host, over a private socketpair, and the payloads are the program's own
dataclasses (RouteConfig, BackendSet, Backend); a frame is never read from anywhere else.
A frame that does not decode to a message for its receiver raises ProtocolError, once
the whole frame is consumed: the stream stays in step and the next message reads fine (a
helper restarted after an upgrade may run newer code than its main process).
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..routes import SpecText  # a route's spec as a helper knows it: its text only

if TYPE_CHECKING:
    from ambassadord.backends.interface import Backend, BackendSet

    from ..routes import RouteConfig

HEADER = struct.Struct("!I")


class ProtocolError(Exception):
    """A frame that is not a message its receiver understands (the message says why)."""


# ---- what travels inside the messages ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """What a helper needs to serve like the main process."""

    listen: tuple  # ListenAddress of every listener the main process bound
    grace: float
    mark: int | None
    use_splice: bool
    sockmap: str  # "on" / "off": what the main process ended up with
    sockmap_size: int
    log_format: str
    log_level: str
    docker: bool = False  # --docker: ask the main process about unknown client addresses
    log_connections: str = "all"  # --log-connections
    passthrough: bool = False  # RunSettings.passthrough


def light_configs(configs: Iterable[RouteConfig]) -> tuple[RouteConfig, ...]:
    """``configs`` as a helper gets them: each spec replaced by its text."""
    return tuple(dataclasses.replace(c, spec=SpecText(c.spec.text)) for c in configs)


# ---- the messages -------------------------------------------------------------------------


class Message:
    """Base of every message (decode() accepts nothing else)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Init(Message):
    settings: Settings
    index: int  # 1..N-1: which helper this is (its log lines say so)


@dataclass(frozen=True, slots=True)
class Routes(Message):
    configs: tuple[RouteConfig, ...]  # light_configs()
    sets: Mapping  # RouteConfig.key -> BackendSet, of the routes resolved so far
    seq: int  # the helper answers RoutesOk(seq) once it serves this table


@dataclass(frozen=True, slots=True)
class Backends(Message):
    key: tuple  # RouteConfig.key
    bset: BackendSet


@dataclass(frozen=True, slots=True)
class Eject(Message):
    """Both ways: the helper's own failure goes to the main process, which passes it on."""

    key: tuple
    backend: Backend
    duration: float


@dataclass(frozen=True, slots=True)
class Down(Message):
    key: tuple
    down: frozenset  # of Backend


@dataclass(frozen=True, slots=True)
class StatsRequest(Message):
    req: int


@dataclass(frozen=True, slots=True)
class Stop(Message):
    pass


@dataclass(frozen=True, slots=True)
class Abort(Message):
    pass


@dataclass(frozen=True, slots=True)
class Ready(Message):
    pid: int


@dataclass(frozen=True, slots=True)
class Failed(Message):
    reason: str


@dataclass(frozen=True, slots=True)
class RoutesOk(Message):
    seq: int


@dataclass(frozen=True, slots=True)
class StatsReply(Message):
    req: int
    snapshot: dict  # Server.stats_snapshot()


@dataclass(frozen=True, slots=True)
class Lookup(Message):
    """--docker: a helper's connection came from ``addr``, which no container route of its
    table has; the main process asks Docker (docker_watch.ContainerWatch.first_seen)."""

    addr: str
    req: int


@dataclass(frozen=True, slots=True)
class Looked(Message):
    """The answer to Lookup ``req``: sent after the Routes of any route it found, so the
    helper's table has it when this arrives (the channel keeps the order)."""

    req: int


TO_HELPER = (Init, Routes, Backends, Eject, Down, StatsRequest, Stop, Abort, Looked)
TO_MAIN = (Ready, Failed, RoutesOk, Eject, StatsReply, Lookup)


# ---- frames -------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """``msg`` as one frame (encode once to send one message to many helpers)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def take_frame(buf: bytearray) -> bytes | None:
    """Remove the first whole frame from ``buf`` and return its payload; None while
    ``buf`` holds less than one frame."""
    if len(buf) < HEADER.size:
        return None
    (n,) = HEADER.unpack_from(buf)
    end = HEADER.size + n
    if len(buf) < end:
        return None
    payload = bytes(buf[HEADER.size:end])
    del buf[:end]
    return payload


def decode(payload: bytes, accept: tuple[type, ...]) -> Message:
    """The message in ``payload``, which must be one of ``accept`` (TO_HELPER or TO_MAIN).

    Raises:
        ProtocolError: it does not unpickle, is not a Message, or is not one of ``accept``
            (the error says which, and what arrived).
    """
    try:
        msg = pickle.loads(payload)
    except Exception as exc:  # garbage, or a class this code does not have
        raise ProtocolError(f"cannot decode a {len(payload)}-byte message: {type(exc).__name__}: {exc}") from None
    if not isinstance(msg, Message):
        raise ProtocolError(f"{type(msg).__name__} {_short(msg)} is not a worker message")
    if not isinstance(msg, accept):
        raise ProtocolError(f"{type(msg).__name__} is not one of {', '.join(t.__name__ for t in accept)}")
    return msg


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
