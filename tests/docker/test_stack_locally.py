"""The compose stack replayed without Docker: the certs job's own command, then the real
`cloud-server` and `device-agent` processes on 127.0.0.1, each with its container's environment
(image ENV + compose `environment`, volume paths mapped into a temp dir). Shows that the generated
material and the settings work with the real daemons: mutual TLS, the containers' health probes,
the cloud's name check, and the cloud binding a client certificate to its device id."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.compose_model import (
    generate_like_the_certs_job,
    model,
    mounts,
    service_env,
)
from tests.support import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.integration
DEVICES = ("device-lowlight", "device-colorcast")


def localize(name: str, kind: str, root: Path) -> dict[str, str]:
    """The service's environment with every path inside one of its volumes mapped to
    root/<volume name> (the layout `generate_like_the_certs_job` writes)."""
    env = service_env(name, kind)
    targets = {t: root / m["source"] for t, m in mounts(model()["services"][name]).items()}
    for key, value in env.items():
        for target, local in targets.items():
            if value == target or value.startswith(target + "/"):
                env[key] = str(local) + value[len(target):]
    return env


@dataclass
class Stack:
    root: Path
    port: int
    cloud: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    generate_like_the_certs_job(root)
    for volume in model()["volumes"]:
        (root / volume).mkdir(exist_ok=True)
    env = {**subprocess_env(), **localize("cloud", "cloud", root),
           "CDCA_CLOUD_LISTEN_ADDRESS": "127.0.0.1:0"}
    port_file, log = root / "cloud.port", root / "cloud.log"
    command = model()["services"]["cloud"]["command"]
    with log.open("wb") as out:
        cloud = subprocess.Popen([str(BIN / command[0]), *command[1:], "--port-file",
                                  str(port_file)], stdout=out, stderr=subprocess.STDOUT,
                                 env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while not (port_file.exists() and port_file.read_text().strip()):
        if cloud.poll() is not None or time.monotonic() > deadline:
            cloud.kill()
            pytest.fail(f"cloud-server did not start: {log.read_text()[-3000:]}")
        time.sleep(0.1)
    yield Stack(root, int(port_file.read_text()), cloud, log)
    cloud.send_signal(signal.SIGTERM)
    try:
        cloud.wait(60)
    except subprocess.TimeoutExpired:
        cloud.kill()


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env={**subprocess_env(), **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _probe(env: dict[str, str], stack: Stack) -> subprocess.CompletedProcess[str]:
    # The images' HEALTHCHECK, with the compose address's port swapped for the real one.
    host = env["CDCA_HEALTHCHECK_ADDRESS"].rsplit(":", 1)[0]
    probe_env = {**env, "CDCA_HEALTHCHECK_ADDRESS": f"127.0.0.1:{stack.port}"}
    if host != "127.0.0.1":
        probe_env["CDCA_HEALTHCHECK_SERVER_NAME"] = host  # verify the name the container dials
    return _run([sys.executable, "-m", "cloud.healthcheck"], probe_env)


def _device_env(name: str, stack: Stack) -> dict[str, str]:
    env = localize(name, "device", stack.root)
    host = env["CDCA_DEVICE_CLOUD_ADDRESS"].rsplit(":", 1)[0]
    return {**env, "CDCA_DEVICE_CLOUD_ADDRESS": f"127.0.0.1:{stack.port}",
            "CDCA_DEVICE_TLS__SERVER_NAME": host}


def _register(env: dict[str, str], name: str) -> subprocess.CompletedProcess[str]:
    steps = model()["services"][name]["command"][2].split("&&")
    first = steps[0].split()
    assert first == ["device-agent", "register"]
    return _run([str(BIN / first[0]), *first[1:]], env)


def test_cloud_serves_mutual_tls_and_its_health_probe_passes(stack: Stack) -> None:
    env = localize("cloud", "cloud", stack.root)
    probe = _probe(env, stack)
    assert probe.returncode == 0, probe.stderr + stack.log.read_text()[-2000:]
    without_cert = {k: v for k, v in env.items()
                    if k not in ("CDCA_HEALTHCHECK_CERT_FILE", "CDCA_HEALTHCHECK_KEY_FILE")}
    assert _probe(without_cert, stack).returncode == 1


@pytest.mark.parametrize("name", DEVICES)
def test_device_registers_and_its_health_probe_passes(name: str, stack: Stack) -> None:
    env = _device_env(name, stack)
    proc = _register(env, name)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["healthy"] is True and report["device_id"] == env["CDCA_DEVICE_DEVICE_ID"]
    probe = _probe(env, stack)
    assert probe.returncode == 0, probe.stderr


def test_a_device_cannot_act_with_another_devices_certificate(stack: Stack) -> None:
    own, other = (_device_env(n, stack) for n in DEVICES)
    swapped = {**own, "CDCA_DEVICE_TLS__CERT_FILE": other["CDCA_DEVICE_TLS__CERT_FILE"],
               "CDCA_DEVICE_TLS__KEY_FILE": other["CDCA_DEVICE_TLS__KEY_FILE"]}
    proc = _register(swapped, DEVICES[0])
    assert proc.returncode != 0
    assert "PERMISSION_DENIED" in proc.stderr


def test_the_server_name_is_checked(stack: Stack) -> None:
    env = {**_device_env(DEVICES[0], stack), "CDCA_DEVICE_TLS__SERVER_NAME": "not-the-cloud",
           "CDCA_DEVICE_RPC_TIMEOUT_S": "2"}
    proc = _register(env, DEVICES[0])
    assert proc.returncode != 0
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr
