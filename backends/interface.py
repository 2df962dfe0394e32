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

Connections never call a resolver. They read whatever set the route currently holds.
"""

from __future__ import annotations

import ipaddress
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field


class SpecError(ValueError):
    """A spec string is malformed. The message quotes the offending text."""


class ResolveError(Exception):
    """A resolver could not produce an answer (source unreachable, bad answer, ...)."""


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


@dataclass(frozen=True, slots=True)
class BackendSet:
    """An immutable answer from a resolver.

    ``stale`` is True when the source failed and this is the last good answer kept alive;
    ``error`` then says why. ``updated`` is the wall-clock time of the last good answer.
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


def failed_set(last_good: BackendSet | None, source: str, error: str) -> BackendSet:
    """What a resolver publishes when its source fails: the last good backends marked stale
    (with the error), or, with none to keep, an empty stale set (the route refuses)."""
    if last_good is not None and last_good.backends:
        return BackendSet(last_good.backends, source=source, updated=last_good.updated, stale=True, error=error)
    return BackendSet((), source=source, stale=True, error=error)


class Resolver(ABC):
    """Turns one spec into backends; see the module docstring."""

    # Wall-clock time (time.time()) of the last good answer from the source, whether or not
    # it changed the set: a watch publishes changes only, and this says the source is alive
    # (the admin API's ``updated_at``). None before the first answer.
    answered_at: float | None = None

    @abstractmethod
    async def resolve(self) -> tuple[Backend, ...]:
        """One answer, now. Raises ResolveError if the source cannot answer."""

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


def parse_host_port(item: str, *, context: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` and check the port.

    Returns (host, port); host is an IP literal or a hostname. Raises SpecError naming
    ``item`` and ``context`` (the whole spec) when it is malformed.
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
    endpoint). Raises ValueError("expected [IPV6]:PORT") for an unclosed or malformed
    bracket; callers turn it into a SpecError naming where the text came from.
    """
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPV6]:PORT")
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
