"""`python -m cloud.healthcheck [ADDRESS]`: one gRPC health Check, for container HEALTHCHECKs.

Exit 0 when the service reports SERVING, 1 otherwise (unreachable, TLS refused, NOT_SERVING,
bad options): Docker reads any non-zero status as unhealthy and reserves 2, so 2 is never used.
Options default to `CDCA_HEALTHCHECK_*` environment variables so that an image can declare one
fixed `HEALTHCHECK CMD ["python", "-m", "cloud.healthcheck"]` and the deployment fills in the
address and TLS files. It imports only grpc: it runs every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV_PREFIX = "CDCA_HEALTHCHECK_"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def check(address: str, *, service: str = "", timeout_s: float = 3.0,
          ca_file: Path | None = None, cert_file: Path | None = None,
          key_file: Path | None = None, server_name: str | None = None) -> str:
    """The health status name of `service` at `address` ("SERVING", "NOT_SERVING", ...).

    TLS when `ca_file` is given; `cert_file` + `key_file` add a client certificate (mutual TLS).

    Raises:
        grpc.RpcError: the call failed (unreachable, handshake refused, deadline, unknown service).
        OSError: a TLS file cannot be read.
    """
    if ca_file is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes(),
            private_key=key_file.read_bytes() if key_file else None,
            certificate_chain=cert_file.read_bytes() if cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse exits 2 on bad usage, which Docker reserves.
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def default(name: str) -> str | None:
        return env.get(ENV_PREFIX + name) or None

    parser = _Parser(prog="python -m cloud.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", nargs="?", default=default("ADDRESS") or DEFAULT_ADDRESS,
                        help=f"host:port (env {ENV_PREFIX}ADDRESS; default {DEFAULT_ADDRESS})")
    parser.add_argument("--service", default=default("SERVICE") or "",
                        help="service name to check; empty: the whole server")
    parser.add_argument("--timeout-s", type=float, default=default("TIMEOUT_S") or 3.0)
    for flag, name in (("--ca-file", "CA_FILE"), ("--cert-file", "CERT_FILE"),
                       ("--key-file", "KEY_FILE")):
        parser.add_argument(flag, type=Path, default=default(name),
                            help=f"PEM file (env {ENV_PREFIX}{name})")
    parser.add_argument("--server-name", default=default("SERVER_NAME"),
                        help="name to verify the server certificate against")
    return parser


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one check; 0 when SERVING, else 1 with one line on stderr."""
    parser = _parser(os.environ if env is None else env)
    args = parser.parse_args(argv)
    if (args.cert_file is None) != (args.key_file is None):
        sys.stderr.write("healthcheck: --cert-file and --key-file go together\n")
        return 1
    if args.cert_file is not None and args.ca_file is None:
        sys.stderr.write("healthcheck: --cert-file needs --ca-file (TLS)\n")
        return 1
    try:
        status = check(args.address, service=args.service, timeout_s=args.timeout_s,
                       ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                       server_name=args.server_name)
    except grpc.RpcError as e:
        sys.stderr.write(f"healthcheck: {args.address}: {e.code().name}: {e.details()}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"healthcheck: cannot read TLS file: {e}\n")
        return 1
    if status != "SERVING":
        sys.stderr.write(f"healthcheck: {args.address}: {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
