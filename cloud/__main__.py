"""`cloud-server`: the CDCA cloud daemon's entry point."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from cloud.settings import CloudSettings
from shared.errors import ConfigError
from shared.logging import setup_logging
from shared.settings import load_settings

log = logging.getLogger("cloud")


def _serve(settings: CloudSettings, port_file: Path | None, metrics_port_file: Path | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from cloud.app import CloudApp  # torch & co. load only once the settings are known good

    app = CloudApp(settings)
    if metrics_port_file is not None and app.metrics_port is not None:
        metrics_port_file.write_text(f"{app.metrics_port}\n")
    if port_file is not None:
        port_file.write_text(f"{app.port}\n")
    stop.wait()
    log.info("signal received, draining", extra={"grace_s": settings.grace_s})
    app.stop(settings.grace_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build settings once, run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="cloud-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC daemon until SIGTERM")
    serve.add_argument("--config", type=Path, help="TOML settings file (env CDCA_CLOUD_* wins)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument("--metrics-port-file", type=Path,
                       help="write the bound Prometheus port here once serving")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(CloudSettings, args.config)
        setup_logging(settings.log_level, settings.log_json)
        return _serve(settings, args.port_file, args.metrics_port_file)
    except ConfigError as e:
        sys.stderr.write(f"cloud-server: configuration error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
