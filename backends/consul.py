"""Consul resolvers: healthy service instances and KV values, watched with blocking queries.

Specs:

* ``consul://[AGENT]/SERVICE[?tag=T&dc=DC]``: the passing instances of SERVICE from the
  health API (``/v1/health/service/SERVICE``; every instance is read, and those with a
  check other than passing are left out here, as ``?passing`` would, and kept for the
  admin API with their checks: :meth:`ConsulServiceResolver.registry_view`). A backend is
  the instance's Service.Address, else its node's Address, with the service port,
  weighted by the instance's ``Weights.Passing``.
* ``consul-kv://[AGENT]/PATH``: the values of the keys under ``PATH/`` (each
  ``host:port``), and PATH's own value split on commas (progrium/ambassadord's format).
  A malformed value (a host that is no valid DNS name too) is skipped with a log line
  naming its key, once, not on every answer; the rest keep serving.

AGENT is ``host[:port]`` (port 8500); without it, the host-wide agent from
``--consul`` / ``CONSUL_HTTP_ADDR`` (default 127.0.0.1:8500) is used.

Watching follows Consul's blocking-query rules
(https://developer.hashicorp.com/consul/api-docs/features/blocking):

* each query passes the last ``X-Consul-Index`` and a ``wait``; the agent answers as soon
  as the result changes, so a change reaches the route in well under a second;
* an index that goes backwards (an agent or server restart, a snapshot restore) resets
  the index to 0, restarting the loop with a non-blocking read, as the docs require;
  an index below 1 is set to 1 (the docs: it otherwise causes a busy loop);
* a blocking query answered before half its wait with the same index (what an agent that
  is shutting down answers) is followed by a non-blocking read: a query blocking with the
  old index at the restarted agent would wait out its whole wait, blind to changes;
* queries are rate-limited to one per ``MIN_QUERY_INTERVAL`` per route;
* on an error (agent down, ACL denial, unknown datacenter, ...) the last known set keeps
  serving, marked stale; the failure is logged and counted, the index is reset (the agent
  may return with a lower one), and the query retried with exponential backoff and jitter.
  There is no time limit on this stale set: a Consul outage says nothing about the
  backends themselves.

Client: py-consul, the maintained continuation of python-consul (same ``consul`` module;
synchronous, requests-based). Its calls run in worker threads (``trio.to_thread.run_sync``
with ``abandon_on_cancel=True``, so shutdown and route removal never wait on them) on a
dedicated CapacityLimiter, so that long-blocking queries cannot starve trio's default
thread pool. py-consul bounds every request (``connections_timeout``, plus the blocking
wait and Consul's wait/16 jitter for a blocking query), so an abandoned thread always
ends, even across a network partition.
"""

from __future__ import annotations

import difflib
import functools
import logging
import random
import re
import time
import urllib.parse
from dataclasses import dataclass, field

import consul
import requests
import trio

from .interface import (
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
)
from .keyvalues import pairs_from_keys
from .state import ResolverState
from .static import backends_of

log = logging.getLogger("ambassadord.resolver.consul")

MIN_QUERY_INTERVAL = 0.1
# The time allowed to connect and to answer a request, beyond a blocking query's wait and
# Consul's wait/16 jitter (py-consul's connections_timeout).
HTTP_MARGIN = 5.0
# Blocking queries hold a thread each for up to `wait`: give them their own pool.
_limiter = trio.CapacityLimiter(256)

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---- specs ----------------------------------------------------------------------------


def _agent(netloc: str, text: str) -> tuple[str, int] | None:
    if not netloc:
        return None
    try:
        host, port = split_host_port(netloc, 8500)
    except ValueError as exc:
        raise SpecError(f"spec {text!r}: bad agent address {netloc!r}: {exc}") from None
    if not host:
        raise SpecError(f"spec {text!r}: bad agent address {netloc!r}")
    problem = host_problem(host)
    if problem:
        # (caught here, not by the first query: the client would only fail at run time,
        # on every query, for as long as the route lives)
        raise SpecError(f"spec {text!r}: bad agent address {netloc!r}: host {host!r}: {problem}")
    return host, parse_port(port, context=f"agent address {netloc!r} in {text!r}")


