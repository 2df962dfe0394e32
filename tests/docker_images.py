"""Docker images made on this machine, for engines that reach no registry (tests/docker_engine.py).

:func:`rootfs_tar` writes the root file system of a tiny image: a few of this machine's
programs, each with every library ``ldd`` names and the dynamic loader, plus /tmp and a
minimal /etc/passwd. ``docker import`` turns the tar into an image in well under a second
(:func:`import_image`); no shell script, no package manager, no network.

:data:`TOOLS` is what the tests' containers need: a shell, ``sleep`` and ``cat`` to hold a
container open or read a file, ``timeout`` to bound a client (Debian 12's redis-cli has no
connect timeout: a SYN that is never answered keeps it for two minutes), and Redis's server
and client. ``redis-server`` is a symlink
to ``redis-check-rdb`` on Debian, and Redis picks its role by the name it was run under: a
program goes into the image under the name it was asked for, with the content of the file
the name resolves to. Directories keep the layout they have here: on a merged-/usr system
(/bin -> usr/bin, /lib64 -> usr/lib64 ...) the image has the same top-level symlinks, so
that ``#!/bin/sh`` and the loader path compiled into every program (/lib64/ld-linux-x86-64.so.2)
resolve in the image as they do here.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from tests.docker_engine import DockerEngine

TOOLS_IMAGE = "amb-test/tools:1"
TOOLS = ("sh", "sleep", "cat", "timeout", "redis-server", "redis-cli")


def libraries(program: str) -> list[str]:
    """The absolute paths of the shared libraries and the loader that ``ldd`` names for
    ``program`` (empty for a static binary)."""
    proc = subprocess.run(["ldd", program], capture_output=True, text=True)
    found = []
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        # "linux-vdso.so.1 (0x...)" (in the kernel, no file), "statically linked"
        words = line.split()
        path = words[words.index("=>") + 1] if "=>" in words else (words[0] if words else "")
        if path.startswith("/"):
            found.append(path)
    return found


_TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def _canonical_dir(path: str) -> str:
    """``path`` with its directory resolved (/bin/sh -> /usr/bin/sh), its own name kept."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _add_file(tar: tarfile.TarFile, name: str, source: str) -> None:
    info = tar.gettarinfo(os.path.realpath(source), arcname=name.lstrip("/"))
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with open(source, "rb") as f:
        tar.addfile(info, f)


def rootfs_tar(dest: Path, programs: Iterable[str] = TOOLS) -> Path:
    """Write to ``dest`` a tar of a root file system holding ``programs`` (names found on
    PATH, or absolute paths) at the paths they have here, with their libraries. Returns ``dest``.

    Raises:
      FileNotFoundError: a program is not on this machine.
    """
    files: dict[str, str] = {}  # path in the image -> file here
    for program in programs:
        path = shutil.which(program)
        if path is None:
            raise FileNotFoundError(f"{program!r} is not installed here (not on PATH)")
        for name in (path, *libraries(path)):
            files[_canonical_dir(name)] = name
    with tarfile.open(dest, "w") as tar:
        for directory, mode in (("tmp", 0o1777), ("etc", 0o755)):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        for top in _TOP_LINKS:
            if os.path.islink(f"/{top}"):
                info = tarfile.TarInfo(top)
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(f"/{top}")
                tar.addfile(info)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(passwd), 0o644
        tar.addfile(info, io.BytesIO(passwd))
        for name, source in sorted(files.items()):
            _add_file(tar, name, source)
    return dest


def import_image(engine: DockerEngine, tar: Path, tag: str = TOOLS_IMAGE) -> None:
    """``docker import TAR TAG`` into ``engine``."""
    engine.docker("import", str(tar), tag)
