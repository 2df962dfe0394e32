"""Route values parsed and validated once, with errors that say where they came from.

What each place routes come from says, turned into :class:`RouteConfig` values:

* ``--map PORT=SPEC`` or ``--map PORT@CIDR=SPEC`` (:func:`routes_from_maps`);
* ``--config FILE`` (:func:`load_file`): TOML with an optional ``[defaults]`` table and a
  ``[routes]`` table whose keys are ports and whose values are a spec string, a table
  (``{ backend = "...", balance = "round-robin", source = "172.17.0.0/16", ... }``) or a
  list of such tables (one port, several source networks);
* environment ``BACKEND_<PORT>=SPEC`` and, with ``--link-env``, Docker links,
  ``<ALIAS>_PORT_<PORT>_TCP=tcp://HOST:PORT`` (:func:`routes_from_env`).

Option precedence, weakest first: built-in defaults, the file's ``[defaults]``,
command-line flags (:func:`route_defaults`), a route's own options. Reading the sources
and merging what they say (duplicates, precedence) is ``sources.py``'s job.

Error handling: every function here raises only :class:`ConfigError`, whatever the input.
A reload runs them while routes are serving, so a file that makes a parser fail in a way
nobody foresaw (nesting deep enough for a RecursionError, a device that never ends) must
be one more rejected file, never the end of the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import reprlib
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from ambassadord.backends import SpecError, parse_spec
from ambassadord.backends.interface import parse_port

from .balancer import BALANCE_POLICIES
from .health import MIN_INTERVAL as MIN_CHECK_INTERVAL
from .routes import DEFAULT_MAX_CONNECTIONS, MODES, ON_DOWN, Keepalive, RouteConfig


class ConfigError(ValueError):
    """Bad configuration. The message names the bad value and where it came from."""


@dataclass(frozen=True)
class RouteDefaults:
    """The options of a route that does not set them itself. ``pinned`` names the options
    given as command-line flags: a file's ``[defaults]`` does not override them."""

    balance: str = "random"
    connect_timeout: float = 2.0
    idle_timeout: float | None = None
    eject_for: float = 10.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_backend_connections: int = 0
    keepalive: Keepalive = Keepalive()
    check_interval: float | None = None
    check_rise: int = 2
    check_fall: int = 3
    mode: str = "proxy"
    on_down: str = "keep"
    drain: float = 0.0
    pinned: frozenset[str] = frozenset()

    def overlaid(self, options: Mapping) -> RouteDefaults:
        """These defaults with a file's ``[defaults]`` laid over, except the pinned options."""
        return replace(self, **{k: v for k, v in options.items() if k not in self.pinned})


# Values quoted in messages come from the input: show them bounded in length and depth
# (a plain repr of a value nested a thousand deep raises RecursionError itself).
_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 80
_shown.maxlevel = 3


def _show(value) -> str:
    return _shown.repr(value)


# The options a route may set, with their validators (value, where) -> value.
def _mode(value, where: str) -> str:
    if value not in MODES:
        raise ConfigError(f"{where}: bad mode {_show(value)}: expected one of {', '.join(MODES)}")
    return value


def _on_down(value, where: str) -> str:
    if value not in ON_DOWN:
        raise ConfigError(f"{where}: bad on_down {_show(value)}: expected one of {', '.join(ON_DOWN)}")
    return value


def _drain(value, where: str) -> float:
    """Seconds from 0 (close at once) to an hour."""
    if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= 3600:
        raise ConfigError(f"{where}: bad drain {_show(value)}: expected a number of seconds from 0 (at once) "
                          "to 3600 (an hour), written without quotes")
    return float(value)


def _balance(value, where: str) -> str:
    if value not in BALANCE_POLICIES:
        raise ConfigError(f"{where}: bad balance {_show(value)}: expected one of {', '.join(BALANCE_POLICIES)}")
    return value


# The longest duration each option takes, and how the message says it. Longer is a slip
# (milliseconds written as seconds, a stray exponent), never a wish: the kernel itself
# gives up a connect after about two minutes of SYN retries; a backend ejected for more
# than a day is better taken out of the route; an idle timeout of more than a week is
# no idle timeout (0). Keep README's route options and flags tables in step.
DURATION_LIMITS = {
    "connect_timeout": (3600, "an hour"),
    "eject_for": (86400, "a day"),
    "check_interval": (86400, "a day"),
    "idle_timeout": (604800, "a week"),
}


_TOML_KINDS = {bool: "a boolean", list: "an array", dict: "a table"}


