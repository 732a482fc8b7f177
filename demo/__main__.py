"""`python -m demo`: a cloud-server and two device-agents on 127.0.0.1 (mutual TLS) adapt the
student to two shifted camera domains over several rounds, then report accuracy and bytes.

The processes are the real console scripts talking gRPC; this package only orchestrates them,
reads what they write (status.json, adapter files, JSON logs) and evaluates the stored adapters
with `shared.models` (all tokens) and with `device.runtime` (as served). It never imports `cloud`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from demo import report
from demo.loop import DEVICES, DemoConfig, adapt

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 424242
"""Held-out evaluation stream (device streams use the seeds above, the zoo 1 and 999)."""


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


def link_goals(rows: list[dict[str, Any]], raw_sample_bytes: int, adapter_fp16_bytes: int
               ) -> list[dict[str, Any]]:
    """Per device over the run: uplink bytes against the raw frames of the samples seen (goal
    <= 1%) and the largest round's downlink against the full adapter in fp16 (goal <= 2%)."""
    out = []
    for device, domain, _ in DEVICES:
        mine = [r for r in rows if r["device"] == device and r["round"] > 0]
        raw = max((r["samples_seen"] for r in mine), default=0) * raw_sample_bytes
        up = sum(r["uplink_bytes"] for r in mine) / raw if raw else 0.0
        down = max((r["downlink_bytes"] for r in mine), default=0) / adapter_fp16_bytes
        out.append({"device": device, "domain": domain, "uplink_share_of_raw": up,
                    "max_downlink_share_of_adapter_fp16": down,
                    "adapter_fp16_bytes": adapter_fp16_bytes,
                    "met": up <= 0.01 and down <= 0.02})
    return out


def run(workdir: Path, cfg: DemoConfig, report_dir: Path,
        ablations: Sequence[str] = ()) -> dict[str, Any]:
    """The whole demo (plus the `ablations` variants, if any); returns (and writes) the result."""
    from shared.models.zoo import ensure_zoo

    t0 = time.monotonic()
    zoo = ensure_zoo(cfg.zoo)
    main = adapt(workdir, cfg, zoo)
    rows, devices, cloud_exit = main.rows, main.devices, main.cloud_exit
    size, frames = main.image_size, main.num_frames
    stream_s = time.monotonic() - t0

    from demo.evaluation import Evaluator, ServedEvaluator, eval_sets

    domains = ["source", *[dom for _, dom, _ in DEVICES]]
    ev = Evaluator(zoo.teacher, zoo.student,
                   eval_sets(domains, cfg.eval_samples, EVAL_SEED, size, frames))
    refs = {"teacher": ev.teacher(), "student": ev.student()}
    served = ServedEvaluator(zoo.student, ev.sets)
    for row in rows:
        snap = main.snapshots[(row["device"], row["round"])]
        acc = refs["student"] if snap is None else ev.adapter(snap)
        row["acc_shifted"], row["acc_source"] = acc[row["domain"]], acc["source"]
        acc = served.adapter(snap)
        row["served_shifted"], row["served_source"] = acc[row["domain"]], acc["source"]
    goals = gap_goals(rows, refs)
    from demo.ablations import full_adapter_bytes

    adapter_fp16 = max((full_adapter_bytes(p) for p in main.snapshots.values() if p), default=0)
    links = link_goals(rows, main.raw_sample_bytes, adapter_fp16) if adapter_fp16 else []
    notes = [
        *(f"{g['device']} ({g['domain']}): closed {g['gap_closed']:.0%} of the student-teacher "
          f"gap after round {g['round']} (goal >= 80%), source {g['source_change_pt']:+.1f} pt "
          f"(goal >= -2 pt); one held-out sample is {100 / cfg.eval_samples:.1f} pt."
          for g in goals),
        *(f"{g['device']}: uplink {g['uplink_share_of_raw']:.2%} of the raw frames seen "
          f"(goal <= 1%), largest downlink round {g['max_downlink_share_of_adapter_fp16']:.2%} "
          f"of the {g['adapter_fp16_bytes']:,}-byte fp16 adapter (goal <= 2%)." for g in links),
        "acc_* columns: the uncompressed student carrying each stored adapter (all visual "
        "tokens); served_* columns: the same adapter as a device serves it (device runtime, "
        "VidCom2 keeping half the visual tokens at their original positions).",
        "Downlink bytes are the DWC payload sizes the devices logged when applying, rolling "
        "back or rejecting an update; uplink bytes are the outbox's uploaded payload bytes.",
    ]
    result: dict[str, Any] = {
        "command": "python -m demo" + (" --quick" if cfg == DemoConfig.quick(
            trainer=cfg.trainer) else "") + (" --ablations" if ablations else ""),
        "settings": {**cfg.__dict__, "raw_sample_bytes": main.raw_sample_bytes,
                     "image_size": size, "num_frames": frames},
        "wall_s": time.monotonic() - t0, "adaptation_s": stream_s,
        "cloud_exit_code": cloud_exit,
        "device_exit_codes": {d.device_id: d.exit_codes for d in devices},
        "devices": {d: {"domain": dom, "seed": s} for d, dom, s in DEVICES},
        "eval_domains": domains,
        "references": refs,
        "rows": rows,
        "goals": goals,
        "link_goals": links,
        "update_events": {d.device_id: d.update_events for d in devices},
        "notes": notes,
    }
    if ablations:
        from demo.ablations import run_ablations

        result["ablations"] = run_ablations(workdir / "ablations", cfg, zoo, ev,
                                            refs["student"], ablations)
        result["wall_s"] = time.monotonic() - t0
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
    parser.add_argument("--ablations", action="store_true",
                        help="also rerun the loop in ablation variants (about 12 more minutes)")
    parser.add_argument("--variants", help="comma-separated subset of the ablation variants "
                        "(default: all; implies --ablations)")
    parser.add_argument("--ablation-rounds", type=int,
                        help="rounds per ablation variant (default 2, at most --rounds)")
    args = parser.parse_args(argv)
    from demo.ablations import NAMES

    variants: tuple[str, ...] = ()
    if args.variants:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in variants if v not in NAMES]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; expected names from {list(NAMES)}")
    elif args.ablations:
        variants = NAMES
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False)])
    import torch

    torch.set_num_threads(1)
    kw: dict[str, Any] = {"trainer": args.trainer}
    if args.rounds is not None:
        kw["rounds"] = args.rounds
    if args.ablation_rounds is not None:
        kw["ablation_rounds"] = args.ablation_rounds
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    with tempfile.TemporaryDirectory(prefix="cdca-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(workdir, cfg, args.report_dir, variants)
    sys.stdout.write(report.table(result["rows"]) + "\n")
    sys.stdout.write(f"report: {args.report_dir / 'report.md'} ({result['wall_s']:.0f} s)\n")
    runs = [result, *result.get("ablations", {}).get("variants", {}).values()]
    codes = [c["exit_code"] for r in runs for cs in r["device_exit_codes"].values() for c in cs]
    clouds = [r["cloud_exit_code"] for r in runs]
    return 0 if not any(clouds) and not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
