"""The Docker Engine API, as far as ``--docker`` needs it: the engine's version, its running
containers, one container's details, and its stream of container and network events.

:func:`endpoint` turns ``--docker URL`` / ``DOCKER_HOST`` (and the TLS variables, read as
the Docker CLI reads them) into an :class:`Endpoint`, checked once at the start;
:class:`DockerClient` talks to it with httpx under trio (no hand-written HTTP; the event
stream is an ordinary trio read, so a cancel scope ends it at once, unlike docker-py's
blocking generator in a worker thread). What the daemon makes of the answers is not here.

Error handling: a bad URL or TLS setting raises :class:`DockerConfigError` naming where it
came from; everything that can go wrong on the wire (no socket, refused, timeout, an HTTP
error, a body that is no JSON, a broken stream) raises :class:`DockerError`, one line with
the endpoint's URL and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx

DEFAULT_URL = "unix:///var/run/docker.sock"
ACCEPTED = "expected unix:///PATH, tcp://HOST[:PORT] or an absolute socket path"
# API versions spoken: 1.24 (Docker 1.12) is the oldest with the event format used here and
# the oldest Docker 25+ still serves; requests go to min(engine's, MAX_API), so that a newer
# engine answers in the schema this was written for. Docker 29 serves only >= 1.44: keep
# MAX_API at or above that.
MIN_API, MAX_API = (1, 24), (1, 47)
EVENT_TYPES = ("container", "network")


class DockerConfigError(ValueError):
    """``--docker`` / ``DOCKER_HOST`` / the TLS variables say something unusable."""


class DockerError(Exception):
    """The engine is unreachable or gave an answer that cannot be used."""


@dataclass(frozen=True)
class TLS:
    """Client TLS as the Docker CLI sets it up from DOCKER_TLS_VERIFY / DOCKER_TLS."""

    verify: bool  # DOCKER_TLS_VERIFY set (to anything): check the engine against ca
    ca: str | None
    cert: str | None  # client certificate and key: both or neither
    key: str | None


@dataclass(frozen=True)
class Endpoint:
    """Where the engine listens. ``url`` as given; ``where`` it came from ("--docker",
    "env DOCKER_HOST" or "default"); ``uds`` the socket path of a unix URL;
    ``base_url`` what HTTP requests go to; ``tls`` for https."""

    url: str
    where: str
    uds: str | None = None
    base_url: str = "http://docker"  # a unix socket's requests need some host name
    tls: TLS | None = None


def endpoint(flag: str | None, env: Mapping[str, str]) -> Endpoint:
    """The engine's endpoint: ``flag`` (``--docker``; None or "" = not given), else
    ``DOCKER_HOST``, else ``unix:///var/run/docker.sock``.

    Accepted: ``unix:///PATH``, a bare absolute path (the same), ``tcp://HOST[:PORT]``
    (port 2375, or 2376 with TLS, as the CLI). TCP uses https when DOCKER_TLS_VERIFY or
    DOCKER_TLS is set to anything non-empty (so the CLI: ``DOCKER_TLS_VERIFY=0`` verifies
    too), verifying the engine only with DOCKER_TLS_VERIFY; the PEM files come from
    DOCKER_CERT_PATH (else DOCKER_CONFIG, else ~/.docker): ca.pem (needed to verify),
    cert.pem and key.pem (used when present). They are loaded here, so a typo fails the
    start. DOCKER_CONTEXT and ``docker context`` are not read: give the URL.

    Raises:
        DockerConfigError: ssh://, npipe://, fd:// or anything else (quoting the value and
            where it came from), or unusable TLS files.
    """
    url, where = (flag, "--docker") if flag else \
        (env["DOCKER_HOST"], "env DOCKER_HOST") if env.get("DOCKER_HOST") else (DEFAULT_URL, "default")

    def bad(problem: str) -> DockerConfigError:
        return DockerConfigError(f"{where} {url!r}: {problem}")

    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:  # a bare path is a unix socket; anything else bare is no URL
        scheme, rest = ("unix", text) if text.startswith("/") else ("", text)
    match scheme.lower():
        case "unix":
            if not rest.startswith("/"):
                raise bad(f"the socket path must be absolute; {ACCEPTED}")
            return Endpoint(url, where, uds=rest)
        case "tcp":
            try:
                parts = urllib.parse.urlsplit("//" + rest)
                host, port = parts.hostname, parts.port
            except ValueError as exc:
                raise bad(f"{exc}; {ACCEPTED}") from None
            if not host or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
                raise bad(f"not HOST[:PORT]; {ACCEPTED}")
            tls = _tls(env)
            netloc = f"[{host}]" if ":" in host else host
            base = f"{'https' if tls else 'http'}://{netloc}:{port or (2376 if tls else 2375)}"
            return Endpoint(url, where, base_url=base, tls=tls)
        case "ssh":
            raise bad("ssh:// is not supported: forward the engine's socket "
                      "(ssh -NL /tmp/docker.sock:/var/run/docker.sock HOST) and use unix:///tmp/docker.sock")
        case "npipe":
            raise bad("npipe:// (a Windows named pipe) is not supported; " + ACCEPTED)
        case "fd":
            raise bad("fd:// is how systemd hands the engine its own socket, not an address to connect to; "
                      + ACCEPTED)
        case _:
            raise bad(ACCEPTED)


def _tls(env: Mapping[str, str]) -> TLS | None:
    verify = bool(env.get("DOCKER_TLS_VERIFY"))
    if not verify and not env.get("DOCKER_TLS"):
        return None
    given = env.get("DOCKER_CERT_PATH")
    folder = given or env.get("DOCKER_CONFIG") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".docker")
    origin = f"env DOCKER_CERT_PATH {given!r}" if given else f"{folder!r} (DOCKER_CERT_PATH is not set)"
    ca, cert, key = (os.path.join(folder, name) for name in ("ca.pem", "cert.pem", "key.pem"))
    if (os.path.exists(cert), os.path.exists(key)) == (False, False):
        cert = key = None
    tls = TLS(verify, ca if verify else None, cert, key)
    try:
        for path in filter(None, (tls.ca, tls.cert, tls.key)):
            open(path, "rb").close()  # an OSError that names the file
        _ssl_context(tls)
    except (OSError, ssl.SSLError) as exc:  # SSLError: a file that is no PEM, a key that does not fit
        raise DockerConfigError(f"TLS files in {origin}: {exc}") from None
    return tls


def _ssl_context(tls: TLS) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca) if tls.verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if not tls.verify:  # DOCKER_TLS without DOCKER_TLS_VERIFY: encrypted, engine not checked (the CLI's choice)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if tls.cert or tls.key:
        context.load_cert_chain(tls.cert or "(no cert.pem)", tls.key or "(no key.pem)")
    return context


def _reason(exc: BaseException, uds: str | None) -> str:
    """One line for the user: the OSError underneath httpx's wrappers where there is one."""
    def telling(e: BaseException) -> bool:  # an SSLError's errno means nothing; trio's summary OSError has none
        return isinstance(e, ssl.SSLError) or (isinstance(e, OSError) and e.errno is not None)

    found, seen = [exc], set()  # depth first: causes, contexts, a group's members (trio's TCP attempts)
    while found and not telling(cause := found.pop()):
        if id(cause) not in seen:
            seen.add(id(cause))
            found += [e for e in (cause.__context__, cause.__cause__, *getattr(cause, "exceptions", ())) if e]
    if isinstance(cause, ssl.SSLError):
        return " ".join(str(cause).split())
    if isinstance(cause, OSError) and cause.errno is not None:
        if uds and cause.errno == errno.EACCES:
            return "permission denied (run as root or in the socket's group, e.g. docker)"
        hint = {errno.ENOENT: " (in a container, mount it: -v /var/run/docker.sock:/var/run/docker.sock)",
                errno.ECONNREFUSED: " (no engine listens there)"}.get(cause.errno, "") if uds else ""
        return f"[Errno {cause.errno}] {os.strerror(cause.errno)}{hint}"
    return " ".join(str(exc).split()) or type(exc).__name__