def _duration(key: str, *, zero: str | None = None):
    """The validator of duration option ``key``: seconds above 0 (or 0, which means
    ``zero``, and becomes None) up to ``DURATION_LIMITS[key]``.

    In the file a duration is a TOML number. A string is refused, not parsed: ``"2"`` and
    ``"2s"`` look like they work, while ``"2m"`` or ``"500ms"`` would not; a flag's text
    is parsed by the command line before it gets here.
    """
    limit, said = DURATION_LIMITS[key]
    expected = (f"0 ({zero}) or up to {limit} seconds ({said})" if zero
                else f"more than 0 and at most {limit} seconds ({said})")

    def parse(value, where: str) -> float | None:
        if isinstance(value, str):
            raise ConfigError(f"{where}: bad duration {_show(value)}: a string; write the seconds as a "
                              f"TOML number, without quotes, e.g. {key} = 2 or 0.5")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: bad duration {_show(value)}: expected a number of seconds, e.g. 2 or 0.5, "
                              f"not {_TOML_KINDS.get(type(value), 'a ' + type(value).__name__)}")
        # One comparison per bound, so that NaN fails too; an int is compared as it is
        # (float() of a TOML integer of 400 digits raises OverflowError).
        if not ((value >= 0 if zero else value > 0) and value <= limit):
            raise ConfigError(f"{where}: bad duration {_show(value)}: expected {expected}")
        return float(value) if value or not zero else None

    return parse


def _source(value, where: str):
    if not isinstance(value, str):
        raise ConfigError(f"{where}: bad source {_show(value)}: expected a CIDR such as 172.17.0.0/16")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{where}: bad source {_show(value)}: expected a CIDR such as 172.17.0.0/16") from None
    # An address with its prefix length (172.17.0.1/16, as `ip addr` shows it): most
    # likely its network is meant, but it may be a typo for another; say which it would be.
    raise ConfigError(f"{where}: bad source {_show(value)}: host bits are set; did you mean {network}?")


