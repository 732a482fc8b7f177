"""CLI: `python -m cloud.zoo train [--zoo default] [--commit]` and `python -m cloud.zoo eval`.

`train` trains the named zoo into `.cache/zoo/<config-hash>/` (or reuses it) and with
`--commit` copies the checkpoints to `zoo/<name>/`. `eval` prints per-domain, per-question-type
exact-match accuracy of the teacher and student (or of `--model DIR`, any checkpoint directory
`load_vlm` accepts) and writes the JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("cloud.zoo")


def _train(args: argparse.Namespace) -> int:
    from shared.models.evaluate import format_table
    from shared.models.zoo import COMMITTED, DEFAULT_CACHE, REPORT_FILE, train_zoo, zoo_config

    cfg = zoo_config(args.zoo)
    cache = Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    target = cache / cfg.key()
    if args.force or not (target / REPORT_FILE).is_file():
        t0 = time.perf_counter()
        report = train_zoo(cfg, target, progress=True, evaluate_after=not args.no_eval,
                           name=args.zoo)
        log.info("trained zoo %r in %.1f s (wall, incl. eval) -> %s", args.zoo,
                 time.perf_counter() - t0, target)
    else:
        report = json.loads((target / REPORT_FILE).read_text())
        log.info("zoo %r already in %s (key %s)", args.zoo, target, cfg.key())
    sys.stdout.write(json.dumps({"zoo": args.zoo, "dir": str(target),
                                 "timings_s": report["timings_s"],
                                 "train_seconds": report["train_seconds"]}, indent=2) + "\n")
    for role, res in report.get("eval", {}).items():
        sys.stdout.write(format_table({f"{role}/{k}": v for k, v in res.items()}) + "\n\n")
    if args.commit:
        dest = COMMITTED / args.zoo
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(target, dest)
        log.info("copied to %s", dest)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from shared.media import procedural as P
    from shared.models.checkpoint import load_vlm
    from shared.models.evaluate import evaluate, first_frame_only, format_table
    from shared.models.zoo import ensure_zoo, heldout_seed, zoo_config

    cfg = zoo_config(args.zoo)
    if args.model:
        models = {Path(args.model).name: Path(args.model)}
    else:
        paths = ensure_zoo(args.zoo, args.cache_dir, progress=True)
        models = {"teacher": paths.teacher, "student": paths.student}
    gen = P.GeneratorConfig(frame_size=cfg.image_size, num_frames=cfg.num_frames)
    domains = args.domains.split(",") if args.domains else list(P.DOMAINS)
    results = {}
    for name, path in models.items():
        loaded = load_vlm(path, quantization=args.quantization)
        for kind in args.media.split(","):
            seed = args.seed if args.seed >= 0 else heldout_seed(cfg)
            samples = [s for d in domains for s in P.batch(d, args.n, seed, kind, gen)]
            t0 = time.perf_counter()
            results[f"{name}/{kind}"] = evaluate(loaded, samples, batch_size=args.batch_size)
            if kind == "video" and args.first_frame:
                results[f"{name}/video_first_frame"] = evaluate(
                    loaded, first_frame_only(samples), batch_size=args.batch_size)
            log.info("%s/%s: %d samples in %.1f s", name, kind, len(samples),
                     time.perf_counter() - t0)
    sys.stdout.write(format_table(results) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on configuration errors)."""
    from shared.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m cloud.zoo", description=__doc__)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train (or reuse) a zoo")
    tr.add_argument("--zoo", default="default")
    tr.add_argument("--cache-dir", default=None)
    tr.add_argument("--force", action="store_true", help="retrain even if cached")
    tr.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    tr.add_argument("--commit", action="store_true", help="copy the result to zoo/<name>/")
    ev = sub.add_parser("eval", help="accuracy per domain and question type")
    ev.add_argument("--zoo", default="default")
    ev.add_argument("--cache-dir", default=None)
    ev.add_argument("--model", default=None, help="a checkpoint directory instead of the zoo")
    ev.add_argument("--media", default="video,image", help="video,image")
    ev.add_argument("--domains", default="", help="comma list (default: all)")
    ev.add_argument("--n", type=int, default=200, help="samples per domain and media kind")
    ev.add_argument("--seed", type=int, default=-1,
                    help="stream seed (default: the zoo's held-out set)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--first-frame", action="store_true",
                    help="also evaluate videos reduced to their first frame")
    ev.add_argument("--quantization", default="none")
    ev.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        return _train(args) if args.cmd == "train" else _eval(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
