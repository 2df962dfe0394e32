"""Small real TCP servers under trio, as backends for in-process server tests (a helper
module, imported by test files)."""

from __future__ import annotations

import contextlib
import functools

import trio


@contextlib.asynccontextmanager
async def tcp_server(handler):
    """A trio TCP server on 127.0.0.1:<free port> running ``handler(stream)``; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def echo(stream):
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()
