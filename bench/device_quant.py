"""Device student on compressed bases: memory and latency per sample for fp32, torch dynamic int8,
bitsandbytes int8 and NF4 4-bit (vision tower fp32 in all), plus exact-match accuracy.

Not a timed test: latencies depend on what else runs on the cores.

Each mode runs in its own child process so resident-memory figures do not mix. Per mode: weight
bytes (parameters + buffers + packed int8 weights), RSS growth from loading the model, peak RSS
during inference, and median / p90 wall time of one compressed answer (batch 1, VidCom2 at 25 %,
greedy, one thread) over procedural samples of every domain.

Usage:
    python -m bench.device_quant --checkpoint zoo/default/student --out reports/device_quant
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.device_quant")

MODES = ("fp32", "int8_dynamic", "bnb8", "bnb4")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _one(checkpoint: Path, mode: str, samples: int, threads: int, keep_ratio: float,
         original_positions: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import warnings

    from device.compress import COMPRESSORS
    from device.inputs import ProceduralInput, generator_for
    from device.runtime.inference import DeviceInference
    from device.runtime.loader import StudentConfig, load_student, model_bytes
    from shared.media import procedural as P

    with warnings.catch_warnings():  # import every backend first: RSS growth = the model only
        warnings.simplefilter("ignore")
        import bitsandbytes  # noqa: F401
        import torch.ao.nn.quantized.dynamic  # noqa: F401
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    st = load_student(StudentConfig(checkpoint, quantization=mode))
    load_s = time.perf_counter() - t0
    rss_model = _rss_bytes() - rss0
    inf = DeviceInference(st, COMPRESSORS.build("vidcom2", {"keep_ratio": keep_ratio}), 3,
                          original_positions=original_positions)
    pc = st.processor.config
    src = ProceduralInput(list(P.DOMAINS), 4242, "video",
                          generator=generator_for(pc.image_size, pc.num_frames))
    items = [src.item(i) for i in range(samples + 2)]
    times, right = [], 0
    for i, item in enumerate(items):
        t = time.perf_counter()
        r = inf.run([item.frames], [item.question], [item.sample_id])[0]
        if i >= 2:  # two warm-up samples
            times.append(time.perf_counter() - t)
            right += r.answer == item.answer
    times.sort()
    return {
        "mode": mode, "weight_bytes": model_bytes(st.model),
        "llm_weight_bytes": model_bytes(st.model.get_base_model().model.language_model),
        "load_rss_bytes": rss_model,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_s": round(load_s, 3), "latency_median_ms": round(1e3 * statistics.median(times), 2),
        "latency_p90_ms": round(1e3 * times[int(0.9 * (len(times) - 1))], 2),
        "accuracy": right / samples, "samples": samples, "threads": threads,
    }


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["mode"] for r in rows]
    ax[0].bar(names, [r["weight_bytes"] / 2**20 for r in rows], color="tab:blue", label="all")
    ax[0].bar(names, [r["llm_weight_bytes"] / 2**20 for r in rows], color="tab:cyan",
              label="LLM part")
    ax[0].set_ylabel("MiB")
    ax[0].set_title("weights (LLM quantized, vision fp32)")
    ax[0].legend()
    ax[1].bar(names, [r["latency_median_ms"] for r in rows], color="tab:orange",
              yerr=[[0] * len(rows), [r["latency_p90_ms"] - r["latency_median_ms"] for r in rows]])
    ax[1].set_ylabel("ms / sample")
    ax[1].set_title("latency (median, whisker to p90)")
    ax[2].bar(names, [r["accuracy"] for r in rows], color="tab:green")
    ax[2].set_ylim(0, 1)
    ax[2].set_title("exact-match accuracy")
    for a in ax:
        a.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run every mode in a child process; print and write the JSON report and the PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path("zoo/default/student"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--original-positions", action="store_true")
    p.add_argument("--out", type=Path, default=Path("reports/device_quant"))
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        row = _one(args.checkpoint, args.one, args.samples, args.threads, args.keep_ratio,
                   args.original_positions)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    rows = []
    for mode in args.modes:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.device_quant", "--one", mode, "--checkpoint",
             str(args.checkpoint), "--samples", str(args.samples), "--threads",
             str(args.threads), "--keep-ratio", str(args.keep_ratio),
             *(["--original-positions"] if args.original_positions else [])],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = [r for r in rows if "error" not in r]
    report = {"checkpoint": str(args.checkpoint), "keep_ratio": args.keep_ratio,
              "original_positions": args.original_positions, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_quant.json").write_text(json.dumps(report, indent=2) + "\n")
    if ok:
        _plot(ok, args.out / "device_quant.png")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