class DockerClient:
    """One engine's API over one httpx connection pool; an async context manager.

    Calls fix the API version first (:meth:`version`) if not done yet. Timeouts: every
    request has ``timeout`` seconds to connect and answer, but the event stream waits for
    events for ever. Raises :class:`DockerError` for anything that goes wrong, also when
    the endpoint's TLS files can no longer be loaded.
    """

    def __init__(self, ep: Endpoint, *, timeout: float = 5.0):
        self.endpoint, self.timeout = ep, timeout
        self.api: str | None = None  # "/v1.41" once version() ran
        try:  # endpoint() loaded the files once; they may have gone since (a reconnect)
            context = _ssl_context(ep.tls) if ep.tls else False  # False: plain http loads no CA store
        except (OSError, ssl.SSLError) as exc:
            raise DockerError(f"{ep.url}: TLS files: {exc}") from None
        transport = httpx.AsyncHTTPTransport(uds=ep.uds, verify=context, trust_env=False)
        self._http = httpx.AsyncClient(transport=transport, base_url=ep.base_url, timeout=timeout, trust_env=False)

    async def __aenter__(self) -> DockerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        await self._http.aclose()

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except httpx.ConnectError as exc:
            raise DockerError(f"cannot connect to {self.endpoint.url}: {_reason(exc, self.endpoint.uds)}") from exc
        except httpx.TimeoutException as exc:
            raise DockerError(f"{self.endpoint.url}: {what}: no answer within {self.timeout:g}s") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise DockerError(f"{self.endpoint.url}: {what}: {_reason(exc, self.endpoint.uds)}") from exc

    async def _check(self, response: httpx.Response, what: str) -> None:
        if response.is_success:
            return
        body = await response.aread()
        try:
            message = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode(errors="replace")[:200]
        raise DockerError(f"{self.endpoint.url}: {what}: HTTP {response.status_code} {' '.join(str(message).split())}")

    async def _get(self, path: str, kind: type, *, prefix: str | None = None, missing_ok: bool = False):
        prefix = await self._prefix() if prefix is None else prefix
        what = f"GET {prefix}{path}"
        with self._errors(what):
            response = await self._http.get(prefix + path)
            if missing_ok and response.status_code == 404:
                return None
            await self._check(response, what)
        try:
            answer = response.json()
        except ValueError as exc:
            raise DockerError(f"{self.endpoint.url}: {what}: the answer is no JSON ({exc})") from None
        if not isinstance(answer, kind):
            raise DockerError(f"{self.endpoint.url}: {what}: expected a JSON {kind.__name__}, got {answer!r:.80}")
        return answer

    async def _prefix(self) -> str:
        if self.api is None:
            await self.version()
        return self.api

    async def version(self) -> dict:
        """``GET /version``; fixes the API version of later calls at min(the engine's,
        :data:`MAX_API`).

        Raises:
            DockerError: unreachable, or the engine speaks no version in MIN_API..MAX_API.
        """
        info = await self._get("/version", dict, prefix="")
        try:
            engine, oldest = (tuple(int(n) for n in str(info.get(k, d)).split(".")) for k, d in
                              (("ApiVersion", None), ("MinAPIVersion", "0.0")))
        except ValueError:
            raise DockerError(f"{self.endpoint.url}: GET /version: no API version in {info!r:.120}") from None
        use = min(engine, MAX_API)
        if use < MIN_API or use < oldest:
            raise DockerError(f"{self.endpoint.url}: the engine speaks API {info.get('MinAPIVersion', '?')} to "
                              f"{info['ApiVersion']}, this client {'.'.join(map(str, MIN_API))} to "
                              f"{'.'.join(map(str, MAX_API))}")
        self.api = "/v%d.%d" % use
        return info

    async def containers(self) -> list[dict]:
        """``GET /containers/json``: the running containers (Id, Names, Labels,
        NetworkSettings.Networks.*.IPAddress / GlobalIPv6Address ...)."""
        return await self._get("/containers/json", list)

    async def inspect(self, cid: str) -> dict | None:
        """``GET /containers/{cid}/json`` (Config.Env, Config.Labels, NetworkSettings ...);
        None when the engine knows no such container (gone)."""
        return await self._get(f"/containers/{urllib.parse.quote(cid, safe='')}/json", dict, missing_ok=True)

    @contextlib.asynccontextmanager
    async def events(self, since: float | None = None) -> AsyncIterator[AsyncIterator[dict]]:
        """``GET /events`` of containers and networks: ``async with client.events() as
        stream: async for event in stream``, each event a decoded dict (Type, Action,
        Actor.ID, Actor.Attributes, time, timeNano).

        The context is entered once the engine answered 200. The engine sends that answer
        just before it subscribes (moby's getEvents), so an event in that moment is missed
        unless ``since`` (a Unix time, on the engine's clock) asks the engine to replay its
        recent events from then on: pass a time from before the call, and expect repeats.

        Resource handling: leaving the context (also by a cancellation) closes the
        stream's connection. A cancelled read ends the stream too (httpx cannot resume
        it): put timeouts around the whole ``async with``, not around one read.

        Raises:
            DockerError: on entry (unreachable, HTTP error), and out of the iteration: a
                broken stream, one that ended, an event that is no JSON object, a read after a
                cancelled one.
        """
        prefix = await self._prefix()
        what = f"GET {prefix}/events"
        params = {"filters": json.dumps({"type": list(EVENT_TYPES)})}
        if since is not None:
            params["since"] = f"{since:.9f}"
        async with contextlib.AsyncExitStack() as stack:
            with self._errors(what):
                response = await stack.enter_async_context(self._http.stream(
                    "GET", prefix + "/events", params=params, timeout=httpx.Timeout(self.timeout, read=None)))
                await self._check(response, what)
            lines = response.aiter_lines()
            stack.push_async_callback(lines.aclose)
            yield _EventStream(self, lines, what)


class _EventStream:
    """The decoded events of one ``GET /events``. Not an async generator: a cancelled read
    ends an async generator, whose next read would then stop quietly, as if there were no
    more events; here it raises DockerError."""

    def __init__(self, client: DockerClient, lines: AsyncIterator[str], what: str):
        self._client, self._lines, self._what = client, lines, what
        self._ended: str | None = None

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> dict:
        where = f"{self._client.endpoint.url}: {self._what}"
        if self._ended is not None:
            raise DockerError(self._ended)
        try:
            with self._client._errors(self._what):
                line = ""
                while not line:
                    got = await anext(self._lines, None)
                    if got is None:
                        raise DockerError(f"{where}: the engine ended the event stream")
                    line = got.strip().lstrip("\x1e")  # \x1e: an RFC 7464 JSON sequence's record separator
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                raise DockerError(f"{where}: an event is no JSON object: {line!r:.80}")
            return event
        except BaseException as exc:  # the stream is over: say why at every later read too
            self._ended = str(exc) if isinstance(exc, DockerError) else f"{where}: a read was cancelled, which ends it"
            raise
