"""A real etcd for tests: one member on loopback (or in a network namespace), driven with etcdctl.

:func:`require_etcd` finds Debian's ``etcd`` (package etcd-server) and ``etcdctl``
(etcd-client); when they are missing the test is skipped, or fails under ``CI=true``,
where a skip would hide a gap.

:class:`EtcdServer` starts ``etcd`` as a single-member cluster with its client and peer
ports picked free (or given), a data directory in a temporary directory that is **kept
across** :meth:`~EtcdServer.stop` / :meth:`~EtcdServer.start` / :meth:`~EtcdServer.restart`
(so keys, revisions and auth settings survive a restart, as with a real etcd), and
``--log-level error``. Ready means ``etcdctl endpoint health`` succeeds, polled with a
deadline. Short Raft timings (heartbeat 10 ms, election 100 ms) make a start or a restart
elect its leader within a fraction of a second.

The test process drives it with ``etcdctl`` (API v3, ``-w json``): :meth:`put`, :meth:`get`,
:meth:`get_prefix`, :meth:`delete` (optionally a whole prefix), :meth:`compact`,
:meth:`revision`. Each returns once etcd has committed the change, and the write methods
return the revision it made, so a test can time a change from the moment it exists.
``ETCDCTL_*`` variables of the test process never reach etcdctl (``env -u``), and
``ETCD_*`` variables never reach etcd. Its output goes to a log in the temporary directory,
which failures quote and tests/conftest.py shows when a test fails (the process handling
is tests/server_process.py's, shared with tests/consul.py).

Options:

* ``password``: on the first start, ``etcdctl user add root:PASSWORD`` then ``auth enable``;
  every later etcdctl call of this object authenticates as root. Clients without a user
  are refused from then on (also after a restart: auth lives in the data directory).
* ``tls`` (:class:`TlsFiles`, e.g. from :func:`make_tls`, which runs ``openssl``): the client
  URLs are ``https://``, served with ``tls.cert`` / ``tls.key``; etcdctl trusts ``tls.ca``.
  With ``client_cert_auth`` etcd also demands a client certificate signed by ``tls.ca``
  (``--client-cert-auth --trusted-ca-file``); etcdctl presents ``tls.client_cert``.
  The peer URL stays plain http (one member: no peer traffic).
* ``ns`` (:class:`tests.netns.Netns`): etcd runs in that namespace (``ns.popen``) and every
  etcdctl call runs there too (``ns.exec``); ports are picked free there. ``host`` is the
  client address etcdctl talks to (and the advertised one); ``listen_hosts`` adds more
  client addresses on the same port (e.g. a LAN address besides 127.0.0.1).
  ``client_port=2379`` makes it the default endpoint of a client that is told none.

Example::

    require_etcd()
    with EtcdServer() as etcd:
        rev = etcd.put("/svc/redis/a", "127.0.0.1:6379")
        etcd.restart()                      # same ports, same data
        assert etcd.get("/svc/redis/a") == b"127.0.0.1:6379"
        etcd.compact(etcd.revision())
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.daemon import free_port
from tests.server_process import READY_TIMEOUT, ServerProcess, url_host

if TYPE_CHECKING:
    from tests.netns import Netns

CALL_TIMEOUT = 15.0


def etcd_missing() -> list[str]:
    """The etcd binaries this machine lacks (empty when both are there)."""
    return [name for name in ("etcd", "etcdctl") if shutil.which(name) is None]


def require_etcd() -> None:
    """Skip when etcd/etcdctl are missing; fail under CI, where a skip would hide a gap."""
    import pytest

    missing = etcd_missing()
    if not missing:
        return
    message = (f"{' and '.join(missing)} missing (Debian packages etcd-server and etcd-client; "
               "scripts/test installs them)")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI=true: this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


class EtcdError(RuntimeError):
    """etcd did not start or died, or an etcdctl call failed (the message quotes its stderr)."""


# ---- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate and key it signed, optionally a client pair."""

    ca: str
    cert: str
    key: str
    client_cert: str | None = None
    client_key: str | None = None