def _split(text: str, scheme: str) -> urllib.parse.SplitResult:
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 agent
        raise SpecError(f"spec {text!r}: {exc}") from None
    if parts.scheme != scheme or parts.fragment:
        raise SpecError(f"spec {text!r}: expected {scheme}://[AGENT]/...")
    return parts


def _three_slashes(parts: urllib.parse.SplitResult, scheme: str) -> str:
    """``consul://redis``: the name went where the agent goes."""
    if parts.path.strip("/"):
        return ""
    return name_as_host_hint(parts.netloc, parts.query and "?" + parts.query, scheme=scheme, what="agent")


@dataclass(frozen=True, slots=True)
class ConsulServiceSpec(Spec):
    text: str
    agent: tuple[str, int] | None
    service: str
    tag: str | None = None
    dc: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ConsulServiceSpec":
        parts = _split(text, "consul")
        service = parts.path.strip("/")
        if not service or "/" in service or not _SERVICE_NAME.match(service):
            raise SpecError(f"spec {text!r}: expected consul://[AGENT]/SERVICE[?tag=T&dc=DC], "
                            f"with a service name of letters, digits, '-', '_' and '.'{_three_slashes(parts, 'consul')}")
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise SpecError(f"spec {text!r}: bad query {parts.query!r}") from None
        unknown = set(query) - {"tag", "dc"}
        if unknown:
            raise SpecError(f"spec {text!r}: unknown parameter(s) {', '.join(sorted(unknown))}; known: tag, dc")
        for key, values in query.items():
            if len(values) != 1 or not values[0]:
                raise SpecError(f"spec {text!r}: give {key} exactly once, with a value")
        return cls(text=text, agent=_agent(parts.netloc, text), service=service,
                   tag=query.get("tag", [None])[0], dc=query.get("dc", [None])[0])

    def resolver(self, options: ResolverOptions) -> "ConsulServiceResolver":
        return ConsulServiceResolver(self, options)


@dataclass(frozen=True, slots=True)
class ConsulKVSpec(Spec):
    text: str
    agent: tuple[str, int] | None
    path: str

    @classmethod
    def parse(cls, text: str) -> "ConsulKVSpec":
        parts = _split(text, "consul-kv")
        path = parts.path.strip("/")
        if not path or parts.query:
            raise SpecError(f"spec {text!r}: expected consul-kv://[AGENT]/PATH, e.g. consul-kv:///services/redis"
                            f"{_three_slashes(parts, 'consul-kv')}")
        host_or_lost_slash(text, parts.netloc, parts.path, scheme="consul-kv", what="agent", default_port=8500)
        return cls(text=text, agent=_agent(parts.netloc, text), path=path)

    def resolver(self, options: ResolverOptions) -> "ConsulKVResolver":
        return ConsulKVResolver(self, options)


# ---- answers -> backends (pure) ---------------------------------------------------------


# A check's output as kept and shown (an HTTP check's output quotes the response body).
CHECK_OUTPUT_MAX = 500
# Failing instances listed in the admin API per route; the rest are counted.
FAILING_SHOWN = 50


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # passing, warning or critical
    output: str
    scope: str = "service"  # "node": a check of the instance's node (serfHealth, node maintenance)


@dataclass(frozen=True, slots=True)
class Instance:
    host: str
    port: int
    weight: float
    # What Consul says of it besides its address (not part of its identity):
    id: str = field(default="", compare=False)
    node: str = field(default="", compare=False)
    status: str = field(default="passing", compare=False)  # by its worst check, see _worst_check
    checks: tuple[Check, ...] = field(default=(), compare=False)

    def detail(self) -> dict:
        return {"id": self.id, "node": self.node, "status": self.status,
                "checks": [{"name": c.name, "status": c.status, "output": c.output, "scope": c.scope}
                           for c in self.checks]}


