"""AKD benchmark on a zoo: one distillation round from a shifted-domain upload; prints JSON,
writes a PNG.

What it does, on the zoo's teacher and student checkpoints:
1. uploads: `--uploads` videos of `--domain` (low_light by default) go through the device path
   (device student, VidCom2 token compression, projected fp16 tokens, exactly what
   `device-agent` uploads; all of them, not UTS-selected);
2. one round of the daemon's "akd" trainer (its defaults unless overridden: CE + KL + feature
   loss, source replay), then the same round with pseudo-label CE only (same cached labels, same
   batches) and, for the forgetting figure, AKD without replay;
3. accuracy (`shared.models.evaluate`, exact match of greedy answers) on `--eval-n` held-out
   procedural videos per domain (the zoo's held-out stream): student before, after with the exact
   delta, after with the DWC payload decoded onto version 0, teacher; on the shifted domain and
   on `source`;
4. downlink bytes of that round: DWC (energy shares x int8/int4; the accuracy of each decoded
   payload) vs the dense fp16 adapter (dense-fp16 codec) vs the full fp16 student weights;
5. step time: one AKD step (teacher forward + the trainer's CE+KL+feature step) vs teacher
   forward + student forward/backward (CE) on the same batch, in the same process.

`goals()` checks the issue's targets: DWC <= 2% of the dense fp16 adapter with <= 0.5 pt
accuracy loss vs the exact delta, and AKD step <= 1.25x. With a zoo that answers near chance,
accuracy differences are mostly noise: the report carries the 95% interval of each accuracy, the
share of answers each payload has in common with the exact delta, and the DWC goal is "not
shown" (met false, met_by_letter true) when it holds only because the exact delta's own effect
is within noise.

Usage:
    python -m bench.akd --steps 200 --out reports/akd      # zoo/default; ~3-5 min, 1 thread
    python -m bench.akd --zoo-dir /path/to/zoo --eval-n 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict

from cloud.distill import AdapterDistiller, AKDConfig, DistillSample, LoRASpec, attach_lora, label
from cloud.distill.akd import _forward
from cloud.distill.prompt import pack
from cloud.distributed.job import load_checkpoint
from cloud.trainers import TRAINERS
from cloud.trainers.akd import AkdTrainerConfig
from device.compress import COMPRESSORS
from device.runtime.inference import DeviceInference
from device.runtime.loader import StudentConfig, load_student
from device.sampling.payload import pack_tokens
from device.settings import COMPRESSOR_DEFAULTS
from shared.codec import CODECS
from shared.media import procedural as P
from shared.models.checkpoint import LoadedVLM, load_vlm
from shared.models.evaluate import evaluate, generate_answers
from shared.models.zoo import ensure_zoo
from shared.types import UploadSample

log = logging.getLogger("bench.akd")
UPLOAD_SEED = 4242
"""Stream of the uploaded samples (the zoo trains on seed*1000+1 and holds out seed*1000+999)."""
HELDOUT_SEED = 999
DWC_GOAL_SHARE = 0.02
DWC_GOAL_LOSS = 0.005
STEP_GOAL = 1.25


class _Ctx:
    """JobContext of a bench round: no checkpoints kept."""

    job_id = "bench"

    def restore(self) -> None:
        return None

    def checkpoint(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _ci95(acc: float, n: int) -> float:
    """Half-width of the normal 95% interval of an accuracy over n samples."""
    return 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n) if n else math.nan


# ----------------------------------------------------------------------------- data


def device_uploads(student_dir: Path, items: list[P.QASample], batch_size: int = 16,
                   ) -> list[UploadSample]:
    """What the device-agent uploads for `items`: projected fp16 tokens its default compressor
    (VidCom2, `device.settings.COMPRESSOR_DEFAULTS`) kept."""
    student = load_student(StudentConfig(student_dir))
    inference = DeviceInference(student, COMPRESSORS.build("vidcom2",
                                                           COMPRESSOR_DEFAULTS["vidcom2"]), 3)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        results = inference.run([s.frames for s in chunk], [s.question for s in chunk],
                                [s.sample_id for s in chunk])
        out += [UploadSample(s.sample_id, "video", s.question, r.answer, 0.2, tokens=pack_tokens(
            r.features, r.record.keep, r.grid, "projected", "float16"))
            for s, r in zip(chunk, results, strict=True)]
    return out


class Evaluator:
    """The zoo student with a LoRA whose weights are swapped per evaluated adapter."""

    def __init__(self, student_dir: Path, spec: LoRASpec) -> None:
        loaded = load_vlm(student_dir)
        self.peft = attach_lora(loaded.model, spec)
        self.loaded = dataclasses.replace(loaded, model=self.peft)
        self.params = sum(p.numel() for p in loaded.model.parameters())

    def run(self, adapter: dict[str, torch.Tensor], sets: dict[str, list[P.QASample]],
            ) -> dict[str, Any]:
        """Accuracy (and the answers, for agreement) per evaluation set."""
        set_peft_model_state_dict(self.peft, adapter)
        self.peft.eval()
        return {name: _scored(self.loaded, items) for name, items in sets.items()}


def _scored(loaded: LoadedVLM, items: list[P.QASample]) -> dict[str, Any]:
    acc = float(evaluate(loaded, items)["overall"]["acc"])
    return {"acc": acc, "n": len(items), "ci95": _ci95(acc, len(items)),
            "answers": generate_answers(loaded, items)}


def _agree(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _public(scored: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv)
                for kk, vv in v.items() if kk != "answers"} for k, v in scored.items()}


# ----------------------------------------------------------------------------- timing


def step_timing(student_dir: Path, teacher_dir: Path, samples: list[DistillSample],
                spec: LoRASpec, batch_size: int, repeats: int) -> dict[str, Any]:
    """Median teacher forward and student forward/backward (CE) on one batch, and the mean AKD
    step (the trainer's CE+KL+feature objective, clip, AdamW) on the same batch."""
    teacher, fmt = load_checkpoint(teacher_dir)
    teacher.requires_grad_(False).eval()
    base, _ = load_checkpoint(student_dir)
    student = attach_lora(base, spec)
    batch = samples[:batch_size]
    t0 = time.perf_counter()
    labels = label(teacher, batch, fmt, max_new_tokens=3, prefer_reference=False)
    label_s = time.perf_counter() - t0
    packed = pack(fmt, [s.question for s in batch], [s.visual_tokens.shape[0] for s in batch],
                  [lab.answer_ids for lab in labels], [s.positions for s in batch])
    targets = torch.cat(packed.answer_ids)  # (N,)

    def teacher_forward() -> None:
        with torch.no_grad():
            _forward(teacher, packed, batch)

    def student_forward_backward() -> None:
        logits, _ = _forward(student, packed, batch)  # (B, L, V)
        picked = torch.cat([logits[i, p] for i, p in enumerate(packed.answer_positions)])
        torch.nn.functional.cross_entropy(picked, targets).backward()
        student.zero_grad(set_to_none=True)

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    student.train()
    for fn in (teacher_forward, student_forward_backward):
        fn()  # warm-up
    t_teacher, t_student = [], []
    for _ in range(repeats):
        t_teacher.append(timed(teacher_forward))
        t_student.append(timed(student_forward_backward))
    distiller = AdapterDistiller(AKDConfig(steps=2, batch_size=batch_size, replay_ratio=0.0))
    distiller.fit(student, None, batch, formatter=fmt, labels=labels)  # warm-up, builds the map
    fit = AdapterDistiller(AKDConfig(steps=repeats, batch_size=batch_size, replay_ratio=0.0))
    fit.projection = distiller.projection
    result = fit.fit(student, None, batch, formatter=fmt, labels=labels)
    teacher_s = statistics.median(t_teacher)
    student_s = statistics.median(t_student)
    akd_step_s = result.metrics["wall_s"] / result.metrics["steps"]
    reference = teacher_s + student_s
    return {
        "batch_size": batch_size, "repeats": repeats,
        "teacher_forward_s": teacher_s, "student_forward_backward_s": student_s,
        "akd_objective_step_s": akd_step_s,
        "akd_step_s": teacher_s + akd_step_s,
        "reference_s": reference, "ratio": (teacher_s + akd_step_s) / reference,
        "teacher_pseudo_label_s_per_sample": label_s / len(batch),
        "note": "akd_step = teacher forward (logits + hidden states for KL/feature targets) + "
                "the trainer's step (student forward, CE+KL+feature loss through the learned "
                "projection, backward, clip, AdamW); reference = teacher forward + student "
                "forward/backward with CE only. Pseudo-label generation is once per upload "
                "(label cache), reported per sample, not per step.",
    }


# ----------------------------------------------------------------------------- rounds


def _round(opts: dict[str, Any], uploads: list[UploadSample]) -> tuple[Any, Any, float]:
    trainer = TRAINERS.build("akd", opts)
    v0 = trainer.initial_adapter()
    t0 = time.perf_counter()
    result = trainer.train(v0, uploads, _Ctx())
    return trainer, result, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the report (without goals)."""
    zoo_dir = Path(args.zoo_dir) if args.zoo_dir else ensure_zoo(args.zoo).root
    student_dir, teacher_dir = zoo_dir / "student", zoo_dir / "teacher"
    work = Path(tempfile.mkdtemp(prefix="cdca-bench-akd-"))
    defaults = AkdTrainerConfig()
    opts: dict[str, Any] = {
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir),
        "work_dir": str(work / "akd"), "label_cache_dir": str(work / "labels"),
        "steps": args.steps or defaults.steps, "lr": args.lr or defaults.lr,
        "batch_size": args.batch_size or defaults.batch_size,
        "replay_ratio": defaults.replay_ratio if args.replay_ratio is None else args.replay_ratio,
    }
    spec = LoRASpec(rank=defaults.lora_r, alpha=defaults.lora_alpha, dropout=0.0,
                    targets=defaults.lora_targets)
    processor_cfg = load_vlm(student_dir).processor.config
    gen = P.GeneratorConfig(frame_size=processor_cfg.image_size,
                            num_frames=processor_cfg.num_frames)
    t0 = time.perf_counter()
    uploads = device_uploads(student_dir, P.batch(args.domain, args.uploads, UPLOAD_SEED,
                                                  "video", gen))
    upload_s = time.perf_counter() - t0
    sets = {d: P.batch(d, args.eval_n, HELDOUT_SEED, "video", gen)
            for d in dict.fromkeys((args.domain, "source"))}

    log.info("AKD round on %d %s uploads", len(uploads), args.domain)
    akd_trainer, akd, akd_s = _round(opts, uploads)
    v0 = akd_trainer.initial_adapter()
    ce_trainer, ce, ce_s = _round({**opts, "akd": {"kl_weight": 0.0, "feature_weight": 0.0}},
                                  uploads)
    rounds = {"akd": (akd, akd_s), "ce_only": (ce, ce_s)}
    if opts["replay_ratio"] > 0:
        rounds["akd_no_replay"] = _round({**opts, "replay_ratio": 0.0}, uploads)[1:]
    # a budgeted round moves only B entries: the dense round with A frozen says what A adds
    rounds["akd_lora_b_only"] = _round({**opts, "akd": {"train_lora_a": False}}, uploads)[1:]
    if args.budget_entries:
        # a few hundred entries need a larger step than the dense round's lr to move as far
        rounds["akd_budgeted"] = _round(
            {**opts, "lr": args.budget_lr, "akd": {"delta_entries": args.budget_entries}},
            uploads)[1:]
    del akd_trainer, ce_trainer

    ev = Evaluator(student_dir, spec)
    acc: dict[str, Any] = {"before": ev.run(v0, sets)}
    for name, (res, _) in rounds.items():
        acc[name] = ev.run(res.adapter, sets)
    teacher = load_vlm(teacher_dir)
    acc["teacher"] = {d: _scored(teacher, items) for d, items in sets.items()}
    del teacher

    # downlink: the round's delta under each codec setting
    new = akd.adapter
    adapter_numel = sum(v.numel() for v in v0.values())
    dense = CODECS.build("dense-fp16", {}).encode(new, v0)
    default_codec = daemon_codec()
    curve = []
    settings = [{"energy_share": share, "bits": bits} for bits in args.bits
                for share in args.shares]
    # byte budgets as shares of the dense fp16 payload: the goal's 2% point, whatever it costs
    settings += [{"energy_share": 1.0, "bits": bits,
                  "budget_bytes": max(1, int(b * dense.stats.payload_bytes))}
                 for bits in args.bits for b in args.budgets]
    for opts_c in settings:
        codec = CODECS.build("dwc", opts_c)
        enc = codec.encode(new, v0)
        scored = ev.run(codec.decode(enc.payload, v0), {args.domain: sets[args.domain]})
        point = scored[args.domain]
        curve.append({
            **opts_c, "payload_bytes": enc.stats.payload_bytes,
            "budget_limited": enc.stats.budget_limited,
            "over_dense_fp16": enc.stats.payload_bytes / dense.stats.payload_bytes,
            "kept": enc.stats.kept, "relative_error": enc.stats.relative_error,
            "acc": point["acc"], "ci95": point["ci95"],
            "loss_vs_exact": acc["akd"][args.domain]["acc"] - point["acc"],
            "answers_agree_with_exact": _agree(point["answers"],
                                               acc["akd"][args.domain]["answers"]),
            "is_daemon_default": opts_c == default_codec,
        })
        log.info("dwc %s: %d bytes, acc %.3f", opts_c, enc.stats.payload_bytes, point["acc"])
    default = CODECS.build("dwc", default_codec)
    enc = default.encode(new, v0)
    acc["akd_dwc"] = ev.run(default.decode(enc.payload, v0), sets)
    budgeted = None
    if "akd_budgeted" in rounds:
        # the budgeted round's k-entry delta through DWC at the goal's byte budget
        # (a tiny test zoo's 2% is below the codec's fixed header: then 128 bytes)
        opts_b = {"energy_share": 1.0, "bits": 8,
                  "budget_bytes": max(128, int(DWC_GOAL_SHARE * dense.stats.payload_bytes))}
        codec = CODECS.build("dwc", opts_b)
        enc_b = codec.encode(rounds["akd_budgeted"][0].adapter, v0)
        acc["akd_budgeted_dwc"] = ev.run(codec.decode(enc_b.payload, v0), sets)
        point = acc["akd_budgeted_dwc"][args.domain]
        budgeted = {
            **opts_b, "delta_entries": args.budget_entries, "lr": args.budget_lr,
            "payload_bytes": enc_b.stats.payload_bytes, "kept": enc_b.stats.kept,
            "budget_limited": enc_b.stats.budget_limited,
            "over_dense_fp16": enc_b.stats.payload_bytes / dense.stats.payload_bytes,
            "acc": point["acc"], "ci95": point["ci95"],
            "loss_vs_exact": acc["akd"][args.domain]["acc"] - point["acc"],
            "loss_vs_own_exact": acc["akd_budgeted"][args.domain]["acc"] - point["acc"],
            "answers_agree_with_exact": _agree(point["answers"],
                                               acc["akd"][args.domain]["answers"]),
            "source_acc": acc["akd_budgeted_dwc"]["source"]["acc"],
        }

    timing = step_timing(student_dir, teacher_dir,
                         [DistillSample.from_upload(u) for u in uploads], spec,
                         opts["batch_size"], args.timing_repeats)
    same = {d: _agree(acc["before"][d]["answers"], acc["akd"][d]["answers"]) for d in sets}
    return {
        "zoo_dir": str(zoo_dir), "domain": args.domain, "uploads": len(uploads),
        "upload_s": upload_s, "eval_n": args.eval_n, "trainer_options": {
            k: v for k, v in opts.items() if k not in ("work_dir", "label_cache_dir")},
        "rounds": {name: {"wall_s": s, **{k: round(v, 4) for k, v in r.metrics.items()}}
                   for name, (r, s) in rounds.items()},
        "accuracy": {name: _public(v) for name, v in acc.items()},
        "answers_same_as_before_after_akd": same,
        "agreement_dwc_default_vs_exact": {
            d: _agree(acc["akd_dwc"][d]["answers"], acc["akd"][d]["answers"]) for d in sets},
        "downlink": {
            "adapter_params": adapter_numel, "dense_fp16_adapter_raw_bytes": 2 * adapter_numel,
            "dense_fp16_adapter_bytes": dense.stats.payload_bytes,
            "student_params": ev.params, "student_fp16_bytes": 2 * ev.params,
            "dwc_default": {**default_codec, "payload_bytes": enc.stats.payload_bytes,
                            "over_dense_fp16": enc.stats.payload_bytes
                            / dense.stats.payload_bytes,
                            "relative_error": enc.stats.relative_error},
            "curve": curve, "budgeted_round": budgeted,
        },
        "timing": timing,
    }


def daemon_codec() -> dict[str, Any]:
    """energy_share and bits of the daemon's codec (WorkerSettings: "dwc", no options)."""
    cfg = CODECS.build("dwc", {}).config  # type: ignore[attr-defined]
    return {"energy_share": cfg.energy_share, "bits": cfg.bits}


# ----------------------------------------------------------------------------- goals


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the numbers behind it, met or not, and how much the
    accuracy part can say on this zoo."""
    out: dict[str, Any] = {}
    dom = report["domain"]
    acc = report["accuracy"]
    exact, before = acc["akd"][dom], acc["before"][dom]
    gain = exact["acc"] - before["acc"]
    # the round's effect is resolvable when it exceeds the 95% interval of the difference
    resolvable = abs(gain) > math.hypot(exact["ci95"], before["ci95"])
    dl = report["downlink"]
    # candidates: every codec point on the dense round's delta, and the budgeted round (its
    # loss counted against the dense round's exact delta, not its own)
    points = dl["curve"] + ([dl["budgeted_round"]] if dl.get("budgeted_round") else [])
    ok = [p for p in points if p["over_dense_fp16"] <= DWC_GOAL_SHARE
          and p["loss_vs_exact"] <= DWC_GOAL_LOSS]
    best = min(ok, key=lambda p: p["payload_bytes"]) if ok else None
    smallest = min(dl["curve"], key=lambda p: p["payload_bytes"]) if dl["curve"] else None
    within = [{k: p.get(k) for k in ("bits", "energy_share", "delta_entries", "payload_bytes",
                                     "over_dense_fp16", "loss_vs_exact",
                                     "answers_agree_with_exact")}
              for p in points if p["over_dense_fp16"] <= DWC_GOAL_SHARE]
    # "met" needs the bound to mean something: when the exact delta's own effect is within
    # noise, a payload that keeps almost none of it passes the 0.5 pt bound by chance
    letter = best is not None
    out["dwc_le_2pct_of_dense_fp16_with_le_0p5pt_loss"] = {
        "met": bool(letter and resolvable), "met_by_letter": letter,
        "status": "fail" if not letter else ("pass" if resolvable else "not shown"),
        "best_point": best, "smallest_point": smallest, "points_within_2pct": within,
        "exact_delta_gain_pt": 100 * gain, "gain_resolvable": bool(resolvable),
        "one_sample_pt": 100 / exact["n"],
        "note": None if resolvable else (
            "the exact delta's own effect on accuracy is within noise here, so the 0.5 pt "
            "bound cannot tell a faithful payload from one that drops the update; see "
            "answers_agree_with_exact per point"),
    }
    if "akd_budgeted" in acc and "akd_lora_b_only" in acc:
        # what the 2% round misses: the budget itself, or the A matrices it cannot move
        b_only, budgeted = acc["akd_lora_b_only"][dom]["acc"], acc["akd_budgeted"][dom]["acc"]
        out["budgeted_round_gap"] = {
            "dense_pt": 100 * exact["acc"], "dense_lora_b_only_pt": 100 * b_only,
            "budgeted_pt": 100 * budgeted,
            "from_freezing_a_pt": 100 * (exact["acc"] - b_only),
            "from_the_entry_budget_pt": 100 * (b_only - budgeted), "info_only": True}
    t = report["timing"]
    out["akd_step_le_1p25x_teacher_fwd_plus_student_fwd_bwd"] = {
        "ratio": t["ratio"], "akd_step_s": t["akd_step_s"], "reference_s": t["reference_s"],
        "met": bool(t["ratio"] <= STEP_GOAL)}
    src = report["accuracy"]
    if "akd_no_replay" in src:
        out["replay_keeps_source"] = {
            "source_before": src["before"]["source"]["acc"],
            "source_after_akd": src["akd"]["source"]["acc"],
            "source_after_no_replay": src["akd_no_replay"]["source"]["acc"],
            "info_only": True}
    teacher = acc["teacher"][dom]["acc"]
    out["zoo_quality"] = {
        "teacher_acc": teacher, "student_before_acc": before["acc"],
        "teacher_beats_student": bool(teacher - before["acc"]
                                      > math.hypot(acc["teacher"][dom]["ci95"], before["ci95"])),
        "note": "AKD can only pass on what the teacher knows; with a teacher no better than the "
                "student the accuracy figures measure the pipeline, not the method"}
    return out


# ----------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs downlink bytes, accuracy per round variant, step times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dom = report["domain"]
    acc = report["accuracy"]
    dl = report["downlink"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for bits, marker in ((8, "o"), (4, "s")):
        pts = sorted((p["payload_bytes"], p["acc"]) for p in dl["curve"]
                     if p["bits"] == bits and "budget_bytes" not in p)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                    label=f"DWC int{bits}, energy shares")
        budget = [(p["payload_bytes"], p["acc"]) for p in dl["curve"]
                  if p["bits"] == bits and "budget_bytes" in p]
        if budget:
            ax.scatter([b[0] for b in budget], [b[1] for b in budget], marker="x",
                       label=f"DWC int{bits}, byte budget")
    if dl.get("budgeted_round"):
        b = dl["budgeted_round"]
        ax.scatter([b["payload_bytes"]], [b["acc"]], marker="*", s=120, color="C3",
                   label=f"budgeted round ({b['delta_entries']} entries) + DWC")
    ax.axhline(acc["akd"][dom]["acc"], color="k", ls="--", lw=1, label="exact delta")
    ax.axhline(acc["before"][dom]["acc"], color="grey", ls=":", lw=1, label="before")
    for x, name in ((dl["dense_fp16_adapter_bytes"], "dense fp16 adapter"),
                    (DWC_GOAL_SHARE * dl["dense_fp16_adapter_bytes"], "2% of dense"),
                    (dl["student_fp16_bytes"], "fp16 student")):
        ax.axvline(x, lw=1, alpha=0.6)
        ax.text(x, ax.get_ylim()[0], name, rotation=90, va="bottom", fontsize=7)
    twin = ax.twinx()  # accuracy is noisy on a weak zoo; answer agreement is not
    for bits, ls in ((8, "-"), (4, "--")):
        pts = sorted((p["payload_bytes"], p["answers_agree_with_exact"]) for p in dl["curve"]
                     if p["bits"] == bits)
        twin.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", ls=ls, lw=1,
                  alpha=0.7, label=f"int{bits}: answers equal to exact delta's")
    twin.set_ylabel("share of answers equal to the exact delta's", fontsize=8)
    twin.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("downlink bytes per round")
    ax.set_ylabel(f"{dom} accuracy")
    ax.set_title(f"bytes vs accuracy ({acc['akd'][dom]['n']} held-out {dom})")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = [n for n in ("before", "akd", "akd_dwc", "akd_lora_b_only", "akd_budgeted",
                         "akd_budgeted_dwc", "ce_only", "akd_no_replay", "teacher")
             if n in acc]
    doms = list(acc["before"])
    width = 0.8 / len(doms)
    for j, d in enumerate(doms):
        ys = [acc[n][d]["acc"] for n in names]
        err = [acc[n][d]["ci95"] for n in names]
        ax.bar([i + j * width for i in range(len(names))], ys, width, yerr=err, label=d,
               capsize=2)
    ax.set_xticks([i + width * (len(doms) - 1) / 2 for i in range(len(names))], names,
                  rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title("one round")
    ax.legend(fontsize=7)
    ax = axes[2]
    t = report["timing"]
    parts = [("teacher fwd", t["teacher_forward_s"]),
             ("student fwd+bwd", t["student_forward_backward_s"]),
             ("AKD step", t["akd_step_s"])]
    ax.bar([p[0] for p in parts], [1000 * p[1] for p in parts])
    ax.axhline(1000 * STEP_GOAL * t["reference_s"], color="r", ls="--", lw=1,
               label=f"{STEP_GOAL}x (teacher fwd + student fwd/bwd)")
    ax.set_ylabel(f"ms per batch of {t['batch_size']}")
    ax.set_title(f"step time: ratio {t['ratio']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; JSON to stdout and `<out>/akd.{json,png}`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="default", help="zoo name (shared.models.zoo.ensure_zoo)")
    p.add_argument("--zoo-dir", default="", help="a zoo directory (teacher/, student/) instead")
    p.add_argument("--domain", default="low_light", choices=[d for d in P.DOMAINS
                                                             if d != "source"])
    p.add_argument("--uploads", type=int, default=64, help="uploaded videos in the round")
    p.add_argument("--eval-n", type=int, default=300, help="held-out videos per domain")
    p.add_argument("--steps", type=int, default=0, help="0: the trainer's default")
    p.add_argument("--lr", type=float, default=0.0, help="0: the trainer's default")
    p.add_argument("--batch-size", type=int, default=0, help="0: the trainer's default")
    p.add_argument("--replay-ratio", type=float, default=None)
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05],
                   help="DWC byte budgets as shares of the dense fp16 adapter payload")
    p.add_argument("--budget-entries", type=int, default=350,
                   help="also a budgeted round training only this many adapter entries, "
                        "sent by DWC at 2%% of the dense payload (0: skip)")
    p.add_argument("--budget-lr", type=float, default=3e-2,
                   help="learning rate of the budgeted round")
    p.add_argument("--timing-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="reports/akd")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__,
                              "command": "python -m bench.akd " + " ".join(
                                  argv if argv is not None else sys.argv[1:])}
    report.update(run(args))
    report["wall_s"] = time.perf_counter() - t0
    report["goals"] = goals(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "akd.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "akd.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
