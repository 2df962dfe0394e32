"""The Docker Engine API client (ambassadord/docker_api.py).

Three tiers: :func:`endpoint` as a pure table (flag, DOCKER_HOST, the TLS variables with
real PEM files made here); the client against a real engine (tests/docker_engine.py):
version, listing, inspect, events of containers and networks, cancellation; and against a
small fake engine on a unix socket of the test's own, for what a real engine does not do on
demand: a stream that breaks or ends, an event that is no JSON, an HTTP error, API versions
out of range, a socket the client may not open.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from ambassadord.docker_api import (
    TLS,
    DockerClient,
    DockerConfigError,
    DockerError,
    Endpoint,
    endpoint,
)
from tests.docker_images import TOOLS_IMAGE

# ---------------------------------------------------------------- endpoint(): a pure table

ENDPOINTS = [
    # flag, env, (url, where, uds, base_url)
    (None, {}, ("unix:///var/run/docker.sock", "default", "/var/run/docker.sock", "http://docker")),
    ("", {}, ("unix:///var/run/docker.sock", "default", "/var/run/docker.sock", "http://docker")),
    (None, {"DOCKER_HOST": ""}, ("unix:///var/run/docker.sock", "default", "/var/run/docker.sock", "http://docker")),
    (None, {"DOCKER_HOST": "tcp://10.0.0.1:2375"}, ("tcp://10.0.0.1:2375", "env DOCKER_HOST", None, "http://10.0.0.1:2375")),
    ("unix:///run/d.sock", {"DOCKER_HOST": "tcp://10.0.0.1:2375"}, ("unix:///run/d.sock", "--docker", "/run/d.sock", "http://docker")),
    ("/run/d.sock", {}, ("/run/d.sock", "--docker", "/run/d.sock", "http://docker")),
    ("tcp://10.0.0.1", {}, ("tcp://10.0.0.1", "--docker", None, "http://10.0.0.1:2375")),
    ("tcp://docker.example:4243/", {}, ("tcp://docker.example:4243/", "--docker", None, "http://docker.example:4243")),
    ("tcp://[fd00::1]:2375", {}, ("tcp://[fd00::1]:2375", "--docker", None, "http://[fd00::1]:2375")),
    # The TLS variables concern tcp:// only; DOCKER_CERT_PATH alone turns no TLS on (the CLI).
    ("unix:///run/d.sock", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/nowhere"}, ("unix:///run/d.sock", "--docker", "/run/d.sock", "http://docker")),
    ("tcp://10.0.0.1:2376", {"DOCKER_CERT_PATH": "/nowhere"}, ("tcp://10.0.0.1:2376", "--docker", None, "http://10.0.0.1:2376")),
]


@pytest.mark.parametrize("flag, env, want", ENDPOINTS)
def test_endpoint(flag, env, want):
    ep = endpoint(flag, env)
    assert (ep.url, ep.where, ep.uds, ep.base_url) == want
    assert ep.tls is None


ENDPOINT_ERRORS = [
    ("ssh://me@host", {}, ["--docker 'ssh://me@host'", "not supported", "ssh -NL /tmp/docker.sock:/var/run/docker.sock",
                           "unix:///tmp/docker.sock"]),
    (None, {"DOCKER_HOST": "ssh://me@host"}, ["env DOCKER_HOST 'ssh://me@host'", "ssh -NL"]),
    (None, {"DOCKER_HOST": "npipe:////./pipe/docker_engine"}, ["env DOCKER_HOST 'npipe:", "named pipe"]),
    ("fd://", {}, ["--docker 'fd://'", "systemd"]),
    (None, {"DOCKER_HOST": "foo"}, ["env DOCKER_HOST 'foo'", "expected unix:///PATH, tcp://HOST[:PORT]"]),
    ("10.0.0.1:2375", {}, ["--docker '10.0.0.1:2375'", "expected unix:///PATH"]),
    ("http://localhost:2375", {}, ["--docker 'http://localhost:2375'", "expected unix:///PATH"]),
    ("unix://run/docker.sock", {}, ["--docker 'unix://run/docker.sock'", "must be absolute"]),
    ("tcp://host:port", {}, ["--docker 'tcp://host:port'", "Port"]),
    ("tcp://:2375", {}, ["--docker 'tcp://:2375'", "not HOST[:PORT]"]),
    ("tcp://host:2375/v1.41", {}, ["not HOST[:PORT]"]),
]


@pytest.mark.parametrize("flag, env, words", ENDPOINT_ERRORS)
def test_endpoint_errors_say_where_and_what(flag, env, words):
    with pytest.raises(DockerConfigError) as caught:
        endpoint(flag, env)
    for word in words:
        assert word in str(caught.value)


@pytest.fixture
def certs(tmp_path) -> Path:
    """A directory with ca.pem, cert.pem and key.pem as DOCKER_CERT_PATH has them (a
    self-signed certificate serves as its own CA)."""
    if not (openssl := subprocess.run(["which", "openssl"], capture_output=True, text=True).stdout.strip()):
        pytest.fail("openssl (Debian package openssl) is needed to make the test's certificates")
    d = tmp_path / "certs"
    d.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem", "-subj", "/CN=docker", "-days", "1"],
                   check=True, capture_output=True)
    (d / "ca.pem").write_bytes((d / "cert.pem").read_bytes())
    return d


def test_tls_verify_uses_the_cert_path_like_the_cli(certs):
    env = {"DOCKER_HOST": "tcp://10.0.0.1", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
    ep = endpoint(None, env)
    assert ep.base_url == "https://10.0.0.1:2376"  # the CLI's TLS port when none is given
    assert ep.tls == TLS(True, str(certs / "ca.pem"), str(certs / "cert.pem"), str(certs / "key.pem"))
    DockerClient(ep)  # builds its SSL context from the files


def test_docker_tls_encrypts_without_verifying(certs):
    (certs / "cert.pem").unlink()
    (certs / "key.pem").unlink()  # no client certificate: allowed, as by the CLI
    ep = endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS": "1", "DOCKER_CERT_PATH": str(certs)})
    assert ep.base_url == "https://10.0.0.1:2376"
    assert ep.tls == TLS(False, None, None, None)


def test_tls_files_default_to_the_cli_config_dir(certs, tmp_path):
    ep = endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CONFIG": str(certs)})
    assert ep.tls.ca == str(certs / "ca.pem")
    with pytest.raises(DockerConfigError, match=r"/\.docker' \(DOCKER_CERT_PATH is not set\).*ca\.pem"):
        endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "HOME": str(tmp_path)})  # no ~/.docker there


@pytest.mark.parametrize("damage, words", [
    ("no dir", ["env DOCKER_CERT_PATH", "No such file", "ca.pem"]),
    ("no ca", ["env DOCKER_CERT_PATH", "No such file", "ca.pem"]),
    ("no key", ["env DOCKER_CERT_PATH", "No such file", "key.pem"]),
    ("bad ca", ["env DOCKER_CERT_PATH"]),
    ("wrong key", ["env DOCKER_CERT_PATH"]),
])
def test_unusable_tls_files_fail_the_start(certs, tmp_path, damage, words):
    path = certs
    match damage:
        case "no dir":
            path = tmp_path / "typo"
        case "no ca":
            (certs / "ca.pem").unlink()
        case "no key":
            (certs / "key.pem").unlink()
        case "bad ca":
            (certs / "ca.pem").write_text("not a certificate\n")
        case "wrong key":
            subprocess.run(["openssl", "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-out", certs / "key.pem"], check=True, capture_output=True)
    with pytest.raises(DockerConfigError) as caught:
        endpoint("tcp://10.0.0.1:2376", {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(path)})
    for word in words:
        assert word in str(caught.value)
