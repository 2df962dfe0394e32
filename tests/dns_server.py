"""A real DNS server for tests: dnsmasq on 127.0.0.1, serving SRV, A and AAAA records.

Names under ``test.`` are local (``--local=/test/``): unknown ones get NXDOMAIN, and no
query is ever forwarded (``--no-resolv``). Addresses given with ``hosts`` come back in
an SRV answer's additional section; those given with ``bare_hosts`` (``--address``) do
not, so the resolver has to look them up: both paths can be tested.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import dns.message
import dns.query

from tests.daemon import free_port, wait_until
from tests.server_logs import tail


def require_dnsmasq() -> str:
    import os

    import pytest

    path = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("dnsmasq is missing (Debian package dnsmasq-base; scripts/test installs it)", pytrace=False)
    pytest.skip("dnsmasq is missing (Debian package dnsmasq-base)")


class Dnsmasq:
    """dnsmasq serving the given records; restart() swaps them on the same port.

    Args:
        srv: (name, target, port, priority, weight) tuples.
        hosts: name -> addresses (A/AAAA, also put in SRV additional sections).
        bare_hosts: name -> one IPv4 address, via --address (not in additional sections).
        ttl: the TTL of every answer (dnsmasq's --local-ttl).
    """

    def __init__(self, *, srv: Iterable[tuple] = (), hosts: dict | None = None, bare_hosts: dict | None = None,
                 ttl: int = 2, port: int | None = None):
        self.binary = require_dnsmasq()
        self.port = port or free_port()
        self.ttl = ttl
        self._dir = tempfile.TemporaryDirectory(prefix="amb-dnsmasq-")
        self.log = Path(self._dir.name) / "dnsmasq.log"
        self.proc = None
        self.start(srv=srv, hosts=hosts, bare_hosts=bare_hosts)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, srv=(), hosts=None, bare_hosts=None) -> None:
        cmd = [self.binary, "--keep-in-foreground", "--port", str(self.port), "--listen-address", "127.0.0.1",
               "--bind-interfaces", "--no-resolv", "--no-hosts", "--local=/test/", f"--local-ttl={self.ttl}",
               "--pid-file=", "--log-facility=-", "--conf-file=/dev/null"]
        cmd += [f"--srv-host={n},{t},{p},{pri},{w}" for n, t, p, pri, w in srv]
        cmd += [f"--host-record={name},{','.join(addrs)}" for name, addrs in (hosts or {}).items()]
        cmd += [f"--address=/{name}/{addr}" for name, addr in (bare_hosts or {}).items()]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=10, what=lambda: f"dnsmasq on {self.server}: {tail(self.log)}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited {self.proc.returncode}: {tail(self.log)}")
        with contextlib.suppress(Exception):
            dns.query.udp(dns.message.make_query("ready.test", "A"), "127.0.0.1", port=self.port, timeout=0.5)
            return True
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, **records) -> None:
        self.stop()
        self.start(**records)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> Dnsmasq:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
