"""README is the front door: every flag of every command and every metric is in it, and
every table renders as a table (a CommonMark parser with GFM tables, markdown-it-py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from ambassadord import admin
from ambassadord.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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


# ---- rendered ------------------------------------------------------------------------------


def _tokens(text: str):
    return MarkdownIt("commonmark").enable("table").parse(text)


def _cells(line: str) -> list[str]:
    """A table line's cells as GFM splits them: on every "|" not escaped with a backslash
    (inside code spans too), the outer pipes optional."""
    row = line.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return re.split(r"(?<!\\)\|", row)


def _tables(text: str) -> list[list[str]]:
    """Every table markdown-it finds: its source lines (header, delimiter, rows)."""
    lines = text.splitlines()
    return [lines[t.map[0]:t.map[1]] for t in _tokens(text) if t.type == "table_open"]


def test_the_table_checks_catch_a_row_cut_off_by_a_paragraph():
    """The bug this guards against (issue 16): rows after a blank line and a paragraph are
    text, not table rows."""
    broken = "| a | b |\n|---|---|\n| 1 | 2 |\n\nA note.\n\n| 3 | 4 |\n"
    assert [len(t) for t in _tables(broken)] == [3]
    assert _stray_rows(broken) == ["| 3 | 4 |"]
    assert _cells("| `a\\|b` | c |") == [" `a\\|b` ", " c "]


def _stray_rows(text: str) -> list[str]:
    """Paragraphs that start with "|": table rows that did not make it into a table."""
    tokens = _tokens(text)
    return [tokens[i + 1].content.splitlines()[0] for i, t in enumerate(tokens)
            if t.type == "paragraph_open" and tokens[i + 1].content.lstrip().startswith("|")]


def test_every_table_renders_as_a_table_with_whole_rows():
    tables = _tables(README)
    assert len(tables) >= 10, f"only {len(tables)} tables found: is the parser's table rule on?"
    for lines in tables:
        width = len(_cells(lines[0]))
        assert re.fullmatch(r"\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?", lines[1].strip()), lines[:2]
        bad = [line for line in lines if len(_cells(line)) != width]
        assert not bad, f"rows without the header's {width} cells (GFM pads or cuts them): {bad}"
    stray = _stray_rows(README)
    assert not stray, f"table rows rendered as text (a blank line or a paragraph cut the table): {stray}"


def test_spec_grammar_table_has_every_scheme():
    """The Consul and etcd rows are the ones Consul users need most; they used to render as text."""
    (spec_table,) = [t for t in _tables(README) if _cells(t[0])[0].strip() == "spec"]
    first_cells = " ".join(_cells(line)[0] for line in spec_table[2:])
    for form in ("`10.0.0.5:6379`", "`srv://", "`dns://", "`consul:///redis`", "`consul-kv:///", "`etcd:///"):
        assert form in first_cells, f"{form} is not a row of the spec grammar table"


def test_scripts_test_takes_its_worker_count_from_readme_and_refuses_a_bad_one_first():
    """README names TEST_WORKERS; scripts/test refuses a value that is no count before it
    installs anything (it would otherwise fail minutes later, in pytest-xdist)."""
    assert "`TEST_WORKERS=N`" in README
    # A path to no test: were the check gone, this would reach pytest and exit 4, not run the suite.
    result = subprocess.run(["bash", str(ROOT / "scripts" / "test"), "tests/no_such_test.py"],
                            env={**os.environ, "TEST_WORKERS": "two"}, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr.strip()) == (
        1, "scripts/test: error: TEST_WORKERS must be a number of processes (0: one process), not 'two'")
