"""Tests of ambassadord.original_dst: the parsing and errno handling with stand-in sockets,
then what the kernel really answers, in network namespaces with and without nat rules."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

import pytest
import trio

from ambassadord.netfilter import RedirectPlan, install
from ambassadord.original_dst import IP6T_SO_ORIGINAL_DST, SO_ORIGINAL_DST, original_destination
from tests.netns import Netns, namespaces, require_prerequisites

# --- stand-in sockets: parsing and errno handling --------------------------------------


class FakeSocket:
    """Answers getsockopt from a table {(level, option): bytes or errno}; records calls."""

    def __init__(self, family: int, answers: dict[tuple[int, int], bytes | int]):
        self.family = family
        self.answers = answers
        self.calls: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.calls.append((level, option, buflen))
        answer = self.answers[(level, option)]
        if isinstance(answer, int):
            raise OSError(answer, "fake")
        return answer


V4_KEY = (socket.SOL_IP, SO_ORIGINAL_DST)
V6_KEY = (socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST)


def sockaddr_in(ip: str, port: int) -> bytes:
    # sin_family in host byte order, then port and address in network byte order.
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, 0x12345)  # flowinfo, ignored
        + socket.inet_pton(socket.AF_INET6, ip)
        + struct.pack("=I", 7)  # scope id, ignored
    )


@pytest.mark.parametrize(
    ("family", "answers", "expected", "calls"),
    [
        (socket.AF_INET, {V4_KEY: sockaddr_in("10.1.2.3", 6379)}, ("10.1.2.3", 6379), [(*V4_KEY, 16)]),
        (socket.AF_INET, {V4_KEY: sockaddr_in("255.255.255.254", 65535)}, ("255.255.255.254", 65535), None),
        (socket.AF_INET, {V4_KEY: errno.ENOENT}, None, [(*V4_KEY, 16)]),
        (socket.AF_INET, {V4_KEY: errno.ENOPROTOOPT}, None, None),
        (socket.AF_INET6, {V6_KEY: sockaddr_in6("fd00::5", 5432)}, ("fd00::5", 5432), [(*V6_KEY, 28)]),
        (socket.AF_INET6, {V6_KEY: sockaddr_in6("::1", 1)}, ("::1", 1), None),
        # Dual-stack socket carrying IPv4: the IPv6 table has nothing, the IPv4 one answers.
        (
            socket.AF_INET6,
            {V6_KEY: errno.ENOENT, V4_KEY: sockaddr_in("127.0.0.1", 6379)},
            ("::ffff:127.0.0.1", 6379),
            [(*V6_KEY, 28), (*V4_KEY, 16)],
        ),
        (socket.AF_INET6, {V6_KEY: errno.ENOENT, V4_KEY: errno.ENOENT}, None, None),
        (socket.AF_INET6, {V6_KEY: errno.ENOPROTOOPT, V4_KEY: errno.ENOPROTOOPT}, None, None),
    ],
)
def test_parse_and_no_answer(family: int, answers: dict, expected, calls) -> None:
    sock = FakeSocket(family, answers)
    assert original_destination(sock) == expected
    if calls is not None:
        assert sock.calls == calls


@pytest.mark.parametrize(
    ("family", "answers", "code"),
    [
        (socket.AF_INET, {V4_KEY: errno.EBADF}, errno.EBADF),
        (socket.AF_INET, {V4_KEY: errno.EINVAL}, errno.EINVAL),
        (socket.AF_INET6, {V6_KEY: errno.ENOTSOCK}, errno.ENOTSOCK),
        (socket.AF_INET6, {V6_KEY: errno.ENOENT, V4_KEY: errno.EBADF}, errno.EBADF),
    ],
)
def test_other_errors_propagate(family: int, answers: dict, code: int) -> None:
    with pytest.raises(OSError) as info:
        original_destination(FakeSocket(family, answers))
    assert info.value.errno == code


def test_closed_socket_raises() -> None:
    sock = socket.socket()
    sock.close()
    with pytest.raises(OSError) as info:
        original_destination(sock)
    assert info.value.errno == errno.EBADF


def test_not_an_ip_socket() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="not an IPv4/IPv6 socket"):
        original_destination(a)


# --- the real kernel --------------------------------------------------------------------


@contextlib.contextmanager
def accepted_connection(ns: Netns, family: int, address: str, port: int, *, v6only: bool = True):
    """Listen on the wildcard address, port 10000; connect to (address, port); yield the
    (accepted, client) pair."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(ns.socket(family))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        listener.bind(("0.0.0.0" if family == socket.AF_INET else "::", 10000))
        listener.listen(1)
        listener.settimeout(10)
        client = stack.enter_context(ns.socket(socket.AF_INET6 if ":" in address else socket.AF_INET))
        client.settimeout(10)
        client.connect((address, port))
        accepted, _ = listener.accept()
        stack.enter_context(accepted)
        yield accepted, client


