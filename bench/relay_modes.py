"""Relay data-path comparison: recv/send, splice(2) and the kernel (BPF sockmap), through a
real ambassadord.

Loopback only, bounded in size and time. Runs the modes interleaved (A B A B ...) and
prints medians of:
  * bulk: one connection streaming N MiB through the proxy into a sink, MiB/s;
  * ping-pong: one connection, 1-byte request / 1-byte reply round trips per second.

Usage: .venv/bin/python bench/relay_modes.py [--rounds 5] [--mib 1024] [--before DIR]

``--before DIR``: every mode also runs from the source tree DIR (e.g. ``git worktree add
/tmp/before <commit>``), interleaved with this one, as "before": a before/after from one
run, on the same machine state.
The side-by-side benchmark against socat, HAProxy and nginx is bench/compare.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sink_and_echo_server(lsock: socket.socket) -> None:
    """Backend: first byte says the mode: b'S' sink (reply total when EOF), b'E' echo."""

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = c.recv(1)
        buf = bytearray(1 << 20)
        if mode == b"S":
            total = 0
            while n := c.recv_into(buf):
                total += n
            c.sendall(str(total).encode())
        else:
            while d := c.recv(1):
                c.sendall(d)
        c.close()

    while True:
        c, _ = lsock.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


MODES = {
    "copy": ["--sockmap", "off", "--splice", "off"],
    "splice": ["--sockmap", "off", "--splice", "on"],
    "sockmap": ["--sockmap", "on"],
}


def start_proxy(mode: str, port: int, backend: int, source: str | None = None) -> subprocess.Popen:
    """ambassadord in ``mode``; from the source tree ``source`` if given (``python -m``
    imports the package from its working directory)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "ambassadord", "run", "--listen", f"127.0.0.1:{port}", "--map", f"{port}=127.0.0.1:{backend}",
         *MODES[mode], "--log-level", "warning"],
        stderr=subprocess.DEVNULL, cwd=source,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise SystemExit(f"proxy ({mode}) did not start")


def bulk(port: int, mib: int) -> float:
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"S")
    chunk = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for _ in range(mib):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    total = int(c.recv(64))
    dt = time.perf_counter() - t0
    c.close()
    assert total == mib << 20, total
    return mib / dt


def pingpong(port: int, seconds: float = 2.0) -> float:
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"E")
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c.sendall(b"x")
        c.recv(1)
        n += 1
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--before", metavar="DIR", help="also run every mode from this source tree, as 'before'")
    args = ap.parse_args()
    if args.before is not None and not os.path.exists(os.path.join(args.before, "ambassadord", "__main__.py")):
        ap.error(f"--before {args.before}: holds no ambassadord source tree")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {mode: (mode, here) for mode in MODES}
    if args.before is not None:
        runs = {name: run for mode in MODES
                for name, run in ((f"{mode} (before)", (mode, args.before)), (mode, (mode, here)))}
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    backend = lsock.getsockname()[1]
    threading.Thread(target=sink_and_echo_server, args=(lsock,), daemon=True).start()
    results = {name: {"bulk": [], "pingpong": []} for name in runs}
    direct = {"bulk": [], "pingpong": []}
    for _ in range(args.rounds):
        direct["bulk"].append(bulk(backend, args.mib))
        direct["pingpong"].append(pingpong(backend))
        for name, (mode, source) in runs.items():
            port = free_port()
            proc = start_proxy(mode, port, backend, source)
            try:
                results[name]["bulk"].append(bulk(port, args.mib))
                results[name]["pingpong"].append(pingpong(port))
            finally:
                proc.terminate()
                proc.wait()
    print(f"{'path':<31}{'bulk MiB/s':>12}{'ping-pong rt/s':>16}")
    rows = {"direct (no proxy)": direct, **{f"ambassadord {name}": r for name, r in results.items()}}
    for label, r in rows.items():
        print(f"{label:<31}{statistics.median(r['bulk']):>12.0f}{statistics.median(r['pingpong']):>16.0f}")


if __name__ == "__main__":
    main()
