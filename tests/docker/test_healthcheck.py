"""cloud.healthcheck (the images' HEALTHCHECK) against a real gRPC health service on 127.0.0.1:0,
plaintext, TLS and mutual TLS with material from shared.certs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloud import healthcheck
from shared.certs import CertConfig, TlsFiles, ensure_tls_material
from tests.support import ROOT, subprocess_env

SERVICE = "cdca.v1.SyncService"


class HealthServer:
    """A gRPC server with only the standard health service; `tls` picks the port's credentials."""

    def __init__(self, tls: TlsFiles | None, mutual: bool = False) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            creds = grpc.ssl_server_credentials(
                [(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
                root_certificates=tls.ca_cert.read_bytes() if mutual else None,
                require_client_auth=mutual)
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.address = f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls_material(tmp_path_factory.mktemp("tls"), CertConfig(
        server_names=("cloud", "localhost", "127.0.0.1"), clients=("healthcheck",)))


@pytest.fixture
def plain() -> Iterator[HealthServer]:
    s = HealthServer(None)
    yield s
    s.server.stop(0)


@pytest.fixture
def mtls(tls: TlsFiles) -> Iterator[HealthServer]:
    s = HealthServer(tls, mutual=True)
    yield s
    s.server.stop(0)


def test_serving_is_0_and_not_serving_is_1(
    plain: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main([plain.address], env={}) == 0
    assert healthcheck.main([plain.address, "--service", SERVICE], env={}) == 0
    plain.health.enter_graceful_shutdown()
    assert healthcheck.main([plain.address], env={}) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unknown_service_and_nothing_listening_are_1(
    plain: HealthServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert healthcheck.main([plain.address, "--service", "nope.Service"], env={}) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    plain.server.stop(0).wait()
    assert healthcheck.main([plain.address, "--timeout-s", "1"], env={}) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_mutual_tls_needs_the_client_certificate(tls: TlsFiles, mtls: HealthServer) -> None:
    cert, key = tls.client("healthcheck")
    with_ca = [mtls.address, "--ca-file", str(tls.ca_cert)]
    assert healthcheck.main(with_ca, env={}) == 1
    assert healthcheck.main([*with_ca, "--cert-file", str(cert), "--key-file", str(key)],
                            env={}) == 0
    # Plaintext against a TLS port fails too.
    assert healthcheck.main([mtls.address], env={}) == 1


def test_options_come_from_the_environment(tls: TlsFiles, mtls: HealthServer) -> None:
    cert, key = tls.client("healthcheck")
    env = {"CDCA_HEALTHCHECK_ADDRESS": f"localhost:{mtls.port}",
           "CDCA_HEALTHCHECK_CA_FILE": str(tls.ca_cert),
           "CDCA_HEALTHCHECK_CERT_FILE": str(cert), "CDCA_HEALTHCHECK_KEY_FILE": str(key),
           "CDCA_HEALTHCHECK_SERVER_NAME": "cloud"}
    assert healthcheck.main([], env=env) == 0
    assert healthcheck.main([], env={**env, "CDCA_HEALTHCHECK_SERVER_NAME": "other"}) == 1


@pytest.mark.parametrize("argv", [
    ["--cert-file", "c.pem"],                                   # cert without key
    ["--cert-file", "c.pem", "--key-file", "k.pem"],             # client cert without TLS
    ["--ca-file", "/nonexistent/ca.pem"],                        # unreadable file
])
def test_bad_options_exit_1(argv: list[str], plain: HealthServer) -> None:
    assert healthcheck.main([plain.address, *argv], env={}) == 1


def test_usage_errors_exit_1_not_2_which_docker_reserves(plain: HealthServer) -> None:
    with pytest.raises(SystemExit) as exc:
        healthcheck.main([plain.address, "--timeout-s", "soon"], env={})
    assert exc.value.code == 1


def test_module_entry_point_runs(plain: HealthServer) -> None:
    # What the images' HEALTHCHECK executes, as a separate process.
    proc = subprocess.run([sys.executable, "-m", "cloud.healthcheck"], cwd=ROOT, timeout=60,
                          env=subprocess_env(CDCA_HEALTHCHECK_ADDRESS=plain.address),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    plain.health.enter_graceful_shutdown()
    proc = subprocess.run([sys.executable, "-m", "cloud.healthcheck", plain.address], cwd=ROOT,
                          timeout=60, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr
