"""Relay bytes both ways between two connected sockets (user.py), in the kernel with a BPF
sockmap (sockmap.py) where it allows it."""

from .sockmap import Sockmap, SockmapError, bpf_syscall_number, cookie
from .user import SPLICE_AVAILABLE, RelayResult, relay
