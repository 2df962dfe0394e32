"""A real Consul agent for tests: ``consul agent -dev`` on loopback, every port chosen free.

Use :func:`consul_binary` to find the binary (``$AMBASSADORD_CONSUL``, else the project's
cache ``.cache/consul/bin/consul`` that ``scripts/lib/prerequisites.sh`` (``step_consul``)
fills from Debian bullseye's package, consul 1.8.7). Missing: a skip, or a failure under
``CI``, where a skip would hide a gap.

:class:`ConsulAgent` starts ``consul agent -dev -client 127.0.0.1 -bind 127.0.0.1`` with
its HTTP, DNS, Serf LAN, Serf WAN, server (RPC) and gRPC ports all picked free (each free
on TCP and UDP alike, since Serf and DNS use both), and waits until it is ready: it has
elected itself leader, lists its own node in the catalog, and its DNS port answers for
that node. It talks to the HTTP API with urllib (no extra dependency) and offers what the
resolver tests need: register / deregister services (optionally with a TTL check to turn
critical or passing at will), KV put / get / delete, and the passing instances of a
service. The agent makes no traffic beyond loopback: no ``-join``, no DNS recursors, and
the update check and anonymous signature are disabled (``-hcl``).

Restart (``stop()`` then ``start()``) reuses the same ports, so a client pointed at the
agent reaches the new one, but a ``-dev`` agent keeps everything in memory: **a restarted
agent has lost every service, check and key**, and its Raft index starts again from a low
number (a client's blocking-query index goes backwards). Re-register what a test needs.

In a network namespace: ``ConsulAgent(ns=netns)`` starts the agent inside a
:class:`tests.netns.Netns` (``ip netns exec``), with its ports picked free there, and makes
every HTTP and DNS request of this object over a socket created in that namespace, so the
test process drives an agent that lives on another "host". ``client`` / ``bind`` set the
agent's ``-client`` (HTTP and DNS; may be a space-separated list, the first one is where
this object talks to it) and ``-bind`` addresses; ``ports`` overrides some of the picked
ports, e.g. ``ports={"http": 8500}`` for an agent on the default address that a client
finds without being told.

Its output (``-log-level warn`` by default) goes to a file in a temporary directory;
failures quote its tail, and tests/conftest.py shows it when a test fails (the process
handling is tests/server_process.py's, shared with tests/etcd_server.py).

Example::

    with ConsulAgent(node="dns-test") as agent:
        check = agent.register("redis", "redis-1", "127.0.0.2", 6379, tags=("primary",), ttl_check=True)
        agent.wait_for_health("redis", 1)
        agent.check_fail(check)          # the instance leaves DNS and ?passing answers
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.server_process import READY_TIMEOUT, ServerProcess, url_host

if TYPE_CHECKING:
    from tests.netns import Netns

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_BINARY = REPO_ROOT / ".cache" / "consul" / "bin" / "consul"
HOST = "127.0.0.1"
HTTP_TIMEOUT = 10.0

# The names of consul agent's port flags (consul 1.8.7), in the order ports are picked.
PORT_NAMES = ("http", "dns", "serf-lan", "serf-wan", "server", "grpc")


def consul_binary() -> str:
    """The consul binary to test against: ``$AMBASSADORD_CONSUL``, else the project's cache.

    Missing or not runnable: ``pytest.fail`` when ``CI`` is set (as tests/netns.py's
    require_prerequisites does), ``pytest.skip`` otherwise.
    """
    env = os.environ.get("AMBASSADORD_CONSUL")
    path = Path(env) if env else CACHE_BINARY
    where = "$AMBASSADORD_CONSUL" if env else "the project's cache"
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    import pytest

    message = (f"consul binary missing at {path} ({where}); scripts/lib/prerequisites.sh (step_consul) "
               f"extracts Debian bullseye's consul 1.8.7 there")
    if os.environ.get("CI"):
        pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def free_ports(count: int, host: str = HOST, *, ns: Netns | None = None) -> list[int]:
    """``count`` distinct ports, each free right now on ``host`` for both TCP and UDP
    (in the network namespace ``ns`` if given)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make(kind: int) -> socket.socket:
        return ns.socket(family, kind) if ns is not None else socket.socket(family, kind)

    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = make(socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            udp = make(socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind((host, port))
            except OSError:
                continue  # taken for UDP: keep the TCP socket held so it is not offered again
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


class ConsulError(RuntimeError):
    """The agent did not start, died, or its HTTP API answered with an error."""


class _NetnsHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is created inside a network namespace."""

    def __init__(self, ns: Netns, host: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = self._ns.socket(family)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ConsulAgent(ServerProcess):
    """One ``consul agent -dev`` (on 127.0.0.1 by default); see the module docstring.

    Life cycle (tests/server_process.py): ``start()``, ``stop()`` (SIGTERM, then SIGKILL;
    consul 1.8 exits 1 on SIGTERM, since a server does not leave the cluster on terminate:
    that is its normal stop, not a failure), ``restart()`` (on the same ports; the new
    agent is empty), ``close()`` (also removes the log), ``running``, ``log_tail()``.

    Args:
        node: the node name (``-node``); also the DNS name ``NODE.node.consul``.
        binary: the consul binary (default :func:`consul_binary`).
        log_level: ``-log-level`` (default ``warn``).
        start: start now (default) or leave it to :meth:`start`.
        extra_args: more ``consul agent`` flags.
        ns: run the agent inside this network namespace; this object's HTTP and DNS
            requests then go over sockets made in it (default: the test's own namespace).
        client: ``-client``: the address(es) HTTP and DNS listen on, space-separated;
            the first is the one this object uses (default 127.0.0.1).
        bind: ``-bind``: the cluster (Serf, RPC) address (default 127.0.0.1).
        ports: flag name -> port, overriding the ports otherwise picked free.

    Attributes:
        ports: flag name (``http``, ``dns``, ``serf-lan``, ``serf-wan``, ``server``,
            ``grpc``) -> port, fixed for the object's life (restarts reuse them).
        http_port, dns_port: the two a client needs.
        http_addr, dns_addr: ``"HOST:PORT"`` (``CONSUL_HTTP_ADDR`` / ``--dns-server`` form),
            HOST being the first ``client`` address (127.0.0.1 by default).
        dns_server: ``(HOST, dns_port)``, the form of ``ResolverOptions.dns_servers``.
        log: the file with the agent's stdout and stderr (kept across restarts).
    """

    error = ConsulError

    def __init__(self, node: str = "amb-consul-test", *, binary: str | None = None, log_level: str = "warn",
                 start: bool = True, extra_args: Iterable[str] = (), ns: Netns | None = None,
                 client: str = HOST, bind: str = HOST, ports: dict[str, int] | None = None):
        self.binary = binary or consul_binary()
        self.node = node
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.ns = ns
        self.client = client
        self.bind = bind
        self.host = client.split()[0]
        unknown = set(ports or {}) - set(PORT_NAMES)
        if unknown:
            raise ValueError(f"unknown port name(s) {sorted(unknown)}; known: {', '.join(PORT_NAMES)}")
        fixed = dict(ports or {})
        # free_ports gives distinct ports; at most len(fixed) of them collide with the fixed ones
        picked = iter([p for p in free_ports(len(PORT_NAMES) + len(fixed), self.host, ns=ns)
                       if p not in fixed.values()])
        self.ports = {name: fixed[name] if name in fixed else next(picked) for name in PORT_NAMES}
        super().__init__("consul")
        if start:
            self._start_or_close(READY_TIMEOUT)

    # ---- addresses ------------------------------------------------------------------

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def dns_port(self) -> int:
        return self.ports["dns"]

    @property
    def http_addr(self) -> str:
        return f"{url_host(self.host)}:{self.http_port}"

    @property
    def dns_addr(self) -> str:
        return f"{url_host(self.host)}:{self.dns_port}"

    @property
    def dns_server(self) -> tuple[str, int]:
        return self.host, self.dns_port

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    # ---- life cycle -----------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [self.binary, "agent", "-dev", "-client", self.client, "-bind", self.bind, "-node", self.node,
               "-log-level", self.log_level,
               # no traffic beyond loopback: no update check, no anonymous signature
               "-hcl", "disable_update_check = true", "-hcl", "disable_anonymous_signature = true"]
        for name in PORT_NAMES:
            cmd += [f"-{name}-port", str(self.ports[name])]
        return cmd + self.extra_args

    @property
    def label(self) -> str:
        return f"consul agent {self.node}"

    def _addresses(self) -> str:
        return f"http {self.http_addr}, dns {self.dns_addr}"

    def _ready_step(self) -> str | None:
        """None when ready (a leader, its own node in the catalog, DNS answering), else what
        is still missing."""
        try:
            if not self.get("/v1/status/leader", timeout=2):
                return "no leader yet"
            if self.node not in [n.get("Node") for n in self.get("/v1/catalog/nodes", timeout=2) or []]:
                return f"node {self.node} not in the catalog yet"
            if not self._dns_answers():
                return "DNS port not answering yet"
        except (OSError, ConsulError, ValueError) as exc:
            return str(exc)
        return None

    def _dns_answers(self) -> bool:
        import dns.message
        import dns.query
        import dns.rcode

        q = dns.message.make_query(f"{self.node}.node.consul", "A")
        sock = None
        try:
            if self.ns is not None:
                sock = self.ns.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            r = dns.query.udp(q, self.host, port=self.dns_port, timeout=0.5, sock=sock)
        except Exception:
            return False
        finally:
            if sock is not None:
                sock.close()
        return r.rcode() == dns.rcode.NOERROR and bool(r.answer)

    # ---- HTTP API -------------------------------------------------------------------

    def request(self, method: str, path: str, *, body: Any = None, data: bytes | None = None,
                query: dict | None = None, timeout: float = HTTP_TIMEOUT) -> tuple[int, dict, bytes]:
        """One HTTP call to the agent. ``body`` is sent as JSON, ``data`` as is.

        Returns (status, headers, body bytes) for 2xx and 404; raises ConsulError for
        other statuses (quoting Consul's message), OSError when the agent is unreachable.
        """
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: ("" if v is True else v) for k, v in query.items()
                                                 if v is not None and v is not False})
        if body is not None:
            data = json.dumps(body).encode()
        if self.ns is not None:
            return self._request_in_ns(method, path, url[len(self.url):], data, timeout)
        req = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read()
            if exc.code == 404:
                return 404, dict(exc.headers), text
            raise ConsulError(f"{method} {path}: HTTP {exc.code}: {text.decode(errors='replace').strip()}") from None

    def _request_in_ns(self, method: str, path: str, target: str, data: bytes | None,
                       timeout: float) -> tuple[int, dict, bytes]:
        """:meth:`request` over a socket made in the agent's namespace (same contract)."""
        conn = _NetnsHTTPConnection(self.ns, self.host, self.http_port, timeout)
        try:
            conn.request(method, target, body=data)
            resp = conn.getresponse()
            status, headers, text = resp.status, dict(resp.getheaders()), resp.read()
        except http.client.HTTPException as exc:  # a broken answer: as unreachable as a refusal
            raise OSError(f"{method} {path}: {exc!r}") from None
        finally:
            conn.close()
        if 200 <= status < 300 or status == 404:
            return status, headers, text
        raise ConsulError(f"{method} {path}: HTTP {status}: {text.decode(errors='replace').strip()}")

    def get(self, path: str, *, query: dict | None = None, timeout: float = HTTP_TIMEOUT) -> Any:
        """GET, parsed JSON; None on 404."""
        status, _, text = self.request("GET", path, query=query, timeout=timeout)
        return None if status == 404 else json.loads(text or b"null")

    def put(self, path: str, *, body: Any = None, data: bytes | None = None, query: dict | None = None) -> Any:
        status, _, text = self.request("PUT", path, body=body, data=data, query=query)
        if status == 404:
            raise ConsulError(f"PUT {path}: HTTP 404: {text.decode(errors='replace').strip()}")
        return json.loads(text) if text.strip() else None

    # ---- services and checks ------------------------------------------------------------

    def register(self, service: str, id: str, address: str | None, port: int, tags: Iterable[str] = (),
                 ttl_check: bool = False, *, meta: dict | None = None, ttl: str = "30s") -> str | None:
        """Register a service instance with the agent (PUT /v1/agent/service/register).

        ``address`` None or "" registers no Service.Address: Consul then uses the node's
        address (127.0.0.1). With ``ttl_check``, the instance gets a TTL check that starts
        passing; its id (``service:ID``) is returned for :meth:`check_pass` /
        :meth:`check_fail`. Registering an existing id replaces it.
        """
        body: dict[str, Any] = {"Name": service, "ID": id, "Port": port, "Tags": list(tags)}
        if address:
            body["Address"] = address
        if meta:
            body["Meta"] = dict(meta)
        check_id = None
        if ttl_check:
            check_id = f"service:{id}"
            body["Check"] = {"CheckID": check_id, "Name": f"{service} {id} TTL", "TTL": ttl, "Status": "passing"}
        self.put("/v1/agent/service/register", body=body)
        return check_id

    def deregister(self, id: str) -> None:
        """Remove a service instance (and its checks) from the agent."""
        self.put(f"/v1/agent/service/deregister/{_seg(id)}")

    def check_pass(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/pass/{_seg(check_id)}", query={"note": note or None})

    def check_warn(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/warn/{_seg(check_id)}", query={"note": note or None})

    def check_fail(self, check_id: str, note: str = "") -> None:
        """Turn a TTL check critical: the instance leaves ?passing answers and DNS."""
        self.put(f"/v1/agent/check/fail/{_seg(check_id)}", query={"note": note or None})

    def services(self) -> dict:
        """The agent's local services (GET /v1/agent/services): id -> service."""
        return self.get("/v1/agent/services") or {}

    def health(self, service: str, *, tag: str | None = None, dc: str | None = None,
               passing: bool = True) -> list[dict]:
        """Instances of ``service`` (GET /v1/health/service/SERVICE), passing only by default.

        Each entry is Consul's {"Node": ..., "Service": ..., "Checks": [...]}.
        """
        return self.get(f"/v1/health/service/{_seg(service)}",
                        query={"passing": passing, "tag": tag, "dc": dc}) or []

    def health_addresses(self, service: str, **kw) -> set[tuple[str, int]]:
        """(address, port) of each passing instance, the service address or else the node's."""
        return {(e["Service"].get("Address") or e["Node"]["Address"], e["Service"]["Port"])
                for e in self.health(service, **kw)}

    def wait_for_health(self, service: str, expected: int | Callable[[list[dict]], bool], *,
                        timeout: float = 10, **kw) -> list[dict]:
        """Poll :meth:`health` until it has ``expected`` instances (or ``expected(entries)`` is true)."""
        ok = expected if callable(expected) else (lambda entries: len(entries) == expected)
        deadline = time.monotonic() + timeout
        while True:
            entries = self.health(service, **kw)
            if ok(entries):
                return entries
            if time.monotonic() > deadline:
                got = sorted(f"{e['Service']['ID']}@{e['Service'].get('Address')}:{e['Service']['Port']}"
                             for e in entries)
                raise TimeoutError(f"health of {service!r} not as expected ({expected}) within {timeout:g}s: {got}")
            time.sleep(0.05)

    # ---- KV -----------------------------------------------------------------------------

    def kv_put(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        if self.put(f"/v1/kv/{_key(key)}", data=data) is not True:
            raise ConsulError(f"PUT /v1/kv/{key}: not stored")

    def kv_get(self, key: str) -> str | None:
        """The value of ``key`` as text, or None when it does not exist."""
        status, _, text = self.request("GET", f"/v1/kv/{_key(key)}", query={"raw": True})
        return None if status == 404 else text.decode()

    def kv_keys(self, prefix: str = "") -> list[str]:
        return self.get(f"/v1/kv/{_key(prefix)}", query={"keys": True}) or []

    def kv_delete(self, key: str, recurse: bool = False) -> None:
        self.request("DELETE", f"/v1/kv/{_key(key)}", query={"recurse": recurse})


def _seg(text: str) -> str:
    """One URL path segment (ids may hold ':', which Consul accepts as is)."""
    return urllib.parse.quote(text, safe=":")


def _key(key: str) -> str:
    """A KV key as a URL path (its '/' separators kept)."""
    return urllib.parse.quote(key.lstrip("/"), safe="/:")
