"""The model zoo: named teacher/student pairs, trained by the project and cached by config hash.

`ensure_zoo("default")` returns the committed checkpoints in `zoo/default/` when their
`zoo_key` matches the config, else the cache `.cache/zoo/<key>/`, training it there when absent.
`ensure_zoo("test")` builds a tiny pair in seconds for the test suite. Layout of a zoo dir:
`teacher/`, `student/` (checkpoint directories, see `shared.models.checkpoint`) and
`zoo_report.json` (timings and held-out accuracies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import ConfigError
from shared.media import procedural as P
from shared.models import tokenizer as T
from shared.models.architectures import TokenIds, VLMSpec, build_vlm
from shared.models.checkpoint import load_vlm, save_vlm
from shared.models.evaluate import evaluate, first_frame_only
from shared.models.pretrain import (
    StageSchedule,
    Stopwatch,
    cache_visual_tokens,
    copy_visual,
    standardize_projector,
    train_language,
    train_vision,
)
from shared.models.processor import VLMProcessor

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "zoo"
COMMITTED = REPO_ROOT / "zoo"
REPORT_FILE = "zoo_report.json"


@dataclass(frozen=True, slots=True)
class ZooConfig:
    """Sizes, data and schedules of one zoo; its hash keys the cache."""

    architecture: str = "llava_onevision"
    seed: int = 0
    image_size: int = 48
    patch_size: int = 8
    num_frames: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 3
    text_hidden: int = 128
    text_heads: int = 4
    text_kv_heads: int = 2
    teacher_layers: int = 6
    teacher_intermediate: int = 512
    student_layers: int = 2
    student_intermediate: int = 128
    train_videos_per_domain: int = 2000
    train_images_per_domain: int = 600
    student_videos: int = 6000
    """Source videos of the student's stage C (a longer prefix of the same stream as the
    teacher's source share): with 2,000 the small student memorised them (train loss 0.12,
    held-out source 0.71)."""
    student_images: int = 1800
    eval_per_domain: int = 200
    """Held-out samples per domain and media kind for the report."""
    prompt_layout: str = "question_both"
    """See `shared.models.processor`: the question before the visual block lets the visual
    tokens attend to it (the flash question went from chance to 0.9 held out), the copy after
    it keeps text tokens that attend to the visual ones (SparseVLM's raters, UTS)."""
    aux_weight: float = 1.0
    """Weight of the per-visual-token auxiliary loss of stages B/C (`pretrain.token_targets`);
    without it count, exists and direction stayed near chance (teacher 0.63 on video)."""
    token_drop: float = 0.0
    """Share of stage B/C batches that keep only a random 10-60% of each sample's visual tokens,
    at their full-prompt positions (`pretrain.train_language`): devices serve VidCom2-compressed
    tokens and upload fewer still. LLaVA-OV only (1-D positions)."""
    vision: StageSchedule = field(default_factory=lambda: StageSchedule(600, 2e-3, 128))
    teacher: StageSchedule = field(
        default_factory=lambda: StageSchedule(1500, 2e-3, 32, warmup=50))
    student: StageSchedule = field(
        default_factory=lambda: StageSchedule(2000, 2e-3, 32, warmup=50))

    def __post_init__(self) -> None:
        if self.aux_weight < 0:
            raise ConfigError(f"`aux_weight` must be >= 0, got {self.aux_weight}")
        if not 0.0 <= self.token_drop <= 1.0:
            raise ConfigError(f"`token_drop` must be in [0, 1], got {self.token_drop}")
        if self.token_drop > 0 and self.architecture != "llava_onevision":
            raise ConfigError("`token_drop` > 0 needs 1-D RoPE positions (llava_onevision), "
                              f"got architecture {self.architecture!r}")
        for name in ("train_videos_per_domain", "train_images_per_domain", "eval_per_domain",
                     "student_videos", "student_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.student_layers * self.student_intermediate >= (
                self.teacher_layers * self.teacher_intermediate):
            raise ConfigError("the student language model must be smaller than the teacher's "
                              f"(student {self.student_layers} x {self.student_intermediate}, "
                              f"teacher {self.teacher_layers} x {self.teacher_intermediate})")
        self.spec("teacher")  # validates sizes

    def spec(self, role: str) -> VLMSpec:
        """`VLMSpec` of the teacher or the student."""
        if role not in ("teacher", "student"):
            raise ConfigError(f"`role` must be 'teacher' or 'student', got {role!r}")
        layers = self.teacher_layers if role == "teacher" else self.student_layers
        inter = self.teacher_intermediate if role == "teacher" else self.student_intermediate
        return VLMSpec(
            architecture=self.architecture, image_size=self.image_size,
            patch_size=self.patch_size, vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers, vision_heads=self.vision_heads,
            text_hidden=self.text_hidden, text_layers=layers, text_heads=self.text_heads,
            text_kv_heads=self.text_kv_heads, text_intermediate=inter,
            num_frames=self.num_frames)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able)."""
        return asdict(self)

    def key(self) -> str:
        """16 hex digits of sha256 over the config JSON (and the data generator version).

        Fields added after zoos were trained (`KEY_SINCE_ADDED`) enter the hash only when set
        away from their default: a zoo trained before the field existed keeps its key."""
        config = self.to_dict()
        for stage in ("vision", "teacher", "student"):
            for name, default in KEY_SINCE_ADDED.items():
                if config[stage][name] == default:
                    del config[stage][name]
        payload = json.dumps({"config": config, "data": DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


KEY_SINCE_ADDED: dict[str, Any] = {"precision": "fp32"}
"""`StageSchedule` fields newer than the committed zoo, with the default that leaves a key
unchanged."""

DATA_VERSION = "procedural-v2+std+cachedB+aux"
"""Bump when the generator changes what a (domain, seed, index) produces."""

ZOOS: dict[str, ZooConfig] = {
    # stage B (the teacher's language model, ~60% of an fp32 run's time) in bf16: 1.4x faster
    # where the CPU has bf16 matmuls (AVX512-BF16, AMX), a better teacher (zoo/README.md)
    "default": ZooConfig(
        token_drop=0.5, teacher=StageSchedule(1500, 2e-3, 32, warmup=50, precision="bf16")),
    # the same in fp32 throughout (the previous default, key 02804e2efd188775): for CPUs that
    # emulate bf16; the same tower and student bit for bit, a different teacher
    "default-fp32": ZooConfig(token_drop=0.5),
    # "test" trains without the auxiliary loss: in its 10 steps it only perturbs the tiny
    # models the replay and adaptation tests were calibrated on; "test-qwen2vl" keeps it
    "test": ZooConfig(
        vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_heads=2,
        text_kv_heads=1, teacher_layers=2, teacher_intermediate=64, student_layers=1,
        student_intermediate=32, train_videos_per_domain=24, train_images_per_domain=8,
        student_videos=32, student_images=8, aux_weight=0.0,
        eval_per_domain=4, vision=StageSchedule(8, 2e-3, 16, warmup=2),
        teacher=StageSchedule(10, 2e-3, 8, warmup=2),
        student=StageSchedule(10, 2e-3, 8, warmup=2)),
    "test-qwen2vl": ZooConfig(
        architecture="qwen2_vl",
        vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_heads=2,
        text_kv_heads=1, teacher_layers=2, teacher_intermediate=64, student_layers=1,
        student_intermediate=32, train_videos_per_domain=24, train_images_per_domain=8,
        student_videos=32, student_images=8,
        eval_per_domain=4, vision=StageSchedule(8, 2e-3, 16, warmup=2),
        teacher=StageSchedule(10, 2e-3, 8, warmup=2),
        student=StageSchedule(10, 2e-3, 8, warmup=2)),
}


@dataclass(frozen=True, slots=True)
class ZooPaths:
    """Checkpoint directories of one zoo."""

    teacher: Path
    student: Path
    root: Path

    @property
    def report(self) -> Path:
        """`zoo_report.json` written by training."""
        return self.root / REPORT_FILE


def zoo_config(name: str) -> ZooConfig:
    """The registered config called `name`."""
    if name not in ZOOS:
        raise ConfigError(f"unknown zoo {name!r}; known: {sorted(ZOOS)}")
    return ZOOS[name]


def _complete(root: Path, key: str) -> bool:
    meta = root / "teacher" / "cdca_meta.json"
    if not (meta.is_file() and (root / "student" / "cdca_meta.json").is_file()):
        return False
    return json.loads(meta.read_text()).get("zoo_key") == key


def ensure_zoo(name: str = "default", cache_dir: str | Path | None = None,
               progress: bool = False, evaluate_after: bool | None = None) -> ZooPaths:
    """Paths of zoo `name`: committed copy, else cache, else trained now into the cache."""
    cfg = zoo_config(name)
    key = cfg.key()
    committed = COMMITTED / name
    if _complete(committed, key):
        return ZooPaths(committed / "teacher", committed / "student", committed)
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    target = root / key
    if not _complete(target, key):
        log.info("training zoo %r (key %s) into %s", name, key, target)
        if evaluate_after is None:
            evaluate_after = not name.startswith("test")
        train_zoo(cfg, target, progress=progress, evaluate_after=evaluate_after, name=name)
    return ZooPaths(target / "teacher", target / "student", target)


def make_tokenizer_ids() -> tuple[Any, TokenIds]:
    """The task tokenizer and the special ids the model configs use."""
    tok = T.train_tokenizer()
    c = tok.convert_tokens_to_ids
    ids = TokenIds(pad=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id,
                   image=c(T.IMAGE), video=c(T.VIDEO), vision_start=c(T.VISION_START),
                   vision_end=c(T.VISION_END), vocab_size=len(tok))
    return tok, ids


def training_data(cfg: ZooConfig, domains: tuple[str, ...] = P.DOMAINS,
                  videos: int | None = None, images: int | None = None,
                  start: tuple[int, int] = (0, 0)) -> list[P.QASample]:
    """Training samples of every domain (video then image), fixed by the zoo seed: per domain,
    stream items `start .. videos - 1` (images likewise); default counts: the teacher's."""
    gen = P.GeneratorConfig(frame_size=cfg.image_size, num_frames=cfg.num_frames)
    n_v = cfg.train_videos_per_domain if videos is None else videos
    n_i = cfg.train_images_per_domain if images is None else images
    out: list[P.QASample] = []
    for d in domains:
        out += P.batch(d, max(0, n_v - start[0]), cfg.seed * 1000 + 1, "video", gen, start[0])
        out += P.batch(d, max(0, n_i - start[1]), cfg.seed * 1000 + 1, "image", gen, start[1])
    return out


