"""Train a student for the device figures with the zoo's own pipeline, on a longer schedule.

Same task, data generator, architecture and stages as `shared.models.zoo` (stage A vision tower +
projector, then the student LM on `source` over the frozen visual tokens); only the schedule is
longer. Used while the committed zoo student was near chance. Writes `<out>/student`.

Usage:
    python -m bench.device_figures_student /tmp/figures 3000 1500 3000   # out, videos/domain,
                                                                           # vision steps, LM steps
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from shared.models.architectures import build_vlm
from shared.models.checkpoint import save_vlm
from shared.models.pretrain import (
    StageSchedule,
    cache_visual_tokens,
    copy_visual,
    train_language,
    train_vision,
)
from shared.models.processor import VLMProcessor
from shared.models.zoo import ZooConfig, make_tokenizer_ids, training_data

log = logging.getLogger("bench.device_figures_student")


def main(argv: list[str] | None = None) -> int:
    """Train and save; prints a JSON line of timings and losses."""
    args = sys.argv[1:] if argv is None else argv
    out, videos, vision_steps, lm_steps = Path(args[0]), int(args[1]), int(args[2]), int(args[3])
    torch.set_num_threads(2)
    cfg = ZooConfig(train_videos_per_domain=videos,
                    vision=StageSchedule(vision_steps, 2e-3, 128),
                    student=StageSchedule(lm_steps, 2e-3, 32))
    t0 = time.time()
    tok, ids = make_tokenizer_ids()
    teacher = build_vlm(cfg.spec("teacher"), ids, cfg.seed)  # only its tower is trained here
    student = build_vlm(cfg.spec("student"), ids, cfg.seed + 1)
    proc = VLMProcessor.from_spec(cfg.spec("teacher"), tok)
    data = training_data(cfg)
    stage_a = train_vision(teacher, proc, data, cfg.vision, cfg.seed, False)
    copy_visual(teacher, student)
    src = [s for s in data if s.domain == "source"]
    tokens = cache_visual_tokens(teacher, proc, src, progress=False)
    loss = train_language(student, proc, src, tokens, cfg.student, cfg.seed + 3, "student", False)
    save_vlm(student, proc, out / "student",
             {"role": "student", "note": "bench.device_figures_student", "zoo_config":
              cfg.to_dict(), "trained_domains": ["source"]})
    sys.stdout.write(json.dumps({"seconds": round(time.time() - t0, 1), "stage_a": stage_a,
                                 "student_loss": loss}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
