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

import difflib
import importlib
import re

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
        close = difflib.get_close_matches(scheme.lower(), SCHEMES, n=1)
        meant = f"; did you mean {close[0]}://?" if close else ""
        raise SpecError(f"spec {text!r}: unknown scheme {scheme!r}{meant} "
                        f"(known schemes: {known}; or HOST:PORT[,HOST:PORT...])")
    try:
        if ":" not in text and "," not in text:
            # A bare name with no port: a DNS SRV name, as in ambassadord (redis.service.consul).
            return _spec_class("dns", "SrvSpec").parse(text)
        return _spec_class("static", "StaticSpec").parse(text)
    except SpecError:
        mangled = _mangled_scheme(text)
        if mangled is None:
            raise
        raise SpecError(f"spec {text!r}: {mangled}") from None


# SCHEME followed by a broken "://" (consul//redis, consul:/redis, etcd:services/redis),
# longest scheme first (consul-kv before consul).
_MANGLED = re.compile(r"(%s)([:/]+)(.+)" % "|".join(sorted(map(re.escape, SCHEMES), key=len, reverse=True)))
# Where a third slash (SCHEME:///...) stands for the default agent or endpoint.
_DEFAULT_HOST = {"consul": "agent", "consul-kv": "agent", "etcd": "endpoint"}


def _mangled_scheme(text: str) -> str | None:
    """What to say about a spec that failed as a name or a host:port list but starts with
    a known scheme whose "://" is mistyped (what it probably meant); None otherwise. Asked
    only after the spec failed: ``consul:8500`` stays a valid host:port (a host called
    consul).

    For consul, consul-kv and etcd, the rest goes after three slashes (the default agent or
    endpoint) unless its first segment has a port (then it is the host). If the likely
    meaning is no valid spec either, its own error is said too.
    """
    m = _MANGLED.fullmatch(text)
    if m is None or m.group(2) == "://":
        return None
    scheme, rest = m.group(1), m.group(3)
    default = _DEFAULT_HOST.get(scheme)
    third = default is not None and not (":" in rest.split("/", 1)[0] and "/" in rest)
    meant = f"{scheme}:{'///' if third else '//'}{rest}"
    said = f"did you mean {meant}? ({scheme} specs start with {scheme}://{'; the third slash: the default ' + default if third else ''})"
    try:
        parse_spec(meant)
    except SpecError as exc:
        return f"{said}; but that is no valid spec either: {exc}"
    return said
