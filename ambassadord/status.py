"""``ambassadord status``: a running daemon's routes and backends, read from its admin API
(``/routes``) and printed as a table, or as the JSON itself."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from ambassadord.backends.interface import hostname_problem

from .server import ListenAddress, parse_listen
from .settings import UsageError


def parse_admin_address(text: str) -> ListenAddress:
    """``status --admin``: ``ADDR:PORT``, ``[V6]:PORT``, or ``HOST:PORT`` with a host name
    (``localhost:10001``), looked up when status connects. (``run --admin`` binds, and takes
    IP addresses only: admin.parse_admin.) Raises ValueError quoting the text."""
    if text.strip().lower() == "off":
        raise ValueError("'off': status needs the daemon's admin address, e.g. localhost:10001")
    try:
        return parse_listen(text)
    except ValueError as exc:
        literal_error = str(exc).replace("bad listen address", "bad admin address").replace(
            "expected ADDR:PORT", "expected HOST:PORT").replace("e.g. 0.0.0.0:10000", "e.g. localhost:10001")
    host, sep, port = text.strip().rpartition(":")
    if sep and ":" not in host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
        problem = hostname_problem(host)
        if problem is None:
            return ListenAddress(host, int(port))
        raise ValueError(f"bad admin address {text!r}: host {host!r}: {problem}")
    raise ValueError(literal_error)


def show(admin: ListenAddress | None, *, timeout: float, as_json: bool = False) -> int:
    """Print the daemon's route table; the exit status (1: no answer, or not ours)."""
    from .admin import admin_url  # (Starlette: not for check, which uses columns())

    if admin is None:
        raise UsageError("--admin off: status needs the daemon's admin address")
    url = admin_url(admin) + "/routes"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        print(f"ambassadord status: {url}: HTTP {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        print(f"ambassadord status: cannot reach the admin API at {url}: {reason} "
              f"(is ambassadord running with --admin {admin}?)", file=sys.stderr)
        return 1
    try:
        data = json.loads(body)
        if not isinstance(data["routes"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        print(f"ambassadord status: {url} did not answer with ambassadord's /routes JSON", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if as_json else render_status(data))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _ago(ts, now) -> str:
    if ts is None:
        return "never"
    d = max(0.0, now - ts)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.0f}h ago"


def render_status(data: dict) -> str:
    """The /routes JSON as a table: one line per backend, route columns on its first line;
    then the totals, and notes on what went wrong."""
    now = data.get("now") or 0
    rows = [("ROUTE", "SPEC", "BACKEND", "STATE", "ACTIVE", "CONNS", "FAILS", "UP", "DOWN", "UPDATED")]
    for r in data["routes"]:
        rows += _route_rows(r, now)
    notes = [f"route {r['name']}: {'stale: ' if r['stale'] else ''}{r['error']}" for r in data["routes"] if r["error"]]
    for r in data["routes"]:
        notes += _failing_notes(r)
    cfg = data.get("config", {})
    last = cfg.get("last_reload")
    if last and not last.get("ok"):
        notes.append(f"last reload ({_ago(last.get('at'), now)}) was rejected: {last.get('error')}")
    return "\n".join([*columns(rows), "", *_totals(data, cfg, now), *notes])


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of text cells as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _route_rows(r: dict, now: float) -> list[tuple[str, ...]]:
    # A connect-mode route says so after its spec; proxy, the default, says nothing.
    # A route a container declared names it after its spec: "(container web-1 (3f2a9c1d0e4b))".
    route_cols = (r["name"], r["spec"] + (" (connect)" if r.get("mode", "proxy") != "proxy" else "")
                  + (f" (container {r['container']})" if r.get("container") else ""))
    if not r["backends"]:
        state = "not resolved" if not r["resolved"] else "no backends"
        return [(*route_cols, "-", state, str(r["active"]), str(r["connections"]), "-",
                 _size(r["bytes_up"]), _size(r["bytes_down"]), _ago(r["updated_at"], now))]
    rows = []
    for i, b in enumerate(r["backends"]):
        state = b["state"]
        if state == "ejected" and b.get("ejected_for") is not None:
            state = f"ejected {b['ejected_for']:.0f}s"
        if r["stale"] and b["in_set"]:
            state += " (stale)"
        rows.append((*(route_cols if i == 0 else ("", "")), b["name"], state, str(b["active"]),
                     str(b["connections"]), str(b["failures"]), _size(b["bytes_up"]), _size(b["bytes_down"]),
                     _ago(r["updated_at"], now) if i == 0 else ""))
    return rows


FAILING_NOTES = 5  # failing instances named per route; the rest are counted


def failing_lines(failing: list[dict], more: int = 0, limit: int = FAILING_NOTES) -> list[str]:
    """Instances the registry lists but does not offer (Consul: failing checks), each with
    the output of its first failing check; the ones past ``limit`` and ``more`` counted."""
    lines = []
    for i in failing[:limit]:
        bad = [c for c in i.get("checks", []) if c.get("status") != "passing"]
        why = f": {bad[0]['name']}: {bad[0]['output'] or bad[0]['status']}" if bad else ""
        where = f"{i['address']}:{i['port']}" if ":" not in i["address"] else f"[{i['address']}]:{i['port']}"
        lines.append(f"instance {i['id']}" + (f" on {i['node']}" if i.get("node") else "")
                     + f" ({where}) is {i['status']}, not offered{why}")
    more += max(0, len(failing) - limit)
    if more > 0:
        lines.append(f"and {more} more failing instance(s)")
    return lines


def _failing_notes(r: dict) -> list[str]:
    return [f"route {r['name']}: {line}" for line in failing_lines(r.get("failing_instances") or [],
                                                                   r.get("failing_instances_more") or 0)]


def _totals(data: dict, cfg: dict, now: float) -> list[str]:
    conns = data.get("connections", {})
    lines = [f"{len(data['routes'])} route(s), {conns.get('active', 0)} open connection(s), "
             f"{conns.get('total', 0)} since start; config loaded {_ago(cfg.get('loaded_at'), now)}"
             + (f" from {cfg['file']}" if cfg.get("file") else "")]
    workers = data.get("workers")
    if workers and workers.get("count", 1) > 1:
        lines.append(f"{workers['count']} worker processes" + (
            f"; only {workers['answered']} answered, counts are partial" if workers["answered"] < workers["count"]
            else "") + (f"; {workers['restarts']} restarted" if workers.get("restarts") else ""))
    docker = data.get("docker")
    if docker:
        lines.append(f"docker {docker['url']}: " + (
            f"{docker['containers']} container(s), {docker['declaring']} declaring routes" if docker["connected"]
            else f"not connected ({docker['error']}), last known routes kept since {_ago(docker['lost_at'], now)}"))
    return lines
