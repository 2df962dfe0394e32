"""Fault injection on the configuration: files and values that crashed, froze or fooled
the daemon. Each must be refused with a ConfigError that names the file (and line, key or
flag) and the problem; nothing that is serving may be lost because of it.

Two tiers. A table of bad inputs against :func:`ambassadord.sources.load_routes` (pure
logic, but real files: a FIFO, a symlink to /dev/zero, a directory, a unix socket). Then the
real daemon with a real Redis behind it, whose ``--config`` file is swapped for each bad
file in turn: every reload is rejected, the daemon stays up and keeps serving the old
routes (a PING through it, and on a connection opened before), /routes shows the rejected
reload, and the daemon's open file descriptors are back to their baseline.

Nothing sleeps to synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ambassadord.config import ConfigError
from ambassadord.sources import load_routes
from tests.daemon import connect, free_port, ping, wait_until
from tests.admin_client import get_routes, metric, route, scrape
from tests.reload_harness import reload_records, reloading_daemon, routes_toml, write_config

PONG = b"+PONG\r\n"
BACKEND = "127.0.0.1:1"


# ---- bad files ----------------------------------------------------------------------


def deep_array(tmp: Path) -> Path:
    path = tmp / "deep.toml"
    path.write_text(f'[routes]\n6379 = "{BACKEND}"\n[defaults]\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n")
    return path


def deep_inline_table(tmp: Path) -> Path:
    path = tmp / "deep.toml"
    path.write_text("[routes]\n6379 = " + "{ a = " * 50_000 + "1" + " }" * 50_000 + "\n")
    return path


def symlink_to_dev_zero(tmp: Path) -> Path:
    path = tmp / "zero.toml"
    path.symlink_to("/dev/zero")
    return path


def fifo(tmp: Path) -> Path:
    path = tmp / "fifo.toml"
    os.mkfifo(path)
    return path


def directory(tmp: Path) -> Path:
    path = tmp / "dir.toml"
    path.mkdir()
    return path


def unix_socket(tmp: Path) -> Path:
    path = tmp / "sock.toml"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return path


def two_mib(tmp: Path) -> Path:
    path = tmp / "big.toml"
    path.write_text(f'[routes]\n6379 = "{BACKEND}"\n' + "# padding\n" * ((2 << 20) // 10))
    return path


def not_utf8(tmp: Path) -> Path:
    path = tmp / "latin1.toml"
    path.write_bytes(f'[routes]\n# caf\xe9\n6379 = "{BACKEND}"\n'.encode("latin-1"))
    return path


def text(content: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "routes.toml"
        path.write_text(content)
        return path

    return make


def route_with(options: str) -> Callable[[Path], Path]:
    return text(f'[routes]\n6379 = {{ backend = "{BACKEND}", {options} }}\n')


# (make the file, fragments of the message besides the path). Before the fix: the deep
# ones raised RecursionError, /dev/zero read until MemoryError, the FIFO blocked forever,
# the rest were accepted (non-UTF-8 bytes silently replaced).
BAD_FILES = [
    pytest.param(deep_array, ["nested too deeply"], id="deep-array"),
    pytest.param(deep_inline_table, ["nested too deeply"], id="deep-inline-table"),
    pytest.param(symlink_to_dev_zero, ["it is a character device, not a regular file"], id="symlink-dev-zero"),
    pytest.param(fifo, ["it is a FIFO, not a regular file"], id="fifo"),
    pytest.param(directory, ["it is a directory, not a regular file"], id="directory"),
    pytest.param(unix_socket, ["it is a socket, not a regular file"], id="unix-socket"),
    pytest.param(two_mib, ["larger than 1 MiB", "the limit for a config file"], id="2-MiB"),
    pytest.param(not_utf8, [":2: not UTF-8 (byte 0xe9 at column 6)"], id="not-utf8"),
    # Ports: ASCII digits only, in keys and in specs.
    pytest.param(text(f'[routes]\n"６３７９" = "{BACKEND}"\n'),
                 [":2: [routes] ６３７９", "bad port '６３７９'", "ASCII digits"], id="full-width-port-key"),
    pytest.param(text(f'[routes]\n"٦٣٧٩" = "{BACKEND}"\n'), ["bad port '٦٣٧٩'", "ASCII digits"],
                 id="arabic-indic-port-key"),
    pytest.param(text('[routes]\n6379 = "10.0.0.5:６３７９"\n'),
                 [":2: [routes] 6379", "bad port '６３７９' in backend '10.0.0.5:６３７９'", "ASCII digits"],
                 id="full-width-port-in-spec"),
    # Source networks with host bits.
    pytest.param(route_with('source = "172.17.0.1/16"'),
                 [":2: [routes] 6379.source", "'172.17.0.1/16'", "host bits", "did you mean 172.17.0.0/16?"],
                 id="cidr-host-bits"),
    pytest.param(route_with('source = "fd00::1/64"'), ["'fd00::1/64'", "did you mean fd00::/64?"],
                 id="cidr-v6-host-bits"),
    # Durations: TOML numbers, in range.
    pytest.param(route_with('connect_timeout = "2"'),
                 [":2: [routes] 6379.connect_timeout", "bad duration '2'", "a string", "TOML number"],
                 id="duration-string"),
    pytest.param(text('[defaults]\neject_for = "10s"\n[routes]\n6379 = "127.0.0.1:1"\n'),
                 [":2: [defaults] eject_for", "bad duration '10s'", "a string"], id="default-duration-string"),
    pytest.param(route_with("eject_for = 1e300"), ["bad duration 1e+300", "at most 86400 seconds (a day)"],
                 id="eject-for-1e300"),
    pytest.param(route_with("eject_for = 99999999999999999999999999999999999999999999"),
                 ["bad duration 9999", "at most 86400 seconds"], id="eject-for-huge-int"),
    pytest.param(route_with("connect_timeout = 7200"), ["bad duration 7200", "at most 3600 seconds (an hour)"],
                 id="connect-timeout-2h"),
    pytest.param(route_with("idle_timeout = 1e9"), ["bad duration 1000000000.0", "up to 604800 seconds (a week)"],
                 id="idle-timeout-30-years"),
    pytest.param(route_with("connect_timeout = true"), ["bad duration True", "not a boolean"], id="duration-bool"),
    pytest.param(route_with("connect_timeout = [2]"), ["bad duration [2]", "not an array"], id="duration-array"),
    pytest.param(route_with("eject_for = nan"), ["bad duration nan"], id="duration-nan"),
    pytest.param(route_with("idle_timeout = inf"), ["bad duration inf"], id="duration-inf"),
    pytest.param(route_with("eject_for = -inf"), ["bad duration -inf"], id="duration-minus-inf"),
    pytest.param(route_with("connect_timeout = -1"), ["bad duration -1", "more than 0"], id="duration-negative"),
    pytest.param(route_with("connect_timeout = 0"), ["bad duration 0", "more than 0"], id="connect-timeout-0"),
    pytest.param(route_with("idle_timeout = -0.5"), ["bad duration -0.5", "0 (never) or up to"],
                 id="idle-timeout-negative"),
]


def load_within(seconds: float, **kw):
    """load_routes(**kw), failing (not hanging) if it has not returned within ``seconds``."""
    outcome: list = []

    def run():
        try:
            outcome.append(load_routes(**kw))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert outcome, f"load_routes({kw}) still blocked after {seconds}s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


@pytest.mark.parametrize("make, fragments", BAD_FILES)
def test_bad_file_is_a_config_error_naming_file_and_problem(tmp_path, make, fragments):
    path = str(make(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_within(10, config_file=path)
    message = str(err.value)
    assert path in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert len(message) < 400, message  # quoted values are bounded


# (load_routes keyword arguments, fragments of the message). Before: every one accepted,
# except --map -1 (which argparse did not pass on; tests/test_cli.py) and bool/NaN/negative
# durations (already refused, now with the bounds in the message).
BAD_VALUES = [
    pytest.param(dict(maps=[f"６３７９={BACKEND}"]), [f"bad port '６３７９' in --map ６３７９={BACKEND}", "ASCII"],
                 id="map-full-width-port"),
    pytest.param(dict(maps=[f"-1={BACKEND}"]), [f"bad port '-1' in --map -1={BACKEND}"], id="map-minus-1"),
    pytest.param(dict(maps=[f"6379@172.17.0.1/16={BACKEND}"]),
                 [f"--map 6379@172.17.0.1/16={BACKEND}", "host bits", "did you mean 172.17.0.0/16?"],
                 id="map-cidr-host-bits"),
    pytest.param(dict(env={"BACKEND_６３７９": BACKEND}), [f"env BACKEND_６３７９={BACKEND}", "bad port '６３７９'"],
                 id="env-full-width-port"),
    pytest.param(dict(env={"R_PORT_６３７９_TCP": f"tcp://{BACKEND}"}, link_env=True),
                 ["env R_PORT_６３７９_TCP", "bad port '６３７９'"], id="link-env-full-width-port"),
    pytest.param(dict(maps=[f"6379={BACKEND}"], flag_defaults={"connect_timeout": 7200.0}),
                 ["--connect-timeout: bad duration 7200.0", "at most 3600"], id="flag-connect-timeout-2h"),
    pytest.param(dict(maps=[f"6379={BACKEND}"], flag_defaults={"eject_for": 0.0}),
                 ["--eject-for: bad duration 0.0", "more than 0"], id="flag-eject-for-0"),
]


@pytest.mark.parametrize("kwargs, fragments", BAD_VALUES)
def test_bad_value_is_a_config_error_naming_it_and_where(kwargs, fragments):
    with pytest.raises(ConfigError) as err:
        load_routes(**kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {str(err.value)!r}"


def test_values_at_the_bounds_are_accepted(tmp_path):
    f = tmp_path / "routes.toml"
    f.write_text('[defaults]\nidle_timeout = 604800\n[routes]\n'
                 f'6379 = {{ backend = "{BACKEND}", connect_timeout = 3600, eject_for = 86400, '
                 'source = "172.17.0.0/16" }\n'
                 f'6380 = {{ backend = "{BACKEND}", idle_timeout = 0, connect_timeout = 0.001 }}\n')
    by_port = {r.port: r for r in load_routes(config_file=str(f)).routes}
    r = by_port[6379]
    assert (r.connect_timeout, r.eject_for, r.idle_timeout, str(r.source)) == (3600, 86400, 604800, "172.17.0.0/16")
    assert (by_port[6380].idle_timeout, by_port[6380].connect_timeout) == (None, 0.001)
    # A flag of 0 for the idle timeout means never, and beats [defaults].
    routes = load_routes(config_file=str(f), flag_defaults={"idle_timeout": 0.0}).routes
    assert {r.port: r.idle_timeout for r in routes} == {6379: None, 6380: None}


# ---- the real daemon ----------------------------------------------------------------


def open_files(pid: int) -> list[str]:
    """What the process has open, sockets left out (the admin API closes an HTTP
    connection a few seconds after its client; the test counts connections in /routes)."""
    fd_dir, targets = f"/proc/{pid}/fd", []
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            targets.append(os.readlink(f"{fd_dir}/{fd}"))
    return sorted(t for t in targets if not t.startswith("socket:"))


def wait_reloads_alive(admin: int, ok: int, failed: int, d) -> dict:
    """Wait for ``ok`` good and ``failed`` rejected reloads; fail at once, with the log,
    if the daemon exits meanwhile."""
    def done() -> bool:
        assert d.alive(), d.describe()
        cfg = get_routes(admin)["config"]
        return (cfg["reloads"], cfg["reloads_failed"]) == (ok, failed)

    wait_until(done, timeout=10, what=d.describe)
    return get_routes(admin)


# (make the file, fragment of the error). Before the fix: the deep ones made the daemon
# exit 1 (RecursionError) at once; /dev/zero (read until MemoryError) and the FIFO (open
# waits for a writer) froze the reload; the 2 MiB and non-UTF-8 files were taken.
BAD_RELOADS = [
    pytest.param(deep_array, "nested too deeply", id="deep-array"),
    pytest.param(deep_inline_table, "nested too deeply", id="deep-inline-table"),
    pytest.param(symlink_to_dev_zero, "it is a character device, not a regular file", id="symlink-dev-zero"),
    pytest.param(fifo, "it is a FIFO, not a regular file", id="fifo"),
    pytest.param(two_mib, "larger than 1 MiB", id="2-MiB"),
    pytest.param(not_utf8, ":2: not UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize("make, fragment", BAD_RELOADS)
def test_reload_of_a_bad_file_keeps_the_daemon_and_its_routes(redis, tmp_path, make, fragment):
    listen = free_port()
    config, admin = tmp_path / "routes.toml", free_port()
    good = routes_toml({listen: f"127.0.0.1:{redis.port}"})
    write_config(config, good)
    with reloading_daemon(config, [listen], admin, tmp_path, "--config-poll", "0.1", "--workers", "1") as d:
        with contextlib.closing(connect("127.0.0.1", listen)) as held:
            assert ping(held) == PONG
            baseline = open_files(d.proc.pid)
            (tmp_path / "incoming").mkdir()
            os.replace(make(tmp_path / "incoming"), config)  # at once, as a reload sees it

            snap = wait_reloads_alive(admin, 0, 1, d)
            last = snap["config"]["last_reload"]
            assert last["ok"] is False and str(config) in last["error"] and fragment in last["error"], last
            [rejected] = [r for r in reload_records(d) if r["ok"] is False]
            assert rejected["error"] == last["error"] and "still serving the previous configuration" in rejected["msg"]
            assert route(snap, str(listen))["spec"] == f"127.0.0.1:{redis.port}"
            with contextlib.closing(connect("127.0.0.1", listen)) as c:
                assert ping(c) == PONG  # the old route serves new connections ...
            assert ping(held) == PONG  # ... and the one it had
            # Nothing left open by the rejected file, and only the held connection once
            # the one just closed is over.
            wait_until(lambda: get_routes(admin)["connections"]["active"] == 1
                       and open_files(d.proc.pid) == baseline, timeout=5,
                       what=lambda: f"open: {open_files(d.proc.pid)}, before the reload: {baseline}; "
                       f"{get_routes(admin)['connections']}")

            write_config(config, good)  # a good file is taken again
            assert wait_reloads_alive(admin, 1, 1, d)["config"]["last_reload"]["ok"] is True
            m = scrape(admin)
            assert metric(m, "ambassadord_config_reloads_total", result="error") == 1
            assert metric(m, "ambassadord_config_reloads_total", result="ok") == 1
            assert ping(held) == PONG
        d.stop()
