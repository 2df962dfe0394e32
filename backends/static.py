"""Static backend lists: ``10.0.0.5:6379``, ``a:6379,b:6379``, ``[fd00::5]:6379``.

IP literals are used as they are. Hostnames are resolved to all their A and AAAA
addresses, and re-resolved every ``refresh_interval`` seconds, so that a name that moves
is followed; when a re-resolution fails, the last good answer keeps serving (stale).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

import trio

from .interface import (
    Backend,
    Publish,
    Resolver,
    ResolverOptions,
    Spec,
    TemporaryFailure,
    canonical,
    parse_host_port,
)
from .state import ResolverState

log = logging.getLogger("ambassadord.resolver.static")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class StaticSpec(Spec):
    text: str
    entries: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str) -> "StaticSpec":
        items = text.split(",")
        entries = []
        for item in items:
            entries.append(parse_host_port(item, context=text))
        return cls(text=text, entries=tuple(dict.fromkeys(entries)))

    @property
    def literal(self) -> bool:
        """True when every entry is an IP literal (nothing to resolve, ever)."""
        return all(_is_ip(h) for h, _ in self.entries)

    def resolver(self, options: ResolverOptions) -> "StaticResolver":
        return StaticResolver(self, options)


async def backends_of(entries, *, weight: float = 1) -> tuple[list[Backend], list[str]]:
    """Backends for (host, port) pairs: IP literals as they are, hostnames via getaddrinfo.

    Returns (backends, errors): one error string per hostname that did not resolve. The
    backends come in the order of ``entries``, each hostname's addresses in canonical
    order (getaddrinfo's may change from one call to the next). Shared by every resolver
    whose source may hold hostnames (static lists, Consul addresses, KV values); their
    parsers have checked each hostname already (interface.hostname_problem), so an error
    here is the look-up's.
    """
    backends: list[Backend] = []
    errors: list[str] = []
    for host, port in entries:
        if _is_ip(host):
            backends.append(Backend(str(ipaddress.ip_address(host)), port, weight=weight, name=host))
            continue
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:  # ValueError: UnicodeError of the idna codec
            errors.append(f"{host}: {exc}")
            continue
        backends += canonical(Backend(sockaddr[0], port, weight=weight, name=host)
                              for family, _, _, _, sockaddr in infos if family in (socket.AF_INET, socket.AF_INET6))
    return list(dict.fromkeys(backends)), errors


class StaticResolver(Resolver):
    def __init__(self, spec: StaticSpec, options: ResolverOptions):
        self.spec = spec
        self.options = options

    async def resolve(self) -> tuple[Backend, ...]:
        backends, errors = await backends_of(self.spec.entries)
        if not backends:
            raise TemporaryFailure(f"{self.spec.text!r}: no address for " + "; ".join(errors))
        for error in errors:  # partial answer: serve what resolved, say what did not
            log.warning("static spec %r: cannot resolve %s", self.spec.text, error)
        return tuple(backends)

    async def watch(self, publish: Publish) -> None:
        state = ResolverState(self.spec.text)
        while True:
            try:
                backends = await self.resolve()
            except TemporaryFailure as exc:
                step = state.failed(str(exc), trio.current_time(), time.time())
                if step.age is not None:
                    log.warning("static spec %r: %s; keeping last good set (stale)", self.spec.text, exc)
                else:
                    log.error("static spec %r: %s", self.spec.text, exc)
            else:
                self.answered_at = time.time()
                step = state.answer(backends, trio.current_time(), self.answered_at)
            if step.publish is not None:
                publish(step.publish)
            if self.spec.literal:
                await trio.sleep_forever()  # nothing to resolve again, ever
            await trio.sleep(self.options.refresh_interval)
