"""The command line, run as a real subprocess: usage errors, check, resolve, iptables;
and, in process, the settings made of flags and env, and a start that fails late.

Every bad input must exit 2 with a message on stderr that names the bad value and where
it came from (flag, file and line, environment variable), and must leave nothing behind:
no listener, no iptables chain. Tests that touch iptables or need an isolated network run
inside a fresh network namespace (tests/netns.py), so nothing here can reach the outside
world or disturb the host's nat table.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ambassadord.cli import build_parser
from tests.daemon import REPO_ROOT, Daemon, free_port, refused, wait_until
from tests.netns import Netns

CHAIN = "AMBASSADORD-10000"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would add routes on its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BACKEND_") and not re.fullmatch(r"[A-Za-z0-9_]+_PORT_\d+_TCP", k)
    }
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, ns: Netns | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess:
    """``python -m ambassadord ARGS...``; its status, stdout and stderr as text."""
    cmd = [sys.executable, "-m", "ambassadord", *args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns.name, *cmd]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, no traceback, and every needle on stderr."""
    shown = f"status {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not on stderr; {shown}"


def nat_tables(ns: Netns) -> str:
    return ns.exec(["iptables-save", "-t", "nat"]) + ns.exec(["ip6tables-save", "-t", "nat"])


def nat_rules(ns: Netns) -> list[str]:
    """The nat rules and chains of both families, without comments and counters: comparable
    before and after."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in ns.exec([tool, "-t", "nat"]).splitlines():
            if line.startswith("#"):
                continue
            out.append(re.sub(r"\[\d+:\d+\]", "", line).strip())
    return out


# ---- bad flags -------------------------------------------------------------------------

BAD_FLAGS = [
    pytest.param(["--listen", "nonsense", "--map", "6379=1.2.3.4:1"], ["--listen", "nonsense"], id="listen-nonsense"),
    pytest.param(["--listen", "[::1]10000", "--map", "6379=1.2.3.4:1"], ["--listen", "[::1]10000"], id="listen-v6-no-colon"),
    pytest.param(["--listen", "::1:10000", "--map", "6379=1.2.3.4:1"], ["--listen", "::1:10000"], id="listen-v6-no-brackets"),
    pytest.param(["--listen", "127.0.0.1:0", "--map", "6379=1.2.3.4:1"], ["--listen", "127.0.0.1:0"], id="listen-port-0"),
    pytest.param(["--connect-timeout", "-1", "--map", "6379=1.2.3.4:1"], ["--connect-timeout", "-1"], id="connect-timeout-negative"),
    pytest.param(["--grace", "soon", "--map", "6379=1.2.3.4:1"], ["--grace", "soon"], id="grace-not-a-number"),
    pytest.param(["--balance", "fastest", "--map", "6379=1.2.3.4:1"], ["--balance", "fastest"], id="balance-unknown"),
    pytest.param(["--map", "70000=1.2.3.4:1"], ["--map 70000=1.2.3.4:1", "70000"], id="map-port-too-big"),
    pytest.param(["--map", "6379=host:redis"], ["--map 6379=host:redis", "'redis'"], id="map-spec-bad-port"),
    pytest.param(["--map", "6379=srv://bad name"], ["--map 6379=srv://bad name", "'bad name'"], id="map-srv-bad-name"),
    pytest.param(["--map", "6379=dns://redis.example"], ["--map 6379=dns://redis.example", "dns://NAME:PORT"],
                 id="map-dns-no-port"),
    pytest.param(["--map", "6379=[zz::1]:1"], ["--map 6379=[zz::1]:1", "zz::1"], id="map-bad-ipv6"),
    pytest.param(["--map", "x=1.2.3.4:1"], ["--map x=1.2.3.4:1", "'x'"], id="map-port-not-a-number"),
    pytest.param(["--map", "6379"], ["--map 6379"], id="map-no-equals"),
    pytest.param(["--map", "6379=1.2.3.4:99999"], ["--map 6379=1.2.3.4:99999", "99999"], id="map-backend-port-too-big"),
    pytest.param(["--map", "6379@10.0.0.0/33=1.2.3.4:1"], ["--map 6379@10.0.0.0/33=1.2.3.4:1", "10.0.0.0/33"], id="map-bad-cidr"),
    pytest.param(["--map", "6379=1.2.3.4:1", "--iptables-dest", "not-an-ip"], ["--iptables-dest", "not-an-ip"], id="iptables-dest"),
    pytest.param(["--map", "6379=1.2.3.4:1", "--mark", "0"], ["--mark", "'0'"], id="mark-zero"),
    # Numbers are ASCII digits; durations are bounded; a bad value is quoted.
    pytest.param(["--map", "６３７９=1.2.3.4:1"], ["--map ６３７９=1.2.3.4:1", "'６３７９'", "ASCII"], id="map-full-width-port"),
    pytest.param(["--map", "-1=1.2.3.4:1"], ["--map -1=1.2.3.4:1", "bad port '-1'"], id="map-port-minus-1"),
    pytest.param(["--map", "6379@172.17.0.1/16=1.2.3.4:1"], ["'172.17.0.1/16'", "did you mean 172.17.0.0/16?"],
                 id="map-cidr-host-bits"),
    pytest.param(["--connect-timeout", "1e300", "--map", "6379=1.2.3.4:1"], ["--connect-timeout", "'1e300'", "604800"],
                 id="connect-timeout-1e300"),
    pytest.param(["--connect-timeout", "7200", "--map", "6379=1.2.3.4:1"], ["--connect-timeout", "7200", "at most 3600"],
                 id="connect-timeout-2h"),
    pytest.param(["--connect-timeout", "0", "--map", "6379=1.2.3.4:1"], ["--connect-timeout", "more than 0"],
                 id="connect-timeout-0"),
    pytest.param(["--eject-for", "nan", "--map", "6379=1.2.3.4:1"], ["--eject-for", "'nan'"], id="eject-for-nan"),
    pytest.param(["--idle-timeout", "inf", "--map", "6379=1.2.3.4:1"], ["--idle-timeout", "'inf'"], id="idle-timeout-inf"),
    pytest.param(["--grace", "５", "--map", "6379=1.2.3.4:1"], ["--grace", "'５'"], id="grace-full-width"),
    pytest.param(["--workers", "４", "--map", "6379=1.2.3.4:1"], ["--workers", "'４'"], id="workers-full-width"),
    pytest.param(["--sockmap-size", "４", "--map", "6379=1.2.3.4:1"], ["--sockmap-size", "'４'"],
                 id="sockmap-size-full-width"),
    pytest.param(["--mark", "４", "--map", "6379=1.2.3.4:1"], ["--mark", "'４'"], id="mark-full-width"),
]


@pytest.mark.parametrize("args, needles", BAD_FLAGS)
def test_bad_flag_exits_2_naming_it(args, needles):
    assert_usage_error(cli("run", *args), *needles)


@pytest.mark.parametrize("args, message", [
    (["run", "--grace", "soon"], "ambassadord run: error: argument --grace: 'soon': expected a number of seconds"),
    (["run", "--balance", "fastest"], "ambassadord run: error: argument --balance: invalid choice: 'fastest'"),
    (["run", "--no-such-flag"], "ambassadord run: error: unrecognized arguments: --no-such-flag"),
    (["status", "--timeout"], "ambassadord status: error: argument --timeout: expected one argument"),
    (["iptables", "insatll"], "ambassadord iptables: error: argument action: invalid choice: 'insatll'"),
    (["resolve"], "ambassadord resolve: error: the following arguments are required: SPEC"),
    (["bogus"], "ambassadord: error: argument COMMAND: invalid choice: 'bogus'"),
    ([], "ambassadord: error: the following arguments are required: COMMAND"),
])
def test_a_flag_error_is_one_line_and_a_pointer_to_help(args, message):
    """Not argparse's usage dump first (17 lines for run), which buried the line that matters."""
    proc = cli(*args)
    assert_usage_error(proc)
    command = " ".join(["ambassadord", *args[:1]]) if args and args[0] != "bogus" else "ambassadord"
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(message), proc.stderr
    assert lines[1] == f"(see {command} --help)", proc.stderr


