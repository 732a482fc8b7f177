"""The demo's child processes: TLS material, the cloud-server daemon, device-agent commands.

Everything here talks to the real console scripts through files and exit codes; nothing imports
`cloud` or `device`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("demo")
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def write_toml(path: Path, values: dict[str, Any]) -> Path:
    """A TOML file of scalars, string lists and (nested) tables."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        for k, v in table.items():
            if isinstance(v, dict) or v is None:
                continue
            text = str(v).lower() if isinstance(v, bool) else json.dumps(v)
            lines.append(f"{k} = {text}")
        for k, v in subs.items():
            name = f"{prefix}.{k}" if prefix else k
            lines.append(f"\n[{name}]")
            emit(name, v)

    emit("", values)
    path.write_text("\n".join(lines) + "\n")
    return path


def child_env() -> dict[str, str]:
    """Our environment minus CDCA_* overrides, one thread per process (2-core machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCA_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def make_certs(out: Path, device_ids: list[str]) -> dict[str, Path]:
    """CA, server (`localhost`) and one client certificate per device via `shared.certs`."""
    argv = [sys.executable, "-m", "shared.certs", "--out", str(out), "--server-name", "localhost"]
    for d in device_ids:
        argv += ["--client", d]
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=ROOT,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"shared.certs failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"ca": out / "ca.pem", "server_cert": out / "server.pem",
            "server_key": out / "server.key"}


@dataclass
class Cloud:
    """A running `cloud-server serve`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    exit_code: int | None = None

    @classmethod
    def start(cls, workdir: Path, config: dict[str, Any], timeout_s: float = 120) -> Cloud:
        cfg = write_toml(workdir / "cloud.toml", config)
        port_file = workdir / "cloud.port"
        port_file.unlink(missing_ok=True)
        log_path = workdir / "cloud.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "cloud-server"), "serve", "--config", str(cfg), "--port-file",
                 str(port_file)], stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"cloud-server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        return cls(proc, int(port_file.read_text()), log_path)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, wait for the drain; the exit code (killed after `timeout_s`: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code


@dataclass
class Device:
    """One device's config file and the outcome of its commands."""

    device_id: str
    workdir: Path
    settings: dict[str, Any]
    exit_codes: list[dict[str, Any]] = field(default_factory=list)
    update_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.device_id

    def config(self, **overrides: Any) -> Path:
        values = {**self.settings, **overrides}
        return write_toml(self.workdir / f"{self.device_id}.toml", values)

    def command(self, cmd: str, config: Path, timeout_s: float = 600
                ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "device-agent"), cmd, "--config", str(config)],
                              capture_output=True, text=True, env=child_env(), cwd=ROOT,
                              timeout=timeout_s)
        self.exit_codes.append({"command": cmd, "exit_code": proc.returncode})
        with (self.workdir / f"{self.device_id}.log").open("a") as f:
            f.write(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"device-agent {cmd} ({self.device_id}) exited "
                               f"{proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def start_run(self, limit: int) -> subprocess.Popen[str]:
        """`device-agent run` over the stream up to position `limit` (resumes at its cursor)."""
        settings = json.loads(json.dumps(self.settings, default=str))
        settings["input"] = {**settings["input"], "limit": limit}
        cfg = write_toml(self.workdir / f"{self.device_id}.run.toml", settings)
        err = (self.workdir / f"{self.device_id}.run.stderr").open("w")
        proc = subprocess.Popen([str(BIN / "device-agent"), "run", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(),
                                cwd=ROOT)
        err.close()
        return proc

    def finish_run(self, proc: subprocess.Popen[str], timeout_s: float = 600) -> dict[str, Any]:
        """Wait for a run; collect its counters and the update events it logged."""
        out, _ = proc.communicate(timeout=timeout_s)
        stderr = (self.workdir / f"{self.device_id}.run.stderr").read_text()
        with (self.workdir / f"{self.device_id}.log").open("a") as f:
            f.write(stderr)
        self.exit_codes.append({"command": "run", "exit_code": proc.returncode})
        if proc.returncode != 0:
            raise RuntimeError(f"device-agent run ({self.device_id}) exited {proc.returncode}:"
                               f" {stderr[-2000:]}")
        for line in stderr.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if str(rec.get("msg", "")).startswith("update "):
                self.update_events.append(rec)
        return json.loads(out.splitlines()[-1])

    def status(self) -> dict[str, Any]:
        """`device-agent status`: the cloud's view plus the agent's last counters."""
        proc = self.command("status", self.config())
        return json.loads(proc.stdout.splitlines()[-1])

    def local_status(self) -> dict[str, Any]:
        path = self.data_dir / "status.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
