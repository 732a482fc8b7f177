"""`cloud-server`: the CDCA cloud daemon's entry point."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from cloud.keys import load_or_create_signing_key, public_key_bytes
from cloud.server import CloudServer
from cloud.servicer import SyncServicer
from cloud.settings import CloudSettings
from cloud.store import Store
from shared.errors import ConfigError
from shared.logging import setup_logging
from shared.settings import load_settings

log = logging.getLogger("cloud")


def _serve(settings: CloudSettings, port_file: Path | None) -> int:
    if settings.tls is None and not settings.insecure:
        raise ConfigError("field `tls`: missing; set `tls` or `insecure = true` explicitly")
    store = Store(settings.data_dir)
    key = load_or_create_signing_key(settings.data_dir / "signing_key.pem")
    servicer = SyncServicer(
        store, settings.enrollment_secret.get_secret_value(), public_key_bytes(key), ""
    )
    server = CloudServer(servicer, settings.listen_address, settings.max_workers)
    if port_file is not None:
        port_file.write_text(f"{server.port}\n")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("signal received, draining", extra={"grace_s": settings.grace_s})
    server.stop(settings.grace_s)
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build settings once, run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="cloud-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC daemon until SIGTERM")
    serve.add_argument("--config", type=Path, help="TOML settings file (env CDCA_CLOUD_* wins)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(CloudSettings, args.config)
        setup_logging(settings.log_level, settings.log_json)
        return _serve(settings, args.port_file)
    except ConfigError as e:
        sys.stderr.write(f"cloud-server: configuration error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
