"""`python -m demo`: start a cloud-server and two device-agents on 127.0.0.1, enroll, report.

The processes are the real console scripts talking gRPC; this module only orchestrates them and
never imports `cloud` or `device`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("demo")
BIN = Path(sys.executable).parent


def _toml(path: Path, values: dict[str, object]) -> Path:
    lines = []
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCA_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run(workdir: Path, devices: list[str]) -> dict[str, object]:
    """Start the cloud, enroll every device, check health; return what each reported."""
    port_file = workdir / "cloud.port"
    cloud_cfg = _toml(workdir / "cloud.toml", {
        "data_dir": str(workdir / "cloud"), "enrollment_secret": "demo-fleet-secret",
        "listen_address": "127.0.0.1:0", "insecure": True,
    })
    cloud_log = (workdir / "cloud.log").open("wb")
    cloud = subprocess.Popen(
        [str(BIN / "cloud-server"), "serve", "--config", str(cloud_cfg), "--port-file",
         str(port_file)], stdout=cloud_log, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if cloud.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cloud-server failed to start; see {cloud_log.name}")
            time.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        log.info("cloud-server listening on %s", address)
        reports: dict[str, object] = {}
        for device_id in devices:
            cfg = _toml(workdir / f"{device_id}.toml", {
                "device_id": device_id, "data_dir": str(workdir / device_id),
                "cloud_address": address, "enrollment_secret": "demo-fleet-secret",
                "insecure": True,
            })
            proc = subprocess.run(
                [str(BIN / "device-agent"), "register", "--config", str(cfg)],
                capture_output=True, text=True, env=_env(), timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{device_id} failed to register: {proc.stderr.strip()}")
            reports[device_id] = json.loads(proc.stdout.splitlines()[-1])
            log.info("%s registered: %s", device_id, reports[device_id])
        return {"cloud": address, "devices": reports}
    finally:
        cloud.send_signal(signal.SIGTERM)
        code = cloud.wait(60)
        cloud_log.close()
        log.info("cloud-server stopped (exit %d)", code)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every device registered and reported healthy."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep state here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo: %(message)s")
    with tempfile.TemporaryDirectory(prefix="cdca-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, ["cam-lowlight", "cam-clutter"])
    healthy = all(r.get("healthy") for r in result["devices"].values())  # type: ignore[union-attr]
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
