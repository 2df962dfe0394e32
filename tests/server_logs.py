"""The logs of the servers a test used (ambassadord, redis-server, consul, etcd ...), and
:func:`tail`, the end of a log file.

Every harness that runs a server process (tests/daemon.py, tests/server_process.py, the
deployments of tests/test_deploy.py) calls :func:`started` with its log file and
:func:`finished` once it stopped; tests/conftest.py attaches the end of every log in
:func:`recent` to the report of a test that fails, so that a failure says what the servers
saw, also when the test stopped them itself.
"""

from __future__ import annotations

from pathlib import Path

_logs: dict[Path, str] = {}  # log file -> title, of servers running or stopped recently
_stopped: set[Path] = set()


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the file ``path`` (or why it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def started(log: Path, title: str) -> None:
    """A server writing to ``log`` runs now; ``title`` names it in a failure report."""
    _logs[log] = title
    _stopped.discard(log)


def finished(log: Path) -> None:
    """The server writing to ``log`` stopped; its log is still shown for the current test."""
    if log in _logs:
        _stopped.add(log)


def recent() -> dict[Path, str]:
    """``{log file: title}`` of servers running now or stopped since :func:`forget_stopped`."""
    return dict(_logs)


def forget_stopped() -> None:
    """Start a new test's record: drop the logs of servers that are no longer running."""
    for path in _stopped:
        _logs.pop(path, None)
    _stopped.clear()