def service_instances(entries: list[dict]) -> tuple[list[Instance], list[str]]:
    """Instances from /v1/health/service entries, passing or not (``Instance.status``).
    Returns (instances, notes on skipped ones)."""
    out, notes = [], []
    for entry in entries or []:
        if not isinstance(entry, dict):
            notes.append(f"an entry that is no object ({type(entry).__name__}); skipped")
            continue
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        sid = svc.get("ID") or svc.get("Service") or "?"
        where = f"instance {sid!r} on node {node.get('Node', '?')!r}"
        host = (svc.get("Address") or node.get("Address") or "").strip()
        port = svc.get("Port")
        if not host:
            notes.append(f"{where}: no address (neither Service.Address nor Node.Address); skipped")
            continue
        if not isinstance(port, int) or not 0 < port < 65536:
            notes.append(f"{where}: bad port {port!r}; skipped")
            continue
        problem = host_problem(host.strip("[]"))
        if problem:
            notes.append(f"{where}: bad address {host!r}: {problem}; skipped")
            continue
        checks = entry.get("Checks")
        if checks is None:
            checks = []
        if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
            # (the health API's own filter is no longer asked for: a garbled list must
            # not make an instance look passing)
            notes.append(f"{where}: bad Checks {_short(repr(checks), 80)}; skipped")
            continue
        weight = ((svc.get("Weights") or {}).get("Passing"))
        weight = weight if isinstance(weight, int) and weight >= 0 else 1
        out.append(Instance(host.strip("[]"), port, weight, id=str(sid), node=str(node.get("Node") or ""),
                            status=_worst_check(entry), checks=tuple(_check(c) for c in checks)))
    return out, notes


def _check(c: dict) -> Check:
    output = " ".join(str(c.get("Output") or "").split())
    if len(output) > CHECK_OUTPUT_MAX:
        output = output[:CHECK_OUTPUT_MAX] + "..."
    return Check(str(c.get("Name") or c.get("CheckID") or "?"), str(c.get("Status") or "?"), output,
                 "service" if c.get("ServiceID") else "node")


def kv_entries(path: str, items: list[dict] | None) -> tuple[list[tuple[str, int]], list[str]]:
    """(host, port) pairs from a recursive KV read of ``path`` (see keyvalues.pairs_from_keys)."""
    return pairs_from_keys(path.strip("/"), ((item.get("Key", ""), item.get("Value")) for item in items or []))


# ---- the client -----------------------------------------------------------------------------


def _wait(seconds: float) -> str:
    # Milliseconds: "0s" would mean "the default" (5 minutes) to Consul, so a sub-second
    # wait must not be rounded down to whole seconds.
    return f"{max(1, round(seconds * 1000))}ms"


class _Consul(consul.Consul):
    """py-consul's client, with the token it is given.

    Kept from python-consul's day, still needed with py-consul 1.8: its ``__init__`` sets
    ``self.token = os.getenv("CONSUL_HTTP_TOKEN", token)``, so the environment beats the
    token it is given. ambassadord has already weighed --consul-token against that
    variable (settings.consul_options), so the token given is the one. (The agent's
    address, scheme and verification are passed explicitly, which keeps py-consul from
    reading CONSUL_HTTP_ADDR / _SSL / _SSL_VERIFY at all.) py-consul sends the token as
    the X-Consul-Token header, never as ?token= in a URL, so it cannot show in an error.
    """

    def __init__(self, host: str, port: int, token: str | None, scheme: str, verify):
        super().__init__(host=host, port=port, token=token, scheme=scheme, verify=verify,
                         connections_timeout=HTTP_MARGIN)
        self.token = token


def _client(agent: tuple[str, int] | None, options: ResolverOptions) -> tuple[_Consul, str]:
    host, port = agent or options.consul_addr
    verify = options.consul_ca or True
    hostpart = f"[{host}]" if ":" in host else host  # py-consul writes scheme://host:port
    client = _Consul(hostpart, port, options.consul_token, options.consul_scheme, verify)
    return client, f"{options.consul_scheme}://{hostpart}:{port}"


