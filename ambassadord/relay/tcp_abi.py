"""The kernel's TCP socket interface as the relay uses it: numbers and layouts only.

While the kernel relays a connection no byte passes through the daemon, so what it knows
of the connection it reads from the sockets: struct tcp_info (include/uapi/linux/tcp.h)
and the send queue's length (ioctl TIOCOUTQ, alias SIOCOUTQ). And a reset is passed on
with SO_LINGER (struct linger, every relay).
"""

from __future__ import annotations

import struct
import termios

# struct tcp_info: the first byte is tcpi_state; tcpi_bytes_acked and tcpi_bytes_received
# (u64 each, Linux 4.1+) sit at offset 120. Asking for TCP_INFO_LEN bytes gets both.
TCP_INFO_BYTES = struct.Struct("<QQ")  # tcpi_bytes_acked, tcpi_bytes_received
TCP_INFO_BYTES_OFFSET = 120
TCP_INFO_LEN = 136

TCP_CLOSE = 7  # a tcpi_state (include/net/tcp_states.h; netinet/tcp.h names it too)

# Bytes in a socket's send queue, not yet acknowledged by the peer. The number differs
# between architectures (0x5411 on x86 and the generic table, another on powerpc, mips,
# sparc): Python's termios module has the platform's own.
TIOCOUTQ = termios.TIOCOUTQ

# setsockopt(SOL_SOCKET, SO_SNDBUFFORCE): SO_SNDBUF without the net.core.wmem_max cap, for
# CAP_NET_ADMIN. asm-generic/socket.h, which every architecture in bpf_abi.BPF_SYSCALLS
# uses for it (mips, sparc, alpha and parisc differ); Python's socket module lacks it.
SO_SNDBUFFORCE = 32

LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}: close() sends an RST
