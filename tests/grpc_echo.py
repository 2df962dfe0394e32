"""A real gRPC server and client (grpcio, HTTP/2) for tests/test_e2e_protocols.py, with
no generated code: the methods take and give raw bytes (grpcio's generic handlers).

    python -m tests.grpc_echo serve PORT          # prints "ready", serves until killed
    python -m tests.grpc_echo call PORT N SIZE    # prints one JSON line of results
    python -m tests.grpc_echo listen PORT         # one long Tick stream: "tick N" lines, then "end CODE"

Methods of service ``amb.Echo``:

* ``Stream`` (bidirectional streaming): echoes every message back, in order;
* ``Hash`` (unary): the SHA-256 of the request;
* ``Tick`` (server streaming): the request is a count; one 8-byte sequence number a
  message, every 10 ms, for as long as the client listens (a long-lived stream).

``call`` streams N messages of SIZE bytes (each different) through ``Stream`` and checks
every echo; makes 200 ``Hash`` calls multiplexed on the same connection; and reads 20
``Tick``s. Both ends turn grpcio's HTTP proxy support off: ``http_proxy`` in the
environment must not take the test's traffic elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent import futures

import grpc

OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 8 << 20),
           ("grpc.max_send_message_length", 8 << 20)]


def message(i: int, size: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def serve(port: int) -> None:
    def stream(requests, context):
        yield from requests

    def digest(request, context):
        return hashlib.sha256(request).digest()

    def tick(request, context):
        for n in range(int.from_bytes(request, "big")):
            if not context.is_active():
                return
            yield n.to_bytes(8, "big")
            time.sleep(0.01)

    handler = grpc.method_handlers_generic_handler("amb.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "Hash": grpc.unary_unary_rpc_method_handler(digest),
        "Tick": grpc.unary_stream_rpc_method_handler(tick),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(port: int, n: int, size: int) -> dict:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stream = channel.stream_stream("/amb.Echo/Stream")
        sent = [message(i, size) for i in range(n)]
        echoed = list(stream(iter(sent), timeout=60))
        digest = channel.unary_unary("/amb.Echo/Hash")
        calls = [digest.future(message(i, 1000), timeout=30) for i in range(200)]
        hashes_ok = sum(c.result() == hashlib.sha256(message(i, 1000)).digest() for i, c in enumerate(calls))
        ticks = [int.from_bytes(t, "big") for t in channel.unary_stream("/amb.Echo/Tick")((20).to_bytes(8, "big"),
                                                                                          timeout=30)]
    return {"echoed": len(echoed), "echo_ok": echoed == sent, "hashes_ok": hashes_ok, "ticks": ticks}


def listen(port: int) -> None:
    """A long-lived server stream, as a consumer's watch or subscription would hold."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        code = "OK"
        try:
            for t in channel.unary_stream("/amb.Echo/Tick")((10**9).to_bytes(8, "big"), timeout=600):
                print(f"tick {int.from_bytes(t, 'big')}", flush=True)
        except grpc.RpcError as exc:
            code = exc.code().name
        print(f"end {code}", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]))
        return 0
    if argv[:1] == ["listen"]:
        listen(int(argv[1]))
        return 0
    if argv[:1] == ["call"]:
        print(json.dumps(call(int(argv[1]), int(argv[2]), int(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
