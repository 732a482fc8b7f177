"""How far the zoo student can close its gap to the teacher on a shifted domain, by kind of
update; prints JSON, writes a PNG.

The demo's goal asks each device to close 80% of its gap within three rounds. This benchmark
separates what stands in the way, on held-out videos of `--domain` and `source`:

- `full_ft_true_<n>`: the student's whole language model fine-tuned (the zoo's stage C recipe:
  answer loss, auxiliary token loss, token drop) on n ground-truth-labelled shifted videos plus
  n/2 source videos, with all their visual tokens: what the student's capacity allows;
- `lora_teacher_<n>`: a dense rank-8 LoRA round (A and B, the AKD objective, true-answer source
  replay) from n uploads of the device's VidCom2-kept tokens, labelled by the teacher: the
  cloud's round without a downlink budget and with far more uploads than a demo round has;
- `lora_true_<n>`: the same round with the true answers teacher-forced: what label noise costs.

Usage:
    python -m bench.adaptation_ceiling --out reports/ceiling        # zoo/default, ~10 min
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict

from bench.akd import HELDOUT_SEED, UPLOAD_SEED, Evaluator, _public, _scored, device_uploads
from cloud.distill import AdapterDistiller, AKDConfig, DistillSample, LoRASpec, attach_lora, label
from cloud.distributed.job import load_checkpoint
from cloud.trainers.akd import AkdTrainerConfig
from shared.media import procedural as P
from shared.models.checkpoint import load_vlm
from shared.models.pretrain import StageSchedule, cache_visual_tokens, train_language
from shared.models.zoo import ZOOS, ensure_zoo

log = logging.getLogger("bench.adaptation_ceiling")

TRAIN_SEED = 4343
"""Stream of the full fine-tune's videos (uploads use bench.akd's UPLOAD_SEED)."""
REPLAY_SEED = 4545
GOAL_SHARE = 0.8


def full_finetune(student_dir: Path, domain: str, n: int, steps: int, zoo: str,
                  sets: dict[str, list[P.QASample]]) -> dict[str, Any]:
    """Stage C's recipe on n true-labelled `domain` videos + n/2 source videos."""
    cfg = ZOOS[zoo]
    loaded = load_vlm(student_dir)
    loaded.model.float()
    gen = P.GeneratorConfig(frame_size=loaded.processor.config.image_size,
                            num_frames=loaded.processor.config.num_frames)
    data = (P.batch(domain, n, TRAIN_SEED, "video", gen)
            + P.batch("source", n // 2, TRAIN_SEED + 1, "video", gen))
    tokens = cache_visual_tokens(loaded.model, loaded.processor, data, progress=False)
    train_language(loaded.model, loaded.processor, data, tokens,
                   StageSchedule(steps, 1e-3, 32, warmup=20), cfg.seed + 7, f"full ft {n}",
                   progress=True, aux_weight=cfg.aux_weight, token_drop=cfg.token_drop)
    return {name: _scored(loaded, items) for name, items in sets.items()}


def lora_round(student_dir: Path, teacher_dir: Path, uploads: list[DistillSample],
               replay: list[DistillSample], steps: int, true_answers: bool,
               evaluator: Evaluator, sets: dict[str, list[P.QASample]]) -> dict[str, Any]:
    """One dense LoRA AKD round (the trainer's defaults but `steps`) from `uploads`."""
    defaults = AkdTrainerConfig()
    spec = LoRASpec(rank=defaults.lora_r, alpha=defaults.lora_alpha, dropout=0.0,
                    targets=defaults.lora_targets)
    teacher, fmt = load_checkpoint(teacher_dir)
    teacher.requires_grad_(False).eval()
    labels = label(teacher, uploads, fmt, max_new_tokens=3, prefer_reference=true_answers)
    replay_labels = label(teacher, replay, fmt, max_new_tokens=3, prefer_reference=True)
    del teacher
    base, _ = load_checkpoint(student_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(defaults.lora_seed)  # version 0's A matrices, as devices build them
        student = attach_lora(base, spec)
    cfg = AKDConfig(steps=steps, lr=defaults.lr, batch_size=defaults.batch_size,
                    replay_ratio=defaults.replay_ratio, progress=True)
    result = AdapterDistiller(cfg).fit(student, None, uploads, formatter=fmt, labels=labels,
                                       replay=replay, replay_labels=replay_labels)
    return evaluator.run(dict(result.adapter), sets)


def _distill_samples(student_dir: Path, items: list[P.QASample]) -> list[DistillSample]:
    """The device's uploads of `items`, each with its true answer as the reference."""
    uploads = device_uploads(student_dir, items)
    return [DistillSample.from_upload(u, reference_answer=s.answer)
            for u, s in zip(uploads, items, strict=True)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the report (with goals)."""
    root = Path(args.zoo_dir) if args.zoo_dir else ensure_zoo(args.zoo).root
    student_dir, teacher_dir = root / "student", root / "teacher"
    pc = load_vlm(student_dir).processor.config
    gen = P.GeneratorConfig(frame_size=pc.image_size, num_frames=pc.num_frames)
    sets = {d: P.batch(d, args.eval_n, HELDOUT_SEED, "video", gen)
            for d in dict.fromkeys((args.domain, "source"))}
    defaults = AkdTrainerConfig()
    evaluator = Evaluator(student_dir, LoRASpec(rank=defaults.lora_r, alpha=defaults.lora_alpha,
                                                dropout=0.0, targets=defaults.lora_targets))
    teacher = load_vlm(teacher_dir)
    rows: dict[str, Any] = {"before": evaluator.run(_zero_b(evaluator), sets),
                            "teacher": {d: _scored(teacher, items) for d, items in sets.items()}}
    del teacher
    seconds: dict[str, float] = {}
    for n in args.full_ft_sizes:
        t0 = time.perf_counter()
        rows[f"full_ft_true_{n}"] = full_finetune(student_dir, args.domain, n, args.steps,
                                                  args.zoo, sets)
        seconds[f"full_ft_true_{n}"] = time.perf_counter() - t0
    if args.lora_uploads:
        uploads = _distill_samples(student_dir, P.batch(args.domain, args.lora_uploads,
                                                        UPLOAD_SEED, "video", gen))
        replay = _distill_samples(student_dir, P.batch("source", args.replay, REPLAY_SEED,
                                                       "video", gen))
        for true_answers in (False, True):
            name = f"lora_{'true' if true_answers else 'teacher'}_{args.lora_uploads}"
            t0 = time.perf_counter()
            rows[name] = lora_round(student_dir, teacher_dir, uploads, replay, args.steps,
                                    true_answers, evaluator, sets)
            seconds[name] = time.perf_counter() - t0
    report = {"zoo_dir": str(root), "domain": args.domain, "eval_n": args.eval_n,
              "steps": args.steps, "seconds": seconds,
              "accuracy": {name: _public(v) for name, v in rows.items()}}
    report["goals"] = goals(report)
    return report


def _zero_b(evaluator: Evaluator) -> dict[str, torch.Tensor]:
    """The evaluator's adapter with every B = 0: the student as the zoo made it."""
    return {k: (torch.zeros_like(v) if ".lora_B." in k else v.clone())
            for k, v in get_peft_model_state_dict(evaluator.peft).items()}


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The 80% gap target on this held-out set, and which updates reach it."""
    dom, acc = report["domain"], report["accuracy"]
    before, teacher = acc["before"][dom]["acc"], acc["teacher"][dom]["acc"]
    target = before + GOAL_SHARE * (teacher - before)
    closed = {name: (v[dom]["acc"] - before) / (teacher - before) if teacher > before else None
              for name, v in acc.items() if name not in ("before", "teacher")}
    return {"gap_closed_80pct": {
        "before": before, "teacher": teacher, "target_acc": target, "closed_share": closed,
        "reaching_target": sorted(n for n, v in acc.items()
                                  if n not in ("before", "teacher") and v[dom]["acc"] >= target),
        "source_change_pt": {n: 100 * (v["source"]["acc"] - acc["before"]["source"]["acc"])
                             for n, v in acc.items() if n not in ("before", "teacher")
                             and "source" in v},
        "info_only": True}}


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy per update kind on the shifted domain and source, with the 80% target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, dom = report["accuracy"], report["domain"]
    names = list(acc)
    doms = list(acc["before"])
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 3, 4.2))
    width = 0.8 / len(doms)
    for j, d in enumerate(doms):
        ax.bar([i + j * width for i in range(len(names))], [acc[n][d]["acc"] for n in names],
               width, yerr=[acc[n][d]["ci95"] for n in names], capsize=2, label=d)
    g = report["goals"]["gap_closed_80pct"]
    ax.axhline(g["target_acc"], color="r", ls="--", lw=1, label=f"80% of the {dom} gap")
    ax.set_xticks([i + width * (len(doms) - 1) / 2 for i in range(len(names))], names,
                  rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"accuracy ({report['eval_n']} held-out videos)")
    ax.set_title(f"what closes the student's {dom} gap ({report['steps']} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="default", help="zoo name (shared.models.zoo.ZOOS)")
    p.add_argument("--zoo-dir", default="", help="a zoo directory (teacher/, student/) instead")
    p.add_argument("--domain", default="low_light",
                   choices=[d for d in P.DOMAINS if d != "source"])
    p.add_argument("--eval-n", type=int, default=300, help="held-out videos per domain")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--full-ft-sizes", type=int, nargs="*", default=[256, 2000])
    p.add_argument("--lora-uploads", type=int, default=2000, help="0: skip the LoRA rounds")
    p.add_argument("--replay", type=int, default=256, help="source replay pool of LoRA rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="reports/ceiling")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "ceiling.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