def heldout_seed(cfg: ZooConfig) -> int:
    """Stream seed of the held-out evaluation data (training uses seed * 1000 + 1)."""
    return cfg.seed * 1000 + 999


def heldout_data(cfg: ZooConfig, media_kind: str) -> list[P.QASample]:
    """Held-out evaluation samples (a different seed from training) of every domain."""
    gen = P.GeneratorConfig(frame_size=cfg.image_size, num_frames=cfg.num_frames)
    return [s for d in P.DOMAINS
            for s in P.batch(d, cfg.eval_per_domain, heldout_seed(cfg), media_kind, gen)]


def train_zoo(cfg: ZooConfig, out_dir: str | Path, progress: bool = True,
              evaluate_after: bool = True, name: str = "") -> dict[str, Any]:
    """Train teacher + student of `cfg` into `out_dir`; returns (and writes) the report."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    watch = Stopwatch()
    torch.manual_seed(cfg.seed)
    tok, ids = make_tokenizer_ids()
    teacher = build_vlm(cfg.spec("teacher"), ids, cfg.seed)
    student = build_vlm(cfg.spec("student"), ids, cfg.seed + 1)
    proc = VLMProcessor.from_spec(cfg.spec("teacher"), tok, cfg.prompt_layout)
    data = training_data(cfg)
    watch.lap("data")
    stage_a = train_vision(teacher, proc, data, cfg.vision, cfg.seed, progress)
    standardize_projector(teacher, proc, data)
    watch.lap("stage_a_vision")
    tokens = cache_visual_tokens(teacher, proc, data, progress=progress)
    watch.lap("cache_tokens")
    loss_t = train_language(teacher, proc, data, tokens, cfg.teacher, cfg.seed + 2,
                            "stage B teacher", progress, cfg.aux_weight, cfg.token_drop)
    watch.lap("stage_b_teacher")
    vhash = copy_visual(teacher, student)
    src = [i for i, s in enumerate(data) if s.domain == "source"]
    # the student's source data: the teacher's source share, then the rest of the same stream
    more = training_data(cfg, ("source",), cfg.student_videos, cfg.student_images,
                         start=(cfg.train_videos_per_domain, cfg.train_images_per_domain))
    more_tokens = cache_visual_tokens(teacher, proc, more, progress=progress)
    loss_s = train_language(student, proc, [data[i] for i in src] + more,
                            [tokens[i] for i in src] + more_tokens,
                            cfg.student, cfg.seed + 3, "stage C student", progress,
                            cfg.aux_weight, cfg.token_drop)
    watch.lap("stage_c_student")
    common = {"zoo": name, "zoo_key": cfg.key(), "zoo_config": cfg.to_dict(),
              "data_version": DATA_VERSION, "vision_sha256_fp32_train": vhash}
    for role, model in (("teacher", teacher), ("student", student)):
        n_params = sum(p.numel() for p in model.model.language_model.parameters())
        save_vlm(model, proc, tmp / role,
                 {**common, "role": role, "spec": cfg.spec(role).to_dict(),
                  "language_model_params": n_params,
                  "trained_domains": list(P.DOMAINS) if role == "teacher" else ["source"]})
    watch.lap("save")
    report: dict[str, Any] = {
        "zoo": name, "zoo_key": cfg.key(), "timings_s": watch.times,
        "train_seconds": round(sum(watch.times.values()), 1),
        "threads": torch.get_num_threads(),
        "final_losses": {"stage_a": stage_a, "teacher": loss_t, "student": loss_s},
    }
    if evaluate_after:
        report["eval"] = evaluate_zoo(tmp / "teacher", tmp / "student", cfg)
        watch.lap("eval")
        report["timings_s"] = watch.times
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return report


def evaluate_zoo(teacher_dir: Path, student_dir: Path, cfg: ZooConfig,
                 batch_size: int = 64) -> dict[str, Any]:
    """Held-out accuracy of both models: videos, first-frame-only videos, images."""
    videos = heldout_data(cfg, "video")
    images = heldout_data(cfg, "image")
    first = first_frame_only(videos)
    res: dict[str, Any] = {}
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        loaded = load_vlm(path)
        res[role] = {
            "video": evaluate(loaded, videos, batch_size=batch_size),
            "video_first_frame_only": evaluate(loaded, first, batch_size=batch_size),
            "image": evaluate(loaded, images, batch_size=batch_size),
        }
    return res
