"""DNS resolvers: SRV (RFC 2782) and A/AAAA, refreshed by TTL, stale on failure.

Specs:

* ``srv://NAME`` and a bare name with no port (``redis.service.consul``, ambassadord's
  form): SRV records of NAME. Each record's target becomes one backend per address, with
  the record's priority and weight (a target with k addresses splits its weight k ways,
  so that targets, not addresses, are weighted as the RFC says). Target addresses come
  from the answer's additional section when it has them (Consul's does), otherwise from
  A and AAAA look-ups of the target. A target of "." (RFC 2782: "decidedly not
  available") and port 0 are skipped.
* ``dns://NAME:PORT``: every A and AAAA address of NAME, on a fixed port.

Queries use EDNS0, so that Consul answers with every record of a service, not a random
3 of them; answers are kept in canonical order (interface.canonical), so that Consul's
shuffling of every answer is no change.

Caching: an answer lives for its TTL (the smallest TTL of every record that went into
it), clamped to [dns_min_ttl, dns_max_ttl] (default 1 s and 300 s: Consul answers with
TTL 0, and a stale record should not outlive five minutes). It is refreshed in the
background at 80% of that, so after the first answer no connection waits on DNS.

Failures, by what they mean:

* NXDOMAIN, or an answer with no records: authoritative. The route has no backends (its
  connections are refused with a log line naming it). Looked up again every
  ``NEGATIVE_REFRESH`` seconds (clamped to the TTL bounds).
* Timeout, SERVFAIL/REFUSED from every server, network errors, malformed answers:
  temporary. The last good answer keeps serving, marked stale, for up to
  ``dns_stale_for`` seconds (default 1 hour); every failure is logged and counted, and
  retried with exponential backoff and jitter (0.5 s doubling to 30 s). A failure of any
  one look-up (say the AAAA of one target) fails the whole answer, so the set does not
  flap between partial answers.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from .interface import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Backend,
    Backoff,
    Notes,
    NotFound,
    Publish,
    ResolveError,
    Resolver,
    ResolverOptions,
    Spec,
    SpecError,
    TemporaryFailure,
    answer_or_failure,
    canonical,
    hostname_problem,
    parse_port,
    split_host_port,
)
from .state import ResolverState

log = logging.getLogger("ambassadord.resolver.dns")

NEGATIVE_REFRESH = 5.0
REFRESH_FRACTION = 0.8
# Per-query time limit (dnspython's timeout); the whole look-up's is options.dns_timeout.
QUERY_TIMEOUT = 2.0
EDNS_PAYLOAD = 1232


# ---- specs ------------------------------------------------------------------------


def check_dns_name(name: str, context: str) -> str:
    """A syntactically valid DNS name (interface.hostname_problem), or SpecError."""
    n = name.strip().rstrip(".")
    if n and (n.rsplit(".", 1)[-1].isdigit() or _is_ipv6(n)):
        # An all-numeric last label is an IP address (RFC 3696 2), never a name to look up:
        # most likely a HOST:PORT whose port was forgotten.
        raise SpecError(f"{name!r} in {context!r} is an IP address, not a DNS name: give its port, e.g. {n}:6379")
    problem = hostname_problem(n)
    if problem:
        raise SpecError(f"bad DNS name {name!r} in {context!r}: {problem}")
    return n


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SrvSpec(Spec):
    text: str
    name: str

    @classmethod
    def parse(cls, text: str) -> "SrvSpec":
        rest = text.removeprefix("srv://")
        if "/" in rest or ":" in rest:
            raise SpecError(f"spec {text!r}: expected srv://NAME (no port, no path), e.g. srv://_redis._tcp.example.com")
        return cls(text=text, name=check_dns_name(rest, text))

    def resolver(self, options: ResolverOptions) -> "SrvResolver":
        return SrvResolver(self, options)


@dataclass(frozen=True, slots=True)
class DnsSpec(Spec):
    text: str
    name: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "DnsSpec":
        rest = text.removeprefix("dns://").rstrip("/")
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise SpecError(f"spec {text!r}: expected dns://NAME:PORT, e.g. dns://redis.example.com:6379")
        return cls(text=text, name=check_dns_name(host, text), port=parse_port(port, context=f"spec {text!r}"))

    def resolver(self, options: ResolverOptions) -> "AddressResolver":
        return AddressResolver(self, options)


# ---- dnspython set-up ---------------------------------------------------------------


def parse_dns_server(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` / ``[V6]:PORT`` / ``V6`` -> (ip, port); ValueError quoting the text."""
    try:
        host, port = split_host_port(text.strip(), 53)
    except ValueError as exc:
        raise ValueError(f"bad DNS server {text!r}: {exc}") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad DNS server {text!r}: {host!r} is not an IP address") from None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"bad DNS server {text!r}: bad port {port!r}")
    return str(ip), int(port)


