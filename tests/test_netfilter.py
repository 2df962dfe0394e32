"""Tests of ambassadord.netfilter: the pure renderers by table, then the real thing in
network namespaces (iptables-nft / ip6tables-nft, REDIRECT, SO_ORIGINAL_DST)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ambassadord import netfilter
from ambassadord.netfilter import (
    DEFAULT_MARK,
    NatState,
    NetfilterError,
    RedirectPlan,
    chain_name,
    check_available,
    install,
    interface_addresses,
    remove,
    render_install,
    render_remove,
)
from ambassadord.original_dst import original_destination
from tests.netns import Netns, link, namespaces, require_prerequisites

REPO = Path(__file__).resolve().parent.parent
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
CHAIN = "AMBASSADORD-10000"
MARK_RULE = f"-A {CHAIN} -m mark --mark 0x1a3b -j RETURN"


# --- pure: render_install / render_remove ------------------------------------------------


def _local(port: int, to: int = 10000) -> str:
    return f"-A AMBASSADORD-{to} -p tcp --dport {port} -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {to}"


def _dest(addr: str, port: int, to: int = 10000) -> str:
    return f"-A AMBASSADORD-{to} -d {addr} -p tcp --dport {port} -j REDIRECT --to-ports {to}"


def _text(*lines: str) -> str:
    return "\n".join(lines) + "\n"


IN_CHAIN = f"{CHAIN}-IN"
ANCHOR = f"-A {CHAIN} -p tcp -m mark --mark 0x1a3b -j REDIRECT --to-ports 10000"
JUMP_OUT = f"-I OUTPUT -p tcp -j {CHAIN}"
JUMP_PRE = f"-I PREROUTING -p tcp -j {IN_CHAIN}"


def _head(to: int = 10000, mark: str = "0x1a3b") -> list[str]:
    """The start of every install: both chains declared (created or flushed), the mark's
    RETURN, and the anchor REDIRECT that never matches."""
    chain = f"AMBASSADORD-{to}"
    return [f":{chain} - [0:0]", f":{chain}-IN - [0:0]", f"-A {chain} -m mark --mark {mark} -j RETURN",
            f"-A {chain} -p tcp -m mark --mark {mark} -j REDIRECT --to-ports {to}"]


INSTALL_CASES = [
    pytest.param(
        RedirectPlan(10000, (6379, 11211)),
        4,
        set(),
        _text("*nat", *_head(), _local(6379), _local(11211), JUMP_OUT, JUMP_PRE, "COMMIT"),
        id="local-v4-no-jumps",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,)),
        6,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _local(6379), "COMMIT"),
        id="local-v6-jumps-exist",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,)),
        4,
        {"PREROUTING"},
        _text("*nat", *_head(), _local(6379), JUMP_OUT, "COMMIT"),
        id="only-missing-jump-added",
    ),
    pytest.param(
        RedirectPlan(10000, (6379, 80), dests=(V4("172.17.0.1"), V6("fd00::5"), V4("10.0.0.1"))),
        4,
        {"OUTPUT", "PREROUTING"},
        _text(
            "*nat",
            *_head(),
            _dest("172.17.0.1", 6379),
            _dest("10.0.0.1", 6379),
            _dest("172.17.0.1", 80),
            _dest("10.0.0.1", 80),
            "COMMIT",
        ),
        id="dests-v4-only-v4-addresses",
    ),
    pytest.param(
        RedirectPlan(10000, (6379, 80), dests=(V4("172.17.0.1"), V6("fd00::5"))),
        6,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _dest("fd00::5", 6379), _dest("fd00::5", 80), "COMMIT"),
        id="dests-v6-only-v6-addresses",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,), dests=(V4("172.17.0.1"),)),
        6,
        set(),
        _text("*nat", *_head(), JUMP_OUT, JUMP_PRE, "COMMIT"),
        id="dests-none-of-family-mark-only-chain",
    ),
    pytest.param(
        RedirectPlan(7000, [443, 443, 22], mark=0xFF),
        4,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(7000, "0xff"), _local(443, 7000), _local(22, 7000), "COMMIT"),
        id="custom-port-and-mark-duplicates-dropped",
    ),
    pytest.param(
        RedirectPlan(10000, ()),
        4,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), "COMMIT"),
        id="no-ports-anchor-stays",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,), from_interfaces=("docker0", "br-0a1b2c3d4e5f"),
                     allow_from=((ipaddress.ip_network("10.0.0.0/8"), None),
                                 (ipaddress.ip_network("192.168.0.0/16"), 6379),
                                 (ipaddress.ip_network("::/0"), None))),
        4,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _local(6379),
              f"-A {IN_CHAIN} -i docker0 -j {CHAIN}",
              f"-A {IN_CHAIN} -i br-0a1b2c3d4e5f -j {CHAIN}",
              f"-A {IN_CHAIN} -s 10.0.0.0/8 -j {CHAIN}",
              f"-A {IN_CHAIN} -s 192.168.0.0/16 -p tcp --dport 6379 -j {CHAIN}",
              "COMMIT"),
        id="bridges-and-allowed-networks-v4",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,), from_interfaces=("docker0",),
                     allow_from=((ipaddress.ip_network("10.0.0.0/8"), None), (ipaddress.ip_network("::/0"), 6379))),
        6,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _local(6379),
              f"-A {IN_CHAIN} -i docker0 -j {CHAIN}",
              f"-A {IN_CHAIN} -s ::/0 -p tcp --dport 6379 -j {CHAIN}",
              "COMMIT"),
        id="bridges-and-allowed-networks-v6",
    ),
    pytest.param(
        # --docker: 6380 only containers declare; 6379 is also a host route (so not twice).
        RedirectPlan(10000, (6379,), from_interfaces=("docker0", "br-1"), bridge_ports=(6380, 6379, 6380)),
        4,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _local(6379),
              f"-A {IN_CHAIN} -i docker0 -p tcp --dport 6380 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 10000",
              f"-A {IN_CHAIN} -i docker0 -j {CHAIN}",
              f"-A {IN_CHAIN} -i br-1 -p tcp --dport 6380 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 10000",
              f"-A {IN_CHAIN} -i br-1 -j {CHAIN}",
              "COMMIT"),
        id="container-ports-from-bridges-only",
    ),
    pytest.param(
        RedirectPlan(10000, (), dests=(V4("172.17.0.1"), V6("fd00::1")), from_interfaces=("docker0",),
                     bridge_ports=(6380,)),
        6,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(),
              f"-A {IN_CHAIN} -i docker0 -d fd00::1 -p tcp --dport 6380 -j REDIRECT --to-ports 10000",
              f"-A {IN_CHAIN} -i docker0 -j {CHAIN}",
              "COMMIT"),
        id="container-ports-with-dests-v6",
    ),
    pytest.param(
        RedirectPlan(10000, (6379,), from_interfaces=("docker0",), bridge_ports=(6380,), bridge_all=True),
        4,
        {"OUTPUT", "PREROUTING"},
        _text("*nat", *_head(), _local(6379),
              f"-A {IN_CHAIN} -i docker0 -p tcp -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 10000",
              f"-A {IN_CHAIN} -i docker0 -j {CHAIN}",
              "COMMIT"),
        id="docker-every-port-from-bridges",
    ),
]


@pytest.mark.parametrize(("plan", "family", "existing", "expected"), INSTALL_CASES)
def test_render_install(plan: RedirectPlan, family: int, existing: set[str], expected: str) -> None:
    assert render_install(plan, family, existing) == expected


def test_render_install_replaces_an_older_layouts_jump() -> None:
    # Before the -IN chain, PREROUTING jumped to the main chain: an upgrade replaces it.
    text = render_install(RedirectPlan(10000, (6379,)), 4, {"OUTPUT"}, [("PREROUTING", CHAIN)])
    assert text == _text("*nat", f"-D PREROUTING -p tcp -j {CHAIN}", *_head(), _local(6379), JUMP_PRE, "COMMIT")


def _state(jumps: set[str], chains: set[str], stale=()) -> NatState:
    return NatState(chains=chains, jumps=jumps, stale_jumps=list(stale))


REMOVE_CASES = [
    pytest.param(
        _state({"OUTPUT", "PREROUTING"}, {CHAIN, IN_CHAIN}),
        False,
        _text(
            "*nat",
            f"-D OUTPUT -p tcp -j {CHAIN}",
            f"-D PREROUTING -p tcp -j {IN_CHAIN}",
            f":{IN_CHAIN} - [0:0]",
            f"-X {IN_CHAIN}",
            f":{CHAIN} - [0:0]",
            f"-X {CHAIN}",
            "COMMIT",
        ),
        id="everything",
    ),
    pytest.param(
        _state({"OUTPUT", "PREROUTING"}, {CHAIN, IN_CHAIN}),
        True,
        _text("*nat", f"-D OUTPUT -p tcp -j {CHAIN}", f"-D PREROUTING -p tcp -j {IN_CHAIN}", "COMMIT"),
        id="jumps-only-chains-stay",
    ),
    pytest.param(
        _state({"PREROUTING"}, {CHAIN, IN_CHAIN}),
        False,
        _text("*nat", f"-D PREROUTING -p tcp -j {IN_CHAIN}", f":{IN_CHAIN} - [0:0]", f"-X {IN_CHAIN}",
              f":{CHAIN} - [0:0]", f"-X {CHAIN}", "COMMIT"),
        id="one-jump",
    ),
    pytest.param(
        _state(set(), {CHAIN}, [("PREROUTING", CHAIN)]),
        False,
        _text("*nat", f"-D PREROUTING -p tcp -j {CHAIN}", f":{CHAIN} - [0:0]", f"-X {CHAIN}", "COMMIT"),
        id="older-layout",
    ),
    pytest.param(_state(set(), {CHAIN}), False, _text("*nat", f":{CHAIN} - [0:0]", f"-X {CHAIN}", "COMMIT"),
                 id="chain-only"),
    pytest.param(_state(set(), set()), False, "", id="nothing-installed"),
    pytest.param(_state(set(), {CHAIN, IN_CHAIN}), True, "", id="jumps-only-nothing-to-do"),
]


@pytest.mark.parametrize(("state", "jumps_only", "expected"), REMOVE_CASES)
def test_render_remove(state: NatState, jumps_only: bool, expected: str) -> None:
    assert render_remove(10000, state, jumps_only=jumps_only) == expected


def test_chain_name() -> None:
    assert chain_name(10000) == "AMBASSADORD-10000"
    assert chain_name(1) == "AMBASSADORD-1"
    with pytest.raises(ValueError, match="0"):
        chain_name(0)


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"to_port": 0, "ports": (80,)}, "to_port 0"),
        ({"to_port": 65536, "ports": (80,)}, "to_port 65536"),
        ({"to_port": 10000, "ports": ("80",)}, "'80'"),
        ({"to_port": 10000, "ports": (True,)}, "True"),
        ({"to_port": 10000, "ports": (80,), "mark": 0}, "mark 0"),
        ({"to_port": 10000, "ports": (80,), "mark": 1 << 32}, "mark 4294967296"),
        ({"to_port": 10000, "ports": (80,), "families": (5,)}, "family 5"),
        ({"to_port": 10000, "ports": (80,), "families": ()}, "families is empty"),
        ({"to_port": 10000, "ports": (80,), "dests": ("10.0.0.1",)}, "'10.0.0.1'"),
        ({"to_port": 10000, "ports": (80,), "from_interfaces": ("eth0 -j ACCEPT",)}, "'eth0 -j ACCEPT'"),
        ({"to_port": 10000, "ports": (80,), "from_interfaces": ("a" * 16,)}, "a" * 16),
        ({"to_port": 10000, "ports": (80,), "allow_from": (("10.0.0.0/8", None),)}, "'10.0.0.0/8'"),
        ({"to_port": 10000, "ports": (80,), "allow_from": ((ipaddress.ip_network("10.0.0.0/8"), 0),)},
         "allow_from port 0"),
    ],
)
def test_plan_rejects_bad_values(kwargs: dict, quoted: str) -> None:
    with pytest.raises(ValueError, match=quoted):
        RedirectPlan(**kwargs)


def test_plan_normalises() -> None:
    plan = RedirectPlan(10000, [80, 80, 22], dests=[V4("10.0.0.1")], families=[6, 4, 6])
    assert plan.ports == (80, 22)
    assert plan.dests == (V4("10.0.0.1"),)
    assert plan.families == (6, 4)
    assert plan.mark == DEFAULT_MARK == 0x1A3B
    hash(plan)  # frozen and hashable


def test_renderers_reject_unknown_hooks_and_families() -> None:
    with pytest.raises(ValueError, match="INPUT"):
        render_install(RedirectPlan(10000, (80,)), 4, {"INPUT"})
    with pytest.raises(ValueError, match="family 5"):
        render_install(RedirectPlan(10000, (80,)), 5, set())
    with pytest.raises(ValueError, match="INPUT"):
        render_remove(10000, _state({"INPUT"}, {CHAIN}))


# --- check_available -------------------------------------------------------------------


def test_check_available_missing_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NetfilterError, match="iptables-restore.*Debian package iptables") as info:
        check_available((4,))
    assert "ip6tables" not in str(info.value)
    with pytest.raises(NetfilterError, match="ip6tables-restore"):
        check_available((4, 6))
    # install and remove check first, before running anything.
    with pytest.raises(NetfilterError, match="iptables-restore"):
        install(RedirectPlan(10000, (80,)))
    with pytest.raises(NetfilterError, match="iptables-restore"):
        remove(10000)


def test_check_available_only_the_missing_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the IPv4 tools present: IPv4 passes, IPv6 names exactly its two tools.
    for tool in ("iptables", "iptables-restore"):
        (tmp_path / tool).symlink_to(_which(tool))
    monkeypatch.setenv("PATH", str(tmp_path))
    if os.geteuid() == 0:
        check_available((4,))
    with pytest.raises(NetfilterError, match=r"^ip6tables, ip6tables-restore not found"):
        check_available((6,))


_CHECK_SNIPPET = (
    "import sys\n"
    "from ambassadord.netfilter import check_available, NetfilterError\n"
    "try:\n"
    "    check_available()\n"
    "except NetfilterError as exc:\n"
    "    print(exc)\n"
    "    sys.exit(3)\n"
)


def test_check_available_missing_cap_net_admin() -> None:
    require_prerequisites()
    setpriv = _which("setpriv", required=False)
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Control: with all capabilities the check passes, so the failure below is the cap's.
    ok = subprocess.run([sys.executable, "-c", _CHECK_SNIPPET], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Root's capabilities after exec are its bounding set: dropping NET_ADMIN there (and
    # from the inheritable set) removes it from CapEff of the new python.
    dropped = subprocess.run(
        [setpriv, "--inh-caps=-net_admin", "--bounding-set=-net_admin", sys.executable, "-c", _CHECK_SNIPPET],
        env=env,
        capture_output=True,
        text=True,
    )
    assert dropped.returncode == 3, dropped.stdout + dropped.stderr
    assert "CAP_NET_ADMIN" in dropped.stdout


# --- real rules in a network namespace -------------------------------------------------

SAVE = {4: "iptables-save", 6: "ip6tables-save"}
LIST = {4: "iptables", 6: "ip6tables"}


def nat_rules(ns: Netns, family: int) -> list[str]:
    """The nat table as iptables-save prints it, minus the comment lines with timestamps."""
    out = ns.exec([SAVE[family], "-t", "nat"])
    return [line for line in out.splitlines() if not line.startswith("#")]


def chain_rules(ns: Netns, family: int, chain: str = CHAIN) -> list[str]:
    return [line for line in nat_rules(ns, family) if line.startswith(("-A", ":")) and chain in line]


def add_unrelated_rules(ns: Netns) -> None:
    """Someone else's nat rules, which install and remove must leave alone (and in order)."""
    for family in (4, 6):
        for hook in ("OUTPUT", "PREROUTING"):
            ns.exec([LIST[family], "-t", "nat", "-A", hook, "-p", "udp", "--dport", "53", "-j", "RETURN"])


