"""The package as users get it: ``python -m build`` makes a wheel and an sdist whose metadata
is complete (version, MIT licence expression and file, authors, classifiers), and the wheel,
installed into a fresh venv, is a working ambassadord: ``--version``, ``check`` and ``run``
(read back with its ``status``), all from the installed console script.

Offline and fast (a few seconds): the build runs without isolation, on the setuptools of
the test venv (the ``test`` extra pins ``setuptools>=77``, PEP 639's ``license-files``);
the fresh venv is made ``--without-pip`` and the wheel installed into it with the test
venv's pip (``--no-deps --no-index``). Its dependencies come from the test venv, through
a ``.pth`` line naming that venv's site-packages: a path line adds the directory only, so
the test venv's editable install of the source tree (an import hook run by its own
``.pth``) stays out, and the test checks that ``ambassadord`` is imported from the wheel.

The build works on a copy of what the Dockerfile copies too (pyproject.toml, README.md,
LICENSE, ambassadord/, backends/), so it writes nothing into the source tree.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.daemon import REPO_ROOT, Daemon, free_port, wait_until

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "ambassadord", "backends")


def run(cmd, *, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{cmd}: status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """{"wheel": PATH, "sdist": PATH}, built once for the module."""
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        kw = {"ignore": shutil.ignore_patterns("__pycache__", "*.py[co]")} if copy is shutil.copytree else {}
        copy(REPO_ROOT / name, src / name, **kw)
    out = root / "dist"
    proc = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=root, timeout=120)
    # setuptools reports a configuration it may stop accepting (a package it would leave out,
    # a licence file that matched nothing) in a banner between "!!" lines.
    assert "!!" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def metadata(text: str):
    return email.parser.Parser().parsestr(text)


def check_metadata(meta, where: str) -> None:
    assert meta["Name"] == "ambassadord", where
    assert meta["Version"] == VERSION, where
    assert meta["License-Expression"] == "MIT", where
    assert meta.get_all("License-File") == ["LICENSE"], where
    assert meta["Author"] == "the ambassadord authors", where
    assert meta["Requires-Python"] == PYPROJECT["requires-python"], where
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers, where
    assert not [c for c in classifiers if c.startswith("License ::")], f"{where}: PEP 639 forbids both"
    assert "consul" in meta["Keywords"].split(","), where
    assert meta["Description-Content-Type"] == "text/markdown", where
    # No placeholder homes: whatever URL there is must not be an example.
    for url in meta.get_all("Project-URL") or []:
        assert "example" not in url and "TODO" not in url, url


def test_wheel_holds_the_licence_the_metadata_and_every_module(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"ambassadord-{VERSION}.dist-info"
        check_metadata(metadata(whl.read(f"{info}/METADATA").decode()), dist["wheel"].name)
        assert whl.read(f"{info}/licenses/LICENSE") == (REPO_ROOT / "LICENSE").read_bytes()
        assert "ambassadord = ambassadord.cli:main" in whl.read(f"{info}/entry_points.txt").decode()
    # Every module of the source tree (backends/ as ambassadord.backends) and the data files:
    # a new subpackage missing from pyproject's list fails here, not on a user's host.
    wanted = {f"ambassadord/{p.relative_to(REPO_ROOT / 'ambassadord')}" for p in (REPO_ROOT / "ambassadord").rglob("*.py")}
    wanted |= {f"ambassadord/backends/{p.name}" for p in (REPO_ROOT / "backends").glob("*.py")}
    wanted |= {"ambassadord/static/status.html", "ambassadord/connect/connect.bpf.o", "ambassadord/connect/connect.bpf.c"}
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)}"
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")], sorted(names)


def test_sdist_holds_the_licence_and_the_metadata(dist):
    top = f"ambassadord-{VERSION}"
    with tarfile.open(dist["sdist"]) as tar:
        names = set(tar.getnames())
        check_metadata(metadata(tar.extractfile(f"{top}/PKG-INFO").read().decode()), dist["sdist"].name)
        assert tar.extractfile(f"{top}/LICENSE").read() == (REPO_ROOT / "LICENSE").read_bytes()
    assert {f"{top}/pyproject.toml", f"{top}/README.md", f"{top}/backends/consul.py",
            f"{top}/ambassadord/connect/connect.bpf.o"} <= names


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; its bin/ directory."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", str(dist["wheel"])], cwd=root.parent, timeout=120)
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    Path(site, "zz_test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run([str(python), "-c", "import ambassadord.backends; print(ambassadord.backends.__file__)"], cwd=root).stdout
    assert where.startswith(site), f"ambassadord imported from {where!r}, not from the wheel in {site}"
    return root / "bin"


def test_installed_wheel_prints_its_version(venv, tmp_path):
    proc = run([str(venv / "ambassadord"), "--version"], cwd=tmp_path)
    assert proc.stdout == f"ambassadord {VERSION}\n", proc.stdout


def test_installed_wheel_checks_routes(venv, tmp_path):
    proc = run([str(venv / "ambassadord"), "check", "--map", "6379=127.0.0.1:6379"], cwd=tmp_path)
    assert proc.stdout.splitlines()[-1] == "1 route(s) OK", proc.stdout
    assert "--map 6379=127.0.0.1:6379" in proc.stdout, proc.stdout


class Installed(Daemon):
    """``run`` of the installed console script (the harness of tests/daemon.py otherwise)."""

    def __init__(self, script: Path, args: list[str], listen: tuple[str, int], workdir: Path):
        self.listen, self.args = listen, ["run", *args]
        self._start([str(script), *self.args], title=f"`{script} {' '.join(self.args)}`", ns=None,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"}, cwd=workdir,
                    workdir=workdir, ready_timeout=15)


def test_installed_wheel_runs_and_its_status_reads_it(venv, tmp_path):
    port, admin = free_port(), free_port()
    args = ["--map", "6379=127.0.0.1:6379", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
            "--workers", "1", "--log-format", "json"]
    with Installed(venv / "ambassadord", args, ("127.0.0.1", port), tmp_path) as daemon:
        # status of the same install, by the admin API's host name (status resolves it)
        def status():
            proc = subprocess.run([str(venv / "ambassadord"), "status", "--admin", f"localhost:{admin}"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=10)
            return proc if proc.returncode == 0 else None

        status = wait_until(status, timeout=10, what=daemon.describe)
        assert status.stdout.splitlines()[1].split()[:3] == ["6379", "127.0.0.1:6379", "127.0.0.1:6379"], status.stdout
        daemon.stop()
