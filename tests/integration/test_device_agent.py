"""`device-agent run` as a real process: answers, UTS uploads through the durable outbox, kill -9.

The cloud here is an in-test SyncService on 127.0.0.1:0 (tests/device/fake_cloud.py) because the
scenario needs a receipt held in flight at the moment of the kill.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from device.sync.credentials import Credentials
from tests.device.fake_cloud import FakeCloud
from tests.device.tiny import write_checkpoint
from tests.support import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.integration

LIMIT, ROUND, BUDGET = 24, 8, 3


def _val(v: object) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_val(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # strings, numbers, booleans, string lists: JSON is valid TOML here


def _toml(path: Path, values: dict[str, object]) -> Path:
    """TOML with one level of tables (deeper dicts as inline tables)."""
    flat = [f"{k} = {_val(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {_val(vv)}" for kk, vv in v.items())
              for k, v in values.items() if isinstance(v, dict)]
    path.write_text("\n".join(flat + tables) + "\n")
    return path


def _config(tmp_path: Path, ckpt: Path, address: str, **over: object) -> Path:
    values: dict[str, object] = {
        "device_id": "cam-01", "data_dir": str(tmp_path / "dev"), "cloud_address": address,
        "insecure": True, "rpc_timeout_s": 10.0, "progress": False, "log_json": True,
        "compressor": "vidcom2",
        "model": {"checkpoint_dir": str(ckpt), "batch_size": 4, "max_new_tokens": 3},
        "input": {"domains": ["source", "low_light"], "seed": 3, "limit": LIMIT},
        "sampler_options": {"mode": "budget", "round_size": ROUND, "round_budget": BUDGET,
                            "token_budget_bytes": 1200},
        "uplink": {"batch_samples": 2, "retry_base_s": 0.05, "retry_max_s": 0.2,
                   "drain_timeout_s": 30.0},
        "updates": {"enabled": False},
    }
    values.update(over)
    Credentials("cam-01", "tok", b"\1" * 32, "").save(tmp_path / "dev")
    return _toml(tmp_path / "device.toml", values)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("student"))


def _agent(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "device-agent"), "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=ROOT)


def test_run_answers_and_uploads_selected_tokens(tmp_path: Path, ckpt: Path) -> None:
    with FakeCloud() as cloud:
        proc = _agent(_config(tmp_path, ckpt, cloud.address))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        counters = json.loads(out.splitlines()[-1])
        samples = cloud.state.samples
    answers = [json.loads(x) for x in (tmp_path / "dev" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == LIMIT and {a["domain"] for a in answers} == {"source", "low_light"}
    assert len(samples) == counters["selected"] == LIMIT // ROUND * BUDGET
    status = json.loads((tmp_path / "dev" / "status.json").read_text())
    assert status["uploaded_samples"] == len(samples) and status["samples_seen"] == LIMIT
    for s in samples:
        t = s.tokens
        assert t is not None and t.values.dtype == np.int8 and t.scales is not None
        assert t.values.shape[1] == 128 and 1 <= t.values.shape[0] <= 1200 // (128 + 12)
        assert t.feature_space == "projected" and len(t.grid) == 3
        assert s.device_answer is not None and 0.0 <= s.confidence <= 1.0
    # the uploaded ones are each round's least confident
    conf = {a["sample_id"]: a["confidence"] for a in answers}
    up = {s.sample_id for s in samples}
    for r in range(LIMIT // ROUND):
        ids = [a["sample_id"] for a in answers[r * ROUND:(r + 1) * ROUND]]
        worst = sorted(ids, key=lambda i: conf[i])[:BUDGET]
        assert set(worst) == up & set(ids)


def test_kill_9_mid_upload_then_restart_uploads_each_sample_once(tmp_path: Path,
                                                                 ckpt: Path) -> None:
    with FakeCloud() as cloud:
        cloud.state.hold_after_storing = 1  # the 2nd upload is stored; its receipt hangs
        cfg = _config(tmp_path, ckpt, cloud.address)
        proc = _agent(cfg)
        assert cloud.state.holding.wait(240), "agent never reached its second upload"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        cloud.state.release.set()
        assert len(cloud.state.upload_ids) == 2
        again = _agent(cfg)
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]
        ids = [s.sample_id for s in cloud.state.samples]
    assert len(ids) == LIMIT // ROUND * BUDGET
    assert Counter(ids).most_common(1)[0][1] == 1
    status = json.loads((tmp_path / "dev" / "status.json").read_text())
    assert status["outbox_pending"] == 0 and status["outbox_in_flight"] == 0
    assert "resuming input stream" in err or status["samples_seen"] == LIMIT


def test_cloud_down_at_first_then_back_every_sample_arrives_once(tmp_path: Path,
                                                                 ckpt: Path) -> None:
    cloud = FakeCloud()  # port bound, not serving yet: the device meets a dead link
    cfg = _config(tmp_path, ckpt, cloud.address,
                  rpc_timeout_s=0.5)  # short deadlines: several failed attempts, then backoff
    proc = _agent(cfg)
    outbox = tmp_path / "dev" / "outbox.sqlite3"
    deadline = time.monotonic() + 240
    attempts = 0
    while time.monotonic() < deadline and attempts < 3 and proc.poll() is None:
        if outbox.exists():
            con = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
            try:
                row = con.execute("SELECT COALESCE(MAX(attempts), 0) FROM uploads").fetchone()
                attempts = int(row[0]) if row else 0
            except sqlite3.OperationalError:
                pass  # the agent has created the file but not yet its schema
            finally:
                con.close()
        time.sleep(0.1)
    assert attempts >= 3, "the agent never retried against the dead link"
    with cloud:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        ids = [s.sample_id for s in cloud.state.samples]
    assert len(ids) == LIMIT // ROUND * BUDGET and len(set(ids)) == len(ids)
    assert "will retry" in err


# ---------------------------------------------------------------- the real cloud-server process

@pytest.fixture
def real_cloud(tmp_path: Path):
    from tests.support import CloudProcess

    cfg = _toml(tmp_path / "cloud.toml", {
        "data_dir": str(tmp_path / "cloud"), "enrollment_secret": "fleet-secret",
        "listen_address": "127.0.0.1:0", "insecure": True, "grace_s": 2.0,
        "worker": {"enabled": False, "trainer": "tiny-kd", "trainer_options": {"dim": 128}},
    })
    server = CloudProcess(cfg, tmp_path)
    yield server
    server.stop(signal.SIGKILL)


def _register(cfg: Path) -> None:
    proc = subprocess.run([str(BIN / "device-agent"), "register", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def _cloud_status(cfg: Path) -> dict:
    proc = subprocess.run([str(BIN / "device-agent"), "status", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_real_cloud_kill_9_then_restart_stores_each_sample_once(
        tmp_path: Path, ckpt: Path, real_cloud) -> None:
    cfg = _config(tmp_path, ckpt, real_cloud.address, enrollment_secret="fleet-secret",
                  model={"checkpoint_dir": str(ckpt), "batch_size": 4, "max_new_tokens": 3,
                         "feature_space": "tiny/features"})
    _register(cfg)
    proc = _agent(cfg)
    db = next((tmp_path / "cloud").rglob("*.sqlite3"))
    deadline = time.monotonic() + 240
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            stored = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        if stored >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None and stored >= 2, "agent finished or never uploaded"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    again = _agent(cfg)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        ids = [r[0] for r in con.execute("SELECT sample_id FROM samples")]
    assert len(ids) == LIMIT // ROUND * BUDGET and len(set(ids)) == len(ids)
    status = _cloud_status(cfg)
    assert status["stored_samples"] == len(ids)
    assert status["device"]["outbox_pending"] == status["device"]["outbox_in_flight"] == 0
    assert status["device"]["dead_lettered"] == 0
