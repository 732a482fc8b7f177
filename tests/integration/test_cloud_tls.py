"""The real cloud-server over TLS and mutual TLS, with certificates issued in the test."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shared.certs import CertConfig, TlsFiles, ensure_tls_material
from tests.cloud.client import Device, batch, code_of, tokens_sample
from tests.cloud.daemon import SECRET, write_config
from tests.support import BIN, CloudProcess, subprocess_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, TlsFiles]:
    root = tmp_path_factory.mktemp("pki")
    fleet = ensure_tls_material(root / "fleet", CertConfig(clients=("cam-01", "cam-02")))
    rogue = ensure_tls_material(root / "rogue", CertConfig(clients=("cam-01",)))
    return fleet, rogue


def _serve(workdir: Path, tls: dict[str, str]) -> CloudProcess:
    cfg = write_config(workdir / "cloud.toml", {
        "data_dir": str(workdir / "cloud"), "enrollment_secret": SECRET,
        "listen_address": "127.0.0.1:0", "tls": tls, "worker": {"trainer": "tiny-kd"}})
    return CloudProcess(cfg, workdir)


def _channel(address: str, ca: Path, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None)
    return grpc.secure_channel(address, creds)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory,
               pki: tuple[TlsFiles, TlsFiles]) -> Iterator[CloudProcess]:
    fleet = pki[0]
    server = _serve(tmp_path_factory.mktemp("tls"), {
        "cert_file": str(fleet.server_cert), "key_file": str(fleet.server_key)})
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory,
                pki: tuple[TlsFiles, TlsFiles]) -> Iterator[CloudProcess]:
    fleet = pki[0]
    server = _serve(tmp_path_factory.mktemp("mtls"), {
        "cert_file": str(fleet.server_cert), "key_file": str(fleet.server_key),
        "client_ca_file": str(fleet.ca_cert)})
    yield server
    server.stop(signal.SIGKILL)


def test_tls_serves_trusting_clients_only(tls_server: CloudProcess,
                                          pki: tuple[TlsFiles, TlsFiles]) -> None:
    fleet, rogue = pki
    with _channel(tls_server.address, fleet.ca_cert) as ch:
        dev = Device(ch, "cam-01").register()
        assert dev.upload("u1", batch(tokens_sample("s1"))).stored_samples == 1
    with grpc.insecure_channel(tls_server.address) as ch:
        assert code_of(Device(ch, "cam-01").register) == grpc.StatusCode.UNAVAILABLE
    with _channel(tls_server.address, rogue.ca_cert) as ch:  # server cert not from its CA
        assert code_of(Device(ch, "cam-01").register) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_binds_the_certificate_to_the_device(
        mtls_server: CloudProcess, pki: tuple[TlsFiles, TlsFiles]) -> None:
    fleet, rogue = pki
    with _channel(mtls_server.address, fleet.ca_cert, fleet.client("cam-01")) as ch:
        one = Device(ch, "cam-01").register()
        assert one.upload("u1", batch(tokens_sample("s1"))).stored_samples == 1
    with _channel(mtls_server.address, fleet.ca_cert) as ch:  # no client certificate
        assert code_of(Device(ch, "cam-01").register) == grpc.StatusCode.UNAVAILABLE
    with _channel(mtls_server.address, fleet.ca_cert, rogue.client("cam-01")) as ch:
        assert code_of(Device(ch, "cam-01").register) == grpc.StatusCode.UNAVAILABLE
    with _channel(mtls_server.address, fleet.ca_cert, fleet.client("cam-02")) as ch:
        two = Device(ch, "cam-01")
        assert code_of(two.register) == grpc.StatusCode.PERMISSION_DENIED
        two.token = one.token  # a stolen token does not help without cam-01's certificate
        assert code_of(two.status) == grpc.StatusCode.PERMISSION_DENIED
        assert Device(ch, "cam-02").register().status().device_id == "cam-02"


def test_unreadable_tls_file_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cloud.toml", {
        "data_dir": str(tmp_path / "cloud"), "enrollment_secret": SECRET,
        "listen_address": "127.0.0.1:0",
        "tls": {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "nope.key")}})
    proc = subprocess.run([str(BIN / "cloud-server"), "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2 and "`tls`" in proc.stderr, proc.stderr
