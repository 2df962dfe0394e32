"""etcd v3 resolver: the values of the keys under a prefix, watched, surviving restarts.

Spec: ``etcd://[ENDPOINT]/PREFIX`` (progrium/ambassadord's form). The key is the path as
written, leading slash included: ``etcd:///services/redis`` reads the key
``/services/redis`` (its value split on commas) and every key below ``/services/redis/``
(each value ``host:port``). A malformed value is skipped with a log line naming its key,
logged once (interface.Notes), not on every update of another key.

Endpoints: the spec's, else ``--etcd`` (repeatable, a cluster), else ETCDCTL_ENDPOINTS,
else 127.0.0.1:2379. After a failure the next endpoint is tried.

How the watch stays correct (no update lost, no deleted key lingering):

1. Read the range under the prefix; its header revision R is the state we hold.
2. Watch the prefix from R + 1: every put and delete after the read arrives, in order.
3. When the watch breaks (etcd restarted, network error), reconnect (every ~0.5 s for the
   first 10 s of an outage, then with exponential backoff to 30 s, always jittered) and *resume* the watch from the last revision seen + 1: etcd replays
   what happened meanwhile, deletes included. The last known set keeps serving (stale)
   until then.
4. If that revision has been compacted away, etcd refuses the resume: read the range
   again (step 1) instead. A compaction is not an outage: no backoff.
5. Every ``etcd_resync`` seconds (30), read the range again and restart the watch anyway,
   so that a watch stream that died silently (a partition that never resets the TCP
   connection) cannot freeze a route for longer than that.

Client: etcd3 (the design card's choice; synchronous gRPC). Unary calls run in worker
threads (``abandon_on_cancel``) and are bounded by the client timeout; the watch callback
runs in etcd3's gRPC thread and hands each response to trio through
``TrioToken.run_sync_soon`` (thread-safe, never blocks that thread) into an unbounded
channel, so events keep their order. A callback can outlive its session (a response on
its way while the resync or a reconnect closes the channel): it is dropped, in trio,
where it would otherwise raise inside trio's run loop and kill the daemon.

etcd3 0.12 is built against old protobuf: with protobuf >= 4 its generated modules fail
to import unless protobuf's pure-Python implementation is used, which must be chosen
before protobuf is first imported. Hence the environment default below; etcd traffic is
small, so the slower implementation costs nothing that matters.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import trio  # noqa: E402

from .interface import (  # noqa: E402
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Backend,
    Backoff,
    Notes,
    Publish,
    Resolver,
    ResolverOptions,
    Spec,
    SpecError,
    TemporaryFailure,
    answer_or_failure,
    canonical,
    host_or_lost_slash,
    host_problem,
    name_as_host_hint,
    parse_port,
    split_host_port,
    split_http_url,
)
from .keyvalues import pairs_from_keys  # noqa: E402
from .state import ResolverState  # noqa: E402
from .static import backends_of  # noqa: E402

log = logging.getLogger("ambassadord.resolver.etcd")

# For this long into an outage, retry every BACKOFF_FIRST (jittered) instead of backing off:
# an etcd restart takes a second or two, and the route should catch up within the next.
FAST_RETRY_WINDOW = 10.0
_limiter = trio.CapacityLimiter(64)


class _Compacted(Exception):
    """The revision to resume from has been compacted: read the range again."""


def _quiet_closed_watch_threads(args) -> None:
    """threading.excepthook: silence etcd3's watch thread dying of our own client.close().

    etcd3's Watcher runs ``while True: open a stream ...`` in a thread with no way to stop
    it; after its channel is closed the next attempt raises ValueError("... Channel
    closed!") and the thread ends. That is the intended end of a session's thread here,
    not an error worth a traceback on stderr. Everything else goes to the previous hook.
    """
    if (args.thread is not None and args.thread.name.startswith("etcd3_watch_")
            and isinstance(args.exc_value, ValueError) and "Channel closed" in str(args.exc_value)):
        log.debug("etcd3 watch thread %s ended with its closed channel", args.thread.name)
        return
    _previous_excepthook(args)


_previous_excepthook = threading.excepthook
threading.excepthook = _quiet_closed_watch_threads


def client_installed() -> bool:
    """Is the etcd3 package there (the ``etcd`` extra)? Not imported: that takes gRPC."""
    try:
        return importlib.util.find_spec("etcd3") is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules["etcd3"] = None
        return False


def _etcd3():
    try:
        import etcd3
        import etcd3.events
        import etcd3.exceptions
    except Exception as exc:  # protobuf chose its C implementation before we could say otherwise
        raise TemporaryFailure(
            f"cannot load the etcd3 client ({type(exc).__name__}: {exc}); set "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python in the environment") from None
    return etcd3


# ---- spec -----------------------------------------------------------------------------------


def parse_endpoint(text: str, *, context: str) -> tuple[str, int]:
    """``host[:port]`` / ``[v6]:port``, optionally with http:// (port 2379 by default)."""
    try:
        _, t = split_http_url(text)
        host, port = split_host_port(t, 2379)
    except ValueError as exc:
        raise SpecError(f"bad etcd endpoint {text!r} in {context}: {exc}") from None
    if not host or "/" in host:
        raise SpecError(f"bad etcd endpoint {text!r} in {context}: expected HOST[:PORT]")
    problem = host_problem(host)
    if problem:  # caught now, not by gRPC on every connection attempt for the route's life
        raise SpecError(f"bad etcd endpoint {text!r} in {context}: host {host!r}: {problem}")
    return host, parse_port(port, context=f"etcd endpoint {text!r} in {context}")


@dataclass(frozen=True, slots=True)
class EtcdSpec(Spec):
    text: str
    endpoint: tuple[str, int] | None
    prefix: str

    @classmethod
    def parse(cls, text: str) -> "EtcdSpec":
        try:
            parts = urllib.parse.urlsplit(text)
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 endpoint
            raise SpecError(f"spec {text!r}: {exc}") from None
        prefix = parts.path.rstrip("/")
        if parts.scheme != "etcd" or not prefix.strip("/") or parts.query or parts.fragment:
            meant = "" if prefix.strip("/") else name_as_host_hint(parts.netloc, "", scheme="etcd", what="endpoint")
            raise SpecError(f"spec {text!r}: expected etcd://[ENDPOINT]/PREFIX, e.g. etcd:///services/redis{meant}")
        host_or_lost_slash(text, parts.netloc, prefix, scheme="etcd", what="endpoint", default_port=2379)
        endpoint = parse_endpoint(parts.netloc, context=f"spec {text!r}") if parts.netloc else None
        if not client_installed():  # said where the spec is read (check, start, reload), not at its first query
            raise SpecError(f"spec {text!r}: etcd:// needs the etcd client, an optional part of ambassadord: "
                            "pip install 'ambassadord[etcd]'")
        return cls(text=text, endpoint=endpoint, prefix=prefix)

    def resolver(self, options: ResolverOptions) -> "EtcdResolver":
        return EtcdResolver(self, options)


# ---- resolver ---------------------------------------------------------------------------------


class EtcdResolver(Resolver):
    def __init__(self, spec: EtcdSpec, options: ResolverOptions):
        self.spec = spec
        self.options = options
        self.endpoints = [spec.endpoint] if spec.endpoint else list(options.etcd_endpoints)
        self._turn = 0
        self.failures = 0
        self.compactions = 0
        self.sessions = 0  # connections made by watch(): one per resync, reconnect or compaction
        # The state: key -> value, as of revision self.revision.
        self.values: dict[str, bytes] = {}
        self.revision = 0
        self.rng = random.Random()

    # -- blocking etcd3 calls, in threads --

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.endpoints[self._turn % len(self.endpoints)]

    def _where(self) -> str:
        host, port = self.endpoint
        return f"etcd {'[' + host + ']' if ':' in host else host}:{port}"

    async def _thread(self, fn, *args, **kw):
        _etcd3()  # a client that cannot load says so, not as an error of the call
        try:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kw), abandon_on_cancel=True, limiter=_limiter)
        except Exception as exc:  # etcd3's own errors, grpc errors, auth failures, bad TLS files ...
            raise TemporaryFailure(f"{self._where()}: {_describe(exc)}") from None

    def _connect(self):
        etcd3 = _etcd3()
        o = self.options
        host, port = self.endpoint
        user = password = None
        if o.etcd_user:
            user, _, password = o.etcd_user.partition(":")
        # A TCP connection of its own (a local subchannel pool): gRPC otherwise shares one
        # among all channels to the same address, and keeps it a while after they close, so
        # the new client of a resync or a reconnect would go on over the old connection,
        # dead or frozen as it may be, until etcd_timeout. One connection per etcd:// route.
        client = etcd3.client(host=host, port=port, timeout=o.etcd_timeout, user=user, password=password,
                              ca_cert=o.etcd_ca, cert_key=o.etcd_key, cert_cert=o.etcd_cert,
                              grpc_options=[("grpc.use_local_subchannel_pool", 1)])
        if user and not o.etcd_ca:
            # etcd3 0.12 hands the auth token to gRPC twice: as call credentials, which current
            # grpcio refuses on a plain-text channel (UNAUTHENTICATED: "insufficient security
            # level"), and as request metadata, which is all etcd needs. Keep only the latter.
            client.call_credentials = None
            client.watcher._credentials = None
        return client

    async def _read_range(self, client) -> None:
        resp = await self._thread(client.get_prefix_response, self.spec.prefix)
        self.values = {kv.key.decode("utf-8", "replace"): kv.value for kv in resp.kvs}
        self.revision = resp.header.revision

    # -- answers --

    async def _backends(self) -> tuple[tuple[Backend, ...], list[str]]:
        """(backends, notes on the values skipped) of the state held now.

        Any exception is a TemporaryFailure (interface.answer_or_failure): the values come
        from whoever can write to etcd, and none of them may end the watch.
        """
        async def backends():
            pairs, notes = pairs_from_keys(self.spec.prefix, sorted(self.values.items()))
            found, errors = await backends_of(pairs)
            return canonical(found), notes + [f"cannot resolve {error}" for error in errors]

        return await answer_or_failure(backends, self.spec.text)

    async def resolve(self) -> tuple[Backend, ...]:
        errors = []
        for _ in self.endpoints:  # a cluster: the next member when one fails
            try:
                client = await self._thread(self._connect)
                try:
                    await self._read_range(client)
                finally:
                    client.close()
                backends, notes = await self._backends()
                for note in notes:
                    log.warning("%s: %s", self.spec.text, note)
                return backends
            except TemporaryFailure as exc:
                errors.append(str(exc))
                self._turn += 1
        raise TemporaryFailure("; ".join(errors))

    # -- the watch loop --

    async def watch(self, publish: Publish) -> None:
        source = self.spec.text
        state = ResolverState(source)
        notes, unusable = Notes(log, source), Notes(log, source)

        async def publish_current() -> None:
            # Runs on every change under the prefix: what it logs, it logs once (Notes).
            try:
                backends, skipped = await self._backends()
            except TemporaryFailure as exc:
                # A value nobody foresaw, not an outage: keep following the watch, so that
                # the change that mends it is seen; published once, not on every change.
                unusable.report([f"{exc}; keeping the last known set (stale)"])
                step = state.failed(str(exc), trio.current_time(), time.time(), changes_only=True)
            else:
                unusable.report([])
                notes.report(skipped)
                self.answered_at = time.time()
                if backends:
                    step = state.answer(backends, trio.current_time(), self.answered_at)
                else:
                    step = state.not_found(f"no backend under etcd key {self.spec.prefix!r}", trio.current_time(),
                                           self.answered_at)
                    if step.publish is not None:
                        log.warning("%s: no backend under %r; the route has no backends", source, self.spec.prefix)
            if step.publish is not None:
                publish(step.publish)

        backoff = Backoff(self.rng, BACKOFF_FIRST, BACKOFF_MAX)
        outage_since = None
        while True:
            self._up = False
            try:
                await self._session(publish_current)
            except TemporaryFailure as exc:
                self.failures += 1
                now = trio.current_time()
                if self._up:  # the session had been working: this is a new outage
                    outage_since = None
                    backoff.reset()
                outage_since = outage_since if outage_since is not None else now
                if now - outage_since < FAST_RETRY_WINDOW:
                    backoff.reset()
                step = state.failed(str(exc), now, time.time())
                if step.age is not None:
                    log.warning("%s: %s; keeping the last known set (stale), retrying in %.1fs", source, exc, backoff.step)
                else:
                    log.error("%s: %s; no backends known, retrying in %.1fs", source, exc, backoff.step)
                publish(step.publish)
                self._turn += 1  # next endpoint of a cluster
                await trio.sleep(backoff.next_delay())
                continue
            backoff.reset()  # a session ended by the resync timer or a compaction: all was well
            outage_since = None

    async def _session(self, publish_current) -> None:
        """Connect, catch up (resume or read), then follow the watch until the resync timer."""
        etcd3 = _etcd3()
        self.sessions += 1
        client = await self._thread(self._connect)
        watch_id = None
        send, receive, callback = _from_grpc_thread()
        try:
            if self.revision == 0:
                await self._read_range(client)
                await publish_current()
            # (when resuming, what we hold is published only once etcd has accepted the
            # watch below: until then it stays marked stale)
            while watch_id is None:
                try:
                    watch_id = await self._start_watch(client, callback, self.revision + 1)
                except _Compacted:
                    self._compacted()
                    await self._read_range(client)
                    await publish_current()
            self._up = True
            await publish_current()
            with trio.move_on_after(self.options.etcd_resync):
                async for response in receive:
                    if isinstance(response, etcd3.exceptions.RevisionCompactedError):
                        # resumed from a revision compacted away: not an outage, read again now
                        self._compacted()
                        self.revision = 0
                        return
                    if isinstance(response, Exception):
                        raise TemporaryFailure(f"{self._where()}: watch broke: {_describe(response)}")
                    self._apply(response, etcd3.events.DeleteEvent)
                    await publish_current()
            # Resync: read everything again on the next session (see step 5).
            self.revision = 0
        finally:
            send.close()
            if watch_id is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(1):
                        try:
                            await self._thread(client.cancel_watch, watch_id)
                        except TemporaryFailure:
                            pass
            client.close()

    def _compacted(self) -> None:
        self.compactions += 1
        log.info("%s: revision %d was compacted; reading %r again", self.spec.text,
                 self.revision + 1, self.spec.prefix)

    def _apply(self, response, delete_event: type) -> None:
        """One watch response's events into the values held, and its revision."""
        for event in response.events:
            key = event.key.decode("utf-8", "replace")
            if isinstance(event, delete_event):
                self.values.pop(key, None)
            else:
                self.values[key] = event.value
            self.revision = max(self.revision, event.mod_revision)
        if response.header.revision > self.revision:
            self.revision = response.header.revision

    async def _start_watch(self, client, callback, start_revision: int):
        etcd3 = _etcd3()

        def start():
            try:
                return client.add_watch_prefix_callback(self.spec.prefix, callback, start_revision=start_revision)
            except etcd3.exceptions.RevisionCompactedError:
                raise _Compacted() from None

        try:
            return await trio.to_thread.run_sync(start, abandon_on_cancel=True, limiter=_limiter)
        except _Compacted:
            raise
        except Exception as exc:
            raise TemporaryFailure(f"{self._where()}: cannot start the watch: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    # grpc errors carry their status and details; etcd3's own exceptions are often empty
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _from_grpc_thread():
    """(send, receive, callback): ``callback`` is etcd3's watch callback, called in its gRPC
    thread; what it is given arrives on ``receive`` in trio. Close ``send`` at the end of
    the session."""
    send, receive = trio.open_memory_channel(math.inf)
    token = trio.lowlevel.current_trio_token()

    def deliver(response) -> None:  # in trio, soon after the callback
        # The session may have ended (resync, reconnect, cancellation) and closed the
        # channel since the callback ran: drop the response. An exception raised here
        # would be raised inside trio's run loop (TrioInternalError), killing the daemon:
        # 1,000 malformed keys and 30 writes/s did so within 27 s, each slow update
        # widening the window.
        try:
            send.send_nowait(response)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def callback(response) -> None:  # etcd3's gRPC thread
        try:
            token.run_sync_soon(deliver, response)
        except trio.RunFinishedError:  # trio is gone: nobody to deliver to
            pass

    return send, receive, callback
