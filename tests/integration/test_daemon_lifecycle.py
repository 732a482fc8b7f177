"""The real cloud-server and device-agent processes on loopback: serve, enroll, probe, drain."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import BIN, ROOT, CloudProcess, subprocess_env, write_toml

pytestmark = pytest.mark.integration


@pytest.fixture
def cloud(tmp_path: Path):
    cfg = write_toml(tmp_path / "cloud.toml", {
        "data_dir": str(tmp_path / "cloud"), "enrollment_secret": "fleet-secret",
        "listen_address": "127.0.0.1:0", "insecure": True, "grace_s": 5.0,
        "worker": {"trainer": "tiny-kd"},
    })
    server = CloudProcess(cfg, tmp_path)
    yield server
    server.stop(signal.SIGKILL)


def _device_config(tmp_path: Path, address: str, secret: str = "fleet-secret") -> Path:
    return write_toml(tmp_path / "device.toml", {
        "device_id": "cam-01", "data_dir": str(tmp_path / "dev"), "cloud_address": address,
        "enrollment_secret": secret, "insecure": True, "rpc_timeout_s": 10.0,
    })


def test_grpcurl_lists_services_and_health_is_serving(cloud: CloudProcess) -> None:
    listed = subprocess.run([str(BIN / "grpcurl"), "-plaintext", cloud.address, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"cdca.v1.SyncService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    check = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", '{"service": "cdca.v1.SyncService"}',
         cloud.address, "grpc.health.v1.Health/Check"],
        capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["status"] == "SERVING"


def test_device_registers_and_reports_healthy(cloud: CloudProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "device-agent"), "register", "--config", str(_device_config(tmp_path, cloud.address))],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "device_id": "cam-01", "healthy": True, "adapter_version": 0}
    creds = tmp_path / "dev" / "enrollment.json"
    assert creds.stat().st_mode & 0o777 == 0o600
    assert "fleet-secret" not in creds.read_text()


def test_wrong_enrollment_secret_is_unauthenticated(cloud: CloudProcess, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "device-agent"), "register", "--config",
         str(_device_config(tmp_path, cloud.address, secret="guess"))],
        capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr


def test_sigterm_flips_health_and_exits_cleanly(cloud: CloudProcess) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="cdca.v1.SyncService"), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        cloud.proc.send_signal(signal.SIGTERM)
        # The drain announces NOT_SERVING to watchers before the server stops.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert cloud.proc.wait(30) == 0
    assert "draining" in cloud.logs()


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"data_dir": "/tmp/x", "enrollment_secret": "s", "insecure": True, "colour": "red"}, "colour"),
        ({"data_dir": "/tmp/x", "enrollment_secret": "s", "insecure": True, "grace_s": "x"}, "grace_s"),
        ({"data_dir": "/tmp/x", "insecure": True}, "enrollment_secret"),
        ({"data_dir": "/tmp/x", "enrollment_secret": "s"}, "tls"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(tmp_path: Path, values: dict, field: str) -> None:
    cfg = write_toml(tmp_path / "bad.toml", values)
    proc = subprocess.run([str(BIN / "cloud-server"), "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"`{field}`" in lines[0], proc.stderr
