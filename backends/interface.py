"""What every resolver shares: the data it publishes and the interface it implements.

A *spec* is the value of a route (``10.0.0.5:6379``, ``srv://_redis._tcp.example``,
``consul:///redis`` ...). It is parsed once, at the edge, into a frozen dataclass whose
``parse()`` raises :class:`SpecError` quoting the offending text. A spec knows how to make
its :class:`Resolver`.

A resolver turns a spec into backends. It offers two things:

* ``resolve()``: one answer, now (used by ``ambassadord resolve SPEC`` and by tests);
* ``watch(publish)``: runs for the daemon's lifetime, calling ``publish`` with a fresh,
  immutable :class:`BackendSet` whenever the answer changes. It never returns on a
  discovery outage: it keeps the last good set (republished with ``stale=True``) and retries.
  What to publish after each answer or failure, every watch loop asks one pure state
  machine (``state.ResolverState``); the loop itself only fetches and waits.

Connections never call a resolver. They read whatever set the route currently holds.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field


log = logging.getLogger("ambassadord.resolver")


class SpecError(ValueError):
    """A spec string is malformed. The message quotes the offending text."""


class ResolveError(Exception):
    """A resolver could not produce an answer (source unreachable, bad answer, ...)."""


class NotFound(ResolveError):
    """An authoritative empty answer (NXDOMAIN, no records): the route has no backends."""


class TemporaryFailure(ResolveError):
    """The source could not answer (timeout, refused, denied, malformed answer, ...): the
    last good set keeps serving, marked stale."""


@dataclass(frozen=True, slots=True)
class Backend:
    """One place a connection can go: an IP literal and a port.

    ``priority`` and ``weight`` follow RFC 2782 (lower priority first; weighted random
    order within a priority). Sources without such a notion use 0 and 1.
    ``name`` is what the operator wrote (a hostname, an SRV target), kept for logs.
    """

    address: str
    port: int
    priority: int = 0
    weight: int = 1
    name: str | None = field(default=None, compare=False)

    @property
    def family(self) -> int:
        import socket

        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def canonical(backends) -> tuple[Backend, ...]:
    """``backends`` without duplicates, in one order that depends only on the set.

    Every resolver whose source has no order of its own (DNS, Consul, etcd) returns its
    answers in this one, so that an answer whose order alone changed (Consul's DNS
    shuffles every SRV answer) compares equal to the last one: a publish, a route's
    ``changed_at`` and its ``backends`` log line then mean a real change. The order is
    the one a person reads best: priority, then weight (heaviest first), address, port.
    (A static list keeps the order it was written in, which round-robin follows.)
    """
    unique = dict.fromkeys(backends)
    return tuple(sorted(unique, key=lambda b: (b.priority, -b.weight, _address_key(b.address), b.port)))


def _address_key(address: str) -> tuple:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (2, 0, address)
    return (ip.version, int(ip), "")


@dataclass(frozen=True, slots=True)
class BackendSet:
    """An immutable answer from a resolver.

    ``stale`` is True when the source failed and this is the last good answer kept alive;
    ``error`` then says why. ``updated`` is the wall-clock time of the last good answer.

    Resolvers publish ``backends`` in an order that depends only on the set (the static
    list's own, else :func:`canonical`), so that comparing two sets' ``backends`` tells
    a change of set, never a mere reshuffle of the source's answer.
    """

    backends: tuple[Backend, ...]
    source: str = ""
    updated: float = field(default_factory=time.time)
    stale: bool = False
    error: str | None = None

    def __len__(self) -> int:
        return len(self.backends)

    def __iter__(self):
        return iter(self.backends)


@dataclass(frozen=True, slots=True)
class ResolverOptions:
    """Host-wide resolver settings (flags and env vars), handed to every resolver."""

    # How often a resolver without change notification re-reads its source (seconds).
    refresh_interval: float = 30.0
    # DNS: servers to ask instead of /etc/resolv.conf's, as (ip, port).
    dns_servers: tuple[tuple[str, int], ...] = ()
    # DNS: an answer's TTL is clamped to [dns_min_ttl, dns_max_ttl] seconds.
    dns_min_ttl: float = 1.0
    dns_max_ttl: float = 300.0
    # DNS: how long the last good answer keeps serving while the servers fail.
    dns_stale_for: float = 3600.0
    # DNS: how long one look-up may take, over every server and retry.
    dns_timeout: float = 5.0
    # Consul: the agent when a spec names none, "http" or "https", ACL token, CA file for
    # HTTPS, and the wait of a blocking query.
    consul_addr: tuple[str, int] = ("127.0.0.1", 8500)
    consul_scheme: str = "http"
    consul_token: str | None = None
    consul_ca: str | None = None
    consul_wait: float = 30.0
    # etcd: endpoints when a spec names none (tried in turn), "user:password", TLS files,
    # the timeout of one call, and how often the range is read again anyway.
    etcd_endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 2379),)
    etcd_user: str | None = None
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_timeout: float = 5.0
    etcd_resync: float = 30.0


Publish = Callable[[BackendSet], None]

# Retry policy of a resolver whose source fails (DNS, Consul, etcd): the first retry after
# about BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX.
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0


class Backoff:
    """Exponential backoff with jitter, shared by the resolvers.

    ``step`` is the current base (what a log line reports as "retrying in"); each wait is
    drawn from [0.5, 1.5) x step, so that many routes (and many hosts) that lost the same
    source do not retry in lock-step. ``reset()`` after a success.
    """

    def __init__(self, rng, first: float = BACKOFF_FIRST, maximum: float = BACKOFF_MAX):
        self.rng, self.first, self.maximum = rng, first, maximum
        self.step = first

    def reset(self) -> None:
        self.step = self.first

    def next_delay(self) -> float:
        delay = self.step * (0.5 + self.rng.random())
        self.step = min(self.step * 2, self.maximum)
        return delay


def failed_set(last_good: BackendSet | None, source: str, error: str, *, updated: float | None = None) -> BackendSet:
    """What a resolver publishes when its source fails: the last good backends marked stale
    (with the error and their own ``updated``), or, with none to keep, an empty stale set
    (the route refuses) made at ``updated`` (default: now)."""
    if last_good is not None and last_good.backends:
        return BackendSet(last_good.backends, source=source, updated=last_good.updated, stale=True, error=error)
    return BackendSet((), source=source, updated=time.time() if updated is None else updated, stale=True, error=error)


class Notes:
    """Logs each note about a source's answer once, while it holds.

    A watch re-reads its whole answer on every change, so a malformed registry value (or a
    backend that does not resolve) would otherwise be reported again on every update of
    anything else: 1,000 bad keys and 30 writes/s made 94 MB of log in half a minute. A note
    is logged when it first appears (a value that changes to another bad value makes a new
    note); one that no longer holds is forgotten, so that it is reported again if it comes back.
    At most ``most`` new notes are logged per answer, then one line says how many more there
    were: a registry filled with thousands of bad keys at once is a few lines, not thousands.
    """

    def __init__(self, log, source: str, most: int = 20):
        self.log, self.source, self.most = log, source, most
        self._current: set[str] = set()

    def report(self, notes) -> None:
        notes = set(notes)
        new = sorted(notes - self._current)
        for note in new[:self.most]:
            self.log.warning("%s: %s", self.source, note)
        if len(new) > self.most:
            self.log.warning("%s: and %d more such problems in this answer (not logged one by one)", self.source,
                             len(new) - self.most)
        self._current = notes


async def answer_or_failure(fn, where: str):
    """``await fn()``, where any exception but a ResolveError becomes a TemporaryFailure.

    ``fn`` reads a source and makes backends of its answer. An exception nobody foresaw
    there (a bug, or a value no parser was ready for) must not end the watch loop: the
    route would stay frozen on its last set while it looks healthy (not stale, no error).
    As a failure, the loop handles it as it handles an outage: the last set keeps
    serving, marked stale with this error, and the source is read again. The traceback
    goes to the debug log; the loop's own log line names the exception.
    """
    try:
        return await fn()
    except ResolveError:
        raise
    except Exception as exc:
        log.debug("%s: unexpected exception", where, exc_info=True)
        raise TemporaryFailure(f"{where}: cannot use the answer ({type(exc).__name__}: {exc})") from exc


class Resolver(ABC):
    """Turns one spec into backends; see the module docstring."""

    # Wall-clock time (time.time()) of the last good answer from the source, whether or not
    # it changed the set: a watch publishes changes only, and this says the source is alive
    # (the admin API's ``updated_at``). None before the first answer.
    answered_at: float | None = None

    @abstractmethod
    async def resolve(self) -> tuple[Backend, ...]:
        """One answer, now. Raises ResolveError if the source cannot answer."""

    def registry_view(self) -> dict | None:
        """What the registry says of its instances, for the admin API, where it says more
        than addresses (Consul: instance ID, node, checks); None: nothing more to say.

        ``{"backends": {"ADDR:PORT": detail}, "failing": [detail, ...], "failing_more": N}``,
        where a detail is a JSON-ready dict and ``failing`` lists the instances the
        registry knows but does not offer (their checks fail), at most a few dozen.
        """
        return None

    async def explain_empty(self) -> str | None:
        """Why an answer was empty, where the source can tell more (a misspelled name,
        instances that all fail, an ACL that hides everything); None: it cannot."""
        return None

    @abstractmethod
    async def watch(self, publish: Publish) -> None:
        """Publish a fresh BackendSet whenever the answer changes; runs until cancelled."""


class Spec(ABC):
    """A parsed route value. Subclasses are frozen dataclasses with a ``parse`` classmethod."""

    #: The text the operator wrote, for logs and errors.
    text: str

    @abstractmethod
    def resolver(self, options: ResolverOptions) -> Resolver:
        """Make the resolver that watches this spec's source."""


def hostname_problem(host: str) -> str | None:
    """What makes ``host`` unusable as a hostname to look up, or None when nothing does.

    The rules of RFC 1035 2.3.4 and RFC 1123 2.1: at most 253 characters (a trailing dot
    aside), labels of 1 to 63 letters, digits and '-', not starting or ending with '-';
    underscores are accepted too, because real deployments use them and resolvers do not
    mind. An all-numeric last label is no name (RFC 3696 2): a mistyped IPv4 address.

    Checked wherever a spec, a registry value or an answer names a host, before the name
    reaches getaddrinfo: Python's idna codec raises UnicodeError (not the OSError a
    resolver expects) for an empty or over-long label, which used to escape a resolver's
    error handling and freeze its route.
    """
    name = host[:-1] if host.endswith(".") else host
    if not name:
        return "empty hostname"
    if not name.isascii():
        return "not ASCII (write an internationalised name in its xn-- form)"
    if len(name) > 253:
        return f"{len(name)} characters long (a hostname has at most 253)"
    for label in name.split("."):
        if not label:
            return "empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"label {label[:16] + '...'!r} is {len(label)} characters long (at most 63)"
        bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
        if bad is not None:
            return f"label {label!r} has the character {bad!r} (allowed: letters, digits, '-' and '_')"
        if label.startswith("-") or label.endswith("-"):
            return f"label {label!r} starts or ends with '-'"
    if name.rsplit(".", 1)[-1].isdigit():
        return "neither an IP address nor a hostname (its last label is all digits)"
    return None


def host_problem(host: str) -> str | None:
    """Like :func:`hostname_problem`, but an IP literal (v4 or v6, no brackets) is fine too."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "not an IPv6 address" if ":" in host else hostname_problem(host)
    return None


def name_as_host_hint(netloc: str, rest: str, *, scheme: str, what: str) -> str:
    """For ``consul://redis``, ``etcd://services`` (a spec with no path, refused): the name
    went where the host goes. ``"; did you mean SCHEME:///NAME..."``, or "" when ``netloc``
    is an IP address or has a port or brackets (then it was meant as the host, and only the
    path is missing)."""
    if not netloc or ":" in netloc or netloc.startswith("["):
        return ""
    try:
        ipaddress.ip_address(netloc)
        return ""
    except ValueError:
        pass
    return f"; did you mean {scheme}:///{netloc}{rest} (three slashes: the default {what})?"


def host_or_lost_slash(text: str, netloc: str, path: str, *, scheme: str, what: str, default_port: int) -> None:
    """Refuse ``SCHEME://WORD/MORE`` where WORD is more likely a path's first segment that
    lost a slash than a host: ``etcd://services/redis`` for ``etcd:///services/redis``.

    WORD is taken for a lost slash when it is one label (no dot, so no IPv4 literal and no
    FQDN), without a port or brackets, and not ``localhost``: a host of that shape (a
    Compose service called ``etcd``) must then be written with its port, which says "host"
    beyond doubt. For a path-shaped spec only (consul-kv://, etcd://): a Consul service
    name has no slash, so ``consul://agent/redis`` is never ambiguous.

    Raises:
        SpecError: quoting ``text`` and giving both readings, with the one to write for each.
    """
    if not netloc or "." in netloc or ":" in netloc or netloc.startswith("[") or netloc.lower() == "localhost":
        return
    raise SpecError(f"spec {text!r}: did you mean {scheme}:///{netloc}{path} (three slashes: the path "
                    f"/{netloc}{path} on the default {what})? As written, {netloc!r} would be the {what}'s "
                    f"host; a one-word host needs its port, e.g. {scheme}://{netloc}:{default_port}{path}")


def parse_host_port(item: str, *, context: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` and check the port.

    Returns (host, port); host is an IP literal or a valid hostname (:func:`hostname_problem`).
    Raises SpecError naming ``item`` and ``context`` (the whole spec) when it is malformed.
    """
    item = item.strip()
    where = "" if item == context.strip() else f" in {context!r}"
    if not item:
        raise SpecError(f"empty backend in {context!r}")
    if item.startswith("["):
        end = item.find("]")
        if end < 0 or item[end + 1 : end + 2] != ":":
            raise SpecError(f"bad backend {item!r}{where}: expected [IPv6]:PORT")
        host, port_text = item[1:end], item[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SpecError(f"bad IPv6 address {host!r}{where}") from None
    else:
        try:
            ipaddress.IPv6Address(item)
        except ValueError:
            pass
        else:  # a whole IPv6 address: the port is missing, not part of it
            raise SpecError(f"bad backend {item!r}{where}: IPv6 addresses go in brackets with a port, e.g. [{item}]:6379")
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise SpecError(f"bad backend {item!r}{where}: expected HOST:PORT")
        if ":" in host:
            raise SpecError(
                f"bad backend {item!r}{where}: IPv6 addresses go in brackets, e.g. [{host}]:{port_text}"
            )
        problem = host_problem(host)
        if problem:
            raise SpecError(f"bad host {host!r}{where}: {problem}")
    return host, parse_port(port_text, context=f"backend {item!r}{where}")


def split_http_url(text: str) -> tuple[str | None, str]:
    """``[http(s)://]HOST[:PORT][/]`` -> (scheme or None, ``HOST[:PORT]``).

    Raises:
        ValueError: a scheme other than http or https (the message says so).
    """
    rest = text.strip()
    scheme = None
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme not in ("http", "https"):
            raise ValueError("scheme must be http or https")
    return scheme, rest.rstrip("/")


def split_host_port(text: str, default_port: int) -> tuple[str, str]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port text, not yet checked).

    Shared by every address whose port may be left out (a Consul agent, an etcd
    endpoint). Raises ValueError for an unclosed or malformed bracket, or one around no
    IPv6 address; callers turn it into a SpecError naming where the text came from.
    """
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        return host, rest.removeprefix(":") or str(default_port)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, str(default_port)


def parse_port(text: str, *, context: str) -> int:
    """A TCP port 1..65535 in ASCII digits, or SpecError naming ``context``.

    ASCII only: ``str.isdigit()`` and ``int()`` also take other scripts' digits (``６３７９``,
    ``٦٣٧٩``), which a reader of the file or of ``ps`` would not see as the port in use.
    """
    text = str(text).strip()
    if not (text.isascii() and text.isdigit()):
        hint = " in ASCII digits 0-9" if text.isdigit() else ""
        raise SpecError(f"bad port {text!r} in {context}: expected a number 1-65535{hint}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise SpecError(f"bad port {text!r} in {context}: expected a number 1-65535")
    return port