def make_tls(directory: str | Path, *, ips: tuple[str, ...] = ("127.0.0.1",), dns: tuple[str, ...] = ("localhost",),
             client: bool = True) -> TlsFiles:
    """A throw-away CA and a server certificate for ``ips`` / ``dns`` (subjectAltName), with openssl.

    With ``client``, also a client certificate (extendedKeyUsage clientAuth) signed by the
    same CA. EC P-256 keys, valid for two days. Raises EtcdError quoting openssl's stderr.
    """
    if shutil.which("openssl") is None:
        raise EtcdError("openssl is missing (Debian package openssl)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, timeout=30, cwd=d)
        if proc.returncode != 0:
            raise EtcdError(f"openssl {' '.join(args)} exited {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace').strip()}")

    key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key_args, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ambassadord test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(name: str, cn: str, ext: str) -> tuple[str, str]:
        (d / f"{name}.ext").write_text(ext)
        openssl("req", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
        return str(d / f"{name}.pem"), str(d / f"{name}.key")

    san = ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in dns])
    cert, key = leaf("server", "etcd", f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                                      f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    client_cert = client_key = None
    if client:
        client_cert, client_key = leaf("client", "root", "basicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n")
    return TlsFiles(ca=str(d / "ca.pem"), cert=cert, key=key, client_cert=client_cert, client_key=client_key)


# ---- the server -------------------------------------------------------------------------------


class EtcdServer(ServerProcess):
    """One etcd member; see the module docstring. Life cycle (tests/server_process.py):
    ``start()``, ``stop(kill=...)``, ``restart(kill=...)`` (same ports, same data directory:
    keys and revisions survive), ``close()`` (also removes the data and the log),
    ``running``, ``log_tail()``."""

    error = EtcdError
    ready_word = "healthy"

    def __init__(self, *, ns: Netns | None = None, host: str = "127.0.0.1", listen_hosts: tuple[str, ...] = (),
                 client_port: int | None = None, peer_port: int | None = None, password: str | None = None,
                 tls: TlsFiles | None = None, client_cert_auth: bool = False, name: str = "amb-etcd",
                 start: bool = True, ready_timeout: float = READY_TIMEOUT):
        if client_cert_auth and (tls is None or not tls.client_cert):
            raise ValueError("client_cert_auth needs tls with a client certificate")
        self.ns = ns
        self.host = host
        self.listen_hosts = tuple(h for h in listen_hosts if h != host)
        self.client_port = client_port or free_port(host, ns=ns)
        self.peer_port = peer_port or self._other_free_port()
        self.password = password
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.name = name
        super().__init__("etcd")
        self.data_dir = Path(self._dir.name) / "data"
        self._auth_enabled = False
        if start:
            self._start_or_close(ready_timeout)

    def _other_free_port(self) -> int:
        for _ in range(20):
            port = free_port(self.host, ns=self.ns)
            if port != self.client_port:
                return port
        raise EtcdError("no second free port")

    # ---- addresses ------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, client port): what ResolverOptions.etcd_endpoints holds."""
        return self.host, self.client_port

    @property
    def addr(self) -> str:
        """``HOST:PORT`` (IPv6 in brackets), as --etcd / ETCDCTL_ENDPOINTS / a spec's netloc take it."""
        return f"{url_host(self.host)}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.addr}"

    def client_urls(self) -> list[str]:
        return [f"{self.scheme}://{url_host(h)}:{self.client_port}" for h in (self.host, *self.listen_hosts)]

    @property
    def peer_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.peer_port}"

    @property
    def user(self) -> str | None:
        """``root:PASSWORD`` when auth is on (ResolverOptions.etcd_user / --etcd-user)."""
        return f"root:{self.password}" if self.password else None

    # ---- life cycle -----------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
               "--listen-client-urls", ",".join(self.client_urls()), "--advertise-client-urls", self.url,
               "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", f"{self.name}={self.peer_url}", "--initial-cluster-state", "new",
               "--initial-cluster-token", f"{self.name}-{os.getpid()}",
               "--heartbeat-interval", "10", "--election-timeout", "100",
               "--logger", "zap", "--log-outputs", "stderr", "--log-level", "error"]
        if self.tls:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.client_cert_auth:
                cmd += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        return cmd

    @property
    def label(self) -> str:
        return f"etcd {self.name}"

    def _addresses(self) -> str:
        return self.url

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}

    def _ready_step(self) -> str | None:
        """None once ``etcdctl endpoint health`` succeeds, else its error."""
        try:
            self.etcdctl("endpoint", "health", timeout=5, dial_timeout="0.5s", command_timeout="1s")
        except EtcdError as exc:
            return str(exc)
        return None

    def _on_ready(self) -> None:
        """On the first start with ``password``: add the root user and enable auth."""
        if self.password and not self._auth_enabled:
            self.etcdctl("user", "add", f"root:{self.password}", "--interactive=false", auth=False)
            self.etcdctl("auth", "enable", auth=False)
            self._auth_enabled = True

    # ---- etcdctl --------------------------------------------------------------------

    def etcdctl(self, *args: str, input: bytes | None = None, json_out: bool = False, auth: bool = True,
                timeout: float = CALL_TIMEOUT, dial_timeout: str = "2s", command_timeout: str = "5s"):
        """Run ``etcdctl ARGS`` against this member (in its namespace); return stdout (parsed with ``json_out``).

        Raises EtcdError quoting etcdctl's stderr when it fails.
        """
        unset = [a for name in sorted(os.environ) if name.startswith("ETCDCTL_") for a in ("-u", name)]
        cmd = ["env", *unset, "ETCDCTL_API=3", "etcdctl", "--endpoints", self.url,
               "--dial-timeout", dial_timeout, "--command-timeout", command_timeout]
        if self.tls:
            cmd += ["--cacert", self.tls.ca]
            if self.client_cert_auth:
                cmd += ["--cert", self.tls.client_cert, "--key", self.tls.client_key]
        if auth and self._auth_enabled:
            cmd += ["--user", f"root:{self.password}"]
        if json_out:
            cmd += ["-w", "json"]
        cmd += list(args)
        try:
            if self.ns is not None:
                out = self.ns.exec(cmd, input=input, timeout=timeout)
            else:
                proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
                if proc.returncode != 0:
                    raise EtcdError(f"etcdctl {' '.join(args)} exited {proc.returncode}: "
                                    f"{proc.stderr.decode(errors='replace').strip()}")
                out = proc.stdout.decode(errors="replace")
        except RuntimeError as exc:  # netns.run's failure (EtcdError is one too)
            if isinstance(exc, EtcdError):
                raise
            raise EtcdError(f"etcdctl {' '.join(args)}: {exc}") from None
        except subprocess.TimeoutExpired:
            raise EtcdError(f"etcdctl {' '.join(args)}: no answer within {timeout:g}s") from None
        return json.loads(out) if json_out else out

    def put(self, key: str, value: str | bytes) -> int:
        """Store ``value`` (any bytes; given on stdin) under ``key``; return the new revision."""
        data = value.encode() if isinstance(value, str) else value
        out = self.etcdctl("put", "--", key, input=data, json_out=True)
        return int(out["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (every key starting with it, with ``prefix``); return the revision after."""
        args = ["del", *(["--prefix"] if prefix else []), "--", key]
        return int(self.etcdctl(*args, json_out=True)["header"]["revision"])

    def _get(self, *args: str) -> dict[str, bytes]:
        out = self.etcdctl("get", *args, json_out=True)
        return {base64.b64decode(kv["key"]).decode(errors="replace"): base64.b64decode(kv.get("value", ""))
                for kv in out.get("kvs") or []}

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with ``prefix`` and its value."""
        return self._get("--prefix", "--", prefix)

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, None when it does not exist."""
        return self._get("--", key).get(key)

    def revision(self) -> int:
        """The store's current revision."""
        out = self.etcdctl("endpoint", "status", json_out=True)
        return int(out[0]["Status"]["header"]["revision"])

    def compact(self, revision: int, *, physical: bool = True) -> None:
        """Compact the history up to ``revision`` (``--physical``: return once it is applied)."""
        self.etcdctl("compaction", *(["--physical"] if physical else []), str(revision))
