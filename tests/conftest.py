"""Shared pytest wiring: when a test fails, show the end of the log of every server it used
(ambassadord, redis-server ... started through tests/topology.py)."""

from __future__ import annotations

import pytest

from tests import topology


def pytest_runtest_setup(item):
    topology.forget_stopped()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for path, title in topology.recent_logs().items():
            report.sections.append((f"log of {title} ({path})", topology.tail(path, 40)))
    return report