def expected_local_rules(ports: tuple[int, ...]) -> list[str]:
    """What iptables-save shows of the main chain (lines naming it, the -IN chain's
    declaration and its jump to the main chain included)."""
    return [
        f":{CHAIN} - [0:0]",
        f":{IN_CHAIN} - [0:0]",
        f"-A PREROUTING -p tcp -j {IN_CHAIN}",
        f"-A OUTPUT -p tcp -j {CHAIN}",
        MARK_RULE,
        f"-A {CHAIN} -p tcp -m mark --mark 0x1a3b -j REDIRECT --to-ports 10000",
        *(
            f"-A {CHAIN} -p tcp -m tcp --dport {p} -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 10000"
            for p in ports
        ),
    ]


def test_install_idempotent_replace_and_remove() -> None:
    require_prerequisites()
    with namespaces("nf-life") as (ns,):
        add_unrelated_rules(ns)
        before = {f: nat_rules(ns, f) for f in (4, 6)}

        install(RedirectPlan(10000, (6379, 11211)), netns=ns.name)
        first = {f: nat_rules(ns, f) for f in (4, 6)}
        for family in (4, 6):
            assert chain_rules(ns, family) == expected_local_rules((6379, 11211)), family
            # Our jumps come first in their hooks, ahead of the rules that were there.
            hooks = [line for line in first[family] if line.startswith(("-A OUTPUT", "-A PREROUTING"))]
            assert hooks == [
                f"-A PREROUTING -p tcp -j {IN_CHAIN}",
                "-A PREROUTING -p udp -m udp --dport 53 -j RETURN",
                f"-A OUTPUT -p tcp -j {CHAIN}",
                "-A OUTPUT -p udp -m udp --dport 53 -j RETURN",
            ]

        # Twice: every rule still exactly once, the whole table unchanged.
        install(RedirectPlan(10000, (6379, 11211)), netns=ns.name)
        for family in (4, 6):
            assert nat_rules(ns, family) == first[family]
            assert len(set(first[family])) == len(first[family])

        # Another port list replaces the chain's content (the :CHAIN declaration flushes
        # it under --noflush); the jumps are not doubled.
        install(RedirectPlan(10000, (80,)), netns=ns.name)
        for family in (4, 6):
            assert chain_rules(ns, family) == expected_local_rules((80,))

        remove(10000, netns=ns.name)
        for family in (4, 6):
            assert nat_rules(ns, family) == before[family]
        remove(10000, netns=ns.name)  # nothing installed: a no-op, not an error
        for family in (4, 6):
            assert nat_rules(ns, family) == before[family]