DIRECT_CASES = [
    pytest.param(socket.AF_INET, "127.0.0.1", True, ("127.0.0.1", 10000), id="v4"),
    pytest.param(socket.AF_INET6, "::1", True, ("::1", 10000), id="v6"),
    pytest.param(socket.AF_INET6, "127.0.0.1", False, ("::ffff:127.0.0.1", 10000), id="dual-stack-v4"),
]


@pytest.mark.parametrize(("family", "address", "v6only", "own"), DIRECT_CASES)
def test_direct_connection_without_nat_rules_is_none(family: int, address: str, v6only: bool, own) -> None:
    # A fresh namespace: no nat rule, so conntrack does not track the connection (ENOENT).
    # Nothing here may list the nat table first: that alone could load it.
    require_prerequisites()
    with namespaces("od-none") as (ns,), accepted_connection(ns, family, address, 10000, v6only=v6only) as (
        accepted,
        _,
    ):
        assert accepted.getsockname()[:2] == own
        assert original_destination(accepted) is None


# Rules that match nothing here: what matters is whether they turn conntrack on.
TRACKING_ON = [
    pytest.param(["-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "REDIRECT", "--to-ports", "9"],
                 id="nat-redirect"),
    pytest.param(["-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"], id="filter-ct-match"),
]


@pytest.mark.parametrize("rule", TRACKING_ON)
@pytest.mark.parametrize(("family", "address", "v6only", "own"), DIRECT_CASES)
def test_direct_connection_with_tracking_is_own_address(
    family: int, address: str, v6only: bool, own, rule: list[str]
) -> None:
    # Once a rule needs conntrack, every connection is tracked: one that was not
    # redirected reads back its own local address, which is how the caller tells.
    require_prerequisites()
    with namespaces("od-own") as (ns,):
        for tool in ("iptables", "ip6tables"):
            ns.exec([tool, *rule])
        with accepted_connection(ns, family, address, 10000, v6only=v6only) as (accepted, _):
            assert original_destination(accepted) == own == accepted.getsockname()[:2]


@pytest.mark.parametrize(("family", "address", "v6only", "own"), DIRECT_CASES)
def test_nat_rules_that_need_no_conntrack_leave_it_off(family: int, address: str, v6only: bool, own) -> None:
    # A nat table with chains and RETURN rules, but no NAT target: still untracked.
    require_prerequisites()
    with namespaces("od-off") as (ns,):
        for tool in ("iptables", "ip6tables"):
            ns.exec([tool, "-t", "nat", "-N", "FOO"])
            ns.exec([tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "FOO"])
            ns.exec([tool, "-t", "nat", "-A", "FOO", "-p", "udp", "--dport", "9", "-j", "RETURN"])
        with accepted_connection(ns, family, address, 10000, v6only=v6only) as (accepted, _):
            assert original_destination(accepted) is None


REDIRECT_CASES = [
    pytest.param(socket.AF_INET, "127.0.0.1", True, ("127.0.0.1", 6379), id="v4"),
    pytest.param(socket.AF_INET6, "::1", True, ("::1", 6379), id="v6"),
    pytest.param(socket.AF_INET6, "127.0.0.1", False, ("::ffff:127.0.0.1", 6379), id="dual-stack-v4"),
]


@pytest.mark.parametrize(("family", "address", "v6only", "expected"), REDIRECT_CASES)
def test_redirected_connection(family: int, address: str, v6only: bool, expected) -> None:
    require_prerequisites()
    with namespaces("od-redir") as (ns,):
        install(RedirectPlan(10000, (6379,)), netns=ns.name)
        with accepted_connection(ns, family, address, 6379, v6only=v6only) as (accepted, client):
            assert accepted.getsockname()[1] == 10000
            assert accepted.getpeername()[1] == client.getsockname()[1]
            assert original_destination(accepted) == expected != accepted.getsockname()[:2]


async def test_trio_socket() -> None:
    # The server hands it trio sockets; getsockopt there is synchronous, as is this call.
    require_prerequisites()
    with namespaces("od-trio") as (ns,):
        install(RedirectPlan(10000, (6379,), families=(4,)), netns=ns.name)
        with accepted_connection(ns, socket.AF_INET, "127.0.0.1", 6379) as (accepted, _):
            tsock = trio.socket.from_stdlib_socket(accepted.dup())
            with tsock:
                assert original_destination(tsock) == ("127.0.0.1", 6379)
