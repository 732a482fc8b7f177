"""Disk full on either side.

Cloud: the real `cloud-server` (1) with every file it writes capped at 1 MiB (RLIMIT_FSIZE: a
write past it fails with EFBIG where a full disk fails with ENOSPC; runs anywhere) and (2) on a
real 2 MiB tmpfs mounted in a user namespace (`unshare -rm`; skipped where the kernel forbids it),
where both the blob files and SQLite meet ENOSPC. An upload that does not fit gets
RESOURCE_EXHAUSTED naming the disk, nothing of it is stored or left behind, what was acknowledged
is intact, the daemon stays healthy, and (1) after a restart with space the same upload id is
stored once.

Device: the durable outbox on a real 1 MiB tmpfs, drained by the real Uploader over gRPC: every
sample offered is either stored and later received by the cloud exactly once, or refused with
StoreFullError and counted; the database stays intact, and a disk filled to the last byte by
another writer only delays the drain.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.cloud.client import Device, batch, tokens_sample
from tests.cloud.daemon import SECRET, rows, write_config
from tests.support import BIN, ROOT, CloudProcess, subprocess_env

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


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare")
def test_cloud_on_a_full_tmpfs_refuses_cleanly(tmp_path: Path) -> None:
    """The same on a real 2 MiB tmpfs: SQLite and the blob files meet ENOSPC, not a cap."""
    if not _userns_tmpfs():
        pytest.skip("unprivileged user namespaces are disabled here")
    data = tmp_path / "cloud"
    data.mkdir()
    cfg = write_config(tmp_path / "cloud.toml", {
        "data_dir": str(data), "enrollment_secret": SECRET, "listen_address": "127.0.0.1:0",
        "insecure": True, "grace_s": 5.0, "worker": {"enabled": False, "trainer": "tiny-kd"}})
    port_file = tmp_path / "cloud.port"
    log = (tmp_path / "cloud.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {data} && exec "
         f"{BIN / 'cloud-server'} serve --config {cfg} --port-file {port_file}"],
        stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "cloud.log").read_text()
            time.sleep(0.05)
        acked, refused = [], 0
        with grpc.insecure_channel(f"127.0.0.1:{int(port_file.read_text())}") as ch:
            dev = Device(ch, "cam-tmpfs").register()
            for i in range(12):  # 256 KiB each: the disk is full before the end
                try:
                    dev.upload(f"u{i}", batch(tokens_sample(f"s{i}", k=4096, d=32, seed=i)))
                    acked.append(f"u{i}")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert "full" in (e.details() or "")
                    refused += 1
            small, reasons = 0, set()
            for i in range(400):  # small uploads fill the rest until they are refused too
                try:
                    dev.upload(f"small{i}", batch(tokens_sample(f"t{i}", seed=i)))
                    acked.append(f"small{i}")
                    small += 1
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    reasons.add(" ".join((e.details() or "").split()[:3]))
                    if i - small > 20:
                        break
            for i in range(20):  # no new sample, so no blob: only SQLite rows, which fail now
                try:
                    dev.upload(f"again{i}", batch(tokens_sample("t0", seed=0)))
                    acked.append(f"again{i}")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    reasons.add(" ".join((e.details() or "").split()[:3]))
            assert reasons == {"store disk full", "store database full:"}  # blob, SQLite
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="cdca.v1.SyncService"), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert dev.status().stored_samples == len([a for a in acked if "again" not in a])
        # the daemon's own tmpfs, seen through its mount namespace (/proc/<pid>/root); SQLite
        # resolves that link to our namespace, so read a copy of the (idle) database
        inside = Path(f"/proc/{proc.pid}/root{data}")
        copy = tmp_path / "copy"
        copy.mkdir()
        for name in ("cloud.sqlite3", "cloud.sqlite3-wal"):
            shutil.copyfile(inside / name, copy / name)
        db = sqlite3.connect(copy / "cloud.sqlite3")
        stored = sorted(u for (u,) in db.execute("SELECT upload_id FROM uploads"))
        referenced = {b for (b,) in db.execute("SELECT blob FROM uploads")}
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        db.close()
        blobs = {p.name for p in (inside / "blobs" / "uploads").iterdir()}
        assert refused > 0 and stored == sorted(acked) and integrity == "ok"
        assert blobs == referenced  # nothing half-written left behind
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        logging.getLogger(__name__).info(
            "cloud on a 2 MiB tmpfs: %d uploads stored, %d refused RESOURCE_EXHAUSTED, %d small"
            " stored after, then refused by %s", len(acked) - small, refused, small, reasons)
    finally:
        proc.kill()
        log.close()


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
    assert r["full_on_drain_while_full"] >= 1  # the uploader met the full disk and backed off
    logging.getLogger(__name__).info("outbox on a 1 MiB disk: %s", {
        k: len(v) if isinstance(v, list) else v for k, v in r.items()})