def _limit(value, where: str) -> int:
    """A connection count; 0 means no limit. TOML integers only: a limit is not a string."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000_000:
        raise ConfigError(f"{where}: bad limit {value!r}: expected a whole number of connections, 0 = no limit")
    return value


def _keepalive(value, where: str) -> Keepalive:
    """``"60,10,6"``, ``"off"``, ``false``, or a number (the idle time; the rest default);
    a Keepalive as it is (the --keepalive flag's parser made it)."""
    if isinstance(value, Keepalive):
        return value
    if value is False:
        return Keepalive(0, 0, 0)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: bad keepalive {value!r}: expected \"IDLE,INTERVAL,COUNT\" such as \"60,10,6\", "
                          f"or \"off\"")
    try:
        return Keepalive.parse(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_check_seconds = _duration("check_interval", zero="no checks")


def _check_interval(value, where: str) -> float | None:
    v = _check_seconds(value, where)
    if v is not None and v < MIN_CHECK_INTERVAL:
        raise ConfigError(f"{where}: check interval {_show(value)} is too short: at least {MIN_CHECK_INTERVAL:g} "
                          "seconds (or 0 for no checks)")
    return v


# Rise and fall counts: HAProxy's defaults are 2 and 3; more than this is a typo.
MAX_CHECK_COUNT = 100


def _check_count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHECK_COUNT:
        raise ConfigError(f"{where}: bad count {_show(value)}: expected a whole number from 1 to {MAX_CHECK_COUNT}")
    return value


OPTION_PARSERS = {
    "balance": _balance,
    "connect_timeout": _duration("connect_timeout"),
    "idle_timeout": _duration("idle_timeout", zero="never"),
    "eject_for": _duration("eject_for"),
    "max_connections": _limit,
    "max_backend_connections": _limit,
    "keepalive": _keepalive,
    "check_interval": _check_interval,
    "check_rise": _check_count,
    "check_fall": _check_count,
    "mode": _mode,
    "on_down": _on_down,
    "drain": _drain,
}


def route_defaults(flags: Mapping) -> RouteDefaults:
    """The built-in defaults with the route options given as flags (None: not given)
    laid over and pinned. Raises ConfigError naming the flag (``--connect-timeout: ...``)."""
    given = {k: OPTION_PARSERS[k](v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None}
    return replace(RouteDefaults(), pinned=frozenset(given), **given)


def _failure(exc: Exception) -> str:
    """What an error no validator foresaw says about the input."""
    if isinstance(exc, RecursionError):
        return "nested too deeply (arrays or tables inside one another)"
    if isinstance(exc, MemoryError):
        return "too large to hold in memory"
    return f"cannot be read ({type(exc).__name__}: {_show(str(exc))})"


def make_route(port: int, spec_text, where: str, defaults: RouteDefaults, **options) -> RouteConfig:
    try:
        spec = parse_spec(spec_text)
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:  # see the module's "Error handling"
        raise ConfigError(f"{where}: spec {_show(spec_text)} {_failure(exc)}") from None
    values = dict(
        balance=defaults.balance,
        connect_timeout=defaults.connect_timeout,
        idle_timeout=defaults.idle_timeout,
        eject_for=defaults.eject_for,
        max_connections=defaults.max_connections,
        max_backend_connections=defaults.max_backend_connections,
        keepalive=defaults.keepalive,
        check_interval=defaults.check_interval,
        check_rise=defaults.check_rise,
        check_fall=defaults.check_fall,
        mode=defaults.mode,
        on_down=defaults.on_down,
        drain=defaults.drain,
    )
    values.update(options)
    return RouteConfig(port=port, spec=spec, origin=where, **values)


def route_port(text, where: str) -> int:
    try:
        return parse_port(str(text), context=where)
    except SpecError as exc:
        raise ConfigError(str(exc)) from None


# ---- --map -------------------------------------------------------------------------

_MAP_RE = re.compile(r"^\s*(?:(?P<name>[A-Za-z][A-Za-z0-9._-]*):)?(?P<port>[^=@\s]+)\s*(?:@\s*(?P<source>[^=\s]+)\s*)?"
                     r"=(?P<spec>.*)$")
# A route's name: what logs, metrics and /routes call it. A letter first (so that it is never
# taken for a port), then letters, digits, '.', '_' and '-'; at most 63 characters.
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,62}")


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(f"{where}: bad route name {_show(value)}: a letter, then letters, digits, '.', '_' or '-' "
                          "(at most 63), e.g. redis-primary")
    return value


def routes_from_maps(maps: Iterable[str], defaults: RouteDefaults) -> list[RouteConfig]:
    routes = []
    for item in maps:
        where = f"--map {item}"
        m = _MAP_RE.match(item)
        if not m:
            raise ConfigError(f"{where}: expected PORT=SPEC, PORT@CIDR=SPEC or NAME:PORT=SPEC, e.g. --map "
                              "6379=10.0.0.5:6379 or --map redis:6379=10.0.0.5:6379")
        port = route_port(m["port"], where)
        opts = {"name": m["name"]} if m["name"] else {}
        if m["source"]:
            opts["source"] = _source(m["source"], where)
        routes.append(make_route(port, m["spec"], where, defaults, **opts))
    return routes


# ---- environment -------------------------------------------------------------------

# \d matches every script's digits on purpose: BACKEND_６３７９ is meant as a port, and the
# port parser rejects it with a message instead of it being ignored.
_BACKEND_ENV = re.compile(r"^BACKEND_(?P<port>\d+)$")
_LINK_ENV = re.compile(r"^(?P<alias>[A-Za-z0-9_]+?)_PORT_(?P<port>\d+)_TCP$")


def routes_from_env(env: Mapping[str, str], defaults: RouteDefaults, *, backend_env: bool = True,
                    link_env: bool = False) -> tuple[list[RouteConfig], list[str]]:
    """Routes from BACKEND_<PORT> (unless not backend_env) and Docker link vars (with
    link_env), in the order of the variables' names. Returns (routes, warnings)."""
    routes, warnings = [], []
    for name in sorted(env):
        value = env[name]
        if name.startswith("BACKEND_"):
            if not backend_env:
                continue
            m = _BACKEND_ENV.match(name)
            where = f"env {name}={value}"
            if not m:
                warnings.append(f"ignoring env {name}: BACKEND_ variables are BACKEND_<PORT>=SPEC, e.g. BACKEND_6379")
                continue
            routes.append(make_route(route_port(m["port"], where), value, where, defaults))
        elif link_env:
            m = _LINK_ENV.match(name)
            if not m:
                continue
            where = f"env {name}={value} (--link-env)"
            if not value.startswith("tcp://"):
                raise ConfigError(f"{where}: expected tcp://HOST:PORT, as Docker links set it")
            routes.append(make_route(route_port(m["port"], where), value.removeprefix("tcp://").rstrip("/"), where, defaults))
    return routes, warnings


# ---- TOML file ---------------------------------------------------------------------

_ROUTE_KEYS = {"backend", "source", "name", *OPTION_PARSERS}


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Best-effort map (table, key) -> line number, for error messages (tomllib has none)."""
    lines: dict[tuple[str, str], int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            table = s.strip("[] ").strip('"')
            continue
        m = re.match(r'''^(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_.-]+))\s*=''', s)
        if m:
            lines.setdefault((table, next(k for k in m.groups() if k is not None)), n)
    return lines


# A config file is a page of routes; a megabyte is thousands of them. A bigger one is not
# a config file (a log, a core dump, /dev/zero behind a symlink), and reading it whole
# would take the memory of the daemon that is serving.
MAX_FILE_BYTES = 1 << 20
_MAX_FILE_SAID = "1 MiB"

_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _not_regular(mode: int) -> str:
    return f"it is {_FILE_KINDS.get(stat.S_IFMT(mode), 'something else')}, not a regular file"


def read_file(path: str) -> str:
    """The text of config file ``path``: a regular file of at most MAX_FILE_BYTES, UTF-8.

    Never blocks on what the path names: it is opened with O_NONBLOCK (a FIFO's open
    returns at once instead of waiting for a writer; a device is not read at all) and must
    be a regular file by fstat of that very descriptor, so a symlink swapped in between
    cannot slip past. A slow file system can still make the read wait; the caller's
    cancellation covers that.

    Raises:
        ConfigError: naming the file and what is wrong (missing, not a regular file,
            too large, not UTF-8 with the line and column).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        problem = exc.strerror
        if exc.errno == errno.ENXIO:  # what a unix socket answers: say what it is
            with contextlib.suppress(OSError):
                problem = _not_regular(os.stat(path).st_mode)
        raise ConfigError(f"cannot read config file {path}: {problem}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"cannot read config file {path}: {_not_regular(st.st_mode)}")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:  # the file may grow after fstat: count what is read
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"cannot read config file {path}: larger than {_MAX_FILE_SAID} "
                          f"({max(st.st_size, size)} bytes), the limit for a config file")
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                          "a TOML file is UTF-8 text") from None


