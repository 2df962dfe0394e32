"""The kernel's BPF interface as the sockmap program uses it: numbers and layouts only.

Every value here is fixed by the kernel's user-space ABI (include/uapi/linux/bpf.h, the
architectures' system call tables, asm-generic/socket.h), so it is written once, named,
and never computed. sockmap.py builds the program and the bpf(2) calls from these.
"""

from __future__ import annotations

import struct

# bpf(2)'s number by platform.machine(), from each architecture's system call table
# (aarch64, riscv64 and loongarch64 share the generic one; 32-bit arm is its EABI), with
# the width of that architecture's pointers: a process of the other width (32-bit Python
# on a 64-bit kernel, or a 64-bit one under `setarch i686`) uses another table. Calling a
# wrong number would run some other system call with our arguments.
BPF_SYSCALLS = {
    "x86_64": (321, 64), "i386": (357, 32), "i686": (357, 32),
    "aarch64": (280, 64), "armv7l": (386, 32), "armv6l": (386, 32),
    "riscv64": (280, 64), "ppc64": (361, 64), "ppc64le": (361, 64), "s390x": (351, 64),
    "loongarch64": (280, 64),
}

# enum bpf_cmd
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 3, 5, 8
BPF_MAP_TYPE_SOCKHASH = 18  # enum bpf_map_type
BPF_PROG_TYPE_SK_SKB = 14  # enum bpf_prog_type
BPF_SK_SKB_STREAM_VERDICT = 5  # enum bpf_attach_type
BPF_PSEUDO_MAP_FD = 1  # src_reg of a 64-bit immediate load: the immediate is a map fd
BPF_ANY = 0  # map update flags: create or replace

# Helper function ids (enum bpf_func_id, the FN() list in bpf.h).
FN_GET_SOCKET_COOKIE = 46
FN_SK_REDIRECT_HASH = 72

# Opcodes of the instructions the program uses (class | operation | source).
MOV64_REG = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X: dst = src
MOV64_IMM = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
ADD64_IMM = 0x07  # BPF_ALU64 | BPF_ADD | BPF_K: dst += imm
STX_DW = 0x7B  # BPF_STX | BPF_MEM | BPF_DW: *(u64 *)(dst + off) = src
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two slots, a 64-bit immediate
CALL = 0x85  # BPF_JMP | BPF_CALL: call helper imm
EXIT = 0x95  # BPF_JMP | BPF_EXIT

# union bpf_attr: the kernel reads `size` bytes and wants everything past the fields a
# command uses zero; 128 bytes covers every command used here.
ATTR_SIZE = 128
INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst_reg:4 | src_reg:4, off, imm
MAP_CREATE_ATTR = struct.Struct("<IIII")  # map_type, key_size, value_size, max_entries
# prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
# prog_flags, prog_name[16], prog_ifindex, expected_attach_type
PROG_LOAD_ATTR = struct.Struct("<IIQQIIQII16sII")
PROG_ATTACH_ATTR = struct.Struct("<IIII")  # target_fd, attach_bpf_fd, attach_type, attach_flags
MAP_ELEM_ATTR = struct.Struct("<IIQQQ")  # map_fd, (pad), key, value (or next_key), flags

SO_COOKIE = 57  # getsockopt(SOL_SOCKET): the socket's u64 cookie, the maps' key
