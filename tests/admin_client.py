"""Talking to a real daemon's admin API from tests: HTTP (/healthz, /routes, /metrics), a
daemon started with --admin and ready when /healthz says ok, and ``python -m ambassadord``
run to completion.

Readiness is the admin API answering /healthz, never the listen port: a probe connection
there would be counted, and tests check the counts exactly.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import REPO_ROOT, Daemon, connect, wait_until
from tests.netns import Netns


def http_get(port: int, path: str, *, host: str = "127.0.0.1", ns: Netns | None = None,
             headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the admin API at ``host:port`` (from inside ``ns`` if given):
    (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if ns is not None:
            conn.sock = connect(host, port, ns=ns, timeout=timeout)
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def get_routes(port: int, **kw) -> dict:
    status, headers, body = http_get(port, "/routes", **kw)
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    return json.loads(body)


def route(snapshot: dict, name: str) -> dict:
    found = [r for r in snapshot["routes"] if r["name"] == name]
    assert len(found) == 1, f"route {name!r} in {[r['name'] for r in snapshot['routes']]}"
    return found[0]


def backend(view: dict, name: str) -> dict:
    found = [b for b in view["backends"] if b["name"] == name]
    assert len(found) == 1, f"backend {name!r} in {[b['name'] for b in view['backends']]}"
    return found[0]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, **kw) -> Samples:
    """/metrics in the Prometheus text format, parsed: {(sample name, sorted labels): value}."""
    status, headers, body = http_get(port, "/metrics", **kw)
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("text/plain"), headers
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def healthz(port: int, **kw) -> tuple[int, bytes]:
    try:
        status, _, body = http_get(port, "/healthz", timeout=2, **kw)
    except http.client.HTTPException as exc:  # half-started server: not yet
        raise OSError(str(exc)) from None
    return status, body


def admin_daemon(args: list[str], admin_port: int, tmp_path: Path, *, ns: Netns | None = None,
                 admin_host: str = "127.0.0.1", env: dict[str, str] | None = None) -> Daemon:
    """The daemon with ``--admin admin_host:admin_port``, ready when /healthz says ok.

    No probe connection to the listen ports (``listen=None``): the tests count connections.
    """
    where = f"[{admin_host}]:{admin_port}" if ":" in admin_host else f"{admin_host}:{admin_port}"
    d = Daemon([*args, "--admin", where], listen=None, ns=ns, workdir=tmp_path, env=env)
    try:
        def ok() -> bool:
            d._check_alive()
            return healthz(admin_port, host=admin_host, ns=ns) == (200, b"ok\n")

        wait_until(ok, timeout=15, what=d.describe)
    except BaseException:
        d.kill()
        raise
    return d


def cli(*args: str, env: dict[str, str] | None = None, ns: Netns | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess:
    """``python -m ambassadord ARGS...`` to completion: its status, stdout and stderr."""
    cmd = [sys.executable, "-m", "ambassadord", *args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns.name, *cmd]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BACKEND_")}
    environ.update(env or {})
    return subprocess.run(cmd, cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def shown(proc: subprocess.CompletedProcess) -> str:
    return f"status {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"

