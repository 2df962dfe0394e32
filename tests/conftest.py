"""Shared pytest wiring: when a test fails, show the end of the log of every server it used
(ambassadord, redis-server ... recorded in tests/server_logs.py); and the fixtures many
test files use: ``redis`` (a redis-server on loopback), ``ns`` (a fresh namespace), and
``docker_engine`` (a Docker engine in a namespace of its own, with ``tools_rootfs``, the
tools image, imported; tests/docker_engine.py, tests/docker_images.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import docker_engine as engines
from tests import docker_images, netns, server_logs
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


@pytest.fixture(scope="session")
def tools_rootfs(tmp_path_factory) -> Path:
    """The tar of tests/docker_images.py's tools image (made once per session, in seconds)."""
    engines.require_prerequisites()
    return docker_images.rootfs_tar(tmp_path_factory.mktemp("docker-images") / "tools.tar")


@pytest.fixture(scope="module")
def docker_engine(tools_rootfs, tmp_path_factory) -> Iterator[engines.DockerEngine]:
    """A Docker engine in a namespace of its own, shared by one test module, with the tools
    image (``docker_images.TOOLS_IMAGE``) imported. Tests remove the containers they start
    (``engine.container(...)`` does); the engine and all it made go when the module ends."""
    netns.require_prerequisites()
    with engines.DockerEngine("dkmod", log_dir=tmp_path_factory.mktemp("dockerd")) as engine:
        docker_images.import_image(engine, tools_rootfs)
        yield engine


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        engines.sweep_stale()  # Docker engines of an earlier run that was killed before its clean-up
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