def test_run_admin_takes_an_ip_address_and_says_why_not_a_name():
    proc = cli("run", "--map", "6379=1.2.3.4:1", "--admin", "localhost:10001")
    assert_usage_error(proc, "--admin", "'localhost:10001'", "listens on an IP address, e.g. 127.0.0.1:10001",
                       "status --admin takes a host name")


def test_run_without_routes_says_where_routes_come_from():
    proc = cli("run")
    assert_usage_error(proc, "no routes", "--map", "--config", "BACKEND_")


# ---- config file -----------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_missing_config_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert_usage_error(cli("run", "--config", missing), missing, "No such file")


def test_unreadable_config_file_is_a_directory(tmp_path):
    assert_usage_error(cli("run", "--config", str(tmp_path)), str(tmp_path))


def test_invalid_toml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "bad.toml", '[routes]\n6379 = "1.2.3.4:1"\n6380 = \n')
    assert_usage_error(cli("run", "--config", path), path, "TOML", "line 3")


def test_route_key_that_is_not_a_port_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "key.toml", '[routes]\n6379 = "1.2.3.4:1"\nredis = "1.2.3.4:1"\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:3", "redis")


def test_route_port_out_of_range_in_file(tmp_path):
    path = write(tmp_path, "range.toml", '[routes]\n65536 = "1.2.3.4:1"\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "65536")


def test_bad_spec_in_file_names_file_line_and_value(tmp_path):
    path = write(tmp_path, "spec.toml", '# routes\n[routes]\n6379 = "1.2.3.4:1"\n6380 = "1.2.3.4:http"\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:4", "6380", "1.2.3.4:http")


def test_bad_spec_in_route_table_names_file_line_and_value(tmp_path):
    path = write(tmp_path, "spec.toml", '[routes]\n6379 = { backend = "[zz::1]:6379" }\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "zz::1")


def test_bad_option_value_in_route_table(tmp_path):
    path = write(tmp_path, "opt.toml", '[routes]\n6379 = { backend = "1.2.3.4:1", balance = "fastest" }\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "balance", "fastest")


def test_unknown_option_in_route_table(tmp_path):
    path = write(tmp_path, "opt.toml", '[routes]\n6379 = { backend = "1.2.3.4:1", colour = "red" }\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "colour")


def test_route_table_without_backend(tmp_path):
    path = write(tmp_path, "nobackend.toml", '[routes]\n6379 = { balance = "random" }\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "backend")


def test_unknown_top_level_table(tmp_path):
    path = write(tmp_path, "top.toml", '[routes]\n6379 = "1.2.3.4:1"\n\n[rootes]\n6380 = "1.2.3.4:2"\n')
    assert_usage_error(cli("run", "--config", path), path, "rootes")


def test_unknown_option_in_defaults(tmp_path):
    path = write(tmp_path, "defaults.toml", '[defaults]\nretries = 3\n[routes]\n6379 = "1.2.3.4:1"\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", "retries")


def test_duplicate_port_across_map_and_file_names_both(tmp_path):
    path = write(tmp_path, "dup.toml", '[routes]\n6379 = "1.2.3.4:1"\n')
    proc = cli("run", "--config", path, "--map", "6379=5.6.7.8:1")
    assert_usage_error(proc, "6379", f"{path}:2", "--map 6379=5.6.7.8:1")


def test_duplicate_port_across_map_and_env_names_both():
    proc = cli("run", "--map", "6379=5.6.7.8:1", env={"BACKEND_6379": "1.2.3.4:1"})
    assert_usage_error(proc, "6379", "--map 6379=5.6.7.8:1", "BACKEND_6379")


# ---- environment -----------------------------------------------------------------------


@pytest.mark.parametrize("spec, meant", [
    ("consul//redis", "did you mean consul:///redis?"),
    ("etcd://services/redis", "did you mean etcd:///services/redis (three slashes"),
    ("consul-kv://services/redis", "did you mean consul-kv:///services/redis (three slashes"),
])
def test_spec_typo_says_what_was_meant_and_where(tmp_path, spec, meant):
    assert_usage_error(cli("check", "--map", f"6379={spec}"), f"--map 6379={spec}: spec {spec!r}: ", meant)
    path = write(tmp_path, "routes.toml", f'[routes]\n6379 = "{spec}"\n')
    assert_usage_error(cli("run", "--config", path), f"{path}:2", meant)


@pytest.mark.netns
def test_resolve_of_a_lost_slash_connects_nowhere(ns):
    """etcd://services/redis used to try an etcd at a host called services, until a timeout."""
    proc = cli("resolve", "etcd://services/redis", ns=ns, timeout=10)
    assert_usage_error(proc, "did you mean etcd:///services/redis")


def test_bad_backend_env_names_the_variable():
    proc = cli("run", env={"BACKEND_6379": "non sense"})
    assert_usage_error(proc, "BACKEND_6379", "non sense")


def test_backend_env_port_out_of_range():
    proc = cli("run", env={"BACKEND_99999": "1.2.3.4:1"})
    assert_usage_error(proc, "BACKEND_99999", "99999")


def test_link_env_not_tcp_names_the_variable():
    proc = cli("run", "--link-env", env={"REDIS_PORT_6379_TCP": "udp://1.2.3.4:6379"})
    assert_usage_error(proc, "REDIS_PORT_6379_TCP", "udp://1.2.3.4:6379")


def test_link_env_ignored_without_the_flag():
    # Without --link-env, Docker link variables are not routes: still "no routes".
    proc = cli("run", env={"REDIS_PORT_6379_TCP": "tcp://1.2.3.4:6379"})
    assert_usage_error(proc, "no routes")


# ---- a failed start leaves nothing behind ---------------------------------------------


@pytest.mark.netns
def test_bad_route_with_iptables_leaves_nothing_behind(ns):
    before = nat_rules(ns)
    proc = cli("run", "--iptables", "--listen", "127.0.0.1:10000", "--map", "6379=1.2.3.4:1",
               "--map", "6380=host:port", ns=ns)
    assert_usage_error(proc, "--map 6380=host")
    assert "AMBASSADORD" not in nat_tables(ns)
    assert nat_rules(ns) == before
    assert refused("127.0.0.1", 10000, ns=ns)


@pytest.mark.netns
def test_unknown_iptables_interface_leaves_nothing_behind(ns):
    proc = cli("run", "--iptables", "--iptables-interface", "nosuch0", "--listen", "127.0.0.1:10000",
               "--map", "6379=1.2.3.4:1", ns=ns)
    assert_usage_error(proc, "nosuch0")
    assert "AMBASSADORD" not in nat_tables(ns)
    assert refused("127.0.0.1", 10000, ns=ns)


@pytest.mark.netns
def test_listener_that_cannot_bind_leaves_nothing_behind(ns):
    # The second listen address is taken: the first, already bound, must be closed again,
    # and the iptables rules must never have been installed.
    with ns.socket() as taken:
        taken.bind(("127.0.0.1", 10002))
        taken.listen(1)
        proc = cli("run", "--iptables", "--listen", "127.0.0.1:10000", "--listen", "127.0.0.1:10002",
                   "--map", "6379=1.2.3.4:1", ns=ns)
    assert proc.returncode == 1, proc.stderr
    assert "127.0.0.1:10002" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "AMBASSADORD" not in nat_tables(ns)
    assert refused("127.0.0.1", 10000, ns=ns)


@pytest.fixture
def logging_restored():
    """daemon.run sets up the root logger for itself: put the test's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_a_start_that_fails_late_closes_what_the_earlier_steps_opened(taken, logging_restored):
    """In process, so that what a failed start leaves open shows: the instance guard and
    the listeners bound before a later step failed are closed, and the signals it blocked
    are unblocked. (Before the ExitStack, both were left to the garbage collector.)"""
    from ambassadord import daemon
    from ambassadord.settings import run_settings

    port, second, admin = free_port(), free_port(), free_port()
    argv = ["run", "--map", f"{port}=127.0.0.1:1", "--listen", f"127.0.0.1:{port}", "--listen",
            f"127.0.0.1:{second}", "--admin", f"127.0.0.1:{admin}", "--workers", "2", "--sockmap", "off"]
    settings = run_settings(build_parser().parse_args(argv), env={})
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", second if taken == "listen" else admin))
        blocker.listen(1)
        gc.collect()  # what earlier tests left to the collector (a client's pooled sockets) goes now, not mid-count
        fds, mask = open_fds(), signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert daemon.run(settings) == 1
            gc.collect()
        # A socket left open would be closed by the garbage collector, with this warning.
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
        assert open_fds() == fds
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
    for p in (port, second):
        with socket.socket(socket.AF_UNIX) as guard:
            guard.bind(f"\0ambassadord port {p}")  # (EADDRINUSE if the guard were still held)
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


# ---- settings: flags and env, weighed once ---------------------------------------------


def run_settings_of(*argv: str, env: dict[str, str] | None = None):
    from ambassadord.settings import run_settings

    return run_settings(build_parser().parse_args(["run", "--map", "6379=10.0.0.5:6379", *argv]), env or {})


def test_run_settings_are_frozen_and_survive_pickling():
    """What a --workers helper would be sent: every value, as given."""
    import dataclasses
    import pickle

    settings = run_settings_of("--keepalive", "30", "--allow-from", "6379@10.0.0.0/8", "--iptables",
                               "--iptables-dest", "127.0.0.1", "--listen", "[::1]:7000", "--grace", "3",
                               "--consul", "https://10.0.0.9:8501", env={"ETCDCTL_USER": "u:p"})
    assert pickle.loads(pickle.dumps(settings)) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grace = 1
    assert settings.routes.flags.keepalive.idle == 30
    assert settings.iptables.allow_from[0][1] == 6379 and str(settings.iptables.dests[0]) == "127.0.0.1"
    assert [str(a) for a in settings.listen] == ["[::1]:7000"]
    assert (settings.resolver.consul_scheme, settings.resolver.consul_addr) == ("https", ("10.0.0.9", 8501))
    assert settings.resolver.etcd_user == "u:p"


@pytest.mark.parametrize("argv, mark, listen", [
    ([], None, ["0.0.0.0:10000", "[::]:10000"]),  # no --iptables: nothing to exempt
    (["--iptables"], 0x1A3B, ["0.0.0.0:10000", "[::]:10000"]),
    (["--iptables", "--mark", "7", "--listen", "127.0.0.1:9"], 7, ["127.0.0.1:9"]),
    (["--mark", "7"], None, ["0.0.0.0:10000", "[::]:10000"]),
])
def test_upstream_mark_only_under_iptables_and_listen_defaults(argv, mark, listen):
    settings = run_settings_of(*argv)
    assert settings.mark == mark
    assert [str(a) for a in settings.listen] == listen
    assert (settings.iptables is not None) == ("--iptables" in argv)


@pytest.mark.parametrize("argv, env, expected", [
    # The flag beats the env var; the env var beats the default.
    (["--consul", "10.0.0.1:1"], {"CONSUL_HTTP_ADDR": "10.0.0.2:2"}, {"consul_addr": ("10.0.0.1", 1)}),
    ([], {"CONSUL_HTTP_ADDR": "10.0.0.2:2", "CONSUL_HTTP_SSL": "true"},
     {"consul_addr": ("10.0.0.2", 2), "consul_scheme": "https"}),
    ([], {}, {"consul_addr": ("127.0.0.1", 8500), "consul_scheme": "http", "consul_token": None}),
    (["--consul-token", "a"], {"CONSUL_HTTP_TOKEN": "b"}, {"consul_token": "a"}),
    ([], {"CONSUL_HTTP_TOKEN": "b"}, {"consul_token": "b"}),
    (["--etcd", "10.0.0.1:1", "--etcd", "10.0.0.2:2"], {"ETCDCTL_ENDPOINTS": "10.0.0.3:3"},
     {"etcd_endpoints": (("10.0.0.1", 1), ("10.0.0.2", 2))}),
    ([], {"ETCDCTL_ENDPOINTS": "10.0.0.3:3, ,10.0.0.4:4"}, {"etcd_endpoints": (("10.0.0.3", 3), ("10.0.0.4", 4))}),
    (["--etcd-user", "a:1"], {"ETCDCTL_USER": "b:2"}, {"etcd_user": "a:1"}),
    (["--etcd-cert", "/dev/null", "--etcd-key", "/dev/null"], {"ETCDCTL_CACERT": "/dev/null"},
     {"etcd_cert": "/dev/null", "etcd_key": "/dev/null", "etcd_ca": "/dev/null"}),
])
def test_registry_flags_are_weighed_against_their_env_vars(argv, env, expected):
    options = run_settings_of(*argv, env=env).resolver
    assert {k: getattr(options, k) for k in expected} == expected


@pytest.mark.parametrize("argv, env, message", [
    (["--consul-ca", "/nonexistent/ca.pem"], {}, "--consul-ca: cannot read CA file /nonexistent/ca.pem: "),
    ([], {"CONSUL_CACERT": "/nonexistent/ca.pem"}, "env CONSUL_CACERT: cannot read CA file /nonexistent/ca.pem: "),
    (["--etcd-key", "/nonexistent/k"], {"ETCDCTL_KEY": "/dev/null"}, "--etcd-key: cannot read /nonexistent/k: "),
    ([], {"ETCDCTL_CERT": "/nonexistent/c"}, "env ETCDCTL_CERT: cannot read /nonexistent/c: "),
    (["--dns-min-ttl", "5", "--dns-max-ttl", "1"], {}, "--dns-min-ttl 5 is above --dns-max-ttl 1"),
    (["--admin", "127.0.0.1:10000"], {}, "--admin 127.0.0.1:10000: the same address and port as a --listen"),
])
def test_settings_errors_name_the_flag_or_env_var(argv, env, message):
    from ambassadord.settings import UsageError

    with pytest.raises(UsageError) as err:
        run_settings_of(*argv, env=env)
    assert str(err.value).startswith(message), err.value


def test_route_flags_are_defaults_for_every_route_and_check_reads_backend_env_only_with_env():
    settings = run_settings_of("--balance", "round-robin", "--connect-timeout", "3")
    (route,) = settings.routes.load({}).routes
    assert (route.balance, route.connect_timeout) == ("round-robin", 3.0)
    from ambassadord.settings import check_sources

    env = {"BACKEND_6380": "10.0.0.6:1"}
    for argv, ports in ([], [6379]), (["--env"], [6379, 6380]):
        sources = check_sources(build_parser().parse_args(["check", "--map", "6379=10.0.0.5:1", *argv]))
        assert sorted(r.port for r in sources.load(env).routes) == ports


# ---- check -----------------------------------------------------------------------------


def test_check_prints_every_route(tmp_path):
    path = write(
        tmp_path,
        "good.toml",
        "[defaults]\nbalance = \"round-robin\"\n\n[routes]\n"
        "6379 = \"10.0.0.5:6379\"\n"
        "6380 = { backend = \"10.0.0.6:6380,[fd00::7]:6380\", balance = \"random\", source = \"172.17.0.0/16\" }\n",
    )
    proc = cli("check", "--config", path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if re.match(r"\d+\s+\S+\s+\S+:", line)}
    assert set(rows) == {"6379", "6380"}, proc.stdout
    # port, source, spec, balance
    assert rows["6379"][1:4] == ["any", "10.0.0.5:6379", "round-robin"], proc.stdout
    assert rows["6380"][1:4] == ["172.17.0.0/16", "10.0.0.6:6380,[fd00::7]:6380", "random"], proc.stdout
    assert f"{path}:5" in proc.stdout and f"{path}:6" in proc.stdout, proc.stdout
    assert "2 route(s)" in proc.stdout, proc.stdout


def test_check_bad_file_exits_2(tmp_path):
    path = write(tmp_path, "bad.toml", '[routes]\n6379 = "1.2.3.4"\n')
    assert_usage_error(cli("check", "--config", path), f"{path}:2", "1.2.3.4")


def test_check_without_anything_to_check_exits_2():
    proc = cli("check")
    assert_usage_error(proc)
    assert proc.stderr == ("ambassadord check: nothing to check: give --config FILE, --map PORT=SPEC, "
                           "--env or --link-env\n"), proc.stderr


def test_check_of_a_file_without_routes_exits_2_as_run_does(tmp_path):
    path = write(tmp_path, "empty.toml", "[routes]\n")
    checked, ran = cli("check", "--config", path), cli("run", "--config", path)
    assert_usage_error(checked, "no routes")
    assert_usage_error(ran, "no routes")
    assert checked.stderr.removeprefix("ambassadord check: ") == ran.stderr.removeprefix("ambassadord run: ")


@pytest.mark.parametrize("command", ["check", "run"])
def test_config_that_is_a_fifo_is_refused_at_once(tmp_path, command):
    """Before: open() waited for a writer, forever."""
    path = tmp_path / "routes.toml"
    os.mkfifo(path)
    assert_usage_error(cli(command, "--config", str(path), timeout=10), str(path), "it is a FIFO, not a regular file")


def test_config_that_is_a_symlink_to_a_device_is_refused(tmp_path):
    """Before: read /dev/zero until out of memory."""
    path = tmp_path / "routes.toml"
    path.symlink_to("/dev/zero")
    assert_usage_error(cli("check", "--config", str(path), timeout=10), str(path), "character device")


def test_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "routes.toml"
    path.write_bytes(b'[routes]\n6379 = "1.2.3.4:1"\n# \xff\n')
    assert_usage_error(cli("check", "--config", str(path)), f"{path}:3: not UTF-8")


# ---- resolve ---------------------------------------------------------------------------


def test_resolve_prints_one_backend_per_line():
    proc = cli("resolve", "10.0.0.5:6379,[fd00::5]:6380")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["10.0.0.5:6379", "[fd00::5]:6380"]


def test_resolve_bad_spec_exits_2():
    assert_usage_error(cli("resolve", "10.0.0.5"), "10.0.0.5")


@pytest.mark.netns
def test_resolve_unknown_name_exits_1(ns):
    # Inside an empty namespace: no DNS packet can leave the machine.
    proc = cli("resolve", "nosuch.invalid:80", ns=ns)
    assert proc.returncode == 1, f"{proc.returncode}: {proc.stdout} {proc.stderr}"
    assert "nosuch.invalid" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr, proc.stderr


# ---- help and entry points -------------------------------------------------------------


def test_console_script_help():
    script = Path(sys.executable).with_name("ambassadord")
    if not script.exists():
        script = shutil.which("ambassadord")
    assert script, "console script ambassadord not installed"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "iptables", "resolve", "check"):
        assert command in proc.stdout


def test_python_m_help():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: ambassadord" in proc.stdout


def test_run_help_lists_every_flag():
    proc = cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--map", "--config", "--link-env", "--listen", "--balance", "--connect-timeout", "--idle-timeout",
                 "--iptables", "--grace", "--log-format", "--log-level"):
        assert flag in proc.stdout, flag


def help_groups(text: str) -> dict[str, list[str]]:
    """``--help`` output -> {group title: the long flags listed under it}."""
    groups: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
            groups[title] = []
        elif title is not None and (m := re.match(r"\s{2}(?:-\w, )?(--[\w-]+)", line)):
            groups[title].append(m.group(1))
    return groups


def test_run_help_lists_admin_in_its_own_group():
    groups = help_groups(cli("run", "--help").stdout)
    assert groups["admin API"] == ["--admin"], groups
    assert "--admin" not in groups["iptables"], groups
    assert "--iptables" in groups["iptables"], groups


@pytest.mark.parametrize("command, says", [
    ("check", "Validate routes as run would read them"),
    ("resolve", "Resolve SPEC once, as a route would"),
])
def test_check_and_resolve_help_say_what_they_do(command, says):
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    # argparse puts a description between the usage and the first group, after a blank line
    description = proc.stdout.split("\n\n")[1]
    assert " ".join(description.split()).startswith(says), proc.stdout


def test_version_is_the_package_metadata():
    import importlib.metadata

    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ambassadord {importlib.metadata.version('ambassadord')}\n", proc.stdout


# ---- status --------------------------------------------------------------------------


def test_status_admin_takes_a_host_name(tmp_path):
    port, admin = free_port(), free_port()
    args = ["--map", "6379=127.0.0.1:6379", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
            "--workers", "1"]
    with Daemon(args, listen=("127.0.0.1", port), workdir=tmp_path) as daemon:
        def status():
            proc = cli("status", "--admin", f"localhost:{admin}", "--json", timeout=10)
            return proc if proc.returncode == 0 else None

        proc = wait_until(status, timeout=10, what=daemon.describe)
        assert '"port": 6379' in proc.stdout, proc.stdout
        daemon.stop()


@pytest.mark.parametrize("value, needles", [
    ("localhost", ["'localhost'", "expected HOST:PORT"]),
    ("localhost:0", ["'localhost:0'", "expected HOST:PORT"]),
    ("web-:10001", ["'web-:10001'", "host 'web-'"]),
    ("::1:10001", ["'::1:10001'", "[::1]"]),
])
def test_status_admin_bad_address_exits_2(value, needles):
    assert_usage_error(cli("status", "--admin", value), "argument --admin", *needles)


def test_no_command_exits_2():
    proc = cli()
    assert proc.returncode == 2
    assert "COMMAND" in proc.stderr or "required" in proc.stderr, proc.stderr


def test_iptables_install_without_port_exits_2():
    assert_usage_error(cli("iptables", "install"), "--port")


@pytest.mark.parametrize("port", ["0", "６３７９", "-1", "65536"])
def test_iptables_bad_port_exits_2(port):
    assert_usage_error(cli("iptables", "install", "--port", port), "--port", f"'{port}'")


# ---- iptables install / remove ---------------------------------------------------------


@pytest.mark.netns
def test_iptables_install_is_idempotent_and_remove_leaves_no_trace(ns):
    before = nat_rules(ns)
    assert "AMBASSADORD" not in "\n".join(before)

    proc = cli("iptables", "install", "--to-port", "10000", "--port", "6379", "--port", "5432", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert CHAIN in proc.stdout
    for tool in ("iptables-save", "ip6tables-save"):
        saved = ns.exec([tool, "-t", "nat"])
        assert f":{CHAIN}" in saved, saved
        for port in (6379, 5432):
            assert re.search(rf"-A {CHAIN} .*--dport {port} .*REDIRECT --to-ports 10000", saved), saved
        assert f"-A OUTPUT -p tcp -j {CHAIN}" in saved, saved
        assert f"-A PREROUTING -p tcp -j {CHAIN}" in saved, saved
    once = nat_rules(ns)

    proc = cli("iptables", "install", "--to-port", "10000", "--port", "6379", "--port", "5432", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert nat_rules(ns) == once, "installing twice changed the rules"

    proc = cli("iptables", "remove", "--to-port", "10000", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert nat_rules(ns) == before
    assert "AMBASSADORD" not in nat_tables(ns)

    # Removing again is a no-op, not an error.
    proc = cli("iptables", "remove", "--to-port", "10000", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert nat_rules(ns) == before


@pytest.mark.netns
def test_iptables_install_redirects_for_real(ns):
    # The rule a CLI install leaves really sends 127.0.0.1:6379 to port 10000.
    proc = cli("iptables", "install", "--port", "6379", "--ipv4-only", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert "AMBASSADORD" not in ns.exec(["ip6tables-save", "-t", "nat"])
    with ns.socket() as listener:
        listener.bind(("127.0.0.1", 10000))
        listener.listen(1)
        listener.settimeout(5)
        with ns.socket() as client:
            client.settimeout(5)
            client.connect(("127.0.0.1", 6379))
            conn, _ = listener.accept()
            conn.close()
    proc = cli("iptables", "remove", "--ipv4-only", ns=ns)
    assert proc.returncode == 0, proc.stderr
    assert "AMBASSADORD" not in nat_tables(ns)
    with ns.socket() as client:
        client.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", 6379))


@pytest.mark.parametrize("args, env, needles", [
    (["--consul", "unix:///run/consul.sock"], {}, ["--consul 'unix:///run/consul.sock'",
                                                    "scheme must be http or https", "unix sockets"]),
    ([], {"CONSUL_HTTP_ADDR": "ftp://10.0.0.1"}, ["env CONSUL_HTTP_ADDR 'ftp://10.0.0.1'",
                                                 "scheme must be http or https"]),
    (["--etcd", "grpc://10.0.0.1:2379"], {}, ["bad etcd endpoint 'grpc://10.0.0.1:2379'",
                                              "scheme must be http or https"]),
])
def test_agent_and_endpoint_urls_with_another_scheme_are_usage_errors(args, env, needles):
    assert_usage_error(cli("run", "--map", "6379=1.2.3.4:1", *args, env=env), *needles)


def test_the_admin_apis_libraries_load_only_when_it_is_on():
    """Starlette and prometheus_client are about a third of a daemon's imports: `check`,
    `resolve`, `status` and `run --admin off` (every helper of --workers, most tests) do
    without them; the admin API's module loads them when it is started."""
    code = ("import sys, ambassadord.cli, ambassadord.daemon, ambassadord.workers.helper;"
            "print(sorted(m for m in ('starlette', 'prometheus_client', 'hypercorn', 'ambassadord.admin')"
            " if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr
