"""Load test: N simulated devices upload concurrently to a real cloud-server and pull updates.

Starts `cloud-server serve` as a child process on 127.0.0.1 (tiny-kd trainer, so distillation
rounds and updates really happen under load), enrolls N devices, and for `duration_s` every device
loops: upload a small batch (k fp16 tokens per sample), then ask for an update. Afterwards it
checks, from the server's own SQLite store, that every acknowledged upload is stored exactly once.

    python -m bench.load --devices 100 --duration-s 60 --out reports/load
prints JSON (throughput, p50/p99 receipt latency, server peak RSS, lost = 0) and writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from shared.pb.v1 import sync_pb2_grpc
from shared.types import Enrollment, SampleBatch, UploadSample, VisualTokens
from shared.wire import convert

BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0


def _start_cloud(workdir: Path, threshold: int) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / "cloud.port"
    (workdir / "cloud.toml").write_text(
        f'data_dir = "{workdir / "cloud"}"\nenrollment_secret = "load-secret"\n'
        'listen_address = "127.0.0.1:0"\ninsecure = true\nmax_workers = 64\n'
        "[limits]\nmax_concurrent_rpcs = 256\n"
        f"[worker]\ntrainer = \"tiny-kd\"\nthreshold_samples = {threshold}\n"
        "cohort = \"fleet\"\n[worker.trainer_options]\nsteps = 5\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDCA_")}
    env.update(OMP_NUM_THREADS="1")
    log = (workdir / "cloud.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "cloud-server"), "serve", "--config", str(workdir / "cloud.toml"),
         "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cloud-server did not start: {(workdir / 'cloud.log').read_text()}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _batch(device: str, seq: int, samples: int, k: int, dim: int) -> SampleBatch:
    rng = np.random.default_rng(seq)
    out = []
    for i in range(samples):
        values = rng.standard_normal((k, dim)).astype(np.float16)
        tokens = VisualTokens(values, np.arange(k, dtype=np.int64), (1, 1, k), "tiny/features")
        out.append(UploadSample(f"{device}-{seq}-{i}", "image", "what is shown?", "a cat", 0.3,
                                tokens))
    return SampleBatch(0, tuple(out))


class _Device:
    def __init__(self, channel: grpc.Channel, device_id: str) -> None:
        self.stub = sync_pb2_grpc.SyncServiceStub(channel)
        self.device_id = device_id
        grant = convert.grant_from_pb(self.stub.Register(
            convert.enrollment_to_pb(Enrollment(device_id, "load-secret")), timeout=TIMEOUT_S))
        self.md = (("x-cdca-device-id", device_id), ("authorization", f"Bearer {grant.device_token}"))
        self.acked: list[str] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.updates = 0

    def loop(self, stop: threading.Event, samples: int, k: int, dim: int) -> None:
        seq = 0
        have = 0
        while not stop.is_set():
            upload_id = f"{self.device_id}-u{seq}"
            payload = convert.encode_sample_batch(_batch(self.device_id, seq, samples, k, dim))
            t0 = time.perf_counter()
            try:
                reply = self.stub.UploadSamples(convert.upload_chunks(upload_id, payload),
                                                timeout=TIMEOUT_S, metadata=self.md)
            except grpc.RpcError as e:
                self.errors.append(e.code().name)
                time.sleep(0.05)
                continue  # same seq: the retry reuses the upload id
            self.latencies.append(time.perf_counter() - t0)
            receipt = convert.receipt_from_pb(reply)
            if not receipt.duplicate:
                self.acked.append(upload_id)
            seq += 1
            try:
                stream = self.stub.GetUpdate(convert.get_update_request(have), timeout=TIMEOUT_S,
                                             metadata=self.md)
                got = convert.reassemble_update(stream, 64 * 1024 * 1024)
                if got is not None:
                    self.updates += 1
            except grpc.RpcError as e:
                self.errors.append(f"GetUpdate:{e.code().name}")


def run(devices: int, duration_s: float, samples: int = 2, k: int = 16, dim: int = 32,
        threshold: int = 400) -> dict[str, Any]:
    """Run the load and return the figures (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="cdca-load-") as tmp:
        workdir = Path(tmp)
        proc, address = _start_cloud(workdir, threshold)
        try:
            channel = grpc.insecure_channel(address)
            with ThreadPoolExecutor(devices) as pool:
                fleet = list(pool.map(lambda i: _Device(channel, f"dev-{i:04d}"), range(devices)))
                stop = threading.Event()
                peak_rss = [0]

                def watch() -> None:
                    while not stop.is_set():
                        peak_rss[0] = max(peak_rss[0], _rss_kb(proc.pid))
                        stop.wait(0.2)

                threading.Thread(target=watch, daemon=True).start()
                t0 = time.perf_counter()
                futures = [pool.submit(d.loop, stop, samples, k, dim) for d in fleet]
                time.sleep(duration_s)
                stop.set()
                for f in futures:
                    f.result()
                elapsed = time.perf_counter() - t0
            channel.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(120)
        db = sqlite3.connect(workdir / "cloud" / "cloud.sqlite3")
        stored_ids = [r[0] for r in db.execute("SELECT upload_id FROM uploads")]
        stored_samples = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        db.close()
    acked = [u for d in fleet for u in d.acked]
    lat = np.array([x for d in fleet for x in d.latencies]) * 1000
    stored = set(stored_ids)
    lost = [u for u in acked if u not in stored]
    return {
        "devices": devices,
        "duration_s": round(elapsed, 2),
        "samples_per_upload": samples,
        "tokens_per_sample": k,
        "uploads_acked": len(acked),
        "uploads_stored": len(stored_ids),
        "stored_duplicates": len(stored_ids) - len(stored),
        "samples_stored": stored_samples,
        "samples_acked": len(acked) * samples,
        "lost": len(lost),
        "uploads_per_s": round(len(acked) / elapsed, 1),
        "samples_per_s": round(len(acked) * samples / elapsed, 1),
        "receipt_latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "receipt_latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "updates_received": sum(d.updates for d in fleet),
        "errors": {e: sum(d.errors.count(e) for d in fleet)
                   for e in sorted({e for d in fleet for e in d.errors})},
        "server_peak_rss_mb": round(peak_rss[0] / 1024, 1),
        "server_exit_code": exit_code,
        "latencies_ms": lat.tolist(),
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(result["latencies_ms"], bins=60)
    ax.set_xlabel("upload receipt latency (ms)")
    ax.set_ylabel("uploads")
    ax.set_title(f"{result['devices']} devices, {result['uploads_per_s']} uploads/s, "
                 f"p99 {result['receipt_latency_ms_p99']} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """CLI: run the load test, print JSON, write load.json + load.png under --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=Path("reports/load"))
    args = p.parse_args(argv)
    result = run(args.devices, args.duration_s)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "latencies_ms"}
    (args.out / "load.json").write_text(json.dumps(summary, indent=2))
    _plot(result, args.out / "load.png")
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
