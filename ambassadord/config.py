"""Routes from every place they can come from, validated once, with errors that say where.

Sources, all merged into one list of RouteConfig:

* ``--map PORT=SPEC`` or ``--map PORT@CIDR=SPEC`` (repeatable);
* ``--config FILE``: TOML with an optional ``[defaults]`` table and a ``[routes]`` table
  whose keys are ports and whose values are a spec string, a table
  (``{ backend = "...", balance = "round-robin", source = "172.17.0.0/16", ... }``) or a
  list of such tables (one port, several source networks);
* environment ``BACKEND_<PORT>=SPEC``;
* with ``--link-env``: Docker links, ``<ALIAS>_PORT_<PORT>_TCP=tcp://HOST:PORT``.

A port (with the same source network) configured twice is an error naming both places:
silently preferring one would hide a mistake. Option precedence, weakest first: built-in
defaults, the file's ``[defaults]``, command-line flags, a route's own options.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from backends import SpecError, parse_spec
from backends.interface import parse_port

from .balancer import BALANCE_POLICIES
from .health import MIN_INTERVAL as MIN_CHECK_INTERVAL
from .routes import RouteConfig


class ConfigError(ValueError):
    """Bad configuration. The message names the bad value and where it came from."""


@dataclass(frozen=True)
class RouteDefaults:
    balance: str = "random"
    connect_timeout: float = 2.0
    idle_timeout: float | None = None
    eject_for: float = 10.0
    check_interval: float | None = None
    check_rise: int = 2
    check_fall: int = 3


# The options a route may set, with their validators (value, where) -> value.
def _balance(value, where: str) -> str:
    if value not in BALANCE_POLICIES:
        raise ConfigError(f"{where}: bad balance {value!r}: expected one of {', '.join(BALANCE_POLICIES)}")
    return value


def _seconds(value, where: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(str(value).strip().removesuffix("s"))
        except ValueError:
            raise ConfigError(f"{where}: bad duration {value!r}: expected seconds, e.g. 2 or 0.5") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: bad duration {value!r}: expected a positive number of seconds")
    return float(value)


def _idle(value, where: str) -> float | None:
    v = _seconds(value, where, allow_zero=True)
    return v or None  # 0 means no idle timeout


def _source(value, where: str):
    if not isinstance(value, str):
        raise ConfigError(f"{where}: bad source {value!r}: expected a CIDR such as 172.17.0.0/16")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{where}: bad source {value!r}: expected a CIDR such as 172.17.0.0/16") from None


def _check_interval(value, where: str) -> float | None:
    v = _seconds(value, where, allow_zero=True)
    if 0 < v < MIN_CHECK_INTERVAL:
        raise ConfigError(f"{where}: check interval {value!r} is too short: at least {MIN_CHECK_INTERVAL:g} seconds "
                          "(or 0 for no checks)")
    return v or None  # 0 means no health checks


# Rise and fall counts: HAProxy's defaults are 2 and 3; more than this is a typo.
MAX_CHECK_COUNT = 100


def _check_count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHECK_COUNT:
        raise ConfigError(f"{where}: bad count {value!r}: expected a whole number from 1 to {MAX_CHECK_COUNT}")
    return value


OPTION_PARSERS = {
    "balance": _balance,
    "connect_timeout": _seconds,
    "idle_timeout": _idle,
    "eject_for": _seconds,
    "check_interval": _check_interval,
    "check_rise": _check_count,
    "check_fall": _check_count,
}


def _route(port: int, spec_text, where: str, defaults: RouteDefaults, **options) -> RouteConfig:
    try:
        spec = parse_spec(spec_text)
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    values = dict(
        balance=defaults.balance,
        connect_timeout=defaults.connect_timeout,
        idle_timeout=defaults.idle_timeout,
        eject_for=defaults.eject_for,
        check_interval=defaults.check_interval,
        check_rise=defaults.check_rise,
        check_fall=defaults.check_fall,
    )
    values.update(options)
    values["check_interval"] = values["check_interval"] or None  # --check-interval 0: no checks
    return RouteConfig(port=port, spec=spec, origin=where, **values)


def _port(text, where: str) -> int:
    try:
        return parse_port(str(text), context=where)
    except SpecError as exc:
        raise ConfigError(str(exc)) from None


# ---- --map -------------------------------------------------------------------------

_MAP_RE = re.compile(r"^\s*(?P<port>[^=@\s]+)\s*(?:@\s*(?P<source>[^=\s]+)\s*)?=(?P<spec>.*)$")


def routes_from_maps(maps: list[str], defaults: RouteDefaults) -> list[RouteConfig]:
    routes = []
    for item in maps:
        where = f"--map {item}"
        m = _MAP_RE.match(item)
        if not m:
            raise ConfigError(f"{where}: expected PORT=SPEC or PORT@CIDR=SPEC, e.g. --map 6379=10.0.0.5:6379")
        port = _port(m["port"], where)
        opts = {}
        if m["source"]:
            opts["source"] = _source(m["source"], where)
        routes.append(_route(port, m["spec"], where, defaults, **opts))
    return routes


# ---- environment -------------------------------------------------------------------

_BACKEND_ENV = re.compile(r"^BACKEND_(?P<port>\d+)$")
_LINK_ENV = re.compile(r"^(?P<alias>[A-Za-z0-9_]+?)_PORT_(?P<port>\d+)_TCP$")


def routes_from_env(env: Mapping[str, str], defaults: RouteDefaults, *, link_env: bool) -> tuple[list[RouteConfig], list[str]]:
    """Routes from BACKEND_<PORT> (and Docker link vars with link_env). Returns (routes, warnings)."""
    routes, warnings = [], []
    for name in sorted(env):
        value = env[name]
        if name.startswith("BACKEND_"):
            m = _BACKEND_ENV.match(name)
            where = f"env {name}={value}"
            if not m:
                warnings.append(f"ignoring env {name}: BACKEND_ variables are BACKEND_<PORT>=SPEC, e.g. BACKEND_6379")
                continue
            routes.append(_route(_port(m["port"], where), value, where, defaults))
        elif link_env:
            m = _LINK_ENV.match(name)
            if not m:
                continue
            where = f"env {name}={value} (--link-env)"
            if not value.startswith("tcp://"):
                raise ConfigError(f"{where}: expected tcp://HOST:PORT, as Docker links set it")
            routes.append(_route(_port(m["port"], where), value.removeprefix("tcp://").rstrip("/"), where, defaults))
    return routes, warnings


# ---- TOML file ---------------------------------------------------------------------

_ROUTE_KEYS = {"backend", "source", *OPTION_PARSERS}


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Best-effort map (table, key) -> line number, for error messages (tomllib has none)."""
    lines: dict[tuple[str, str], int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            table = s.strip("[] ").strip('"')
            continue
        m = re.match(r'^"?([A-Za-z0-9_.-]+)"?\s*=', s)
        if m:
            lines.setdefault((table, m.group(1)), n)
    return lines


def load_file(path: str, flag_defaults: dict) -> tuple[list[RouteConfig], RouteDefaults]:
    """Read a TOML config file.

    Args:
        path: the file.
        flag_defaults: route options given as command-line flags (they beat [defaults]).
    Raises:
        ConfigError: unreadable file, TOML syntax error, unknown table or key, bad value;
            the message names the file and, where known, the line and key.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    lines = _key_lines(text)

    def where(table: str, key: str | None = None) -> str:
        if key is None:
            return f"{path}: [{table}]"
        line = lines.get((table, key))
        return f"{path}:{line}: [{table}] {key}" if line else f"{path}: [{table}] {key}"

    unknown = set(data) - {"routes", "defaults"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}: expected [routes] and optionally [defaults]")

    d = data.get("defaults", {})
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: defaults must be a table, [defaults]")
    opts = {}
    for key, value in d.items():
        if key not in OPTION_PARSERS:
            raise ConfigError(f"{where('defaults', key)}: unknown option; known: {', '.join(OPTION_PARSERS)}")
        opts[key] = OPTION_PARSERS[key](value, where("defaults", key))
    opts.update(flag_defaults)
    defaults = replace(RouteDefaults(), **opts)

    routes_table = data.get("routes", {})
    if not isinstance(routes_table, dict):
        raise ConfigError(f"{path}: routes must be a table, [routes]")
    routes = []
    for key, value in routes_table.items():
        w = where("routes", key)
        port = _port(key, w)
        entries = value if isinstance(value, list) else [value]
        if not entries:
            raise ConfigError(f"{w}: empty list of routes")
        for i, entry in enumerate(entries):
            ew = f"{w}[{i}]" if isinstance(value, list) else w
            if isinstance(entry, str):
                routes.append(_route(port, entry, ew, defaults))
                continue
            if not isinstance(entry, dict):
                raise ConfigError(f"{ew}: expected a spec string or a table with backend = \"...\", got {entry!r}")
            extra = set(entry) - _ROUTE_KEYS
            if extra:
                raise ConfigError(f"{ew}: unknown option(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(_ROUTE_KEYS))}")
            if "backend" not in entry:
                raise ConfigError(f"{ew}: missing backend = \"SPEC\"")
            ropts = {k: OPTION_PARSERS[k](v, f"{ew}.{k}") for k, v in entry.items() if k in OPTION_PARSERS}
            if "source" in entry:
                ropts["source"] = _source(entry["source"], f"{ew}.source")
            routes.append(_route(port, entry["backend"], ew, defaults, **ropts))
    return routes, defaults


# ---- all together ------------------------------------------------------------------


@dataclass
class LoadedConfig:
    routes: list[RouteConfig]
    warnings: list[str] = field(default_factory=list)


def load_routes(
    *,
    maps: list[str] = (),
    config_file: str | None = None,
    env: Mapping[str, str] = {},
    link_env: bool = False,
    flag_defaults: dict | None = None,
) -> LoadedConfig:
    """Every route from every source, checked for duplicates.

    Raises:
        ConfigError: naming the bad value and its origin.
    """
    flag_defaults = {k: v for k, v in (flag_defaults or {}).items() if v is not None}
    routes: list[RouteConfig] = []
    defaults = replace(RouteDefaults(), **flag_defaults)
    if config_file:
        file_routes, defaults = load_file(config_file, flag_defaults)
        routes += file_routes
    routes += routes_from_maps(list(maps), defaults)
    env_routes, warnings = routes_from_env(env, defaults, link_env=link_env)
    routes += env_routes
    seen: dict = {}
    for r in routes:
        if r.key in seen:
            raise ConfigError(
                f"port {r.describe()} is mapped twice: by {seen[r.key].origin} and by {r.origin}"
            )
        seen[r.key] = r
    return LoadedConfig(routes, warnings)