class _ConsulResolver(Resolver):
    """The blocking-query watch loop shared by the service and KV resolvers."""

    def __init__(self, spec, options: ResolverOptions):
        self.spec = spec
        self.options = options
        self.client, self.agent_url = _client(spec.agent, options)
        self.failures = 0
        self.rng = random.Random()

    async def _call(self, fn, **kw):
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, **kw), abandon_on_cancel=True, limiter=_limiter)
        except consul.ACLPermissionDenied as exc:
            raise TemporaryFailure(f"{self.agent_url}: permission denied ({exc or 'HTTP 403'}): "
                                   "the ACL token (--consul-token / CONSUL_HTTP_TOKEN) lacks read access") from None
        except consul.ConsulException as exc:  # an HTTP error, or an answer that is not Consul's JSON
            raise TemporaryFailure(f"{self.agent_url}: {_short(str(exc).strip()) or type(exc).__name__}") from None
        except requests.exceptions.SSLError as exc:
            if _PLAIN_HTTP.search(str(exc)):  # the TLS hello was answered in plain HTTP
                raise TemporaryFailure(f"{self.agent_url}: the agent answers plain HTTP there, not TLS: use http:// "
                                       "(an agent's HTTPS port is 8501 by default)") from None
            raise TemporaryFailure(f"{self.agent_url}: TLS error ({_reason(exc)}); is --consul-ca right?") from None
        except requests.exceptions.RequestException as exc:
            raise TemporaryFailure(f"{self.agent_url}: {_reason(exc)}") from None
        except (ValueError, KeyError, TypeError) as exc:  # a malformed answer
            raise TemporaryFailure(f"{self.agent_url}: bad answer ({exc!r})") from None

    async def fetch(self, index: int, wait: float | None):
        """(index, raw result) of one (blocking) query."""
        raise NotImplementedError

    async def to_backends(self, raw) -> tuple[tuple[Backend, ...], list[str]]:
        """(backends, notes on what was skipped) of a raw answer."""
        raise NotImplementedError

    async def explain_empty(self) -> str:
        # Consul does not refuse a token-less read under a default-deny ACL: it filters the
        # answer to nothing. Say so, or a forgotten token looks like an empty source.
        return self.empty_answer + ("" if self.options.consul_token else
                                    " (if the agent enforces ACLs, a missing --consul-token / CONSUL_HTTP_TOKEN "
                                    "hides it)")

    async def _read(self, index: int, wait: float | None):
        """(index, backends, notes) of one query; any failure is a TemporaryFailure."""
        async def read():
            new_index, raw = await self.fetch(index, wait)
            return (new_index, *await self.to_backends(raw))

        return await answer_or_failure(read, self.agent_url)

    async def resolve(self) -> tuple[Backend, ...]:
        _, backends, notes = await self._read(0, None)
        for note in notes:
            log.warning("%s: %s", self.spec.text, note)
        return backends

    async def watch(self, publish: Publish) -> None:
        try:
            await self._watch(publish)
        finally:
            # The client and its endpoints refer to each other, so its pooled connection
            # to the agent would otherwise wait for the cyclic garbage collector after a
            # reload removed the route (measured: 3 fds of 20 removed watches still open
            # before a gc.collect(), 0 with this). A query still in flight in its
            # abandoned thread closes its own connection when it ends.
            self.client.http.session.close()

    async def _watch(self, publish: Publish) -> None:
        source = self.spec.text
        index = 0
        state = ResolverState(source)
        backoff = Backoff(self.rng, BACKOFF_FIRST, BACKOFF_MAX)
        last_query = -MIN_QUERY_INTERVAL
        notes = Notes(log, source)
        settled = True  # False: the next query reads without blocking (see below)
        while True:
            pause = last_query + MIN_QUERY_INTERVAL - trio.current_time()
            if pause > 0:
                await trio.sleep(pause)  # rate limit: at most one query per interval
            last_query = trio.current_time()
            asked = index if settled else 0
            wait = self.options.consul_wait if asked else None
            try:
                new_index, backends, skipped = await self._read(asked, wait)
                self.answered_at = time.time()
            except TemporaryFailure as exc:
                self.failures += 1
                index = 0  # the agent may come back with a lower index: start over
                if state.answered:
                    log.warning("%s: %s; keeping the last known set (stale), retrying in %.1fs", source, exc, backoff.step)
                else:
                    log.error("%s: %s; no backends known yet, retrying in %.1fs", source, exc, backoff.step)
                publish(state.failed(str(exc), trio.current_time(), time.time()).publish)
                await trio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            notes.report(skipped)
            # An agent that is shutting down answers every blocking query at once, nothing
            # changed. Were the next query to block with that index at the agent that comes
            # back (its indexes start low again), it would block for its whole wait, blind to
            # every change. So after an early answer with the same index, the next query does
            # not block; its index tells whether the agent is still the one we knew.
            settled = not (asked and new_index == asked and trio.current_time() - last_query < wait / 2)
            if new_index < index:
                log.info("%s: index went backwards (%d -> %d): restarting the blocking loop", source, index, new_index)
                index = 0
            else:
                index = max(new_index, 1)
            if backends:
                step = state.answer(backends, trio.current_time(), self.answered_at)
            else:
                step = state.not_found(self.empty_answer, trio.current_time(), self.answered_at)
                if step.publish is not None:
                    log.warning("%s: %s on %s; the route has no backends", source, await self.explain_empty(),
                                self.agent_url)
            if step.publish is not None:
                publish(step.publish)


