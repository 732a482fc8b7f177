"""Child process of test_disk_full: drives a real Outbox on a small filesystem until it is full,
drains it with the real Uploader over gRPC (to the in-test SyncService, which records what
arrives), offers more, and writes what happened as JSON (the mount dies with the process)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import threading
from pathlib import Path

import grpc

from device.outbox import Outbox, OutboxConfig
from device.sync.client import GrpcTransport
from device.sync.credentials import Credentials
from device.sync.uploader import BackoffConfig, Uploader
from shared.errors import StoreFullError
from tests.cloud.client import batch, tokens_sample
from tests.device.fake_cloud import FakeCloud


def main(db: Path, out: Path) -> None:
    """1: offer 40 samples of 16 KiB to a 1 MiB filesystem, upload everything grouped, offer 8
    more (freed pages are reused). 2: store 4, let another file take every free byte, offer 4,
    try to drain, delete that file, drain."""
    box = Outbox(db, OutboxConfig(max_bytes=64 << 20, batch_samples=4,  # budget > the disk
                                  disk_reserve_bytes=192 * 1024))
    offered: list[str] = []
    stored: list[str] = []
    refused: list[str] = []
    full_on_drain = 0

    def offer(n: int, tag: str) -> None:
        for i in range(n):
            s = tokens_sample(f"{tag}-{i}", k=256, d=32, seed=i)  # (256, 32) fp16: 16 KiB
            offered.append(s.sample_id)
            try:
                box.enqueue(batch(s))
                stored.append(s.sample_id)
            except StoreFullError:
                refused.append(s.sample_id)

    def drain() -> None:
        nonlocal full_on_drain
        while (outcome := uploader.drain_once()) != "empty":
            if outcome == "failed":  # the disk is full: the uploader keeps everything
                full_on_drain += 1
                return

    with FakeCloud() as cloud, GrpcTransport(
            grpc.insecure_channel(cloud.address), 10.0,
            Credentials("cam-01", "tok", b"\1" * 32, "")) as transport:
        uploader = Uploader(box, transport, BackoffConfig(0.01, 0.05), threading.Event())
        offer(40, "first")
        refused_first = len(refused)
        drain()
        offer(8, "second")
        drain()
        offer(4, "third")
        filler = db.parent / "other-writer.bin"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # someone else takes every free byte
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)
        offer(4, "fourth")
        drain()
        full_drains = full_on_drain
        filler.unlink()
        drain()
        acked = [s.sample_id for s in cloud.state.samples]  # what reached the cloud
    report = {"offered": offered, "stored": stored, "refused": refused, "acked": acked,
              "refused_first": refused_first, "full_on_drain_while_full": full_drains,
              "counters": box.counters(), "depth": box.depth()}
    box.close()
    con = sqlite3.connect(db)
    report["integrity"] = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
