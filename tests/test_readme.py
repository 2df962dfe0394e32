"""README is the front door: every flag of every command and every metric is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ambassadord import admin
from ambassadord.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("command", ["run", "status", "iptables", "resolve", "check"])
def test_every_flag_is_in_readme(command):
    missing = [opt for action in _subcommands()[command]._actions for opt in action.option_strings
               if opt.startswith("--") and opt != "--help" and f"`{opt}" not in README]
    assert not missing, f"ambassadord {command}: flags missing from README: {missing}"


def test_every_metric_is_in_readme():
    names = set(re.findall(r'"(ambassadord_[a-z_]+)"', Path(admin.__file__).read_text()))
    assert len(names) > 15, names
    missing = sorted(n for n in names if f"`{n}" not in README)
    assert not missing, f"metrics missing from README: {missing}"
