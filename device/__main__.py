"""`device-agent`: the CDCA edge agent's entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from device.settings import DeviceSettings
from device.sync.client import GrpcTransport, open_channel
from device.sync.credentials import Credentials
from shared.errors import ConfigError, StoreFullError, TransportError
from shared.logging import setup_logging
from shared.settings import load_settings
from shared.types import Enrollment

log = logging.getLogger("device")


def _register(settings: DeviceSettings) -> int:
    if settings.enrollment_secret is None:
        raise ConfigError("field `enrollment_secret`: missing; required by `register`")
    with GrpcTransport(open_channel(settings), settings.rpc_timeout_s) as transport:
        grant = transport.register(
            Enrollment(settings.device_id, settings.enrollment_secret.get_secret_value(), "cpu")
        )
        creds = Credentials(
            settings.device_id, grant.device_token, grant.cloud_public_key, grant.base_model_hash
        )
        path = creds.save(settings.data_dir)
        transport.credentials = creds
        status = transport.status()
    log.info("registered", extra={"device_id": settings.device_id, "credentials": str(path)})
    sys.stdout.write(json.dumps({"device_id": status.device_id, "healthy": True,
                                 "adapter_version": status.adapter_version}) + "\n")
    return 0


def _status(settings: DeviceSettings) -> int:
    creds = Credentials.load(settings.data_dir)
    with GrpcTransport(open_channel(settings), settings.rpc_timeout_s, creds) as transport:
        status = transport.status()
    out = dataclasses.asdict(status)
    local = settings.data_dir / "status.json"
    if local.exists():  # the agent's own counters from its last `run`
        out["device"] = json.loads(local.read_text())
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def _run(settings: DeviceSettings) -> int:
    from device.build import build_agent  # heavy imports (torch, transformers) only for `run`

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with build_agent(settings, stop) as agent:
        counters = agent.run(stop)
    sys.stdout.write(json.dumps(dataclasses.asdict(counters)) + "\n")
    return 0


def _export_onnx(settings: DeviceSettings) -> int:
    from device.runtime.onnx_vision import export_from_settings

    report = export_from_settings(settings)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


COMMANDS = {"register": _register, "status": _status, "run": _run, "export-onnx": _export_onnx}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build settings once, run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="device-agent", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--config", type=Path, help="TOML settings file (env CDCA_DEVICE_* wins)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(DeviceSettings, args.config)
        if settings.tls is None and not settings.insecure:
            raise ConfigError("field `tls`: missing; set `tls` or `insecure = true` explicitly")
        setup_logging(settings.log_level, settings.log_json)
        return COMMANDS[args.command](settings)
    except ConfigError as e:
        sys.stderr.write(f"device-agent: configuration error: {e}\n")
        return 2
    except StoreFullError as e:
        sys.stderr.write(f"device-agent: storage full: {e}\n")
        return 1
    except TransportError as e:
        sys.stderr.write(f"device-agent: cloud call failed: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
