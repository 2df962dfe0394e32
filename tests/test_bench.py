"""The benchmark still runs: bench/compare.py --quick, end to end, in its own namespace.

Not a timed test (the figures are not checked against anything, the machine is shared):
it checks that every target is started, measured on every workload and torn down, so the
side-by-side benchmark in README cannot rot unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import netns

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "socat", "haproxy", "nginx", "ambassadord", "ambassadord-connect", "w1")  # w1: a --variant
TOOLS = ("haproxy", "nginx", "socat", "iperf3", "redis-benchmark", "redis-server")

pytestmark = pytest.mark.netns


def test_compare_quick_measures_every_target_and_cleans_up():
    netns.require_prerequisites()
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing {missing} (scripts/test installs them)")
        pytest.skip(f"missing {missing}")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    bench = subprocess.Popen([sys.executable, "bench/compare.py", "--quick", "--json", "", "--variant", "w1=--workers 1"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = bench.communicate(timeout=300)
    except BaseException:
        bench.terminate()  # it cleans up on SIGTERM
        bench.communicate(timeout=30)
        raise
    assert bench.returncode == 0, out[-3000:] + err[-3000:]
    header = next(line for line in out.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == list(TARGETS)
    for metric in ("bulk: iperf3, Gbit/s", "request/response: redis-benchmark -k 1, requests/s",
                   "request/response: p50, ms", "connection churn: redis-benchmark -k 0, requests/s",
                   "idle: RSS, MiB per 1,000 connections",
                   "held back: MiB a client got in toward a backend that reads nothing"):
        row = next((line for line in out.splitlines() if line.startswith(f"| {metric}")), None)
        assert row is not None, f"no row {metric!r} in:\n{out}"
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        # connect mode holds no memory per connection: its idle row may read 0 or below
        for name in ("ambassadord", "w1") + (("ambassadord-connect",) if "idle" not in metric else ()):
            ours = cells[TARGETS.index(name)]
            assert re.match(r"[\d,.]+ \([\d.]+×\)", ours), f"{metric}: {name} cell {ours!r}"
            assert float(ours.split()[0].replace(",", "")) > 0, row
    assert "ambassadord against the goals" in out
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    # Its own name only (ambbench-<its pid>): another bench running on the machine is not this one's.
    own = f"ambbench-{bench.pid}"
    assert own not in after - before, "the bench left its namespace behind"
    root = next(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[2] == "cgroup2")
    assert own not in os.listdir(root), "the bench left its cgroup behind"


@pytest.mark.parametrize("variant, message", [
    ("w1", "expected NAME[@DIR]=FLAGS with a new NAME"),
    ("haproxy=--workers 1", "expected NAME[@DIR]=FLAGS with a new NAME"),
    ("old@/nonexistent=", "/nonexistent holds no ambassadord source tree"),
])
def test_compare_rejects_a_bad_variant(variant, message):
    proc = subprocess.run([sys.executable, "bench/compare.py", "--variant", variant], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc
    assert message in proc.stderr, proc.stderr
