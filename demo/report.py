"""The demo's results as a table, a Markdown report, PNG plots and demo.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("round", "device", "domain", "acc_shifted", "acc_source", "served_shifted",
           "served_source", "samples_seen",
           "uploaded_samples", "uplink_bytes", "raw_frame_bytes", "downlink_bytes",
           "adapter_version", "rollbacks", "withheld", "round_s")


def _fmt(v: Any, column: str = "") -> str:
    if isinstance(v, float) and column == "round_s":
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the per-round, per-device rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plots(result: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png (per device vs round, with teacher and un-adapted student) and bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    devices = result["devices"]
    refs = result["references"]
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 4), squeeze=False)
    for ax, (dev, info) in zip(axes[0], devices.items(), strict=True):
        mine = [r for r in rows if r["device"] == dev]
        rounds = [r["round"] for r in mine]
        dom = info["domain"]
        ax.plot(rounds, [r["acc_shifted"] for r in mine], "o-", label=f"device on {dom}")
        ax.plot(rounds, [r["acc_source"] for r in mine], "s-", label="device on source")
        if all("served_shifted" in r for r in mine):
            ax.plot(rounds, [r["served_shifted"] for r in mine], "o--", color="C0", alpha=0.6,
                    label=f"as served (VidCom2 50%) on {dom}")
            ax.plot(rounds, [r["served_source"] for r in mine], "s--", color="C1", alpha=0.6,
                    label="as served on source")
        for name, style in (("teacher", "--"), ("student", ":")):
            ax.axhline(refs[name][dom], linestyle=style, color="k" if name == "teacher" else "gray",
                       label=f"{name} on {dom}")
        ax.set_title(f"{dev} ({dom})")
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    acc_png = out / "accuracy.png"
    fig.savefig(acc_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, dev in enumerate(devices):
        mine = [r for r in rows if r["device"] == dev and r["round"] > 0]
        up_x = [r["round"] + (2 * i - 1.5) * width for r in mine]
        down_x = [x + width for x in up_x]
        ax.bar(up_x, [r["uplink_bytes"] for r in mine], width, label=f"{dev} uplink")
        ax.bar(down_x, [r["downlink_bytes"] for r in mine], width, label=f"{dev} downlink")
        ax.scatter(up_x, [r["raw_frame_bytes"] for r in mine], marker="_", s=200, color="k",
                   label="raw frames of the uploaded samples" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["round"] for r in rows if r["round"] > 0}))
    ax.set_xlabel("round")
    ax.set_ylabel("bytes")
    ax.set_title("uplink (selected tokens) and downlink (DWC updates) per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bytes_png = out / "bytes.png"
    fig.savefig(bytes_png, dpi=100)
    plt.close(fig)
    return [acc_png, bytes_png]


def _short(changes: dict[str, Any]) -> str:
    """`key=value` of what a variant changes (nested tables flattened)."""
    flat: list[str] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            flat.append(f"{prefix}={v}")

    for where, v in changes.items():
        if v:
            walk(where, v)
    return ", ".join(f"`{f}`" for f in flat) or "default demo settings"


def ablation_table(ab: dict[str, Any]) -> str:
    """One Markdown row per (group, variant): final accuracy per device, bytes up and down."""
    devices = list(next(iter(ab["variants"].values()))["devices"].items())
    acc_cols = [f"{d} {info['domain']} / source" for d, info in devices]
    head = ["group", "variant", "changes", *acc_cols, "uploaded samples", "uplink bytes",
            "uplink B/sample", "downlink B/round", "rollbacks", "withheld"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, names in ab["groups"].items():
        for n in names:
            v = ab["variants"][n]
            ds = v["devices"].values()
            per_sample = v["uplink_bytes"] / v["uploaded_samples"] if v["uploaded_samples"] else 0
            lines.append("| " + " | ".join([
                group, n, _short(v["changes"]),
                *(f"{d['acc_shifted']:.3f} / {d['acc_source']:.3f}" for d in ds),
                str(v["uploaded_samples"]), str(v["uplink_bytes"]), f"{per_sample:.0f}",
                f"{v['downlink_bytes_per_round']:.0f}", str(sum(d["rollbacks"] for d in ds)),
                str(sum(d.get("withheld", 0) for d in ds)),
            ]) + " |")
    full = ab.get("full_adapter_fp16_bytes_per_round")
    if full is not None:
        lines.append("| downlink codec | full-adapter (computed) | every LoRA tensor in fp16 | "
                     + " | ".join("-" for _ in devices) + f" | - | - | - | {full} | - | - |")
    return "\n".join(lines)


def ablation_plot(ab: dict[str, Any], out: Path) -> Path:
    """ablations.png: final accuracy, uplink bytes and downlink bytes per round by variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ab["variants"])
    variants = [ab["variants"][n] for n in names]
    devices = list(variants[0]["devices"].items())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / (2 * len(devices))
    for j, (dev, info) in enumerate(devices):
        for k, (key, label) in enumerate((("acc_shifted", info["domain"]), ("acc_source",
                                                                            "source"))):
            x = [i + (2 * j + k - len(devices) + 0.5) * width for i in range(len(names))]
            axes[0].bar(x, [v["devices"][dev][key] for v in variants], width,
                        label=f"{dev} on {label}")
    axes[0].set_ylabel("final exact-match accuracy")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=6, loc="lower right")
    axes[1].bar(range(len(names)), [v["uplink_bytes"] for v in variants])
    axes[1].set_ylabel(f"uplink bytes, {ab['rounds']} round(s), both devices")
    down = [v["downlink_bytes_per_round"] for v in variants]
    axes[2].bar(range(len(names)), down)
    full = ab.get("full_adapter_fp16_bytes_per_round")
    if full is not None:
        axes[2].axhline(full, color="k", linestyle="--", label="full adapter fp16 (computed)")
        axes[2].legend(fontsize=7)
    axes[2].set_ylabel("downlink bytes per round per device")
    for ax in axes[1:]:
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e3)  # bars on a log axis need a floor; every byte count is above
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"ablations ({ab['rounds']} round(s) of {ab['samples_per_round']} samples each)")
    fig.tight_layout()
    png = out / "ablations.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def ablation_section(ab: dict[str, Any], out: Path) -> list[str]:
    """The report's "Ablations" section (and its PNG)."""
    ablation_plot(ab, out)
    return [
        "## Ablations", "",
        f"`python -m demo --ablations`: each variant is a fresh run of the same loop (new "
        f"certificates, stores and devices) with one setting changed, {ab['rounds']} round(s) of "
        f"{ab['samples_per_round']} samples per device (fewer rounds than the demo so that all "
        "variants fit in about 16 minutes on 2 cores), evaluated on the same held-out sets. "
        "Accuracy is each device's final adapter; bytes are summed over both devices "
        "(uplink) or averaged over devices and rounds (downlink).", "",
        f"- `random` uploads the same share of samples UTS uploaded in `uts` (per round of "
        f"{ab['round_size']}), with the same per-sample token byte budget; `upload-all` sends "
        "every sample.",
        "- `vidcom2-all-tokens` vs `no-vidcom2`: the per-sample token budget is lifted in both, "
        "so the uplink carries every token the compressor kept (with the default budget both "
        "would send the same tokens per sample); the device also answers with that compressor.",
        "- `ce-only`: the `akd` trainer with `kl_weight = feature_weight = 0` (pseudo-label "
        "cross-entropy only, as in bench/akd.py).",
        "- `full-adapter` is not a codec the device decodes: its row is the fp16 size of every "
        "LoRA tensor of the stored adapter, computed, not transmitted, for one version; "
        "`downlink B/round` of the other rows sums every update a device received in the round "
        "(applied, rolled back or rejected), and a round can carry more than one version.", "",
        ablation_table(ab), "", "![ablations](ablations.png)", "",
    ]


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """demo.json, report.md and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(result, out)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    refs = result["references"]
    ref_lines = [f"| {name} | " + " | ".join(f"{refs[name][d]:.3f}" for d in result["eval_domains"])
                 + " |" for name in ("teacher", "student")]
    s = result["settings"]
    md = [
        "# CDCA demo", "",
        f"Command: `{result['command']}`; wall time {result['wall_s']:.0f} s; trainer "
        f"`{s['trainer']}`; zoo `{s['zoo']}`; {s['rounds']} rounds of {s['samples_per_round']} "
        f"samples per device; cloud exit code {result['cloud_exit_code']}.", "",
        "Real processes on 127.0.0.1 with mutual TLS: one `cloud-server`, two `device-agent`s "
        "(each `register`, then per round a `run` over its shifted stream and a short `run` that "
        "downloads, verifies, probes and applies the round's update).", "",
        "## References (held-out, exact match, uncompressed)", "",
        "| model | " + " | ".join(result["eval_domains"]) + " |",
        "|---|" + "---|" * len(result["eval_domains"]), *ref_lines, "",
        "## Per round and device", "",
        "Round 0 is the un-adapted student. Accuracy: the adapter version the device stored at "
        "the end of the round, evaluated on held-out samples of its shifted domain and of source "
        f"({s['eval_samples']} each). `samples_seen` is the "
        "stream position (cumulative); the other counts and bytes are per round; "
        "`raw_frame_bytes` is what the uploaded samples' raw uint8 frames would have cost; "
        "`withheld`: the cloud finished the device's round but published nothing (a check "
        "before publishing failed"
        + (f": above all, losing more than {s['source_check_margin']:.2f} of accuracy on "
           f"{s['source_check_samples']} held-out source videos" if s.get("source_check_samples")
           else "") + ").", "",
        table(result["rows"]), "",
        "Device probe (source accuracy of the serving model before -> after each update, "
        f"{s['probe_samples']} samples; an update more than {s['rollback_margin']:.2f} worse is "
        "rolled back):", "",
        *[f"- round {r['round']} {r['device']}: " + ", ".join(
            f"{b:.3f} -> {a:.3f}" for b, a in r["probes"] if a is not None and b is not None)
          for r in result["rows"] if r.get("probes")], "",
        "![accuracy](accuracy.png)", "", "![bytes](bytes.png)", "",
        *(ablation_section(result["ablations"], out) if "ablations" in result else []),
        "## Notes", "", *[f"- {n}" for n in result["notes"]], "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return {"json": out / "demo.json", "md": out / "report.md", "plots": pngs[0]}
