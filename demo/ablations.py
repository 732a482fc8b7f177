"""`python -m demo --ablations`: the loop rerun with one setting changed at a time.

Each variant is a fresh `adapt` run (new certificates, stores and device state) of
`DemoConfig.ablation_rounds` rounds, evaluated with the default demo's held-out sets:

- uplink selection: UTS (default) vs random at UTS's measured upload rate and the same per-sample
  token byte budget vs uploading every sample;
- token compression: VidCom2 vs none, both with the per-sample token budget lifted so that the
  uplink carries every token the compressor kept (with the default budget both would send the
  same number of tokens per sample);
- distillation: AKD vs pseudo-label cross-entropy only (KL and feature terms off);
- downlink codec: DWC (default) vs dense fp16 delta; the full adapter in fp16 is not a codec the
  device decodes, so its size per round is computed from the stored adapters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from demo.evaluation import Evaluator
from demo.loop import DEVICES, Adaptation, DemoConfig, Variant, adapt

log = logging.getLogger("demo")
UNCAPPED_TOKEN_BYTES = 1 << 24
"""A per-sample token budget no sample reaches: every kept token goes up."""
AKD_CE_ONLY = {"akd": {"kl_weight": 0.0, "feature_weight": 0.0}}
"""bench/akd.py's pseudo-label-only configuration of the `akd` trainer."""
NAMES = ("uts", "random", "upload-all", "vidcom2-all-tokens", "no-vidcom2", "ce-only",
         "dense-fp16")
GROUPS = {"uplink selection": ("uts", "random", "upload-all"),
          "visual token compression": ("vidcom2-all-tokens", "no-vidcom2"),
          "distillation": ("uts", "ce-only"),
          "downlink codec": ("uts", "dense-fp16")}
"""How the report groups the variants ("uts" is the default demo's settings)."""


def _round_size(cfg: DemoConfig) -> int:
    return min(32, cfg.samples_per_round)


def variant(name: str, cfg: DemoConfig, done: dict[str, dict[str, Any]]) -> Variant:
    """The settings of variant `name`; "random" takes its rate from the finished "uts" run."""
    size = _round_size(cfg)
    if name == "uts":
        return Variant(name)
    if name == "random":
        if "uts" not in done:
            raise ValueError("variant `random`: needs `uts` to run first (it matches UTS's "
                             f"measured upload rate); got order {list(done)}")
        rate = done["uts"]["uploaded_samples"] / max(1, done["uts"]["samples_seen"])
        return Variant(name, device={"sampler": "random", "sampler_options": {
            "round_size": size, "round_budget": max(1, round(rate * size))}})
    if name == "upload-all":
        return Variant(name, device={"sampler_options": {
            "mode": "budget", "round_size": size, "round_budget": size}})
    if name == "vidcom2-all-tokens":
        return Variant(name, device={
            "sampler_options": {"token_budget_bytes": UNCAPPED_TOKEN_BYTES}})
    if name == "no-vidcom2":
        return Variant(name, device={
            "compressor": "none", "sampler_options": {"token_budget_bytes": UNCAPPED_TOKEN_BYTES}})
    if name == "ce-only":
        return Variant(name, trainer=AKD_CE_ONLY)
    if name == "dense-fp16":
        return Variant(name, worker={"codec": "dense-fp16", "codec_options": {}})
    raise ValueError(f"ablation variant {name!r}: expected one of {NAMES}")


def full_adapter_bytes(path: Path) -> int:
    """fp16 bytes of every LoRA tensor of a stored adapter (a full-adapter download)."""
    with safe_open(str(path), "pt") as f:
        return sum(2 * _numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def summarize(run: Adaptation, ev: Evaluator, student: dict[str, float], v: Variant
              ) -> dict[str, Any]:
    """Final accuracy per device, uplink bytes, downlink bytes per round of one variant run."""
    per_device: dict[str, Any] = {}
    for dev, domain, _ in DEVICES:
        mine = [r for r in run.rows if r["device"] == dev and r["round"] > 0]
        last = max(r["round"] for r in mine)
        snap = run.snapshots[(dev, last)]
        acc = student if snap is None else ev.adapter(snap)
        up = sum(r["uploaded_samples"] for r in mine)
        per_device[dev] = {
            "domain": domain, "acc_shifted": acc[domain], "acc_source": acc["source"],
            "samples_seen": max(r["samples_seen"] for r in mine), "uploaded_samples": up,
            "uplink_bytes": sum(r["uplink_bytes"] for r in mine),
            "uplink_bytes_per_sample": sum(r["uplink_bytes"] for r in mine) / up if up else 0.0,
            "downlink_bytes_per_round": sum(r["downlink_bytes"] for r in mine) / len(mine),
            "updates_applied": sum(r["updates_applied"] for r in mine),
            "rollbacks": sum(r["rollbacks"] for r in mine),
            "withheld": sum(r.get("withheld", 0) for r in mine),
            "adapter_version": mine[-1]["adapter_version"],
        }
    devs = per_device.values()
    return {
        "name": v.name, "changes": {"device": v.device, "worker": v.worker,
                                    "trainer_options": v.trainer},
        "rounds": max(r["round"] for r in run.rows), "seconds": round(run.seconds, 1),
        "cloud_exit_code": run.cloud_exit,
        "device_exit_codes": {d.device_id: d.exit_codes for d in run.devices},
        "devices": per_device,
        "samples_seen": sum(d["samples_seen"] for d in devs),
        "uploaded_samples": sum(d["uploaded_samples"] for d in devs),
        "uplink_bytes": sum(d["uplink_bytes"] for d in devs),
        "downlink_bytes_per_round": sum(d["downlink_bytes_per_round"] for d in devs) / len(devs),
    }


def run_ablations(workdir: Path, cfg: DemoConfig, zoo: Any, ev: Evaluator,
                  student: dict[str, float], names: Sequence[str] = NAMES) -> dict[str, Any]:
    """Every variant in `names` (in order) at `cfg.ablation_rounds` rounds; the ablations dict.
    `student`: the un-adapted student's accuracies (a device whose updates all rolled back)."""
    for n in names:
        if n not in NAMES:
            raise ValueError(f"ablation variant {n!r}: expected one of {NAMES}")
    acfg = dataclasses.replace(cfg, rounds=min(cfg.rounds, cfg.ablation_rounds))
    done: dict[str, dict[str, Any]] = {}
    full: list[int] = []
    for n in names:
        v = variant(n, acfg, done)
        log.info("ablation %s: %s", n, {k: x for k, x in dataclasses.asdict(v).items() if x})
        run = adapt(workdir / n, acfg, zoo, v)
        done[n] = summarize(run, ev, student, v)
        if n == "uts":
            full += [full_adapter_bytes(p) for p in run.snapshots.values() if p is not None]
    return {
        "rounds": acfg.rounds, "samples_per_round": acfg.samples_per_round,
        "round_size": _round_size(acfg), "variants": done,
        "groups": {g: [n for n in ns if n in done] for g, ns in GROUPS.items()},
        "full_adapter_fp16_bytes_per_round": max(full) if full else None,
    }
