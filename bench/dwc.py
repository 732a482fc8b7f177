"""DWC downlink benchmark: payload size vs fidelity of adapter updates; prints JSON, writes a PNG.

Three parts:
- `akd`: a real AKD round (tiny random LLaVA-OneVision teacher 4 layers / student 2 layers, LoRA
  r=8 on the student's attention + MLP) produces the adapter; each codec setting's payload is
  applied on a "device" copy and its answer logits are compared with the cloud student's.
- `scale`: a LoRA r=8 adapter with the shapes of Qwen2-0.5B (LLaVA-OneVision-0.5B's LLM, 24
  layers, attention + MLP: 4.4M parameters) and a synthetic heavy-tailed update (log-normal
  per-entry scales); size, relative error and encode/decode time per setting and byte budget.
- `rounds`: 20 rounds of a drifting cloud adapter sent with DWC, with and without error feedback;
  the device/cloud gap per round.

Usage:
    python -m bench.dwc --out reports/dwc            # about a minute on 2 CPU cores
    python -m bench.dwc --quick                      # smaller scale part
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
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from cloud.distill import AdapterDistiller, AKDConfig, DistillSample, LoRASpec, attach_lora, label
from cloud.distill.akd import _forward
from cloud.distill.prompt import PromptFormatter, pack
from shared.codec import CODECS, DeltaCodec

log = logging.getLogger("bench.dwc")

SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dense-fp16", {}),
    *((f"dwc int{b} share {s}", {"energy_share": s, "bits": b})
      for b in (8, 4) for s in (0.8, 0.9, 0.95, 0.99, 0.999)),
)
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<ans>", "<image>", "<video>"]
_WORDS = ("what colour is the shape how many shapes are there red green blue one two three four "
          "circle square triangle moving left right up down first last frame").split()


def _codec(label_: str, opts: dict[str, Any]) -> DeltaCodec:
    return CODECS.build("dense-fp16" if label_ == "dense-fp16" else "dwc", opts)


# ---------------------------------------------------------------------------------------- akd

def _tiny_pair(hidden: int) -> tuple[Any, Any, PromptFormatter]:
    vocab = {w: i for i, w in enumerate(_SPECIALS + _WORDS)}
    tok_model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok_model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_model, pad_token="<pad>",
                                  unk_token="<unk>")
    ids = {s: vocab[s] for s in _SPECIALS}

    def vlm(layers: int, seed: int) -> LlavaOnevisionForConditionalGeneration:
        cfg = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=hidden,
                             intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                             eos_token_id=ids["<eos>"], initializer_range=hidden ** -0.5),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=16,
                               intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=4),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[16, 16]],
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlavaOnevisionForConditionalGeneration._from_config(cfg).eval()

    fmt = PromptFormatter(tokenizer=tok, visual_id=ids["<video>"], eos_id=ids["<eos>"],
                          pad_id=ids["<pad>"], bos_id=ids["<bos>"], answer_id=ids["<ans>"])
    return vlm(4, 1), vlm(2, 2), fmt


@torch.no_grad()
def _answer_logits(model: Any, fmt: PromptFormatter, samples: list[DistillSample],
                   labels: list[Any]) -> torch.Tensor:
    model.eval()
    batch = pack(fmt, [s.question for s in samples], [s.visual_tokens.shape[0] for s in samples],
                 [t.answer_ids for t in labels])
    logits, _ = _forward(model, batch, samples)
    return torch.cat([logits[i, p] for i, p in enumerate(batch.answer_positions)])  # (N, V)


def akd_part(args: argparse.Namespace) -> dict[str, Any]:
    """One AKD round, then every codec setting applied on the device side."""
    hidden = 128
    teacher, student_base, fmt = _tiny_pair(hidden)
    g = torch.Generator().manual_seed(3)
    questions = ["what colour is the shape", "how many shapes are there",
                 "what shape is moving left", "which frame is first"]
    samples = [DistillSample(question=questions[i % 4],
                             visual_tokens=torch.randn(12, hidden, generator=g))
               for i in range(args.akd_samples)]
    t0 = time.perf_counter()
    labels = label(teacher, samples, fmt, max_new_tokens=6)
    label_s = time.perf_counter() - t0
    torch.manual_seed(4)
    cloud = attach_lora(student_base, LoRASpec(rank=8, alpha=16))
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(cloud).items()}
    device = attach_lora(_tiny_pair(hidden)[1], LoRASpec(rank=8, alpha=16))
    set_peft_model_state_dict(device, initial)
    result = AdapterDistiller(AKDConfig(steps=args.akd_steps, batch_size=8, lr=3e-3)).fit(
        cloud, None, samples, formatter=fmt, labels=labels)
    want = _answer_logits(cloud, fmt, samples, labels)
    before = _answer_logits(device, fmt, samples, labels)
    numel = sum(v.numel() for v in initial.values())
    rows = []
    for name, opts in SETTINGS:
        codec = _codec(name, opts)
        enc = codec.encode(result.adapter, initial)
        set_peft_model_state_dict(device, codec.decode(enc.payload, initial))
        got = _answer_logits(device, fmt, samples, labels)
        rows.append({
            "setting": name, "payload_bytes": enc.stats.payload_bytes,
            "fp32_over_payload": round(enc.stats.dense_fp32_bytes / enc.stats.payload_bytes, 2),
            "kept": enc.stats.kept, "relative_error": round(enc.stats.relative_error, 5),
            "logit_max_abs_err": round(float((got - want).abs().max()), 5),
            "logit_err_over_update": round(float((got - want).norm() / (before - want).norm()), 5),
            "argmax_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4),
        })
    return {"adapter_params": numel, "adapter_fp32_bytes": 4 * numel,
            "akd": {k: round(v, 4) for k, v in result.metrics.items()},
            "label_s": round(label_s, 3), "settings": rows}


# -------------------------------------------------------------------------------------- scale

def qwen2_lora_shapes(layers: int = 24, hidden: int = 896, inter: int = 4864, kv: int = 128,
                      rank: int = 8) -> dict[str, tuple[int, int]]:
    """LoRA A (r, in) and B (out, r) shapes of a Qwen2-0.5B-sized LLM, attention + MLP."""
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
            "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}
    out = {}
    for i in range(layers):
        for mod, (d_in, d_out) in dims.items():
            p = f"base_model.model.model.language_model.layers.{i}.{mod}"
            out[f"{p}.lora_A.weight"] = (rank, d_in)
            out[f"{p}.lora_B.weight"] = (d_out, rank)
    return out


def _synthetic_update(shapes: dict[str, tuple[int, int]], seed: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base, new = {}, {}
    for name, shape in shapes.items():
        is_a = name.endswith("lora_A.weight")
        b = torch.randn(shape, generator=g) / shape[1] ** 0.5 if is_a else torch.zeros(shape)
        scale = 1e-3 * torch.exp(1.5 * torch.randn(shape, generator=g))  # heavy-tailed magnitudes
        base[name] = b
        new[name] = b + scale * torch.randn(shape, generator=g)
    return base, new


def scale_part(args: argparse.Namespace) -> dict[str, Any]:
    """Size/error/time of each setting on a 0.5B-class LoRA adapter; then byte budgets."""
    layers = 4 if args.quick else 24
    base, new = _synthetic_update(qwen2_lora_shapes(layers=layers), seed=5)
    numel = sum(v.numel() for v in base.values())
    rows = []
    for name, opts in [*SETTINGS, *((f"dwc int8 share 0.99 budget {b}",
                                     {"energy_share": 0.99, "budget_bytes": b})
                                    for b in args.budgets)]:
        codec = _codec(name, opts)
        t0 = time.perf_counter()
        enc = codec.encode(new, base)
        t1 = time.perf_counter()
        codec.decode(enc.payload, base)
        t2 = time.perf_counter()
        rows.append({"setting": name, "payload_bytes": enc.stats.payload_bytes,
                     "fp32_over_payload": round(enc.stats.dense_fp32_bytes
                                                / enc.stats.payload_bytes, 2),
                     "kept": enc.stats.kept, "energy_share": round(enc.stats.energy_share, 5),
                     "relative_error": round(enc.stats.relative_error, 5),
                     "budget_limited": enc.stats.budget_limited,
                     "encode_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)})
        log.info("scale %s: %d bytes", name, enc.stats.payload_bytes)
    return {"layers": layers, "adapter_params": numel, "adapter_fp32_bytes": 4 * numel,
            "settings": rows}


# ------------------------------------------------------------------------------------- rounds

def rounds_part(args: argparse.Namespace) -> dict[str, Any]:
    """Device/cloud gap over rounds, DWC int4 share 0.9, with and without error feedback."""
    base, _ = _synthetic_update(qwen2_lora_shapes(layers=2), seed=6)
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(args.rounds):
        steps.append({k: 2e-3 * torch.exp(torch.randn(v.shape, generator=g))
                      * torch.randn(v.shape, generator=g) for k, v in base.items()})
    codec = CODECS.build("dwc", {"energy_share": 0.9, "bits": 4})
    curves: dict[str, list[float]] = {}
    for mode in ("feedback", "no_feedback"):
        cloud = {k: v.clone() for k, v in base.items()}
        prev = {k: v.clone() for k, v in base.items()}
        device = {k: v.clone() for k, v in base.items()}
        residual = None
        gaps = []
        for step in steps:
            cloud = {k: cloud[k] + step[k] for k in cloud}
            enc = codec.encode(cloud, prev, residual if mode == "feedback" else None)
            device = codec.decode(enc.payload, device)
            prev, residual = {k: v.clone() for k, v in cloud.items()}, enc.residual
            gap = sum(float((device[k] - cloud[k]).double().norm() ** 2) for k in cloud) ** 0.5
            moved = sum(float((cloud[k] - base[k]).double().norm() ** 2) for k in cloud) ** 0.5
            gaps.append(round(gap / moved, 5))
        curves[mode] = gaps
    return {"codec": "dwc int4 share 0.9", "gap_over_total_update": curves}


# --------------------------------------------------------------------------------------- main

def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if "scale" in report:
        rows = report["scale"]["settings"]
        for prefix, marker in (("dwc int8 share", "o"), ("dwc int4 share", "s")):
            pts = [(r["payload_bytes"], r["relative_error"]) for r in rows
                   if r["setting"].startswith(prefix) and "budget" not in r["setting"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=prefix[4:])
        budget = [(r["payload_bytes"], r["relative_error"]) for r in rows
                  if "budget" in r["setting"]]
        ax.scatter([b[0] for b in budget], [b[1] for b in budget], marker="x", c="k",
                   label="int8 with byte budget")
        dense = next(r for r in rows if r["setting"] == "dense-fp16")
        ax.scatter([dense["payload_bytes"]], [max(dense["relative_error"], 1e-4)], marker="*",
                   s=120, label="dense fp16")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("payload bytes")
        ax.set_ylabel("relative weight error of the update")
        ax.set_title(f"LoRA r=8, {report['scale']['adapter_params'] / 1e6:.1f}M params")
        ax.legend(fontsize=8)
    ax = axes[1]
    if "rounds" in report:
        for mode, ys in report["rounds"]["gap_over_total_update"].items():
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=mode)
        ax.set_xlabel("round")
        ax.set_ylabel("|device - cloud| / |cloud - initial|")
        ax.set_title(report["rounds"]["codec"])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; write dwc.json and dwc.png under --out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["akd", "scale", "rounds"])
    p.add_argument("--akd-samples", type=int, default=16)
    p.add_argument("--akd-steps", type=int, default=60)
    p.add_argument("--budgets", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4-layer scale part")
    p.add_argument("--out", default="reports/dwc")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    parts = {"akd": akd_part, "scale": scale_part, "rounds": rounds_part}
    report: dict[str, Any] = {"torch": torch.__version__}
    for name in args.parts:
        t0 = time.perf_counter()
        report[name] = parts[name](args)
        report[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dwc.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "dwc.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
