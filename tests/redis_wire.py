"""Redis over a raw socket, counting every byte: the requests and replies the admin,
reload and fault tests send through the daemon (a helper module, imported by test files)."""

from __future__ import annotations

import socket


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def read_line(sock: socket.socket) -> bytes:
    """One reply line (simple replies only: +OK, +PONG, -ERR ...). Reads byte-exactly up to
    and including CRLF, so the byte count of what was received is exact."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def read_bulk(sock: socket.socket) -> bytes:
    """A whole bulk-string reply ($N CRLF data CRLF), raw, exactly."""
    head = read_line(sock)
    assert head.startswith(b"$"), head
    n = int(head[1:-2])
    rest = b""
    while len(rest) < n + 2:
        chunk = sock.recv(n + 2 - len(rest))
        if not chunk:
            raise ConnectionError("closed mid-reply")
        rest += chunk
    return head + rest


def served_by(sock: socket.socket) -> int:
    """Which redis-server answered on ``sock``: the port it listens on (CONFIG GET port)."""
    sock.sendall(b"CONFIG GET port\r\n")
    reply = b""
    while reply.count(b"\r\n") < 5:
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError(f"closed after {reply!r}")
        reply += chunk
    return int(reply.split(b"\r\n")[4])
