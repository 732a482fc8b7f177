"""`python -m demo`: a cloud-server and two device-agents on 127.0.0.1 (mutual TLS) adapt the
student to two shifted camera domains over several rounds, then report accuracy and bytes.

The processes are the real console scripts talking gRPC; this package only orchestrates them,
reads what they write (status.json, adapter files, JSON logs) and evaluates the stored adapters
with `shared.models`. It never imports `cloud` or `device`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo import report
from demo.processes import Cloud, Device, make_certs

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent
SECRET = "demo-fleet-secret"
DEVICES = (("cam-lowlight", "low_light", 101), ("cam-colorcast", "color_cast", 202))
EVAL_SEED = 424242
"""Held-out evaluation stream (device streams use the seeds above, the zoo 1 and 999)."""


@dataclass(frozen=True)
class DemoConfig:
    """How much the demo does; `quick()` is the test-suite size."""

    rounds: int = 3
    samples_per_round: int = 64
    eval_samples: int = 96
    calibration_samples: int = 16
    probe_samples: int = 48
    trainer: str = "akd"
    trainer_steps: int = 30
    zoo: str = "default"
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("rounds", "samples_per_round", "eval_samples", "trainer_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"field `{name}`: must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        return cls(**{"rounds": 1, "samples_per_round": 12, "eval_samples": 12,
                      "calibration_samples": 8, "probe_samples": 8, "trainer_steps": 8, **kw})


def gap_goals(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]
              ) -> list[dict[str, Any]]:
    """Per device, at its last round: share of the student-to-teacher gap closed on its shifted
    domain and the change on source (the issue's goals: >= 80% and >= -2 points)."""
    out = []
    for device, domain, _ in DEVICES:
        last = max((r for r in rows if r["device"] == device), key=lambda r: r["round"])
        gap = refs["teacher"][domain] - refs["student"][domain]
        closed = (last["acc_shifted"] - refs["student"][domain]) / gap if gap > 0 else 0.0
        change = 100 * (last["acc_source"] - refs["student"]["source"])
        out.append({"device": device, "domain": domain, "round": last["round"],
                    "gap_closed": closed, "source_change_pt": change,
                    "met": closed >= 0.8 and change >= -2.0})
    return out


def trainer_options(cfg: DemoConfig, teacher: Path, student: Path, data: Path
                    ) -> dict[str, Any]:
    """The cloud worker's `trainer_options` for the trainer the demo asks for."""
    if cfg.trainer == "akd":
        return {"student_dir": str(student), "teacher_dir": str(teacher),
                "label_cache_dir": str(data / "labels"), "work_dir": str(data / "jobs"),
                "steps": cfg.trainer_steps, "batch_size": cfg.batch_size}
    return {}


def _progress(devices: list[Device], procs: dict[str, Any], limits: dict[str, int],
              phase: str) -> None:
    """Rich progress bars of each device's stream, fed from its status.json, until all exit."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as bar:
        tasks = {d.device_id: bar.add_task(f"{phase} {d.device_id}", total=limits[d.device_id],
                                           info="") for d in devices}
        while any(p.poll() is None for p in procs.values()):
            for d in devices:
                st = d.local_status()
                bar.update(tasks[d.device_id], completed=st.get("samples_seen", 0),
                           info=f"up {st.get('uploaded_samples', 0)} samples / "
                                f"{st.get('uploaded_bytes', 0) // 1024} KiB, "
                                f"adapter v{st.get('adapter_version', 0)}")
            time.sleep(0.3)
        for d in devices:
            st = d.local_status()
            bar.update(tasks[d.device_id], completed=st.get("samples_seen", 0))


def _run_all(devices: list[Device], limits: dict[str, int], phase: str
             ) -> dict[str, dict[str, Any]]:
    procs = {d.device_id: d.start_run(limits[d.device_id]) for d in devices}
    _progress(devices, procs, limits, phase)
    return {d.device_id: d.finish_run(procs[d.device_id]) for d in devices}


def _wait_for_updates(devices: list[Device], uploaded: dict[str, int], timeout_s: float
                      ) -> dict[str, dict[str, Any]]:
    """Until the cloud has distilled every device's uploads into a version newer than the one
    the device serves (devices that uploaded nothing are not waited for)."""
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict[str, Any]] = {}
    waiting = [d for d in devices if uploaded[d.device_id] > 0]
    while waiting:
        for d in list(waiting):
            st = d.status()
            out[d.device_id] = st
            if st["pending_samples"] == 0 and st["latest_version"] > st["adapter_version"]:
                log.info("%s: cloud published v%d (round %d)", d.device_id,
                         st["latest_version"], st["rounds"])
                waiting.remove(d)
        if waiting and time.monotonic() > deadline:
            log.warning("no update within %.0f s for %s", timeout_s,
                        [d.device_id for d in waiting])
            break
        if waiting:
            time.sleep(1.0)
    return out


def _snapshot(device: Device, dest: Path) -> tuple[int, Path | None]:
    """Copy the adapter version the device now serves (the store keeps only two)."""
    pointer = device.data_dir / "adapters" / "CURRENT"
    if not pointer.exists():
        return 0, None
    version = int(json.loads(pointer.read_text())["version"])
    src = device.data_dir / "adapters" / f"v{version:010d}.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return version, dest


def run(workdir: Path, cfg: DemoConfig, report_dir: Path) -> dict[str, Any]:
    """The whole demo; returns (and writes) the result dict."""
    from shared.models.zoo import ensure_zoo

    t0 = time.monotonic()
    zoo = ensure_zoo(cfg.zoo)
    proc_cfg = json.loads((zoo.student / "cdca_processor.json").read_text())
    size, frames = int(proc_cfg["image_size"]), int(proc_cfg["num_frames"])
    raw_sample_bytes = frames * size * size * 3
    certs = make_certs(workdir / "certs", [d for d, _, _ in DEVICES])
    cloud_data = workdir / "cloud"
    cloud = Cloud.start(workdir, {
        "data_dir": str(cloud_data), "enrollment_secret": SECRET,
        "listen_address": "127.0.0.1:0", "log_json": True,
        "tls": {"cert_file": str(certs["server_cert"]), "key_file": str(certs["server_key"]),
                "client_ca_file": str(certs["ca"])},
        "worker": {"trainer": cfg.trainer,
                   "trainer_options": trainer_options(cfg, zoo.teacher, zoo.student,
                                                      cloud_data),
                   "threshold_samples": 100_000, "schedule_s": 1.0, "min_samples": 1},
    })
    log.info("cloud-server up on 127.0.0.1:%d (mutual TLS, trainer %s)", cloud.port,
             cfg.trainer)
    devices: list[Device] = []
    rows: list[dict[str, Any]] = []
    snapshots: dict[tuple[str, int], Path | None] = {}
    try:
        for dev_id, domain, seed in DEVICES:
            d = Device(dev_id, workdir, {
                "device_id": dev_id, "data_dir": str(workdir / dev_id),
                "cloud_address": f"127.0.0.1:{cloud.port}", "enrollment_secret": SECRET,
                "log_json": True, "progress": False,
                "tls": {"ca_file": str(certs["ca"]),
                        "cert_file": str(workdir / "certs" / f"client-{dev_id}.pem"),
                        "key_file": str(workdir / "certs" / f"client-{dev_id}.key"),
                        "server_name": "localhost"},
                "model": {"checkpoint_dir": str(zoo.student), "batch_size": cfg.batch_size},
                "input": {"domains": [domain], "seed": seed},
                "uplink": {"calibration_samples": cfg.calibration_samples,
                           "retry_base_s": 0.2, "drain_timeout_s": 60.0},
                "updates": {"poll_interval_s": 0.5, "probe_samples": cfg.probe_samples},
            })
            d.command("register", d.config())
            devices.append(d)
            rows.append({"round": 0, "device": dev_id, "domain": domain, "samples_seen": 0,
                         "uploaded_samples": 0, "uplink_bytes": 0, "raw_frame_bytes": 0,
                         "downlink_bytes": 0, "adapter_version": 0, "rollbacks": 0})
            snapshots[(dev_id, 0)] = None
        log.info("registered %s", [d.device_id for d in devices])
        seen = {d.device_id: 0 for d in devices}
        prev = {d.device_id: {"uploaded_samples": 0, "uploaded_bytes": 0} for d in devices}
        for r in range(1, cfg.rounds + 1):
            round_t0 = time.monotonic()
            events_before = {d.device_id: len(d.update_events) for d in devices}
            limits = {k: v + cfg.samples_per_round for k, v in seen.items()}
            _run_all(devices, limits, f"round {r} stream")
            uploaded = {d.device_id: d.local_status().get("uploaded_samples", 0)
                        - prev[d.device_id]["uploaded_samples"] for d in devices}
            cloud_view = _wait_for_updates(devices, uploaded, timeout_s=240)
            # the update arrives through a short run: poll, verify, apply, probe
            sync_limits = {d.device_id: d.local_status()["samples_seen"] + cfg.batch_size
                           for d in devices}
            _run_all(devices, sync_limits, f"round {r} update")
            for d, (_, domain, _) in zip(devices, DEVICES, strict=True):
                st = d.local_status()
                seen[d.device_id] = st["samples_seen"]
                new_events = d.update_events[events_before[d.device_id]:]
                version, snap = _snapshot(d, workdir / "snapshots" / d.device_id / f"r{r}.st")
                snapshots[(d.device_id, r)] = snap
                up_samples = st["uploaded_samples"] - prev[d.device_id]["uploaded_samples"]
                rows.append({
                    "round": r, "device": d.device_id, "domain": domain,
                    "samples_seen": st["samples_seen"], "uploaded_samples": up_samples,
                    "uplink_bytes": st["uploaded_bytes"] - prev[d.device_id]["uploaded_bytes"],
                    "raw_frame_bytes": up_samples * raw_sample_bytes,
                    "downlink_bytes": sum(int(e.get("payload_bytes", 0)) for e in new_events),
                    "adapter_version": version,
                    "updates_applied": sum(e["msg"] == "update applied" for e in new_events),
                    "rollbacks": sum(e["msg"] == "update rolled back" for e in new_events),
                    "rejected": sum(e["msg"] == "update rejected" for e in new_events),
                    "probes": [[e.get("previous_probe"), e.get("probe")] for e in new_events],
                    "cloud_rounds": cloud_view.get(d.device_id, {}).get("rounds"),
                    "round_s": round(time.monotonic() - round_t0, 1),
                })
                prev[d.device_id] = st
    finally:
        cloud_exit = cloud.stop()
        log.info("cloud-server stopped (exit %d)", cloud_exit)
    stream_s = time.monotonic() - t0

    from demo.evaluation import Evaluator, eval_sets

    domains = ["source", *[dom for _, dom, _ in DEVICES]]
    ev = Evaluator(zoo.teacher, zoo.student,
                   eval_sets(domains, cfg.eval_samples, EVAL_SEED, size, frames))
    refs = {"teacher": ev.teacher(), "student": ev.student()}
    for row in rows:
        snap = snapshots[(row["device"], row["round"])]
        acc = refs["student"] if snap is None else ev.adapter(snap)
        row["acc_shifted"], row["acc_source"] = acc[row["domain"]], acc["source"]
    goals = gap_goals(rows, refs)
    notes = [
        *(f"{g['device']} ({g['domain']}): closed {g['gap_closed']:.0%} of the student-teacher "
          f"gap after round {g['round']} (goal >= 80%), source {g['source_change_pt']:+.1f} pt "
          f"(goal >= -2 pt); one held-out sample is {100 / cfg.eval_samples:.1f} pt."
          for g in goals),
        "Accuracy is measured on the uncompressed student carrying each stored adapter; the "
        "device itself serves with VidCom2 token compression.",
        "Downlink bytes are the DWC payload sizes the devices logged when applying, rolling "
        "back or rejecting an update; uplink bytes are the outbox's uploaded payload bytes.",
    ]
    result: dict[str, Any] = {
        "command": "python -m demo" + (" --quick" if cfg == DemoConfig.quick(
            trainer=cfg.trainer) else ""),
        "settings": {**cfg.__dict__, "raw_sample_bytes": raw_sample_bytes,
                     "image_size": size, "num_frames": frames},
        "wall_s": time.monotonic() - t0, "adaptation_s": stream_s,
        "cloud_exit_code": cloud_exit,
        "device_exit_codes": {d.device_id: d.exit_codes for d in devices},
        "devices": {d: {"domain": dom, "seed": s} for d, dom, s in DEVICES},
        "eval_domains": domains,
        "references": refs,
        "rows": rows,
        "goals": goals,
        "update_events": {d.device_id: d.update_events for d in devices},
        "notes": notes,
    }
    report.write(result, report_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every process exited 0."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep state here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="test-suite sized run")
    parser.add_argument("--trainer", default="akd", help="cloud trainer (registry key)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--report-dir", type=Path, default=ROOT / "reports" / "demo")
    args = parser.parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False)])
    import torch

    torch.set_num_threads(1)
    kw: dict[str, Any] = {"trainer": args.trainer}
    if args.rounds is not None:
        kw["rounds"] = args.rounds
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    with tempfile.TemporaryDirectory(prefix="cdca-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, cfg, args.report_dir)
    sys.stdout.write(report.table(result["rows"]) + "\n")
    sys.stdout.write(f"report: {args.report_dir / 'report.md'} ({result['wall_s']:.0f} s)\n")
    codes = [c["exit_code"] for cs in result["device_exit_codes"].values() for c in cs]
    return 0 if result["cloud_exit_code"] == 0 and not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
