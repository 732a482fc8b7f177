"""shared.certs: generated PEM material is accepted by a real gRPC TLS server on 127.0.0.1:0,
mutual TLS rejects clients without (or with the wrong, or an expired) certificate, and
`ensure_tls_material` keeps valid material and reissues what is not."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared import certs
from shared.certs import CertConfig, Usage, ensure_tls_material, issue, new_ca
from shared.errors import ConfigError

METHOD = "/cdca.test.Echo/Who"
CLIENTS = ("cam-1", "cam-2")


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    # The peer's verified client-certificate CN (empty without mutual TLS).
    names = context.auth_context().get("x509_common_name", [])
    return b",".join(names)


def _serve(files: certs.TlsFiles, require_client_cert: bool,
           cert: Path | None = None, key: Path | None = None) -> tuple[grpc.Server, int]:
    creds = grpc.ssl_server_credentials(
        [((key or files.server_key).read_bytes(), (cert or files.server_cert).read_bytes())],
        root_certificates=files.ca_cert.read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "cdca.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(_who)}),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port != 0
    server.start()
    return server, port


def _call(port: int, ca: Path, cert: Path | None = None, key: Path | None = None,
          host: str = "127.0.0.1", server_name: str | None = None) -> bytes:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(f"{host}:{port}", creds, options=options) as channel:
        return channel.unary_unary(METHOD)(b"", timeout=10)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> certs.TlsFiles:
    return ensure_tls_material(
        tmp_path_factory.mktemp("tls"),
        CertConfig(server_names=("cloud", "localhost", "127.0.0.1"), clients=CLIENTS))


@pytest.fixture
def tls_server(material: certs.TlsFiles) -> Iterator[int]:
    server, port = _serve(material, require_client_cert=False)
    yield port
    server.stop(0)


@pytest.fixture
def mtls_server(material: certs.TlsFiles) -> Iterator[int]:
    server, port = _serve(material, require_client_cert=True)
    yield port
    server.stop(0)


# -- the material itself ---------------------------------------------------------------------

def test_files_modes_and_contents(material: certs.TlsFiles) -> None:
    d = material.directory
    assert sorted(p.name for p in d.iterdir()) == sorted([
        "ca.pem", "ca.key", "server.pem", "server.key",
        "client-cam-1.pem", "client-cam-1.key", "client-cam-2.pem", "client-cam-2.key"])
    for p in d.iterdir():
        assert p.stat().st_mode & 0o777 == (0o600 if p.suffix == ".key" else 0o644), p
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"cloud", "localhost"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate(material.client("cam-2")[0].read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-2"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(ConfigError, match="cam-9"):
        material.client("cam-9")


# -- real gRPC over TLS ----------------------------------------------------------------------

def test_tls_server_accepts_a_client_that_trusts_the_ca(
    material: certs.TlsFiles, tls_server: int
) -> None:
    assert _call(tls_server, material.ca_cert) == b""
    assert _call(tls_server, material.ca_cert, host="localhost") == b""


def test_server_name_must_be_covered_by_the_certificate(
    material: certs.TlsFiles, tls_server: int
) -> None:
    assert _call(tls_server, material.ca_cert, server_name="cloud") == b""
    with pytest.raises(grpc.RpcError) as err:
        _call(tls_server, material.ca_cert, server_name="not-the-cloud")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_a_server_signed_by_another_ca(
    material: certs.TlsFiles, tls_server: int, tmp_path: Path
) -> None:
    other = ensure_tls_material(tmp_path / "other", CertConfig())
    with pytest.raises(grpc.RpcError) as err:
        _call(tls_server, other.ca_cert)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_accepts_a_client_certificate_and_sees_its_device_id(
    material: certs.TlsFiles, mtls_server: int
) -> None:
    for device in CLIENTS:
        cert, key = material.client(device)
        assert _call(mtls_server, material.ca_cert, cert, key) == device.encode()


def test_mtls_rejects_a_client_without_certificate(
    material: certs.TlsFiles, mtls_server: int
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_server, material.ca_cert)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_rejects_a_client_certificate_from_another_ca(
    material: certs.TlsFiles, mtls_server: int, tmp_path: Path
) -> None:
    other = ensure_tls_material(tmp_path / "other", CertConfig(clients=("cam-1",)))
    cert, key = other.client("cam-1")
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_server, material.ca_cert, cert, key)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _load_ca(material: certs.TlsFiles) -> certs.Issued:
    ca = certs.load_pair(material.ca_cert, material.directory / certs.CA_KEY)
    assert ca is not None
    return ca


def _expired(ca: certs.Issued, cn: str, usage: Usage, out: Path, **kw: object) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    leaf = issue(ca, cn, usage, not_before=now - dt.timedelta(days=2),
                 not_after=now - dt.timedelta(days=1), **kw)  # type: ignore[arg-type]
    certs.write_pair(out / f"{cn}.pem", out / f"{cn}.key", leaf)
    return out / f"{cn}.pem", out / f"{cn}.key"


def test_mtls_rejects_an_expired_client_certificate(
    material: certs.TlsFiles, mtls_server: int, tmp_path: Path
) -> None:
    cert, key = _expired(_load_ca(material), "cam-1", Usage.CLIENT, tmp_path)
    with pytest.raises(grpc.RpcError) as err:
        _call(mtls_server, material.ca_cert, cert, key)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_rejects_an_expired_server_certificate(
    material: certs.TlsFiles, tmp_path: Path
) -> None:
    cert, key = _expired(_load_ca(material), "cloud", Usage.SERVER, tmp_path,
                         server_names=("cloud", "127.0.0.1"))
    server, port = _serve(material, require_client_cert=False, cert=cert, key=key)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _call(port, material.ca_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


# -- idempotence and reissue -----------------------------------------------------------------

def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_second_run_keeps_everything(tmp_path: Path) -> None:
    cfg = CertConfig(server_names=("cloud", "127.0.0.1"), clients=("cam-1",))
    first = ensure_tls_material(tmp_path, cfg)
    assert set(first.created) == {"ca.pem", "server.pem", "client-cam-1.pem"}
    before = _snapshot(tmp_path)
    again = ensure_tls_material(tmp_path, cfg)
    assert again.created == () and set(again.kept) == set(first.created)
    assert _snapshot(tmp_path) == before


def test_new_name_or_client_reissues_only_what_changed(tmp_path: Path) -> None:
    ensure_tls_material(tmp_path, CertConfig(server_names=("cloud",), clients=("cam-1",)))
    before = _snapshot(tmp_path)
    files = ensure_tls_material(
        tmp_path, CertConfig(server_names=("cloud", "cloud.internal"), clients=("cam-1", "cam-2")))
    assert set(files.created) == {"server.pem", "client-cam-2.pem"}
    after = _snapshot(tmp_path)
    for name in ("ca.pem", "ca.key", "client-cam-1.pem", "client-cam-1.key"):
        assert after[name] == before[name]
    assert after["server.pem"] != before["server.pem"]


def test_expiring_leaf_is_renewed_and_expired_ca_replaces_everything(tmp_path: Path) -> None:
    cfg = CertConfig(clients=("cam-1",), ca_days=100, leaf_days=40, renew_before_days=10)
    now = dt.datetime.now(dt.UTC)
    ensure_tls_material(tmp_path, cfg, now=now)
    # 31 days on, the leaves are within 10 days of expiry; the CA is not.
    later = ensure_tls_material(tmp_path, cfg, now=now + dt.timedelta(days=31))
    assert set(later.created) == {"server.pem", "client-cam-1.pem"}
    # Past the CA's renewal point every leaf must follow the new CA.
    much_later = ensure_tls_material(tmp_path, cfg, now=now + dt.timedelta(days=95))
    assert set(much_later.created) == {"ca.pem", "server.pem", "client-cam-1.pem"}


def test_mismatched_or_corrupt_files_are_reissued(tmp_path: Path) -> None:
    cfg = CertConfig(clients=("cam-1", "cam-2"))
    files = ensure_tls_material(tmp_path, cfg)
    c1_cert, c1_key = files.client("cam-1")
    _, c2_key = files.client("cam-2")
    c1_key.write_bytes(c2_key.read_bytes())  # key of another certificate
    files.server_key.write_bytes(b"not a key")
    again = ensure_tls_material(tmp_path, cfg)
    assert set(again.created) == {"server.pem", "client-cam-1.pem"}
    assert certs.load_pair(c1_cert, c1_key) is not None


def test_leaf_problem_names_the_reason(tmp_path: Path) -> None:
    ca, other = new_ca(), new_ca()
    leaf = issue(ca, "cam-1", Usage.CLIENT)
    assert certs.leaf_problem(leaf, ca.cert, Usage.CLIENT, common_name="cam-1") is None
    assert "not signed" in str(certs.leaf_problem(leaf, other.cert, Usage.CLIENT,
                                                  common_name="cam-1"))
    assert "server" in str(certs.leaf_problem(leaf, ca.cert, Usage.SERVER, common_name="cam-1"))
    assert "common name" in str(certs.leaf_problem(leaf, ca.cert, Usage.CLIENT,
                                                   common_name="cam-2"))


# -- configuration and CLI -------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"server_names": ()}, "server_names"),
    ({"server_names": ("bad name!",)}, "server_names"),
    ({"clients": ("cam/1",)}, "clients"),
    ({"clients": ("cam-1", "cam-1")}, "clients"),
    ({"leaf_days": 0}, "leaf_days"),
    ({"leaf_days": 10, "renew_before_days": 10}, "renew_before_days"),
])
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CertConfig(**kwargs)  # type: ignore[arg-type]


def test_issue_rejects_inverted_validity() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ConfigError, match="not_after"):
        issue(new_ca(), "x", Usage.CLIENT, not_before=now, not_after=now)


def test_cli_is_idempotent_and_rejects_bad_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--server-name", "cloud", "--client", "cam-1",
            "--client", "cam-2"]
    assert certs.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["kept"] == [] and "client-cam-2.pem" in first["created"]
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cloud"
    assert certs.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["created"] == []
    assert certs.main(["--out", str(tmp_path), "--client", "cam 1"]) == 2
    assert "cam 1" in capsys.readouterr().err


def test_ca_key_can_live_outside_the_shared_directory(tmp_path: Path) -> None:
    shared, private = tmp_path / "tls", tmp_path / "ca" / "ca.key"
    cfg = CertConfig(clients=("cam-1",))
    files = ensure_tls_material(shared, cfg, ca_key=private)
    assert private.stat().st_mode & 0o777 == 0o600
    assert not (shared / "ca.key").exists()
    ca = certs.load_pair(files.ca_cert, private)
    assert ca is not None
    assert ensure_tls_material(shared, cfg, ca_key=private).created == ()
    # Without its key the CA cannot sign: a new CA and new leaves are issued.
    assert set(ensure_tls_material(shared, cfg).created) == {"ca.pem", "server.pem",
                                                            "client-cam-1.pem"}