# What OpenSSL says when a TLS hello is answered by a plain-HTTP server.
_PLAIN_HTTP = re.compile(r"WRONG_VERSION_NUMBER|wrong version number|record layer failure|http request", re.I)


def _reason(exc: Exception) -> str:
    # requests nests the interesting part (e.g. "Connection refused") deep in its message
    text = str(exc)
    m = re.search(r"\[Errno \d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    return _short(text)


def _short(text: str, limit: int = 200) -> str:
    # py-consul quotes a whole undecodable body (an HTML page of some other server) in its
    # exception: one line of a log should not carry it
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class ConsulServiceResolver(_ConsulResolver):
    @property
    def empty_answer(self) -> str:
        spec = self.spec
        return (f"no passing instance of service {spec.service!r}" + (f" with tag {spec.tag!r}" if spec.tag else "")
                + (f" in datacenter {spec.dc!r}" if spec.dc else ""))

    async def explain_empty(self) -> str:
        """Why there is no passing instance, from what else the agent says: a name it does
        not know (and those it does), instances none of which pass or carry the tag, or no
        service at all (what a default-deny ACL shows a request without a token)."""
        spec = self.spec
        try:
            _, names = await self._call(self.client.catalog.services, dc=spec.dc)
            if spec.service in (names or {}):
                _, entries = await self._call(self.client.health.service, service=spec.service, dc=spec.dc)
            else:
                entries = None
        except TemporaryFailure:
            return self.empty_answer
        try:
            return self._explained(names, entries)
        except (AttributeError, TypeError, ValueError):  # an answer of another shape: no more to say
            return self.empty_answer

    def _explained(self, names, entries) -> str:
        spec = self.spec
        if entries is None:
            return _unknown_service(spec.service, sorted(str(n) for n in names or {} if n != "consul"),
                                    bool(self.options.consul_token))
        tagged = [e for e in entries if not spec.tag or spec.tag in ((e.get("Service") or {}).get("Tags") or [])]
        if spec.tag and entries and not tagged:
            seen = sorted({t for e in entries for t in (e.get("Service") or {}).get("Tags") or []})
            return (f"{self.empty_answer}: its {len(entries)} instance(s) have tags {', '.join(seen) or '(none)'}")
        worst = [_worst_check(e) for e in tagged]
        counts = ", ".join(f"{worst.count(s)} {s}" for s in ("critical", "warning", "maintenance") if worst.count(s))
        if not tagged:
            return f"{self.empty_answer}: the service has no instance registered"
        return f"{self.empty_answer}: {len(tagged)} instance(s), {counts or 'none passing'}"

    def __init__(self, spec, options: ResolverOptions):
        super().__init__(spec, options)
        # The instances of the last answer: those offered, by backend, and those whose
        # checks fail (see registry_view). Kept through a failure, like the set itself.
        self._offered: dict[str, Instance] = {}
        self._failing: list[Instance] = []

    async def fetch(self, index, wait):
        # Every instance, not only ?passing ones: the failing ones are filtered out here
        # (to_backends), as Consul's filter would, so that /routes can say which they are and
        # why. The blocking query's index is the same either way.
        spec = self.spec
        kw = dict(service=spec.service, tag=spec.tag, dc=spec.dc)
        if index:
            kw.update(index=index, wait=_wait(wait))
        new_index, entries = await self._call(self.client.health.service, **kw)
        return int(new_index or 0), entries

    async def to_backends(self, entries) -> tuple[tuple[Backend, ...], list[str]]:
        instances, notes = service_instances(entries)
        backends: list[Backend] = []
        offered: dict[str, Instance] = {}
        for inst in instances:
            if inst.status != "passing":
                continue
            got, errors = await backends_of([(inst.host, inst.port)], weight=inst.weight)
            backends += got
            offered.update((str(b), inst) for b in got)
            notes += [f"cannot resolve instance address {error}" for error in errors]
        self._offered = offered
        self._failing = sorted((i for i in instances if i.status != "passing"), key=lambda i: (i.node, i.id))
        return canonical(backends), notes

    def registry_view(self) -> dict:
        failing = [{"address": i.host, "port": i.port, **i.detail()} for i in self._failing[:FAILING_SHOWN]]
        return {"backends": {key: inst.detail() for key, inst in self._offered.items()},
                "failing": failing, "failing_more": max(0, len(self._failing) - FAILING_SHOWN)}


def _unknown_service(name: str, known: list[str], token: bool) -> str:
    if not known:
        return (f"no service named {name!r}: the agent shows no service at all"
                + ("; the ACL token may not read any" if token else
                   "; if it enforces ACLs, a missing --consul-token / CONSUL_HTTP_TOKEN hides them"))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    rest = close + [n for n in known if n not in close]
    return (f"no service named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; known: {', '.join(rest[:10])}" + (f" and {len(rest) - 10} more" if len(rest) > 10 else ""))


def _worst_check(entry) -> str:
    """An instance's state by its worst check: maintenance (node or service), critical,
    warning or passing."""
    checks = [c for c in entry.get("Checks") or () if isinstance(c, dict)]
    if any(str(c.get("CheckID", "")).startswith(("_node_maintenance", "_service_maintenance")) for c in checks):
        return "maintenance"
    statuses = {str(c.get("Status", "")) for c in checks}
    # (Consul's own ?passing filter: an instance passes when every check says "passing")
    if "critical" in statuses or statuses - {"passing", "warning"}:
        return "critical"
    return "warning" if "warning" in statuses else "passing"


class ConsulKVResolver(_ConsulResolver):
    @property
    def empty_answer(self) -> str:
        return f"no backend under KV path {self.spec.path!r}"

    async def fetch(self, index, wait):
        kw = dict(key=self.spec.path, recurse=True)
        if index:
            kw.update(index=index, wait=_wait(wait))
        new_index, items = await self._call(self.client.kv.get, **kw)
        return int(new_index or 0), items

    async def to_backends(self, items) -> tuple[tuple[Backend, ...], list[str]]:
        pairs, notes = kv_entries(self.spec.path, items)
        backends, errors = await backends_of(pairs)
        return canonical(backends), notes + [f"cannot resolve {error}" for error in errors]