def load_file(path: str, defaults: RouteDefaults) -> tuple[list[RouteConfig], RouteDefaults]:
    """Read a TOML config file.

    Args:
        path: the file.
        defaults: the defaults so far (built-in and flags; the pinned ones beat [defaults]).
    Returns:
        The file's routes, and the defaults with its [defaults] laid over.
    Raises:
        ConfigError: unreadable file (see :func:`read_file`), TOML syntax error, unknown
            table or key, bad value, or anything else the parsers raise; the message names
            the file and, where known, the line and key.
    """
    text = read_file(path)
    try:
        return _file_routes(path, text, defaults)
    except ConfigError:
        raise
    except Exception as exc:  # see the module's "Error handling"
        raise ConfigError(f"{path}: {_failure(exc)}") from None


def _file_routes(path: str, text: str, defaults: RouteDefaults) -> tuple[list[RouteConfig], RouteDefaults]:
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
    defaults = defaults.overlaid(opts)

    routes_table = data.get("routes", {})
    if not isinstance(routes_table, dict):
        raise ConfigError(f"{path}: routes must be a table, [routes]")
    routes = []
    for key, value in routes_table.items():
        w = where("routes", key)
        port = route_port(key, w)
        entries = value if isinstance(value, list) else [value]
        if not entries:
            raise ConfigError(f"{w}: empty list of routes")
        for i, entry in enumerate(entries):
            ew = f"{w}[{i}]" if isinstance(value, list) else w
            if isinstance(entry, str):
                routes.append(make_route(port, entry, ew, defaults))
                continue
            if not isinstance(entry, dict):
                raise ConfigError(f"{ew}: expected a spec string or a table with backend = \"...\", got {_show(entry)}")
            extra = set(entry) - _ROUTE_KEYS
            if extra:
                raise ConfigError(f"{ew}: unknown option(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(_ROUTE_KEYS))}")
            if "backend" not in entry:
                raise ConfigError(f"{ew}: missing backend = \"SPEC\"")
            ropts = {k: OPTION_PARSERS[k](v, f"{ew}.{k}") for k, v in entry.items() if k in OPTION_PARSERS}
            if "source" in entry:
                ropts["source"] = _source(entry["source"], f"{ew}.source")
            if "name" in entry:
                ropts["name"] = _name(entry["name"], f"{ew}.name")
            routes.append(make_route(port, entry["backend"], ew, defaults, **ropts))
    return routes, defaults
