"""Backends stored as values under a key prefix (Consul KV, etcd): ambassadord's format.

Under a path P, the backends are the values of the keys below ``P/`` (each ``host:port``,
commas allowed), plus P's own value split on commas. Shared by ``consul-kv://`` and
``etcd://``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .interface import SpecError, parse_host_port


def pairs_from_keys(base: str, items: Iterable[tuple[str, bytes | str | None]]) -> tuple[list[tuple[str, int]], list[str]]:
    """(host, port) pairs from (key, value) items read under ``base``. Pure.

    Keys that merely share the prefix (``baseX``), folders (keys ending in ``/``) and
    empty values are ignored; a malformed value is skipped with a note naming its key.
    Returns (pairs, notes).
    """
    pairs, notes = [], []
    base = base.rstrip("/")
    for key, raw in items:
        if key != base and not key.startswith(base + "/"):
            continue
        if raw is None or key.endswith("/"):
            continue
        try:
            value = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            notes.append(f"key {key!r}: value is not UTF-8 text; skipped")
            continue
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                pairs.append(parse_host_port(part, context=part))
            except SpecError as exc:
                notes.append(f"key {key!r}: {exc}; skipped")
    return list(dict.fromkeys(pairs)), notes