def make_resolver(options: ResolverOptions) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver, on --dns-server servers if given, else /etc/resolv.conf.

    Raises:
        TemporaryFailure: no server is configured anywhere.
    """
    if options.dns_servers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in options.dns_servers]
    else:
        try:
            r = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            raise TemporaryFailure(f"no DNS server: /etc/resolv.conf has none and no --dns-server was given ({exc})") from None
    r.lifetime = options.dns_timeout
    r.timeout = min(QUERY_TIMEOUT, options.dns_timeout)
    r.cache = None  # we cache answers ourselves, by TTL, and refresh them early
    # EDNS0 with 1232-byte UDP answers (the DNS Flag Day 2020 size). Without it, Consul
    # answers a plain UDP query with a random 3 of a service's records (udp_answer_limit)
    # and no truncation flag, so a route over more than 3 instances would change its set
    # on every refresh, each time to a different subset.
    r.use_edns(0, 0, EDNS_PAYLOAD)
    return r


def _servers(r) -> str:
    return ",".join(str(ns) for ns in r.nameservers)


async def _query(r, name: str, rdtype: str):
    """One look-up. Returns the dnspython Answer; classifies failures."""
    try:
        return await r.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        raise NotFound(f"{name} {rdtype}: NXDOMAIN") from None
    except dns.resolver.NoAnswer:
        raise NotFound(f"{name} {rdtype}: no records") from None
    except dns.resolver.LifetimeTimeout:
        raise TemporaryFailure(f"{name} {rdtype}: timeout (servers {_servers(r)})") from None
    except dns.resolver.NoNameservers as exc:
        raise TemporaryFailure(f"{name} {rdtype}: every server failed ({_short(exc)})") from None
    except dns.exception.DNSException as exc:
        raise TemporaryFailure(f"{name} {rdtype}: {_short(exc)}") from None
    except OSError as exc:
        raise TemporaryFailure(f"{name} {rdtype}: {exc.strerror or exc}") from None


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


async def lookup_addresses(r, name: str) -> tuple[list[str], float]:
    """Every A and AAAA address of ``name`` (queried concurrently) and the smallest TTL.

    Raises:
        NotFound: neither family has a record.
        TemporaryFailure: either query failed temporarily (no partial answers).
    """
    results: dict[str, object] = {}

    async def one(rdtype):
        try:
            results[rdtype] = await _query(r, name, rdtype)
        except ResolveError as exc:
            results[rdtype] = exc

    async with trio.open_nursery() as n:
        n.start_soon(one, "A")
        n.start_soon(one, "AAAA")
    temp = [e for e in results.values() if isinstance(e, TemporaryFailure)]
    if temp:
        raise temp[0]
    addrs, ttl = [], float("inf")
    for rdtype in ("A", "AAAA"):
        ans = results[rdtype]
        if isinstance(ans, NotFound):
            continue
        ttl = min(ttl, ans.rrset.ttl)
        addrs += [rd.address for rd in ans]
    if not addrs:
        raise NotFound(f"{name}: no A or AAAA records")
    return addrs, ttl


# ---- SRV -> backends (pure) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # without the trailing dot; "." for "not available"


def srv_records(answer) -> list[SrvRecord]:
    return [SrvRecord(rd.priority, rd.weight, rd.port, rd.target.to_text(omit_final_dot=True) or ".") for rd in answer]


def additional_addresses(message: dns.message.Message) -> tuple[dict[str, list[str]], float]:
    """Addresses per owner name from a response's additional section, and their smallest TTL."""
    out: dict[str, list[str]] = {}
    ttl = float("inf")
    for rrset in message.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            owner = rrset.name.to_text(omit_final_dot=True).lower()
            out.setdefault(owner, []).extend(rd.address for rd in rrset)
            ttl = min(ttl, rrset.ttl)
    return out, ttl


def srv_backends(records: list[SrvRecord], addresses: dict[str, list[str]]) -> tuple[list[Backend], list[str]]:
    """Backends from SRV records and the addresses of their targets. Pure.

    Returns (backends, notes): notes say which records were skipped and why.
    """
    backends, notes = [], []
    for rec in records:
        if rec.target in (".", ""):
            notes.append("target '.' (service not available) skipped")
            continue
        if rec.port == 0:
            notes.append(f"{rec.target}: port 0 skipped")
            continue
        problem = hostname_problem(rec.target)
        if problem:
            notes.append(f"target {rec.target!r}: {problem}, skipped")
            continue
        addrs = list(dict.fromkeys(addresses.get(rec.target.lower(), [])))
        if not addrs:
            notes.append(f"{rec.target}: no A/AAAA records, skipped")
            continue
        weight = rec.weight / len(addrs) if len(addrs) > 1 else rec.weight
        for a in addrs:
            backends.append(Backend(a, rec.port, priority=rec.priority, weight=weight, name=rec.target))
    return list(canonical(backends)), notes


