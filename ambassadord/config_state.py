"""The configuration's state as the daemon loaded it: the file, when, the reloads'
results, and --docker's status. Written by daemon.py, shown by the admin API; a module
of its own so that a daemon with ``--admin off`` never loads the admin API (Starlette,
prometheus_client: about 160 ms of every start)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ConfigState:
    """What the admin API says about configuration and reloads (written by daemon.py)."""

    file: str | None = None
    loaded_at: float = field(default_factory=time.time)
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_at: float | None = None
    last_reload_ok: bool = True
    last_reload_error: str | None = None
    last_reload_summary: str | None = None
    # --docker: the watch's status() (docker_watch.ContainerWatch), for /routes; None: off.
    docker: Callable[[], dict] | None = None

    def succeeded(self, summary: str) -> None:
        self.loaded_at = self.last_reload_at = time.time()
        self.reloads_ok += 1
        self.last_reload_ok, self.last_reload_error, self.last_reload_summary = True, None, summary

    def failed(self, error: str) -> None:
        self.last_reload_at = time.time()
        self.reloads_failed += 1
        self.last_reload_ok, self.last_reload_error, self.last_reload_summary = False, error, None
