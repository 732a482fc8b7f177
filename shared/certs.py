"""TLS material for a fleet: a private CA, the cloud's server certificate and one client
certificate per device (mutual TLS), written as PEM files. `python -m shared.certs` is idempotent:
material that is still valid for what was asked is kept, anything else is (re)issued.

Files in the output directory: `ca.pem`/`ca.key` (the key elsewhere with `--ca-key`),
`server.pem`/`server.key`, `client-<id>.pem`/`client-<id>.key`. Keys are 0600, certificates
0644; every file is written atomically (temp file, fsync, rename): no reader sees half a key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError
from shared.logging import setup_logging

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
# Same rule as DeviceSettings.device_id: a client certificate's CN is a device id.
CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
# Issued slightly in the past so a peer whose clock lags a little still accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)


class Usage(Enum):
    """What a leaf certificate may authenticate (its extended key usage)."""

    SERVER = "server"
    CLIENT = "client"


_EKU = {
    Usage.SERVER: ExtendedKeyUsageOID.SERVER_AUTH, Usage.CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH}


def client_files(client_id: str) -> tuple[str, str]:
    """File names (certificate, key) of a device's client certificate."""
    return f"client-{client_id}.pem", f"client-{client_id}.key"


@dataclass(frozen=True)
class CertConfig:
    """What `ensure_tls_material` must leave in the directory."""

    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES
    """DNS names and IP addresses the server certificate must cover (its SANs); the first is
    also its common name."""
    clients: tuple[str, ...] = ()
    """Device ids that get a client certificate (CN = the id)."""
    ca_days: int = 3650
    """Lifetime of a new CA."""
    leaf_days: int = 397
    """Lifetime of a new server or client certificate."""
    renew_before_days: int = 30
    """Existing material expiring sooner than this is reissued."""

    def __post_init__(self) -> None:
        if not self.server_names:
            raise ConfigError("`server_names` must name at least one host, got ()")
        for name in self.server_names:
            if not _is_ip(name) and not DNS_NAME.match(name):
                raise ConfigError(
                    f"`server_names`: {name!r} is neither an IP address nor a DNS name")
        for client in self.clients:
            if not CLIENT_ID.match(client):
                raise ConfigError(
                    f"`clients`: {client!r} must match {CLIENT_ID.pattern} (a device id)")
        if len(set(self.clients)) != len(self.clients):
            raise ConfigError(f"`clients` must be unique, got {list(self.clients)}")
        for name in ("ca_days", "leaf_days"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.renew_before_days < min(self.ca_days, self.leaf_days):
            raise ConfigError(
                f"`renew_before_days` must be in [0, min(ca_days, leaf_days)) = "
                f"[0, {min(self.ca_days, self.leaf_days)}), got {self.renew_before_days}")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the material in a directory, and what the last `ensure` did to each file pair."""

    directory: Path
    clients: tuple[str, ...]
    created: tuple[str, ...] = field(default=())
    kept: tuple[str, ...] = field(default=())

    @property
    def ca_cert(self) -> Path:
        """CA certificate: the devices' trust root and the cloud's `client_ca_file`."""
        return self.directory / CA_CERT

    @property
    def server_cert(self) -> Path:
        """The cloud's certificate."""
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        """The cloud's private key."""
        return self.directory / SERVER_KEY

    def client(self, client_id: str) -> tuple[Path, Path]:
        """(certificate, key) paths of a device's client certificate."""
        if client_id not in self.clients:
            raise ConfigError(f"`client_id`: {client_id!r} is not one of {list(self.clients)}")
        cert, key = client_files(client_id)
        return self.directory / cert, self.directory / key


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ca(
    common_name: str = "CDCA fleet CA", *, not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A self-signed CA that may sign leaves only (path length 0); default: 10 years from now."""
    start = not_before or _now() - CLOCK_SKEW
    end = not_after or start + dt.timedelta(days=3650)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued, common_name: str, usage: Usage, *, server_names: Sequence[str] = (),
    not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by `ca`; default validity: now (minus skew) plus 397 days.

    Pass a `not_after` in the past to get an expired certificate (for tests), e.g.
    `issue(ca, "cam-1", Usage.CLIENT, not_before=now - 2 days, not_after=now - 1 day)`.
    """
    start = not_before or _now() - CLOCK_SKEW
    end = not_after or start + dt.timedelta(days=397)
    if end <= start:
        raise ConfigError(f"`not_after` must be later than `not_before` ({start}), got {end}")
    if usage is Usage.SERVER and not server_names:
        raise ConfigError("`server_names` must not be empty for a server certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    eku = _EKU[usage]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
            for n in server_names
        ]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (file mode `mode` from creation on): temp, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_pair(cert_path: Path, key_path: Path, issued: Issued) -> None:
    """Write key (0600) then certificate (0644); a crash in between leaves a mismatched pair,
    which the next `ensure_tls_material` reissues."""
    write_atomic(key_path, issued.key_pem(), 0o600)
    write_atomic(cert_path, issued.cert_pem(), 0o644)


def load_pair(cert_path: Path, key_path: Path) -> Issued | None:
    """The pair at these paths, or None when missing, unreadable or not a matching EC pair."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return None
    return Issued(cert, key)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def leaf_problem(
    leaf: Issued, ca: x509.Certificate, usage: Usage, *, common_name: str,
    server_names: Sequence[str] = (), now: dt.datetime | None = None,
    renew_before: dt.timedelta = dt.timedelta(0),
) -> str | None:
    """Why `leaf` cannot be kept for this use (None when it can)."""
    now = now or _now()
    cert = leaf.cert
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by the CA"
    if cert.not_valid_after_utc - renew_before <= now:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc.isoformat()}"
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in names] != [common_name]:
        return f"common name is not {common_name!r}"
    if _EKU[usage] not in _eku(cert):
        return f"not usable for {usage.value} authentication"
    missing = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in server_names} - _sans(cert)
    if missing:
        return f"does not cover {sorted(missing)}"
    return None


def _ca_problem(ca: Issued, now: dt.datetime, renew_before: dt.timedelta) -> str | None:
    cert = ca.cert
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.verify_directly_issued_by(cert)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature):
        return "not a self-signed CA"
    if not constraints.ca:
        return "not a CA"
    if cert.not_valid_after_utc - renew_before <= now:
        return f"expires {cert.not_valid_after_utc.isoformat()}"
    return None


def ensure_tls_material(
    directory: Path, config: CertConfig, *, ca_key: Path | None = None,
    now: dt.datetime | None = None,
) -> TlsFiles:
    """Leave a CA, a server certificate and the clients' certificates valid for `config` in
    `directory`, keeping every existing file pair that already is (idempotent).

    `ca_key` keeps the CA's private key out of `directory` (default `directory/ca.key`), so the
    directory can be handed to the cloud and devices without the power to mint certificates.
    """
    now = now or _now()
    renew = dt.timedelta(days=config.renew_before_days)
    ca_key = ca_key or directory / CA_KEY
    directory.mkdir(parents=True, exist_ok=True)
    ca_key.parent.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    kept: list[str] = []

    ca = load_pair(directory / CA_CERT, ca_key)
    problem = "missing or unreadable" if ca is None else _ca_problem(ca, now, renew)
    if ca is None or problem is not None:
        log.info("issuing a new CA", extra={"reason": problem})
        ca = new_ca(not_before=now - CLOCK_SKEW,
                    not_after=now + dt.timedelta(days=config.ca_days))
        write_pair(directory / CA_CERT, ca_key, ca)
        created.append(CA_CERT)
    else:
        kept.append(CA_CERT)

    server_names = tuple(dict.fromkeys(config.server_names))
    wanted: list[tuple[str, str, str, Usage, tuple[str, ...]]] = [
        (SERVER_CERT, SERVER_KEY, server_names[0], Usage.SERVER, server_names)]
    wanted += [(*client_files(c), c, Usage.CLIENT, ()) for c in config.clients]
    for cert_name, key_name, cn, usage, names in wanted:
        leaf = load_pair(directory / cert_name, directory / key_name)
        problem = "missing or unreadable" if leaf is None else leaf_problem(
            leaf, ca.cert, usage, common_name=cn, server_names=names, now=now,
            renew_before=renew)
        if leaf is not None and problem is None:
            kept.append(cert_name)
            continue
        log.info("issuing a certificate", extra={"file": cert_name, "reason": problem})
        leaf = issue(ca, cn, usage, server_names=names, not_before=now - CLOCK_SKEW,
                     not_after=now + dt.timedelta(days=config.leaf_days))
        write_pair(directory / cert_name, directory / key_name, leaf)
        created.append(cert_name)
    return TlsFiles(directory, tuple(config.clients), tuple(created), tuple(kept))


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.certs --out DIR [--server-name N]... [--client ID]...`; 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m shared.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory of the PEM files")
    parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP of the server (localhost, 127.0.0.1 always)")
    parser.add_argument("--client", action="append", default=[], metavar="ID",
                        help="device id that gets a client certificate (repeatable)")
    parser.add_argument("--ca-key", type=Path, metavar="PATH",
                        help="keep the CA private key here instead of OUT/ca.key")
    parser.add_argument("--days", type=int, default=397, help="lifetime of new leaf certificates")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = CertConfig(
            server_names=tuple(dict.fromkeys([*args.server_name, *DEFAULT_SERVER_NAMES])),
            clients=tuple(args.client), leaf_days=args.days,
            renew_before_days=min(30, args.days - 1))
        files = ensure_tls_material(args.out, config, ca_key=args.ca_key)
    except ConfigError as e:
        sys.stderr.write(f"shared.certs: configuration error: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"shared.certs: cannot write {args.out}: {e}\n")
        return 1
    sys.stdout.write(json.dumps({"out": str(files.directory), "created": list(files.created),
                                 "kept": list(files.kept)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
