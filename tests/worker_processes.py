"""The processes of a ``--workers N`` daemon, seen from outside: which one served a
connection (its log record), its helpers (child processes), whether one is still alive."""

from __future__ import annotations

import os
import subprocess


def worker_of(rec: dict) -> int:
    """The process that wrote log record ``rec``: a helper's records carry ``worker`` (its
    index); the main process's have none (0 here)."""
    return rec.get("worker", 0)


def helpers_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (the helpers of a main process)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
