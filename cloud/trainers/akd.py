"""The "akd" trainer: AKD rounds from the zoo teacher into the zoo student's LoRA adapters.

The adapter layout is the device's (device/runtime/loader.py `StudentConfig` defaults: peft LoRA
r=8, alpha=16, dropout 0 on the LLM's attention/MLP projections, A matrices drawn under
`torch.manual_seed(lora_seed)` right before `get_peft_model`), so version 0 here equals a fresh
device's version 0 bit for bit and every update decodes onto the weights the device serves. The
values are copied, not imported: the cloud never imports the device package.

With `nproc_per_node` 1 (the default) a round runs in the worker's process on models loaded once:
teacher labels come from the label cache (the teacher is loaded on the first miss), then
`AdapterDistiller.fit` trains the LoRA weights, checkpointing through the JobContext every
`checkpoint_every` steps so that a stopped or crashed round resumes at its last checkpoint with
the same batches. With more ranks a round is a torchrun job (cloud/distributed/trainer.py),
checkpointed once at its end. Either way `replay_ratio` of every batch comes from a pool of
procedural source-domain samples encoded by the student's vision tower when the trainer is built
(cloud/distill/replay.py), labelled (teacher-forced on their true answers) and cached like
uploads, so a round on a shifted domain forgets less of the source domain. Before an
in-process round is published it can be checked (`holdout_share`: teacher-label loss on uploads
kept out of training; `source_check_samples`: exact-match accuracy on held-out source videos);
a round that fails a check is returned withheld, and the worker publishes nothing. peft and
transformers are imported only when the trainer is built, so a daemon with another trainer
starts without them.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloud.distill.replay import ReplayConfig
from cloud.trainers.base import JobContext, StateDict, TrainResult
from shared.errors import ConfigError, WireFormatError
from shared.types import UploadSample

DEVICE_LORA_TARGETS = (r".*language_model.*\."
                       r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
"""Equal to device/runtime/loader.py `StudentConfig.lora_targets` (tests/integration checks)."""
FEATURE_SPACE = "projected"
"""What devices upload: post-projector tokens of the vision tower + projector both sides share."""


@dataclass(frozen=True, slots=True)
class AkdTrainerConfig:
    """Options of the "akd" trainer (`[worker.trainer_options]` in cloud.toml)."""

    zoo: str = "default"
    """Zoo whose teacher/student are used when `student_dir`/`teacher_dir` are empty."""
    student_dir: str = ""
    """Student checkpoint (HF save_pretrained + processor files); the devices' base model."""
    teacher_dir: str = ""
    work_dir: str = ""
    """Per-job directories; empty: a fresh temporary directory per daemon."""
    label_cache_dir: str = ""
    """Teacher label cache reused across rounds; empty: <work_dir>/labels."""
    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 4
    replay_ratio: float = 0.25
    """Share of each batch drawn from the source-domain replay pool (0: no replay)."""
    replay_samples: int = 64
    """Size of the replay pool (procedural samples encoded by the student's vision tower)."""
    replay_domain: str = "source"
    replay_seed: int = 1
    """Procedural stream of the pool (1: the zoo's source training stream)."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = DEVICE_LORA_TARGETS
    lora_seed: int = 0
    """Seed of version 0's LoRA A matrices; must equal the devices' `lora_seed`."""
    nproc_per_node: int = 1
    """1: rounds run in the worker's process; N > 1: torchrun jobs with N ranks."""
    threads_per_rank: int = 1
    checkpoint_every: int = 10
    """Steps between checkpoints of an in-process round (its last step always checkpoints)."""
    holdout_share: float = 0.0
    """Share of a round's uploads kept out of training (chosen by sample-id hash) to check the
    new adapter: a round whose teacher-label cross-entropy on them does not fall is withheld,
    not published. Devices cannot see their own domain's accuracy (no labels); this check can.
    0: off. In-process rounds only (`nproc_per_node` 1)."""
    source_check_samples: int = 0
    """Procedural `source` videos (stream `source_check_seed`) the student answers with the
    round's start and end adapters before the round is published: a round whose exact-match
    accuracy on them falls by more than `source_check_margin` is withheld. What a device's
    source probe would roll back, caught before a byte goes down and on more samples than a
    device probes. 0: off. In-process rounds only (`nproc_per_node` 1)."""
    source_check_margin: float = 0.02
    source_check_seed: int = 8675
    """A stream nothing else draws from (training is 1, the zoo's held-out set 999)."""
    akd: dict[str, Any] = field(default_factory=dict)
    """Further AKDConfig options (temperature, loss weights, ...)."""
    labelling: dict[str, Any] = field(default_factory=dict)
    """LabellingConfig options (e.g. max_new_tokens of the teacher)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lora_r", "lora_alpha", "nproc_per_node",
                     "threads_per_rank", "checkpoint_every", "replay_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"`lr` must be > 0, got {self.lr}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"`replay_ratio` must be in [0, 1), got {self.replay_ratio}")
        if not 0.0 <= self.holdout_share < 1.0:
            raise ConfigError(f"`holdout_share` must be in [0, 1), got {self.holdout_share}")
        if self.source_check_samples < 0:
            raise ConfigError("`source_check_samples` must be >= 0, got "
                              f"{self.source_check_samples}")
        if not 0.0 <= self.source_check_margin <= 1.0:
            raise ConfigError("`source_check_margin` must be in [0, 1], got "
                              f"{self.source_check_margin}")
        for name in ("holdout_share", "source_check_samples"):
            if getattr(self, name) > 0 and self.nproc_per_node > 1:
                raise ConfigError(f"`{name}` > 0 needs in-process rounds (`nproc_per_node` 1), "
                                  f"got nproc_per_node {self.nproc_per_node}")
        self.replay_config()
        for name in ("akd", "labelling"):
            clash = {"steps", "lr", "batch_size", "replay_ratio", "seed"} & set(getattr(self, name))
            if clash:
                raise ConfigError(f"`{name}`: set {sorted(clash)} as top-level options")

    def replay_config(self) -> ReplayConfig:
        """What the replay pool holds."""
        return ReplayConfig(samples=self.replay_samples, domain=self.replay_domain,
                            seed=self.replay_seed)

    def source_check_config(self) -> ReplayConfig:
        """What the source check answers (encoded like the replay pool)."""
        return ReplayConfig(samples=self.source_check_samples, domain="source",
                            seed=self.source_check_seed)


def holdout_split(samples: list[Any], share: float) -> tuple[list[Any], list[Any]]:
    """(train, held out): about `share` of the samples, those whose sha256(sample_id) is lowest,
    so a resumed round holds out the same ones. Rounds under 4 samples hold none out."""
    n_held = min(round(share * len(samples)), len(samples) - 1) if len(samples) >= 4 else 0
    if n_held == 0:
        return list(samples), []
    ranked = sorted(range(len(samples)),
                    key=lambda i: hashlib.sha256(samples[i].sample_id.encode()).digest())
    held = set(ranked[:n_held])
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


class AkdTrainer:
    """`cloud.trainers.Trainer` over the AKD job trainer, in the device's adapter layout."""

    def __init__(self, cfg: AkdTrainerConfig) -> None:
        from cloud.distributed.trainer import AkdJobConfig, AkdJobTrainer  # peft: seconds
        from shared.models.zoo import ensure_zoo

        self.cfg = cfg
        student, teacher = cfg.student_dir, cfg.teacher_dir
        if not student or not teacher:
            paths = ensure_zoo(cfg.zoo)
            student, teacher = student or str(paths.student), teacher or str(paths.teacher)
        for name, path in (("student_dir", student), ("teacher_dir", teacher)):
            if not (Path(path) / "config.json").is_file():
                raise ConfigError(f"`{name}` {path!r} has no config.json; expected an HF "
                                  "save_pretrained directory")
        work = cfg.work_dir or tempfile.mkdtemp(prefix="cdca-akd-")
        self._jobs = AkdJobTrainer(AkdJobConfig(
            student_dir=student, teacher_dir=teacher,
            label_cache_dir=cfg.label_cache_dir or str(Path(work) / "labels"), work_dir=work,
            nproc_per_node=cfg.nproc_per_node, threads_per_rank=cfg.threads_per_rank,
            steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.lora_seed,
            akd={**cfg.akd, "replay_ratio": cfg.replay_ratio},
            lora={"rank": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.0,
                  "targets": cfg.lora_targets},
            labelling=dict(cfg.labelling)))
        self.base_model_hash = self._jobs.base_model_hash
        self._spec = self._jobs.config.template()
        self._teacher_dir = teacher
        self._teacher: Any = None
        self._student: Any = None
        self._formatter: Any = None
        self._replay: list[Any] = []
        self._source_check: list[Any] = []
        if cfg.nproc_per_node == 1 or cfg.replay_ratio > 0:
            from cloud.distributed.job import load_checkpoint

            base, self._formatter = load_checkpoint(student)
            if cfg.replay_ratio > 0:  # torchrun rounds get it exported
                self._replay = _encoded_source(base, student, cfg.replay_config(),
                                               f"`replay_ratio` {cfg.replay_ratio}")
            if cfg.source_check_samples > 0:
                self._source_check = _encoded_source(
                    base, student, cfg.source_check_config(),
                    f"`source_check_samples` {cfg.source_check_samples}")
        if cfg.nproc_per_node == 1:
            from cloud.distill import attach_lora
            from cloud.labels import checkpoint_hash, prompt_digest

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.lora_seed)  # as the job trainer and the devices do
                self._student = attach_lora(base, self._spec.lora_spec())
            self._teacher_hash = checkpoint_hash(teacher)
            self._prompt = prompt_digest(self._formatter)

    def initial_adapter(self) -> StateDict:
        """The fresh LoRA every device builds from the same checkpoint and seed (version 0)."""
        return self._jobs.initial_adapter()

    def check_sample(self, sample: UploadSample) -> None:
        """Only projected visual tokens of the student's width can be distilled from."""
        tokens = sample.tokens
        if tokens is not None and tokens.feature_space != FEATURE_SPACE:
            raise WireFormatError(f"tokens.feature_space: got {tokens.feature_space!r}, "
                                  f"expected {FEATURE_SPACE!r}")
        self._jobs.check_sample(sample)

    def train(self, adapter: StateDict, samples: Sequence[UploadSample],
              ctx: JobContext) -> TrainResult:
        """One AKD round from `adapter`, resumed from the job's last checkpoint if it has one."""
        if self._student is None:
            return self._jobs.train(adapter, samples, ctx, self._replay)
        from peft import set_peft_model_state_dict

        from cloud.distill import AdapterDistiller, DistillSample

        steps = self.cfg.steps
        restored = ctx.restore()
        start, weights = (0, adapter) if restored is None else restored
        all_distill = [DistillSample.from_upload(s) for s in samples]
        distill, held = holdout_split(all_distill, self.cfg.holdout_share)
        if start >= steps:
            return self._checked(adapter, weights, held, {"restored": 1.0})
        labels, hits = self._labels([*distill, *self._replay])
        labels, replay_labels = labels[:len(distill)], labels[len(distill):]
        set_peft_model_state_dict(self._student, weights)

        def on_step(step: int, losses: Any) -> None:
            done = step + 1
            if done < steps and done % self.cfg.checkpoint_every == 0:
                ctx.checkpoint(done, self._adapter_now())

        result = AdapterDistiller(self._spec.akd_config()).fit(
            self._student, None, distill, formatter=self._formatter, labels=labels,
            replay=self._replay, replay_labels=replay_labels, start_step=start,
            on_step=on_step, base=adapter)
        ctx.checkpoint(steps, result.adapter)
        metrics = {**result.metrics, "start_step": float(start),
                   "label_hit_rate": hits / (len(distill) + len(self._replay))}
        return self._checked(adapter, dict(result.adapter), held, metrics)

    def _checked(self, base: StateDict, new: StateDict, held: list[Any],
                 metrics: dict[str, float]) -> TrainResult:
        """The round's result, withheld when it does not lower the held-out uploads' loss or
        when it costs more than `source_check_margin` of source accuracy."""
        from peft import set_peft_model_state_dict

        from cloud.distill import answer_exact_match, answer_nll

        def before_after(score: Callable[[], float]) -> tuple[float, float]:
            """`score` of the student at the round's start adapter, then at its end."""
            set_peft_model_state_dict(self._student, base)
            first = score()
            set_peft_model_state_dict(self._student, new)
            return first, score()

        reasons = []
        if held:
            labels, _ = self._labels(held)
            nll = before_after(lambda: answer_nll(self._student, held, labels, self._formatter))
            metrics = {**metrics, "holdout_samples": float(len(held)),
                       "holdout_nll_before": nll[0], "holdout_nll_after": nll[1]}
            if not nll[1] < nll[0]:
                reasons.append(f"held-out uploads' teacher-label cross-entropy did not fall: "
                               f"{nll[0]:.4f} -> {nll[1]:.4f} on {len(held)} samples")
        if self._source_check:
            pool = self._source_check
            answers = [s.reference_answer for s in pool]
            acc = before_after(lambda: answer_exact_match(self._student, pool, answers,
                                                          self._formatter))
            metrics = {**metrics, "source_check_samples": float(len(pool)),
                       "source_acc_before": acc[0], "source_acc_after": acc[1]}
            if acc[0] - acc[1] > self.cfg.source_check_margin + 1e-9:
                reasons.append(f"source accuracy fell by more than "
                               f"{self.cfg.source_check_margin}: {acc[0]:.3f} -> {acc[1]:.3f} "
                               f"on {len(pool)} held-out source videos")
        set_peft_model_state_dict(self._student, new)
        return TrainResult(adapter=new, metrics=metrics, withheld="; ".join(reasons) or None)

    def _adapter_now(self) -> StateDict:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(self._student).items()}

    def _labels(self, samples: list[Any]) -> tuple[list[Any], int]:
        """Teacher labels of `samples` from the cache, labelling (and caching) the misses."""
        from cloud.distill import label
        from cloud.distributed.job import load_checkpoint
        from cloud.labels import SqliteLabelCache, label_key

        config = self._spec.labelling_config()
        keys = [label_key(self._teacher_hash, s, config, self._prompt) for s in samples]
        cache = SqliteLabelCache(self._spec.label_cache_dir)
        try:
            found = [cache.get(k) for k in keys]
            todo = [i for i, lab in enumerate(found) if lab is None]
            if todo:
                if self._teacher is None:
                    self._teacher, _ = load_checkpoint(self._teacher_dir)
                    self._teacher.requires_grad_(False)
                new = label(self._teacher, [samples[i] for i in todo], self._formatter,
                            max_new_tokens=config.max_new_tokens,
                            prefer_reference=config.prefer_reference)
                for i, lab in zip(todo, new, strict=True):
                    cache.put(keys[i], lab)
                    found[i] = lab
        finally:
            cache.close()
        return found, len(samples) - len(todo)


def _encoded_source(base: Any, student_dir: str, config: ReplayConfig, needed_by: str
                    ) -> list[Any]:
    """Procedural samples of `config` encoded by the student's (shared) vision tower."""
    from cloud.distill.replay import source_replay
    from shared.models.processor import PROCESSOR_FILE, VLMProcessor

    if not (Path(student_dir) / PROCESSOR_FILE).is_file():
        raise ConfigError(f"{needed_by} needs a zoo student checkpoint ({PROCESSOR_FILE} in "
                          f"{student_dir!r}) to encode source samples; set it to 0 for other "
                          "checkpoints")
    return source_replay(base, VLMProcessor.from_pretrained(student_dir), config)
