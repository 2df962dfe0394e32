"""The proxy's data plane: relay bytes both ways between two connected sockets, half-close aware.

Three ways, fastest first (``relay`` picks):

1. **In the kernel** (``--sockmap``, the default where the kernel allows it; kernel.py):
   both sockets join a BPF sockmap before anything has been read from them, and the
   kernel redirects every chunk from one to the other. The connection's task only waits
   for news from the Watcher: EOF, errors, data the kernel passed up. Bytes are counted
   from the sockets (TCP_INFO). Each socket gets a 32 MiB send buffer, without which bulk
   moves at one buffer per timer tick (kernel.py, "Send buffers"). Not used with an idle
   timeout (no byte passes here to reset it).
2. **recv/send** through one shared scratch buffer, one task per direction (user.py).
3. **splice(2)**, socket -> pipe -> socket, which a recv/send direction switches to once
   it has moved SPLICE_AFTER bytes or filled the whole buffer in one read (bulk): small
   request/response traffic never pays for a pipe (user.py).

Semantics, the same for all three (contract.py):

* EOF on one side becomes ``shutdown(SHUT_WR)`` of the other (as in mitmproxy's TCP
  layer): a client that sends its request and shuts its write side still gets the whole
  reply. The relay ends when both directions have seen EOF. In the kernel, the FIN is
  passed on only once every byte before it has been written into the other socket.
* A reset or any other socket error in either direction ends both directions at once, and
  is passed on as a reset: the other socket gets SO_LINGER 0, so the caller's close()
  sends an RST and drops what is still queued. (Closed normally, it would send a FIN after
  the bytes that made it through, and a truncated stream would look complete.)
* An optional idle timeout ends the relay when no byte moved either way for that long.
* The caller owns the sockets and closes them (``finally``) as soon as the relay returns;
  the relay never closes them. (After a kernel relay they are still in the sockmap:
  closing them is what takes them out.)

How the modules fit (each imports only those above it)::

    bpf_abi, tcp_abi   the kernel's numbers and layouts: bpf(2) commands, map, program
                       and attach types, helper ids, opcodes, bpf_attr layouts, the
                       syscall number per architecture; TCP_INFO offsets, TCP states,
                       TIOCOUTQ, struct linger. No logic.
    contract           RelayResult, Broken, half_close, pass_reset: what every way keeps
    user               the copy and splice pumps (bytes through this process)
    sockmap, watcher   the BPF maps and program; the epoll set that reports EOF and errors
    kernel             KernelRelay: owns the Sockmap and the Watcher (open, run, close),
                       relays one connection in the kernel; TCP_INFO counts, drain and
                       reset checks
    connection         relay(): the entry point, kernel first, user space otherwise

Resource handling: the daemon makes one ``KernelRelay`` at start and closes it at exit
(after the Server stopped); the Server runs its ``run()`` task and hands it to every
``relay(..., kernel=...)``. Nothing else here holds a kernel resource beyond one call: a
splice pipe lives as long as its direction.

A second data plane (issue 14: balancing at connect time, a cgroup ``connect4/6`` program
that sends the consumer straight to a backend, no proxy hop) plugs in beside this package,
not into it: a package of its own (e.g. ``ambassadord/connect/``) whose object keeps the
``dataplane.DataPlane`` contract that ``KernelRelay`` keeps (made at start, one ``run()``
task for the daemon's lifetime, ``close()`` at exit, a context manager). The daemon's life
cycle makes it for the routes in that mode and closes it; it learns each route's backend
sets and ejections through the Server's ``peers.Peers`` interface (``backends``,
``ejected``, ``down``: what the worker pool hears; a Peers that tells both is the daemon's
to make), and the routes in that mode get no REDIRECT rule. server.py and this package stay
as they are: a connection that reaches the proxy is still relayed here.

Measured: bench/compare.py and bench/relay_modes.py (README, "Performance").
"""

from .connection import relay
from .contract import RelayResult
from .kernel import KernelRelay
from .sockmap import Sockmap, SockmapError, bpf_syscall_number, cookie
from .user import SPLICE_AVAILABLE

__all__ = ["KernelRelay", "RelayResult", "SPLICE_AVAILABLE", "Sockmap", "SockmapError", "bpf_syscall_number",
           "cookie", "relay"]
