"""Shared pytest wiring: when a test fails, show the end of the log of every server it used
(ambassadord, redis-server ... recorded in tests/server_logs.py); and the fixtures many
test files use: ``redis`` (a redis-server on loopback) and ``ns`` (a fresh namespace)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import netns, server_logs
from tests.daemon import RedisProcess, free_port, require
from tests.netns import Netns, namespaces


@pytest.fixture
def redis(tmp_path) -> Iterator[RedisProcess]:
    """A redis-server on 127.0.0.1 on a free port, in the current namespace."""
    require("redis-server", "redis-cli")
    with RedisProcess(free_port(), workdir=tmp_path) as server:
        yield server


@pytest.fixture
def ns(request) -> Iterator[Netns]:
    """A fresh network namespace (loopback up), named after the test module."""
    netns.require_prerequisites()
    with namespaces(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:5]) as (made,):
        yield made


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        netns.sweep_stale()  # namespaces of an earlier run that was killed before its clean-up


def pytest_runtest_setup(item):
    server_logs.forget_stopped()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for path, title in server_logs.recent().items():
            report.sections.append((f"log of {title} ({path})", server_logs.tail(path, 40)))
    return report
