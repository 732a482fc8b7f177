"""Batched greedy answering and exact-match accuracy per domain and per question type."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from shared.media.procedural import QASample
from shared.models.checkpoint import LoadedVLM


@torch.no_grad()
def generate_answers(loaded: LoadedVLM, samples: Sequence[QASample], max_new_tokens: int = 3,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers for `samples` (images and videos may be mixed; batched per kind)."""
    answers: list[str] = [""] * len(samples)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_kind["image" if s.frames.shape[0] == 1 else "video"].append(i)
    pad = loaded.processor.pad_id
    for idx in by_kind.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            inputs = loaded.processor([samples[i] for i in chunk])
            out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=pad)
            texts = loaded.processor.decode_answers(out[:, inputs["input_ids"].shape[1]:])
            for i, t in zip(chunk, texts, strict=True):
                answers[i] = t
    return answers


def _acc(hits: list[bool]) -> dict[str, float | int]:
    return {"acc": sum(hits) / len(hits) if hits else 0.0, "n": len(hits)}


def evaluate(loaded: LoadedVLM, samples: Sequence[QASample], max_new_tokens: int = 3,
             batch_size: int = 64) -> dict[str, Any]:
    """Exact-match accuracy: overall, per domain, per question type and per (domain, qtype)."""
    preds = generate_answers(loaded, samples, max_new_tokens, batch_size)
    per_domain: dict[str, list[bool]] = defaultdict(list)
    per_qtype: dict[str, list[bool]] = defaultdict(list)
    cross: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    hits = []
    for s, p in zip(samples, preds, strict=True):
        hit = p.strip().lower() == s.answer.strip().lower()
        hits.append(hit)
        qkey = f"{s.media_kind}/{s.qtype}"
        per_domain[s.domain].append(hit)
        per_qtype[qkey].append(hit)
        cross[s.domain][qkey].append(hit)
    return {
        "overall": _acc(hits),
        "per_domain": {d: _acc(h) for d, h in per_domain.items()},
        "per_qtype": {q: _acc(h) for q, h in sorted(per_qtype.items())},
        "per_domain_qtype": {d: {q: _acc(h)["acc"] for q, h in sorted(c.items())}
                             for d, c in cross.items()},
    }


def first_frame_only(samples: Sequence[QASample]) -> list[QASample]:
    """Videos whose every frame is replaced by the first one (same length, no time)."""
    return [dataclasses.replace(s, frames=s.frames[:1].expand_as(s.frames).contiguous())
            if s.frames.shape[0] > 1 else s for s in samples]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table: one row per (model, domain) and a column per question type."""
    qtypes = sorted({q for r in results.values() for q in r["per_qtype"]})
    head = ["model", "domain", "all", *qtypes]
    rows = [head]
    for name, r in results.items():
        for d, v in r["per_domain"].items():
            rows.append([name, d, f"{v['acc']:.3f}",
                         *[f"{r['per_domain_qtype'][d].get(q, float('nan')):.2f}" for q in qtypes]])
        rows.append([name, "ALL", f"{r['overall']['acc']:.3f}",
                     *[f"{r['per_qtype'][q]['acc']:.2f}" if q in r["per_qtype"] else "-"
                       for q in qtypes]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in rows)
