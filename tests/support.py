"""Helpers for tests that run the real daemons as subprocesses on loopback."""

from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: one torch thread (two processes share 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCA_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def write_toml(path: Path, values: dict[str, object]) -> Path:
    """Write a flat TOML file (strings, numbers, booleans; nested dicts as tables)."""
    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    flat = [f"{k} = {fmt(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {fmt(vv)}" for kk, vv in v.items())
        for k, v in values.items() if isinstance(v, dict)
    ]
    path.write_text("\n".join(flat + tables) + "\n")
    return path


class CloudProcess:
    """`cloud-server serve` as a real child process; `port` is read from its port file."""

    def __init__(self, config: Path, workdir: Path, timeout_s: float = 60.0,
                 extra_args: tuple[str, ...] = (), max_file_bytes: int | None = None) -> None:
        """`max_file_bytes` caps every file the daemon writes (RLIMIT_FSIZE: writes beyond it
        fail with EFBIG, as on a full disk; Python ignores SIGXFSZ)."""
        self.port_file = workdir / "cloud.port"
        self.port_file.unlink(missing_ok=True)
        self.log = (workdir / "cloud.log").open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "cloud-server"), "serve", "--config", str(config),
             "--port-file", str(self.port_file), *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT,
            preexec_fn=None if max_file_bytes is None else functools.partial(
                resource.setrlimit, resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)),
        )
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.proc.poll() is not None:
                raise RuntimeError(f"cloud-server exited {self.proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"cloud-server did not start: {self.logs()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        """Everything the server wrote so far."""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig: int = 15, timeout_s: float = 30.0) -> int:
        """Send `sig` and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.log.close()
