"""`device-agent run` SIGKILLed at each instant of applying an update, against the real
cloud-server: after every restart the agent serves an adapter that is bit for bit version 0 or
the published one, never on probation, and the cloud's record converges to what the device serves.

Instants (device/sync/updater.py `apply`): new version written but pointer not swapped
(`CDCA_FAULT_POINT=adapter-written`), pointer swapped on probation while the probe runs (the test
polls the pointer file and kills from outside), and the final swap done but the acknowledgement
not sent (`CDCA_FAULT_POINT=adapter-swapped`). The first and last last microseconds, so only a
self-kill at that line can hit them.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from device.runtime.adapter_store import AdapterStore
from device.runtime.loader import StudentConfig, adapter_state, load_student
from device.sync.credentials import Credentials
from device.sync.updater import ACKED
from tests.cloud.client import Device
from tests.cloud.daemon import rows, start_cloud
from tests.device.tiny import write_checkpoint
from tests.integration.test_device_agent import _toml
from tests.reliability.updates import chain, cloud_base_model_hash, digest, publish_chain
from tests.support import BIN, ROOT, subprocess_env

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAINER = {"dim": 128}  # the tiny student's projected width: the agent's uploads are accepted


def _agent(cfg: Path, fault: str | None = None) -> subprocess.Popen:
    env = subprocess_env(**({"CDCA_FAULT_POINT": fault} if fault else {}))
    return subprocess.Popen([str(BIN / "device-agent"), "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def _pointer(adapters: Path) -> dict | None:
    try:
        return json.loads((adapters / "CURRENT").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written / mid-replace
        return None


def test_sigkill_at_every_instant_of_apply(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "student")
    v0 = adapter_state(load_student(StudentConfig(ckpt)).model)
    published = publish_chain(tmp_path / "cloud", "cam-01", [v0, *chain(v0, 2, scale=1e-4)],
                              cloud_base_model_hash(**TRAINER))
    expected = {0: digest(v0)} | {h.version: digest(held) for h, _, held in published}
    data = tmp_path / "dev"
    adapters = data / "adapters"
    store = AdapterStore(adapters)
    cloud = start_cloud(tmp_path, worker={"enabled": False, "trainer_options": TRAINER})
    try:
        dev = Device(grpc.insecure_channel(cloud.address), "cam-01").register()
        Credentials("cam-01", dev.token, dev.public_key, cloud_base_model_hash(**TRAINER)
                    ).save(data)
        cfg = _toml(tmp_path / "device.toml", {
            "device_id": "cam-01", "data_dir": str(data), "cloud_address": cloud.address,
            "insecure": True, "rpc_timeout_s": 10.0, "progress": False, "log_json": True,
            "model": {"checkpoint_dir": str(ckpt), "batch_size": 4, "max_new_tokens": 3,
                      "feature_space": "tiny/features"},
            "input": {"domains": ["source"], "seed": 3, "limit": 8},
            "sampler_options": {"mode": "budget", "round_size": 4, "round_budget": 1,
                                "token_budget_bytes": 1200},
            "uplink": {"batch_samples": 2, "retry_base_s": 0.05, "retry_max_s": 0.2,
                       "drain_timeout_s": 30.0, "calibration_samples": 4},
            "updates": {"poll_interval_s": 0.1, "rollback_margin": 1.0, "probe_samples": 24},
        })

        def recorded() -> tuple[int, list[str]]:
            (version,), = rows(tmp_path, "SELECT adapter_version FROM devices")
            return version, [s for (s,) in rows(tmp_path,
                                                 "SELECT status FROM updates ORDER BY version")]

        def consistent_after_restart() -> None:
            """What a restart serves: a published version, with the weights it names."""
            ptr = store.pointer()
            assert ptr is not None
            serving = ptr.previous if ptr.probation else ptr.version
            assert serving is not None
            assert digest(store.read(serving)) == expected[serving]

        timings = {}
        # 1. new weights written, pointer not swapped: the old version stays current
        t = time.monotonic()
        proc = _agent(cfg, "adapter-written")
        proc.communicate(timeout=300)
        timings["run_to_kill_s"] = round(time.monotonic() - t, 1)
        assert proc.returncode == -signal.SIGKILL
        assert _pointer(adapters) == {"version": 0, "previous": None, "probation": False}
        assert store.versions() == [0, 1]  # v1 complete on disk, unreferenced
        consistent_after_restart()
        assert recorded() == (0, ["produced", "produced"])

        # 2. pointer swapped on probation, probe running: killed from outside
        proc = _agent(cfg)
        deadline = time.monotonic() + 240
        while (_pointer(adapters) or {}).get("probation") is not True:
            assert proc.poll() is None and time.monotonic() < deadline, "never on probation"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _pointer(adapters) == {"version": 1, "previous": 0, "probation": True}
        consistent_after_restart()  # a restart on probation goes back to version 0
        assert recorded() == (0, ["produced", "produced"])

        # 3. final swap done, acknowledgement not sent: the device serves 1, the cloud says 0
        proc = _agent(cfg, "adapter-swapped")
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
        assert _pointer(adapters) == {"version": 1, "previous": 0, "probation": False}
        consistent_after_restart()
        assert recorded() == (0, ["produced", "produced"])
        assert not (adapters / ACKED).exists()

        # 4. a clean run: re-sends the lost ack, then applies version 2
        t = time.monotonic()
        proc = _agent(cfg)
        out, err = proc.communicate(timeout=300)
        timings["clean_run_s"] = round(time.monotonic() - t, 1)
        assert proc.returncode == 0, err[-3000:]
        assert "acknowledgement re-sent" in " ".join(
            r for (r,) in rows(tmp_path, "SELECT COALESCE(detail, '') FROM updates"))
        assert _pointer(adapters) == {"version": 2, "previous": 1, "probation": False}
        assert digest(store.read(2)) == expected[2]
        assert recorded() == (2, ["applied", "applied"])
        assert json.loads((adapters / ACKED).read_text()) == {"version": 2}
        served = [json.loads(x)["adapter_version"]
                  for x in (data / "answers.jsonl").read_text().splitlines()]
        assert set(served) <= {0, 1, 2} and served == sorted(served)  # never back in time
        log.info("apply crash timings %s", timings)
    finally:
        cloud.stop(signal.SIGKILL)