# ---- resolvers ----------------------------------------------------------------------------


class _DnsResolver(Resolver):
    """TTL-driven refresh loop shared by the SRV and A/AAAA resolvers."""

    def __init__(self, spec, options: ResolverOptions):
        self.spec = spec
        self.options = options
        self._dns = None
        self.failures = 0  # temporary failures so far (the tests read it)
        self.rng = random.Random()
        self.notes = Notes(log, spec.text)  # skipped records, logged once each (answers repeat every TTL)

    def _resolver(self):
        if self._dns is None:
            self._dns = make_resolver(self.options)
        return self._dns

    async def lookup(self) -> tuple[tuple[Backend, ...], float]:
        """(backends, ttl). Raises NotFound or TemporaryFailure."""
        raise NotImplementedError

    async def resolve(self) -> tuple[Backend, ...]:
        backends, _ = await self.lookup()
        return backends

    def _clamp(self, ttl: float) -> float:
        return max(self.options.dns_min_ttl, min(self.options.dns_max_ttl, ttl))

    async def watch(self, publish: Publish) -> None:
        source = self.spec.text
        state = ResolverState(source, stale_for=self.options.dns_stale_for)
        backoff = Backoff(self.rng, BACKOFF_FIRST, BACKOFF_MAX)
        while True:
            try:
                backends, ttl = await answer_or_failure(self.lookup, source)
            except NotFound as exc:
                backoff.reset()
                step = state.not_found(str(exc), trio.current_time(), time.time())
                if step.publish is not None:
                    log.warning("%s: %s; the route has no backends", source, exc)
                delay = self._clamp(NEGATIVE_REFRESH)
            except TemporaryFailure as exc:
                self.failures += 1
                step = state.failed(str(exc), trio.current_time(), time.time())  # published, so it is counted
                if step.age is not None:
                    log.warning("%s: %s; serving the last good answer (stale, %.0fs old), retrying in %.1fs",
                                source, exc, step.age, backoff.step)
                else:
                    why = "the last good answer is too old" if step.dropped else "no answer yet"
                    log.error("%s: %s; %s: the route has no backends, retrying in %.1fs", source, exc, why, backoff.step)
                delay = backoff.next_delay()
            else:
                backoff.reset()
                self.answered_at = time.time()
                step = state.answer(backends, trio.current_time(), self.answered_at)
                delay = self._clamp(ttl) * REFRESH_FRACTION
            if step.publish is not None:
                publish(step.publish)
            await trio.sleep(delay)


class SrvResolver(_DnsResolver):
    async def lookup(self) -> tuple[tuple[Backend, ...], float]:
        r = self._resolver()
        name = self.spec.name
        answer = await _query(r, name, "SRV")
        records = srv_records(answer)
        ttl = float(answer.rrset.ttl)
        addresses, add_ttl = additional_addresses(answer.response)
        missing = sorted({rec.target.lower() for rec in records
                          if rec.target not in (".", "") and rec.port and rec.target.lower() not in addresses
                          and not hostname_problem(rec.target)})
        if addresses:
            ttl = min(ttl, add_ttl)
        if missing:
            found: dict[str, object] = {}

            async def one(target):
                # Failures are recorded, not raised: raised in a child task they would come
                # out of the nursery wrapped in an ExceptionGroup.
                try:
                    found[target] = await lookup_addresses(r, target)
                except ResolveError as exc:
                    found[target] = exc

            async with trio.open_nursery() as n:
                for target in missing:
                    n.start_soon(one, target)
            for target in missing:  # a temporary failure of any one fails the whole answer
                if isinstance(found[target], TemporaryFailure):
                    raise found[target]
            for target, got in found.items():
                if not isinstance(got, NotFound):
                    addresses[target] = got[0]
                    ttl = min(ttl, got[1])
        backends, notes = srv_backends(records, addresses)
        self.notes.report(notes)
        if not backends:
            raise NotFound(f"{name} SRV: no usable target ({'; '.join(notes) or 'no records'})")
        return tuple(backends), ttl


class AddressResolver(_DnsResolver):
    async def lookup(self) -> tuple[tuple[Backend, ...], float]:
        addrs, ttl = await lookup_addresses(self._resolver(), self.spec.name)
        return canonical(Backend(a, self.spec.port, name=self.spec.name) for a in addrs), float(ttl)
