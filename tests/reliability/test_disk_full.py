"""Disk full on either side.

Cloud: the real `cloud-server` with every file it writes capped at 1 MiB (RLIMIT_FSIZE, so a
write past it fails with EFBIG exactly where a full disk fails with ENOSPC; no root needed). An
upload whose blob does not fit gets RESOURCE_EXHAUSTED naming the disk, nothing of it is stored
or left behind, smaller uploads before and after are stored, the daemon stays healthy, and after
a restart with space the same upload id is stored once.

Device: the durable outbox on a real 384 KiB tmpfs (mounted in a user namespace by `unshare`,
skipped where the kernel forbids that) so SQLite meets a real ENOSPC: every sample offered is
either stored and later acknowledged, or refused with StoreFullError and counted; the database
stays intact and accepts samples again once acknowledged uploads free space.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cloud.client import Device, batch, tokens_sample
from tests.cloud.daemon import SECRET, rows, write_config
from tests.support import ROOT, CloudProcess, subprocess_env

pytestmark = pytest.mark.integration

CAP = 1024 * 1024


def _cloud(tmp_path: Path, cap: int | None) -> CloudProcess:
    cfg = write_config(tmp_path / "cloud.toml", {
        "data_dir": str(tmp_path / "cloud"), "enrollment_secret": SECRET,
        "listen_address": "127.0.0.1:0", "insecure": True, "grace_s": 5.0,
        "worker": {"enabled": False, "trainer": "tiny-kd"}})
    return CloudProcess(cfg, tmp_path, max_file_bytes=cap)


def test_cloud_store_full_refuses_cleanly_and_keeps_serving(tmp_path: Path) -> None:
    big = batch(*(tokens_sample(f"big-{i}", k=8192, d=32, seed=i) for i in range(3)))  # 1.5 MB
    cloud = _cloud(tmp_path, CAP)
    try:
        with grpc.insecure_channel(cloud.address) as ch:
            dev = Device(ch, "cam-full").register()
            assert dev.upload("small-1", batch(tokens_sample("a", seed=1))).stored_samples == 1
            with pytest.raises(grpc.RpcError) as refused:
                dev.upload("big", big)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "disk full" in refused.value.details()
            assert dev.upload("small-2", batch(tokens_sample("b", seed=2))).stored_samples == 1
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="cdca.v1.SyncService"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert dev.status().stored_samples == 2
            token = dev.token
        assert cloud.proc.poll() is None  # still running
        assert cloud.stop(signal.SIGTERM) == 0
    finally:
        cloud.stop(signal.SIGKILL)
    assert sorted(rows(tmp_path, "SELECT upload_id FROM uploads")) == [("small-1",), ("small-2",)]
    assert rows(tmp_path, "PRAGMA integrity_check") == [("ok",)]
    blobs = sorted(p.name for p in (tmp_path / "cloud" / "blobs" / "uploads").iterdir())
    assert blobs == sorted(b for (b,) in rows(tmp_path, "SELECT blob FROM uploads"))  # no .tmp

    cloud = _cloud(tmp_path, None)  # space again: the device's retry of the same id is stored
    try:
        with grpc.insecure_channel(cloud.address) as ch:
            dev = Device(ch, "cam-full")
            dev.token = token
            receipt = dev.upload("big", big)
            assert (receipt.stored_samples, receipt.duplicate) == (3, False)
            assert dev.status().stored_samples == 5
    finally:
        cloud.stop(signal.SIGKILL)


def _userns_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _userns_tmpfs(), reason="unprivileged user namespaces are disabled here")
def test_outbox_on_a_full_disk_counts_every_refusal_and_drains(tmp_path: Path) -> None:
    mount, report = tmp_path / "disk", tmp_path / "report.json"
    mount.mkdir()
    child = (f"mount -t tmpfs -o size=1m tmpfs {mount} && exec {sys.executable} -m "
             f"tests.reliability.outbox_on_full_disk {mount}/outbox.sqlite3 {report}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", child], capture_output=True, text=True,
                          timeout=120, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(report.read_text())
    offered, stored, refused, acked = (r[k] for k in ("offered", "stored", "refused", "acked"))
    assert r["integrity"] == "ok"
    assert sorted(stored + refused) == sorted(offered) and not set(stored) & set(refused)
    assert 0 < r["refused_first"] < 40 and len(refused) >= r["refused_first"]
    assert sorted(acked) == sorted(stored)  # every stored sample uploaded, exactly once
    c = r["counters"]
    assert (c["enqueued"], c["uploaded_samples"], c["rejected_new"]) == (
        len(stored), len(stored), len(refused))  # seen = uploaded + refused, all counted
    assert r["depth"] == [0, 0]
    logging.getLogger(__name__).info("outbox on a 1 MiB disk: %s", {
        k: len(v) if isinstance(v, list) else v for k, v in r.items()})