def test_two_daemon_ports_do_not_touch_each_other() -> None:
    require_prerequisites()
    with namespaces("nf-two") as (ns,):
        install(RedirectPlan(10000, (6379,)), netns=ns.name)
        install(RedirectPlan(10001, (5432,), families=(4,)), netns=ns.name)
        remove(10001, families=(4,), netns=ns.name)
        assert chain_rules(ns, 4) == expected_local_rules((6379,))
        assert not [line for line in nat_rules(ns, 4) if "AMBASSADORD-10001" in line]


def test_install_family_6_failure_rolls_back_family_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_prerequisites()
    fake = tmp_path / "ip6tables-restore"
    fake.write_text("#!/bin/sh\necho 'ip6tables-restore: simulated: no IPv6 nat table' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with namespaces("nf-undo") as (ns,):
        before = nat_rules(ns, 4)
        with pytest.raises(NetfilterError) as info:
            install(RedirectPlan(10000, (6379,)), netns=ns.name)
        message = str(info.value)
        assert "IPv6" in message and "ip6tables-restore" in message and "simulated: no IPv6 nat table" in message
        assert "IPv4 rules were removed again" in message
        assert nat_rules(ns, 4) == before
        # IPv4 alone still works.
        install(RedirectPlan(10000, (6379,), families=(4,)), netns=ns.name)
        assert chain_rules(ns, 4) == expected_local_rules((6379,))


def test_remove_refuses_foreign_reference_and_names_it() -> None:
    require_prerequisites()
    with namespaces("nf-foreign") as (ns,):
        install(RedirectPlan(10000, (6379,)), netns=ns.name)
        ns.exec(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", CHAIN])
        with pytest.raises(NetfilterError) as info:
            remove(10000, netns=ns.name)
        assert f"-A OUTPUT -p tcp -m tcp --dport 1 -j {CHAIN}" in str(info.value)
        assert "IPv4" in str(info.value)
        # IPv4 untouched (nothing half-done); IPv6 was still cleaned up.
        assert set(expected_local_rules((6379,))) < set(chain_rules(ns, 4))
        assert chain_rules(ns, 6) == []
        ns.exec(["iptables", "-t", "nat", "-D", "OUTPUT", "-p", "tcp", "--dport", "1", "-j", CHAIN])
        remove(10000, netns=ns.name)
        assert chain_rules(ns, 4) == []


def test_remove_deletes_duplicate_jumps() -> None:
    # Two installs racing between listing and restore can both add a jump; remove still
    # leaves no trace.
    require_prerequisites()
    with namespaces("nf-dup") as (ns,):
        before = nat_rules(ns, 4)
        install(RedirectPlan(10000, (6379,)), netns=ns.name)
        for hook in ("OUTPUT", "OUTPUT", "PREROUTING"):
            ns.exec(["iptables", "-t", "nat", "-A", hook, "-p", "tcp", "-j", CHAIN])
        assert sum(line == f"-A OUTPUT -p tcp -j {CHAIN}" for line in nat_rules(ns, 4)) == 3
        remove(10000, netns=ns.name)
        assert nat_rules(ns, 4) == before


def test_failed_restore_quotes_the_line() -> None:
    require_prerequisites()
    with namespaces("nf-bad") as (ns,):
        text = "*nat\n:X - [0:0]\n-A X -p tcp --dport 99999 -j RETURN\nCOMMIT\n"
        with pytest.raises(NetfilterError) as info:
            netfilter._restore(4, text, ns.name)
        message = str(info.value)
        assert "iptables-restore -w --noflush exited with status" in message
        assert "(line 3: '-A X -p tcp --dport 99999 -j RETURN')" in message
        assert chain_rules(ns, 4, "X") == []  # atomic: the chain declared before it is not there


# --- real redirects ---------------------------------------------------------------------


@contextlib.contextmanager
def listening(ns: Netns, family: int, port: int = 10000):
    sock = ns.socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        sock.listen(8)
        sock.settimeout(10)  # a failure shows as a timeout, not a hang
        yield sock
    finally:
        sock.close()


def connect(ns: Netns, family: int, address: str, port: int, *, mark: int | None = None) -> socket.socket:
    sock = ns.socket(family)
    try:
        sock.settimeout(10)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def assert_redirected(ns: Netns, listener: socket.socket, family: int, address: str, port: int) -> None:
    client = connect(ns, family, address, port)
    try:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getpeername()[:2] == client.getsockname()[:2]
            assert accepted.getsockname()[1] == 10000
            assert original_destination(accepted) == (address, port)
    finally:
        client.close()


def assert_refused(ns: Netns, family: int, address: str, port: int, **kw) -> None:
    with pytest.raises(ConnectionRefusedError):
        connect(ns, family, address, port, **kw).close()


@pytest.mark.parametrize(
    ("family", "loopback"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"]
)
def test_redirect_local_and_own_mark_excluded(family: int, loopback: str) -> None:
    require_prerequisites()
    with namespaces("nf-redir") as (ns,), listening(ns, family) as listener:
        assert_refused(ns, family, loopback, 6379)  # nothing listens on 6379 before
        install(RedirectPlan(10000, (6379,)), netns=ns.name)
        assert_redirected(ns, listener, family, loopback, 6379)
        # The daemon's own upstream sockets carry the mark and go where they were sent.
        assert_refused(ns, family, loopback, 6379, mark=DEFAULT_MARK)
        # Another mark is an ordinary consumer.
        client = connect(ns, family, loopback, 6379, mark=DEFAULT_MARK + 1)
        with client:
            accepted, _ = listener.accept()
            with accepted:
                assert original_destination(accepted) == (loopback, 6379)
        # Unmapped ports are not redirected.
        assert_refused(ns, family, loopback, 6380)
        remove(10000, netns=ns.name)
        assert_refused(ns, family, loopback, 6379)


def test_redirect_from_bridged_peer_via_prerouting() -> None:
    # A container on a bridge: its connection to the host's address enters through
    # PREROUTING, not OUTPUT, and is redirected because it came from a container bridge.
    require_prerequisites()
    with namespaces("nf-host", "nf-ctr") as (host, ctr):
        ifa, _ = link(host, [], ctr, ["10.78.0.2/24", "fd00:78::2/64"], tag=f"p{os.getpid()}")
        host.exec(["ip", "link", "add", "br-test", "type", "bridge"])
        host.exec(["ip", "link", "set", ifa, "master", "br-test"])
        for addr in ("10.78.0.1/24", "fd00:78::1/64"):
            host.exec(["ip", "addr", "add", addr, "dev", "br-test", *(["nodad"] if ":" in addr else [])])
        host.exec(["ip", "link", "set", "br-test", "up"])
        assert netfilter.container_bridges(netns=host.name) == ["br-test"]
        install(RedirectPlan(10000, (6379,), from_interfaces=("br-test",)), netns=host.name)
        for family, address in ((socket.AF_INET, "10.78.0.1"), (socket.AF_INET6, "fd00:78::1")):
            with listening(host, family) as listener:
                client = connect(ctr, family, address, 6379)
                with client:
                    accepted, _ = listener.accept()
                    with accepted:
                        assert original_destination(accepted) == (address, 6379)


def test_not_open_to_other_hosts_unless_allowed() -> None:
    # Issue 12, item 11: another host on the LAN reached the backends through the mapped
    # ports (before: redirected; the -IN chain did not exist). Now only this host's
    # processes and its container bridges are redirected, unless --allow-from opens more.
    require_prerequisites()
    with namespaces("nf-me", "nf-lan") as (me, lan):
        link(me, ["10.79.0.1/24", "fd00:79::1/64"], lan, ["10.79.0.2/24", "fd00:79::2/64"], tag=f"l{os.getpid()}")
        # A LAN bridge (a physical-like port: a tap) is not a container bridge.
        me.exec(["ip", "link", "add", "br-lan", "type", "bridge"])
        me.exec(["ip", "tuntap", "add", "tap-lan", "mode", "tap"])
        me.exec(["ip", "link", "set", "tap-lan", "master", "br-lan"])
        assert netfilter.container_bridges(netns=me.name) == []
        install(RedirectPlan(10000, (6379, 6380)), netns=me.name)
        for family, address in ((socket.AF_INET, "10.79.0.1"), (socket.AF_INET6, "fd00:79::1")):
            with listening(me, family):
                assert_refused(lan, family, address, 6379)  # from the LAN: not redirected
                loopback = "127.0.0.1" if family == socket.AF_INET else "::1"
            with listening(me, family) as listener:
                assert_redirected(me, listener, family, loopback, 6379)  # this host: redirected
        # Opened to the LAN's network, for one port only.
        install(RedirectPlan(10000, (6379, 6380), allow_from=((ipaddress.ip_network("10.79.0.0/24"), 6379),
                                                              (ipaddress.ip_network("fd00:79::/64"), 6379))),
                netns=me.name)
        for family, address in ((socket.AF_INET, "10.79.0.1"), (socket.AF_INET6, "fd00:79::1")):
            with listening(me, family) as listener:
                assert_redirected(lan, listener, family, address, 6379)
                assert_refused(lan, family, address, 6380)
        # Opened to everyone.
        install(RedirectPlan(10000, (6379, 6380), allow_from=((ipaddress.ip_network("0.0.0.0/0"), None),)),
                netns=me.name)
        with listening(me, socket.AF_INET) as listener:
            assert_redirected(lan, listener, socket.AF_INET, "10.79.0.1", 6380)
        remove(10000, netns=me.name)
        assert chain_rules(me, 4) == [] and chain_rules(me, 6) == []


def test_redirect_only_given_dests() -> None:
    require_prerequisites()
    with namespaces("nf-dest") as (ns,):
        ns.exec(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d0p"])
        ns.exec(["ip", "addr", "add", "10.77.0.1/24", "dev", "d0"])
        ns.exec(["ip", "addr", "add", "10.77.0.9/24", "dev", "d0"])
        ns.exec(["ip", "addr", "add", "fd00:77::1/64", "dev", "d0", "nodad"])
        ns.exec(["ip", "link", "set", "d0", "up"])
        ns.exec(["ip", "link", "set", "d0p", "up"])
        install(RedirectPlan(10000, (6379,), dests=(V4("10.77.0.1"), V6("fd00:77::1"))), netns=ns.name)
        with listening(ns, socket.AF_INET) as listener:
            assert_redirected(ns, listener, socket.AF_INET, "10.77.0.1", 6379)
            assert_refused(ns, socket.AF_INET, "127.0.0.1", 6379)
            assert_refused(ns, socket.AF_INET, "10.77.0.9", 6379)  # local, but not a dest
        with listening(ns, socket.AF_INET6) as listener:
            assert_redirected(ns, listener, socket.AF_INET6, "fd00:77::1", 6379)
            assert_refused(ns, socket.AF_INET6, "::1", 6379)


# --- interface_addresses ---------------------------------------------------------------


def test_interface_addresses() -> None:
    require_prerequisites()
    with namespaces("nf-if") as (ns,):
        ns.exec(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d0p"])
        for addr in ("10.9.0.1/24", "169.254.1.1/32", "fd00::1/64", "fe80::1234/64"):
            ns.exec(["ip", "addr", "add", addr, "dev", "d0", *(["nodad"] if ":" in addr else [])])
        ns.exec(["ip", "addr", "add", "10.9.9.1", "peer", "10.9.9.2", "dev", "d0"])
        ns.exec(["ip", "link", "set", "d0", "up"])
        ns.exec(["ip", "link", "set", "d0p", "up"])
        assert "fe80::1234" in ns.exec(["ip", "-6", "addr", "show", "dev", "d0"])

        got = interface_addresses(["d0"], netns=ns.name)
        # Point-to-point: our side (IFA_LOCAL), not the peer. Link-local IPv6 skipped.
        assert sorted(got, key=str) == sorted(
            [V4("10.9.0.1"), V4("169.254.1.1"), V4("10.9.9.1"), V6("fd00::1")], key=str
        )
        assert got.index(V4("10.9.0.1")) < got.index(V4("169.254.1.1"))

        both = interface_addresses(["lo", "d0", "lo"], netns=ns.name)
        assert both[:2] == [V4("127.0.0.1"), V6("::1")]
        assert len(both) == len(set(both)) == 6

        with pytest.raises(NetfilterError, match="'nosuch0' does not exist in network namespace " + ns.name):
            interface_addresses(["d0", "nosuch0"], netns=ns.name)

        assert interface_addresses(["d0p"], netns=ns.name) == []  # only a link-local address
        assert interface_addresses("lo", netns=ns.name) == [V4("127.0.0.1"), V6("::1")]


def test_interface_addresses_unknown_namespace_is_not_created() -> None:
    require_prerequisites()
    name = f"amb-nf-absent-{os.getpid()}"
    with pytest.raises(NetfilterError, match=name):
        interface_addresses(["lo"], netns=name)
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_interface_addresses_current_namespace() -> None:
    assert V4("127.0.0.1") in interface_addresses(["lo"])
    with pytest.raises(NetfilterError, match="'amb-no-such-if'"):
        interface_addresses(["amb-no-such-if"])


def _which(tool: str, *, required: bool = True) -> str | None:
    import shutil

    path = shutil.which(tool)
    if path is None and required:
        pytest.skip(f"{tool} not installed")
    return path


def test_namespaces_left_by_a_killed_run_are_swept_and_live_ones_kept():
    """tests/conftest.py sweeps at the start of a run what a run killed before its clean-up
    left behind; a namespace of a live process, or with a process in it, stays."""
    require_prerequisites()
    from tests.netns import sweep_stale

    dead = next(p for p in range(4_000_000, 3_000_000, -1) if not os.path.exists(f"/proc/{p}"))
    stale, live = f"amb-sweeptest-{dead}", f"amb-sweeptest-{os.getpid()}"
    busy = f"amb-sweepbusy-{dead}"
    for name in (stale, live, busy):
        subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", busy, "sleep", "60"])
    try:
        # `ip netns exec` takes a moment to enter the namespace: sweeping before the sleeper
        # is in it would (rightly) find it empty. On a loaded machine that race was lost.
        from tests.daemon import wait_until

        wait_until(lambda: subprocess.run(["ip", "netns", "pids", busy], capture_output=True, text=True).stdout.strip(),
                   timeout=10, what=f"a process in {busy}")
        swept = sweep_stale()
        names = set(os.listdir("/run/netns"))
        assert stale in swept and stale not in names
        assert live in names and busy in names and live not in swept and busy not in swept
    finally:
        sleeper.kill()
        sleeper.wait()
        for name in (stale, live, busy):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("listing, found", [
    ("-P PREROUTING ACCEPT\n-A OUTPUT -p tcp --dport 6379 -j REDIRECT --to-ports 10000\n", True),
    ("-A PREROUTING -p tcp -j DNAT --to-destination 127.0.0.1:10000\n", True),
    ("-A OUTPUT -p tcp -j REDIRECT --to-ports 9990-10010\n", True),
    ("-A OUTPUT -p tcp -j REDIRECT --to-ports 10001\n-A X -j DNAT --to-destination 10.0.0.1:100000\n", False),
    ("-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80\n", False),
    ("", False),
])
def test_redirects_in_finds_any_rule_that_leads_to_the_listener(listing, found):
    from ambassadord.netfilter import redirects_in

    assert redirects_in(listing, 10000) is found
