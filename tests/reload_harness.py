"""Reloading a real daemon: config files written as configuration management does, the
daemon started on listen ports with --config, its reload log records (a helper module,
imported by test files)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.admin_client import admin_daemon


def write_config(path: Path, text: str) -> None:
    """Replace the file atomically (write a temporary file, then rename), as editors and
    configuration management do: the daemon never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def routes_toml(routes: dict[int, str], *, head: str = "") -> str:
    """A [routes] table (after ``head``): a value is a spec string, or an inline table as written."""
    lines = [f"{port} = {value}" if value.startswith("{") else f'{port} = "{value}"' for port, value in routes.items()]
    return head + "[routes]\n" + "".join(line + "\n" for line in lines)


def reload_records(daemon) -> list[dict]:
    return [r for r in daemon._records_so_far() if r.get("event") == "reload"]


def reloading_daemon(config: Path, ports: list[int], admin: int, tmp_path: Path, *extra: str):
    listen = [a for p in ports for a in ("--listen", f"127.0.0.1:{p}")]
    return admin_daemon([*listen, "--config", str(config), *extra], admin, tmp_path)
