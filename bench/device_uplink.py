"""UTS uplink on the zoo video task: bytes per uploaded sample and confidence calibration.

Part `bytes`: for the samples UTS selects, wire bytes of one uploaded sample (serialized
SampleBatch of one, int8 tokens + scales + int64 positions + question + answer + confidence)
at several token byte budgets, against the same clip as raw fp16 pixels (the model input), as
JPEG (quality 90, per frame), as raw uint8 frames through the `frames` payload, as every encoder
token (fp16), and as every token the compressor kept (int8).

Part `calibration`: on a mixed stream (source + the four shifted camera domains), the threshold is
the q-quantile of confidences on separate source data; among uploaded samples, the fraction the
device answered wrongly vs the base rate (= random selection at the same upload rate, with a
95 % interval from 2000 random draws). Enrichment = P(wrong | uploaded) / P(wrong), at most
1 / P(wrong). The official code's product of max-probabilities is reported beside the two
length-normalised signals. Part `budget_mode`: the sampler's other mode, the least confident
`round_budget` of every `round_size` stream samples (no calibration data needed).

Part `tokens`: the student (and, with --teacher, the teacher) reading only the uploaded tokens
chosen by answer->visual attention vs the same number of random kept tokens vs all kept tokens:
exact-match accuracy and agreement with its own answer on all kept tokens.

Usage:
    python -m bench.device_uplink --student zoo/default/student --teacher zoo/default/teacher \
        --out reports/device_uplink
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import statistics
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from device.agent import build_upload_sample
from device.compress import COMPRESSORS
from device.compress.base import KeepPlan, Stage, VisualBatch
from device.inputs import ProceduralInput, generator_for
from device.runtime.inference import DeviceInference, Inference
from device.runtime.loader import StudentConfig, load_student
from device.sampling.base import Selection
from device.sampling.uncertainty import (
    SIGNALS,
    UncertaintySampler,
    UncertaintySamplerConfig,
    sequence_confidence,
    token_bytes,
    tokens_within_budget,
)
from device.settings import COMPRESSOR_DEFAULTS
from device.vlm.compressed import CompressedVLM
from shared.media import procedural as P
from shared.types import SampleBatch
from shared.wire import convert

log = logging.getLogger("bench.device_uplink")


def _run_all(inf: DeviceInference, items: list[Any], batch: int) -> list[Inference]:
    out: list[Inference] = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        out += inf.run([c.frames for c in chunk], [c.question for c in chunk],
                       [c.sample_id for c in chunk])
    return out


def _conf(r: Inference, signal: str) -> float:
    rec = r.record
    if signal == "official_product":  # the official code: product of greedy max-probabilities
        return float(torch.exp(rec.token_logprobs.double().sum()))
    return sequence_confidence(rec.token_logprobs, rec.token_entropy, rec.vocab_size, signal)


def _jpeg_bytes(frames: torch.Tensor, size: int) -> int:
    from PIL import Image

    total = 0
    for f in frames:
        im = Image.fromarray(f.numpy()).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        total += buf.tell()
    return total


def bytes_part(inf: DeviceInference, items: list[Any], res: list[Inference],
               budgets: list[int]) -> dict[str, Any]:
    """Wire bytes per uploaded sample vs raw references."""
    pc = inf.student.processor.config
    dim = int(res[0].features.shape[1])
    n_all = res[0].visual_tokens_in
    raw_fp16 = pc.num_frames * 3 * pc.image_size * pc.image_size * 2
    rows: dict[str, Any] = {
        "frames": pc.num_frames, "image_size": pc.image_size, "token_dim": dim,
        "raw_fp16_pixels_bytes": raw_fp16,
        "jpeg_q90_bytes_mean": statistics.mean(
            _jpeg_bytes(it.frames, pc.image_size) for it in items[:50]),
        "all_encoder_tokens_fp16_bytes": n_all * dim * 2,
        "compressor_kept_tokens_int8_bytes_mean": statistics.mean(
            r.record.keep.numel() * token_bytes(dim, "int8") for r in res),
    }
    frame_payload = []
    for it, r in list(zip(items, res, strict=True))[:20]:
        sel = Selection(it.sample_id, 0.5, torch.arange(r.record.keep.numel()))
        s = build_upload_sample(sel, it, r, "frames", inf.feature_space, "int8", pc.num_frames)
        frame_payload.append(len(convert.encode_sample_batch(SampleBatch(0, (s,)))))
    rows["frames_payload_uint8_bytes_mean"] = statistics.mean(frame_payload)
    per_budget = []
    for budget in budgets:
        sizes, ntok = [], []
        for it, r in zip(items, res, strict=True):
            idx = tokens_within_budget(r.record.token_scores, token_bytes(dim, "int8"), budget)
            s = build_upload_sample(Selection(it.sample_id, _conf(r, "logprob"), idx), it, r,
                                    "tokens", inf.feature_space, "int8", pc.num_frames)
            sizes.append(len(convert.encode_sample_batch(SampleBatch(0, (s,)))))
            ntok.append(int(idx.numel()))
        mean = statistics.mean(sizes)
        per_budget.append({"token_budget_bytes": budget, "tokens": statistics.mean(ntok),
                           "bytes_mean": mean, "bytes_max": max(sizes),
                           "pct_of_raw_fp16": 100 * mean / raw_fp16,
                           "pct_of_jpeg": 100 * mean / rows["jpeg_q90_bytes_mean"],
                           "pct_of_all_tokens_fp16": 100 * mean / rows[
                               "all_encoder_tokens_fp16_bytes"]})
    rows["uploads"] = per_budget
    return rows


def calibration_part(cal: list[Inference], res: list[Inference], items: list[Any],
                     quantiles: list[float], seed: int) -> dict[str, Any]:
    """Wrong-answer enrichment of threshold selection vs random selection at the same rate."""
    wrong = np.array([r.answer != it.answer for r, it in zip(res, items, strict=True)])
    shifted = np.array([it.meta["domain"] != "source" for it in items])
    out: dict[str, Any] = {"stream_samples": len(items), "base_wrong_rate": float(wrong.mean()),
                           "max_possible_enrichment": float(1 / max(wrong.mean(), 1e-9)),
                           "accuracy_by_domain": {
                               d: float(1 - wrong[[it.meta["domain"] == d for it in items]].mean())
                               for d in sorted({it.meta["domain"] for it in items})},
                           "signals": {}}
    rng = random.Random(seed)
    for signal in ("logprob", "entropy", "official_product"):
        src = np.array([_conf(r, signal) for r in cal])
        conf = np.array([_conf(r, signal) for r in res])
        rows = []
        for q in quantiles:
            thr = float(np.quantile(src, q))
            sel = conf < thr
            n = int(sel.sum())
            if n == 0:
                rows.append({"quantile": q, "threshold": thr, "uploaded": 0})
                continue
            draws = [wrong[rng.sample(range(len(items)), n)].mean() for _ in range(2000)]
            lo, hi = np.quantile(draws, [0.025, 0.975])
            rows.append({
                "quantile": q, "threshold": thr, "uploaded": n, "upload_rate": n / len(items),
                "wrong_rate_uploaded": float(wrong[sel].mean()),
                "wrong_rate_random_mean": float(np.mean(draws)),
                "wrong_rate_random_95": [float(lo), float(hi)],
                "enrichment": float(wrong[sel].mean() / max(wrong.mean(), 1e-9)),
                "shifted_share_uploaded": float(shifted[sel].mean()),
                "shifted_share_stream": float(shifted.mean()),
            })
        out["signals"][signal] = rows
    return out


def budget_part(res: list[Inference], items: list[Any], round_size: int,
                round_budgets: list[int], seed: int) -> dict[str, Any]:
    """Wrong-answer enrichment of the sampler's budget mode: per round of `round_size` stream
    samples, the real `UncertaintySampler` uploads the `round_budget` least confident."""
    wrong = np.array([r.answer != it.answer for r, it in zip(res, items, strict=True)])
    index = {r.record.sample_id: i for i, r in enumerate(res)}
    dim = int(res[0].features.shape[-1])
    rng = random.Random(seed)
    out: dict[str, Any] = {"round_size": round_size, "signals": {}}
    for signal in SIGNALS:
        rows = []
        for k in round_budgets:
            sampler = UncertaintySampler(UncertaintySamplerConfig(
                signal=signal, mode="budget", round_size=round_size, round_budget=k), dim)
            chosen = [index[sel.sample_id] for start in range(0, len(res), round_size)
                      for sel in sampler.select([r.record for r in res[start:start + round_size]])]
            n = len(chosen)
            draws = [wrong[rng.sample(range(len(items)), n)].mean() for _ in range(2000)]
            lo, hi = np.quantile(draws, [0.025, 0.975])
            rows.append({
                "round_budget": k, "uploaded": n, "upload_rate": n / len(items),
                "wrong_rate_uploaded": float(wrong[chosen].mean()),
                "wrong_rate_random_95": [float(lo), float(hi)],
                "enrichment": float(wrong[chosen].mean() / max(wrong.mean(), 1e-9)),
            })
        out["signals"][signal] = rows
    return out


class _FixedKeep:
    """A pre-LLM 'compressor' that returns the indices it is given (per call, in order)."""

    stage: ClassVar[Stage] = Stage.PRE_LLM

    def __init__(self) -> None:
        self.plans: list[torch.Tensor] = []

    def select(self, batch: VisualBatch) -> KeepPlan:
        return KeepPlan(keep=self.plans.pop(0))


def tokens_part(teacher_dir: Path, items: list[Any], res: list[Inference], budget: int,
                seed: int, original_positions: bool) -> dict[str, Any]:
    """A model reading only the uploaded tokens: attention top-k vs random k vs all kept.

    Reports exact-match accuracy and agreement with the same model's answer on all kept tokens
    (how much of the evidence for that answer the k tokens carry)."""
    teacher = load_student(StudentConfig(teacher_dir, attention_scores=False))
    fixed = _FixedKeep()
    cv = CompressedVLM(teacher.model, fixed, original_positions=original_positions)
    g = torch.Generator().manual_seed(seed)
    dim = int(res[0].features.shape[1])
    hits: dict[str, list[bool]] = {"attention": [], "random": [], "least_attended": [],
                                   "all_kept": []}
    agree: dict[str, list[bool]] = {"attention": [], "random": [], "least_attended": []}
    for it, r in zip(items, res, strict=True):
        k = r.record.keep
        idx = tokens_within_budget(r.record.token_scores, token_bytes(dim, "int8"), budget)
        rnd = torch.sort(torch.randperm(k.numel(), generator=g)[:idx.numel()]).values
        low = torch.sort(torch.topk(-r.record.token_scores, idx.numel()).indices).values
        answers = {}
        for name, keep in (("all_kept", k), ("attention", k[idx]), ("random", k[rnd]),
                           ("least_attended", k[low])):
            fixed.plans = [keep]
            gen = cv.generate(teacher.processor(([it.frames], [it.question])), max_new_tokens=3,
                              do_sample=False)
            answers[name] = teacher.processor.decode_answers(gen.new_tokens)[0]
            hits[name].append(answers[name] == it.answer)
        for name in agree:
            agree[name].append(answers[name] == answers["all_kept"])
    return {"model": str(teacher_dir), "token_budget_bytes": budget, "samples": len(items),
            **{f"accuracy_{k}": float(np.mean(v)) for k, v in hits.items()},
            **{f"agreement_with_all_kept_{k}": float(np.mean(v)) for k, v in agree.items()}}


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    b = report["bytes"]
    labels = ["raw fp16", "JPEG q90", "raw uint8\nframes payload", "all tokens\nfp16",
              "kept tokens\nint8"] + [f"UTS {u['tokens']:.0f} tok" for u in b["uploads"]]
    vals = [b["raw_fp16_pixels_bytes"], b["jpeg_q90_bytes_mean"],
            b["frames_payload_uint8_bytes_mean"], b["all_encoder_tokens_fp16_bytes"],
            b["compressor_kept_tokens_int8_bytes_mean"]] + [u["bytes_mean"] for u in b["uploads"]]
    ax[0].bar(range(len(vals)), vals, color=["grey"] * 5 + ["tab:blue"] * len(b["uploads"]))
    ax[0].axhline(0.01 * b["raw_fp16_pixels_bytes"], color="red", ls="--", label="1% of raw fp16")
    ax[0].set_yscale("log")
    ax[0].set_xticks(range(len(vals)), labels, rotation=45, ha="right", fontsize=8)
    ax[0].set_ylabel("bytes per sample")
    ax[0].legend()
    c = report["calibration"]
    for signal, rows in c["signals"].items():
        rows = [r for r in rows if r.get("uploaded")]
        ax[1].plot([r["upload_rate"] for r in rows], [r["wrong_rate_uploaded"] for r in rows],
                   "o-", label=f"UTS ({signal})")
    ax[1].axhline(c["base_wrong_rate"], color="grey", ls="--", label="random (base rate)")
    ax[1].set_xlabel("upload rate")
    ax[1].set_ylabel("wrong answers among uploaded")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the parts; print and write JSON and PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, default=Path("zoo/default/student"))
    p.add_argument("--teacher", type=Path, default=None)
    p.add_argument("--quantization", default="fp32")
    p.add_argument("--per-domain", type=int, default=60)
    p.add_argument("--calibration", type=int, default=100)
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--round-size", type=int, default=30,
                   help="budget mode: stream samples per round (the stream cycles 5 domains)")
    p.add_argument("--round-budgets", type=int, nargs="+", default=[3, 6, 9],
                   help="budget mode: uploads per round")
    p.add_argument("--budgets", type=int, nargs="+", default=[420, 840, 1680, 3360])
    p.add_argument("--teacher-samples", type=int, default=100)
    p.add_argument("--keep-ratio", type=float,
                   default=COMPRESSOR_DEFAULTS["vidcom2"]["keep_ratio"],
                   help="VidCom2 keep ratio (default: the device's)")
    p.add_argument("--compact-positions", dest="original_positions", action="store_false",
                   help="renumber kept tokens compactly (the official VidCom2 code) instead of "
                        "the device default, their full-prompt positions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("reports/device_uplink"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    st = load_student(StudentConfig(args.student, quantization=args.quantization))
    inf = DeviceInference(st, COMPRESSORS.build("vidcom2", {"keep_ratio": args.keep_ratio}), 3,
                          original_positions=args.original_positions)
    pc = st.processor.config
    gen = generator_for(pc.image_size, pc.num_frames)
    cal_items = [ProceduralInput(["source"], 7, "video", generator=gen).item(i)
                 for i in range(args.calibration)]
    stream = ProceduralInput(list(P.DOMAINS), 4242, "video", generator=gen)
    items = [stream.item(i) for i in range(args.per_domain * len(P.DOMAINS))]
    cal = _run_all(inf, cal_items, args.batch)
    res = _run_all(inf, items, args.batch)
    report: dict[str, Any] = {
        "student": str(args.student), "quantization": args.quantization,
        "compressor": f"vidcom2 keep_ratio={args.keep_ratio}",
        "original_positions": args.original_positions,
        "bytes": bytes_part(inf, items, res, args.budgets),
        "calibration": calibration_part(cal, res, items, args.quantiles, args.seed),
        "budget_mode": budget_part(res, items, args.round_size, args.round_budgets, args.seed),
    }
    n = args.teacher_samples
    for role, path in (("student", args.student), ("teacher", args.teacher)):
        if path is not None:
            report[f"tokens_{role}"] = tokens_part(path, items[:n], res[:n], args.budgets[1],
                                                   args.seed, args.original_positions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_uplink.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, args.out / "device_uplink.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
