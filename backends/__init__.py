"""Resolvers, one module per source, and the registry that maps a spec to its parser.

How the pieces fit:

* ``interface.py``: the shared data (``Backend``, ``BackendSet``, kept in one canonical
  order), the ``Spec`` and ``Resolver`` interfaces, the two ways a source fails
  (``NotFound``, ``TemporaryFailure``), the ``host:port`` parsing and hostname checks
  every module uses, and what every watch loop shares (backoff, notes logged once,
  unforeseen exceptions turned into failures).
* ``state.py``: the one state machine every watch loop feeds (answer, not found,
  failure): the last good set, its stale age, and what to publish. Pure.
* ``static.py``: ``host:port[,host:port...]`` lists (hostnames re-resolved periodically).
* ``dns.py``: ``srv://NAME`` and bare names (SRV, RFC 2782), ``dns://NAME:PORT`` (A/AAAA).
* ``consul.py``: ``consul://[AGENT]/SERVICE`` (passing instances) and
  ``consul-kv://[AGENT]/PATH``, watched with blocking queries.
* ``etcd.py``: ``etcd://[ENDPOINT]/PREFIX``, read then watched, resumed after restarts.
* ``keyvalues.py``: the value format shared by Consul KV and etcd.

``parse_spec(text)`` is the one entry point the daemon uses: it picks the module by the
spec's scheme (the part before ``://``) or, for scheme-less values, by its shape.
"""

from __future__ import annotations

import importlib

from .interface import (
    Backend,
    BackendSet,
    NotFound,
    Publish,
    ResolveError,
    Resolver,
    ResolverOptions,
    Spec,
    SpecError,
    TemporaryFailure,
)

__all__ = [
    "Backend",
    "BackendSet",
    "NotFound",
    "Publish",
    "ResolveError",
    "Resolver",
    "ResolverOptions",
    "Spec",
    "SpecError",
    "TemporaryFailure",
    "parse_spec",
    "SCHEMES",
]

# scheme -> (module, Spec class). Imported when a spec needs it, so that a process that
# resolves nothing (a --workers helper) does not load the DNS and Consul clients.
SCHEMES: dict[str, tuple[str, str]] = {
    "srv": ("dns", "SrvSpec"),
    "dns": ("dns", "DnsSpec"),
    "consul": ("consul", "ConsulServiceSpec"),
    "consul-kv": ("consul", "ConsulKVSpec"),
    "etcd": ("etcd", "EtcdSpec"),
}


def _spec_class(module: str, name: str) -> type[Spec]:
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def parse_spec(text: str) -> Spec:
    """Parse a route value into its Spec.

    Raises:
        SpecError: the text names an unknown scheme or is malformed; the message quotes it.
    """
    if not isinstance(text, str):
        raise SpecError(f"a backend spec must be a string, not {type(text).__name__} {text!r}")
    text = text.strip()
    if not text:
        raise SpecError("empty backend spec")
    scheme, sep, _ = text.partition("://")
    if sep:
        where = SCHEMES.get(scheme)
        if where is not None:
            return _spec_class(*where).parse(text)
        known = ", ".join(sorted(SCHEMES))
        raise SpecError(f"spec {text!r}: unknown scheme {scheme!r} (known schemes: {known}; or HOST:PORT[,HOST:PORT...])")
    if ":" not in text and "," not in text:
        # A bare name with no port: a DNS SRV name, as in ambassadord (redis.service.consul).
        return _spec_class("dns", "SrvSpec").parse(text)
    return _spec_class("static", "StaticSpec").parse(text)
