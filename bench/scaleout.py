"""AKD scale-out benchmark: distillation samples/s at world size 1 and 2, label cache reuse.

Builds a zoo-format teacher (LLaVA-OneVision, Qwen2 LLM 6 layers x 128) and student (2 layers)
from configs, and a samples file of uploaded visual tokens, then runs the same job spec as real
processes (`python -m cloud.distributed.run`, and `torchrun --nproc-per-node 2` for world size 2)
sharing one teacher label cache:
1. world size 1, 1 thread, empty cache: the teacher labels every upload (hit rate 0);
2. world size 2 (gloo, 1 thread per rank), same uploads: every label comes from the cache;
3. world size 1 with 2 threads (same core count as 2): the fair single-process baseline.
samples/s is global batch x steps / training wall time on rank 0 (process start, model loading
and labelling excluded; those are reported separately). The machine's 2 cores are shared with
other work, so the load average is recorded with the figures.

Usage:
    python -m bench.scaleout --out reports/scaleout      # about 2-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from cloud.distill import DistillSample
from cloud.distributed import ADAPTER_FILE, RESULT_FILE, DistillJobSpec, save_samples
from shared.models import VLMProcessor, VLMSpec, build_vlm, save_vlm
from shared.models.zoo import make_tokenizer_ids

log = logging.getLogger("bench.scaleout")
REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("what colour is the circle?", "which way is the object moving?",
             "how many red objects are there?", "is there a blue square?")
ANSWERS = ("red", "left", "two", "yes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(student dir, teacher dir, samples file) built from configs with fixed seeds."""
    tok, ids = make_tokenizer_ids()
    dirs = []
    for role, layers, seed in (("student", args.student_layers, 3),
                               ("teacher", args.teacher_layers, 1)):
        spec = VLMSpec(text_layers=layers)
        d = work / role
        save_vlm(build_vlm(spec, ids, seed=seed), VLMProcessor.from_spec(spec, tok), d,
                 {"role": role}, dtype=torch.float32)
        dirs.append(d)
    g = torch.Generator().manual_seed(11)
    width = VLMSpec().text_hidden
    samples = []
    for i in range(args.samples):
        k = args.tokens - int(torch.randint(0, args.tokens // 4, (1,), generator=g))
        samples.append(DistillSample(
            question=QUESTIONS[i % len(QUESTIONS)],
            visual_tokens=torch.randn(k, width, generator=g),  # (K, D) post-projector
            reference_answer=ANSWERS[i % len(ANSWERS)] if i % 4 == 3 else None,
            sample_id=f"u{i}"))
    path = work / "samples.safetensors"
    save_samples(samples, path)
    return dirs[0], dirs[1], path


def run(work: Path, name: str, world_size: int, threads: int, args: argparse.Namespace
        ) -> dict[str, Any]:
    """One job as real processes; returns rank 0's result.json plus process wall time."""
    spec = DistillJobSpec(
        student_dir=str(work / "student"), teacher_dir=str(work / "teacher"),
        samples_file=str(work / "samples.safetensors"), output_dir=str(work / name),
        label_cache_dir=str(work / "labels"), steps=args.steps, batch_size=args.batch_size,
        lr=1e-3, seed=5, backend="gloo", labelling={"max_new_tokens": 8})
    spec.to_json(work / f"{name}.json")
    entry = ["-m", "cloud.distributed.run", "--job", str(work / f"{name}.json"),
             "--threads", str(threads)]
    if world_size == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(world_size), "--master-addr", "127.0.0.1", "--master-port",
               str(_free_port()), *entry]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads((work / name / RESULT_FILE).read_text())
    m = result["metrics"]
    return {
        "world_size": world_size, "threads_per_rank": threads,
        "samples_per_s": round(m["samples_per_s"], 2), "train_wall_s": round(m["wall_s"], 3),
        "process_wall_s": round(wall, 2), "loss_first": round(m["loss_first"], 4),
        "loss_last": round(m["loss_last"], 4),
        "labels": {k: (round(v, 3) if isinstance(v, float) else v)
                   for k, v in result["labels"].items()},
        "load_avg_1m_before": round(load_before, 2),
    }


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = [f"{k}\nws={v['world_size']} x {v['threads_per_rank']}t" for k, v in runs.items()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [v["samples_per_s"] for v in runs.values()], color="#4477aa")
    ax.set_ylabel("distillation samples/s")
    ax.set_title(f"AKD scale-out (label cache hit rate over jobs 1+2: "
                 f"{report['label_cache']['hit_rate_two_jobs']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the three jobs and print/write the JSON report and a PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48, help="visual tokens per upload (max)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="global batch")
    p.add_argument("--teacher-layers", type=int, default=6)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--out", default="reports/scaleout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    work = out / "work"
    if (work / "labels").exists():
        raise SystemExit(f"{work} exists; remove it (the cache must start empty)")
    work.mkdir(parents=True, exist_ok=True)
    build_inputs(work, args)
    runs = {
        "job1": run(work, "job1", 1, 1, args),
        "job2": run(work, "job2", 2, 1, args),
        "job3": run(work, "job3", 1, 2, args),
    }
    a1 = safetensors.torch.load_file(work / "job1" / ADAPTER_FILE)
    a2 = safetensors.torch.load_file(work / "job2" / ADAPTER_FILE)
    diffs = {k: (a1[k] - a2[k]).abs() for k in a1}
    hits = runs["job1"]["labels"]["hits"] + runs["job2"]["labels"]["hits"]
    lookups = runs["job1"]["labels"]["samples"] + runs["job2"]["labels"]["samples"]
    report = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "backend": "gloo",
                    "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "setup": {"samples": args.samples, "max_visual_tokens": args.tokens,
                  "steps": args.steps, "global_batch": args.batch_size,
                  "teacher_layers": args.teacher_layers, "student_layers": args.student_layers,
                  "text_hidden": VLMSpec().text_hidden, "lora_rank": 8},
        "runs": runs,
        "speedup_ws2_vs_ws1_1thread": round(runs["job2"]["samples_per_s"]
                                            / runs["job1"]["samples_per_s"], 3),
        "speedup_ws2_vs_ws1_2threads": round(runs["job2"]["samples_per_s"]
                                             / runs["job3"]["samples_per_s"], 3),
        "label_cache": {
            "hit_rate_job1": runs["job1"]["labels"]["hit_rate"],
            "hit_rate_job2": runs["job2"]["labels"]["hit_rate"],
            "hit_rate_two_jobs": hits / lookups,
            "teacher_label_s_job1": runs["job1"]["labels"]["wall_s"],
            "label_stage_s_job2": runs["job2"]["labels"]["wall_s"],
        },
        # AdamW moves every entry by about lr * sign(grad): entries whose gradient is ~0 can
        # take the sign of fp32 rounding, which differs between 1 and 2 ranks
        "adapter_ws1_vs_ws2": {
            "max_abs_diff": max(float(d.max()) for d in diffs.values()),
            "entries_over_1e-6": sum(int((d > 1e-6).sum()) for d in diffs.values()),
            "entries": sum(d.numel() for d in diffs.values()),
            "adapter_max_abs": max(float(a1[k].abs().max()) for k in a1),
            "lr": 1e-3,
        },
    }
    (out / "scaleout.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "scaleout.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
