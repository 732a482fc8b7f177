"""Running `cloud-server serve` for integration tests: config files, data-dir inspection."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tests.support import CloudProcess

SECRET = "fleet-secret"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, values: dict[str, Any]) -> Path:
    """TOML with one level of tables; dicts inside tables become inline tables."""
    flat = [f"{k} = {_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {_value(vv)}" for kk, vv in v.items())
              for k, v in values.items() if isinstance(v, dict)]
    path.write_text("\n".join(flat + tables) + "\n")
    return path


def start_cloud(workdir: Path, **overrides: Any) -> CloudProcess:
    """A daemon on 127.0.0.1:0 with its data under workdir/cloud (reused across restarts); the
    fast "tiny-kd" trainer unless `worker` names another (it replaces `trainer_options` too)."""
    values: dict[str, Any] = {
        "data_dir": str(workdir / "cloud"), "enrollment_secret": SECRET,
        "listen_address": "127.0.0.1:0", "insecure": True, "grace_s": 10.0,
        "worker": {"trainer": "tiny-kd", "threshold_samples": 4, "schedule_s": 3600.0,
                   "trainer_options": {"steps": 6, "checkpoint_every": 2}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    if "tls" in values:
        values.pop("insecure")
    workdir.mkdir(parents=True, exist_ok=True)
    return CloudProcess(write_config(workdir / "cloud.toml", values), workdir, extra_args=(
        "--metrics-port-file", str(workdir / "cloud.metrics-port")))


def rows(workdir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the daemon's database (a plain reader; WAL lets it run beside the server)."""
    db = sqlite3.connect(workdir / "cloud" / "cloud.sqlite3", timeout=10)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def blob_count(workdir: Path, kind: str = "uploads") -> int:
    """Files in one blob directory of the daemon's store."""
    return sum(1 for _ in (workdir / "cloud" / "blobs" / kind).iterdir())
