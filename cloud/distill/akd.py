"""AKD: adapter-based knowledge distillation (CD-CCA CVPR'24 §3.3), on uploaded visual tokens.

The teacher labels each sample (greedy answer, its logits and last hidden states); the student's
LoRA adapters then minimise CE on the pseudo-label + T^2-scaled KL to the teacher's answer
distribution + MSE between projected student and teacher last hidden states at the visual and
answer positions. Departures from the official code (see shared/reference/cdcca.md §3): logit KL
is used (the official code distils only sampled text and features), the feature alignment is a
learned Linear instead of a 1x1 Conv1d (the same map), and there is no wavelet term.

Visual tokens enter both models as `inputs_embeds` at the placeholder positions, which is what
`mm_encoder_outputs` does inside LLaVA-OneVision, so a compressed subset of tokens works as is;
with a formatter that knows the full visual block (`PromptFormatter.full_visual`) they keep the
RoPE positions they had in the full prompt, as on a device serving with `original_positions`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from tqdm import tqdm

from cloud.distill import losses, sparse_delta
from cloud.distill.base import DataParallel, DistillResult, DistillSample, TeacherLabel
from cloud.distill.prompt import PackedBatch, PromptFormatter, pack
from shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AKDConfig:
    """Options of the "akd" distiller."""

    steps: int = 100
    """Optimizer steps per round."""
    batch_size: int = 4
    lr: float = 1e-3
    """AdamW learning rate of the LoRA parameters."""
    projection_lr: float = 1e-3
    """AdamW learning rate of the cloud-only feature projection."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 2.0
    """Softmax temperature of the KL term."""
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    feature_weight: float = 0.1
    feature_on_visual: bool = True
    """Feature loss also at the visual positions (always at the answer positions)."""
    replay_ratio: float = 0.25
    """Share of each batch drawn from the replay (source) pool when one is given."""
    max_new_tokens: int = 16
    """Teacher answer length cap when labelling."""
    prefer_reference: bool = True
    """Label with the sample's reference answer when it has one (teacher-forced)."""
    delta_entries: int | None = None
    """Budgeted round: train only this many LoRA B entries, chosen by gradient saliency at the
    round's base (`cloud.distill.sparse_delta`); None trains every LoRA entry."""
    saliency_batches: int = 8
    """Batches whose summed gradient ranks the entries of a budgeted round."""
    train_lora_a: bool = True
    """False: only the LoRA B matrices train, A stays at the round's base (a budgeted round
    moves only B entries anyway). bench.akd's dense B-only round measures what the A matrices
    add to a round: on the default zoo nearly all of what a 2% budgeted round misses."""
    source_penalty: float = 100.0
    """Budgeted round with a replay pool: an entry's saliency |g| on the uploads is divided by
    sqrt(1 + source_penalty * F / mean F), F its squared gradient on replay batches (a diagonal
    Fisher of the source task), so the round picks entries the source domain does not lean on.
    bench: 350 entries on 64 low_light uploads cost 3.0-3.3 pt of held-out source at 0, 0.3 pt
    at 100, with low_light unchanged (0.63 / 0.63 vs 0.65 / 0.63, two seeds). 0: off."""
    seed: int = 0
    progress: bool = False
    """Show a tqdm bar."""

    def __post_init__(self) -> None:
        if self.delta_entries is not None and self.delta_entries < 1:
            raise ConfigError(f"`delta_entries` must be >= 1 or None, got {self.delta_entries}")
        for name in ("steps", "batch_size", "max_new_tokens", "saliency_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "projection_lr", "temperature", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "ce_weight", "kl_weight", "feature_weight",
                     "source_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"`replay_ratio` must be in [0, 1), got {self.replay_ratio}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _input_embeddings(model: Any) -> nn.Module:
    """The token embedding of an HF model or a peft wrapper (both define the method)."""
    return cast(nn.Module, model.get_input_embeddings())


def _projector(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            return module
    raise ConfigError(
        "feature_space 'vision' needs a per-token `multi_modal_projector` (LLaVA-style); "
        f"{type(model).__name__} has none"
    )


def _embeds(
    model: nn.Module, batch: PackedBatch, samples: Sequence[DistillSample],
) -> torch.Tensor:
    """Token embeddings with the samples' visual tokens at the placeholder positions."""
    dev = _device(model)
    embed = _input_embeddings(model)
    x = embed(batch.input_ids.to(dev)).clone()  # (B, L, D)
    for i, s in enumerate(samples):
        tokens = s.visual_tokens.to(dev, x.dtype)  # (K, D) or (K, Dv) pre-projector
        if s.feature_space == "vision":
            tokens = _projector(model)(tokens)  # (K, D)
        if tokens.shape[-1] != x.shape[-1]:
            raise ConfigError(
                f"sample {s.sample_id!r}: visual tokens have width {tokens.shape[-1]}, the "
                f"model's embeddings {x.shape[-1]} (feature_space {s.feature_space!r})"
            )
        x[i, batch.visual_positions[i].to(dev)] = tokens
    return x


def _forward(
    model: nn.Module, batch: PackedBatch, samples: Sequence[DistillSample],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, L, V), last hidden (B, L, D))."""
    out = model(
        inputs_embeds=_embeds(model, batch, samples),
        attention_mask=batch.attention_mask.to(_device(model)),
        position_ids=batch.position_ids.to(_device(model)),
        output_hidden_states=True,
    )
    return out.logits, out.hidden_states[-1]


@torch.no_grad()
def label(
    teacher: nn.Module, samples: Sequence[DistillSample], formatter: PromptFormatter,
    *, max_new_tokens: int = 16, prefer_reference: bool = True,
) -> list[TeacherLabel]:
    """Teacher pseudo-labels: greedy answer (or the reference), its logits and hidden states."""
    out: list[TeacherLabel] = []
    with _eval_mode(teacher):
        for s in samples:
            if prefer_reference and s.reference_answer is not None:
                answer = torch.tensor(formatter.answer_ids(s.reference_answer))
            else:
                answer = _generate(teacher, formatter, s, max_new_tokens)
            batch = pack(formatter, [s.question], [s.visual_tokens.shape[0]], [answer],
                         [s.positions])
            logits, hidden = _forward(teacher, batch, [s])
            a_pos, v_pos = batch.answer_positions[0], batch.visual_positions[0]
            out.append(TeacherLabel(
                answer_ids=answer,
                logits=logits[0, a_pos].float().cpu(),  # (A, V)
                hidden=hidden[0, torch.cat([v_pos, a_pos])].float().cpu(),  # (K + A, Dt)
            ))
    return out


def _generate(
    teacher: nn.Module, formatter: PromptFormatter, s: DistillSample, max_new_tokens: int,
) -> torch.Tensor:
    """Greedy continuation after the prompt, cut after the first EOS: (A,) int64."""
    empty = torch.zeros(0, dtype=torch.long)
    batch = pack(formatter, [s.question], [s.visual_tokens.shape[0]], [empty], [s.positions])
    generate = cast(Callable[..., torch.Tensor], teacher.generate)
    generated = generate(
        inputs_embeds=_embeds(teacher, batch, [s]),
        attention_mask=batch.attention_mask.to(_device(teacher)),
        position_ids=batch.position_ids.to(_device(teacher)),
        max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[formatter.visual_id],
        eos_token_id=formatter.eos_id, pad_token_id=formatter.pad_id,
    )[0].cpu()  # (A',) only the new tokens when generating from inputs_embeds
    ends = torch.nonzero(generated == formatter.eos_id).flatten()
    return generated[: int(ends[0]) + 1] if ends.numel() else generated


def _answer_logits(
    student: nn.Module, samples: Sequence[DistillSample], answers: Sequence[torch.Tensor],
    formatter: PromptFormatter, batch_size: int,
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per batch of `samples`, teacher-forced on `answers`: the student's logits at each
    sample's answer positions ((A_i, V) each) and the answer ids ((A_i,) each)."""
    if not samples:
        raise ConfigError("`samples` is empty; nothing to score")
    if len(answers) != len(samples):
        raise ConfigError(f"{len(answers)} answers for {len(samples)} samples; expected one each")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = pack(formatter, [s.question for s in chunk],
                     [s.visual_tokens.shape[0] for s in chunk],
                     list(answers[start:start + batch_size]), [s.positions for s in chunk])
        logits, _ = _forward(student, batch, chunk)  # (B, L, V)
        yield ([logits[i, p].float() for i, p in enumerate(batch.answer_positions)],
               [a.to(logits.device) for a in batch.answer_ids])


@torch.no_grad()
def answer_nll(
    student: nn.Module, samples: Sequence[DistillSample], labels: Sequence[TeacherLabel],
    formatter: PromptFormatter, batch_size: int = 16,
) -> float:
    """Mean cross-entropy of the teachers' answer tokens under `student` (eval mode): how well
    it agrees with the teacher on samples it was not trained on."""
    total, count = 0.0, 0
    with _eval_mode(student):
        for logits, targets in _answer_logits(student, samples,
                                              [t.answer_ids for t in labels], formatter,
                                              batch_size):
            total += float(torch.nn.functional.cross_entropy(
                torch.cat(logits), torch.cat(targets), reduction="sum"))
            count += sum(int(t.numel()) for t in targets)
    return total / count


@torch.no_grad()
def answer_exact_match(
    student: nn.Module, samples: Sequence[DistillSample], answers: Sequence[str],
    formatter: PromptFormatter, batch_size: int = 16,
) -> float:
    """Share of `samples` whose greedy answer under `student` (eval mode) is exactly `answers`.

    Teacher-forced and batched: greedy decoding yields the answer (and stops) exactly when the
    argmax at every answer position, EOS included, is the answer's token; the visual placeholder
    is never an argmax, as `_generate` suppresses it.
    """
    hits = 0
    with _eval_mode(student):
        ids = [torch.tensor(formatter.answer_ids(a)) for a in answers]
        for logits, targets in _answer_logits(student, samples, ids, formatter, batch_size):
            for lg, t in zip(logits, targets, strict=True):
                lg[:, formatter.visual_id] = float("-inf")
                hits += bool(torch.equal(lg.argmax(-1), t))
    return hits / len(samples)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdapterDistiller:
    """AKD into a peft student (registry key "akd")."""

    def __init__(self, config: AKDConfig) -> None:
        self.config = config
        self.projection: losses.FeatureProjection | None = None
        """Student->teacher feature map; kept across rounds, never shipped to devices."""

    def fit(
        self, student: nn.Module, teacher: nn.Module | None, samples: Sequence[DistillSample],
        *, formatter: PromptFormatter, replay: Sequence[DistillSample] = (),
        labels: Sequence[TeacherLabel] | None = None,
        replay_labels: Sequence[TeacherLabel] | None = None, start_step: int = 0,
        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
        parallel: DataParallel | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> DistillResult:
        """Train the student's LoRA weights on `samples` (+ replay) and return them.

        Args:
            student: a peft model whose only trainable parameters are LoRA weights.
            teacher: frozen teacher; may be None when both label lists are given.
            samples: uploaded (target-domain) samples.
            formatter: prompt layout and tokenizer shared by teacher and student.
            replay: source-domain samples mixed into each batch at `replay_ratio`.
            labels, replay_labels: cached `label(...)` outputs, one per sample.
            start_step: resume at this step (the caller restored the adapter); batches are the
                same as in an uninterrupted run, the optimizer moments start afresh.
            on_step: called after each step with (step, losses), e.g. to checkpoint; an
                exception it raises stops the round.
            parallel: data parallelism across processes (None: this process alone). Every rank
                draws the same global batch and trains on its strided share; the loss is
                normalised by the global token counts, so after the gradient average the update
                equals the single-process one on the whole batch.
            base: the round's starting adapter (peft state-dict keys) when the student holds a
                restored checkpoint; a budgeted round (`delta_entries`) ranks and projects
                against it. None: the student's weights at the call are the base.
        """
        with _frozen_lora_a(student, not self.config.train_lora_a):
            return self._fit(student, teacher, samples, formatter, replay, labels, replay_labels,
                             start_step, on_step, parallel, base)

    def _fit(
        self, student: nn.Module, teacher: nn.Module | None, samples: Sequence[DistillSample],
        formatter: PromptFormatter, replay: Sequence[DistillSample],
        labels: Sequence[TeacherLabel] | None, replay_labels: Sequence[TeacherLabel] | None,
        start_step: int, on_step: Callable[[int, Mapping[str, float]], None] | None,
        parallel: DataParallel | None, base: Mapping[str, torch.Tensor] | None,
    ) -> DistillResult:
        cfg = self.config
        par = parallel if parallel is not None else SingleProcess()
        if not samples:
            raise ConfigError("`samples` is empty; nothing to distil")
        if cfg.batch_size < par.world_size:
            raise ConfigError(f"`batch_size` ({cfg.batch_size}) must be >= the world size "
                              f"({par.world_size}): every rank needs a share of each batch")
        labels = self._labels(teacher, samples, labels, formatter, "labels")
        replay_labels = self._labels(teacher, replay, replay_labels, formatter, "replay_labels")
        params = self._trainable(student)
        dim_s = int(cast(nn.Embedding, _input_embeddings(student)).embedding_dim)
        dim_t = labels[0].hidden.shape[-1]
        if self.projection is None or (self.projection.in_features, self.projection.out_features
                                       ) != (dim_s, dim_t):
            self.projection = losses.FeatureProjection(dim_s, dim_t)
        projection = self.projection.to(_device(student))
        optimizer = torch.optim.AdamW([
            {"params": params, "lr": cfg.lr},
            {"params": list(projection.parameters()), "lr": cfg.projection_lr},
        ], weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        n_replay = round(cfg.batch_size * cfg.replay_ratio) if replay else 0
        history: list[dict[str, float]] = []
        objective = _Objective(cfg, student, projection, formatter)
        model = par.wrap(objective)
        was_training = student.training
        objective.train()
        sparse = None
        if cfg.delta_entries is not None:
            sparse = self._budget(model, student, params, base, (samples, labels),
                                  (replay, replay_labels), par, cfg.delta_entries)
            optimizer.zero_grad(set_to_none=True)
        start = time.monotonic()
        try:
            for step in tqdm(range(cfg.steps), disable=not cfg.progress or par.rank > 0,
                             desc="akd"):
                pick = torch.randint(len(samples), (cfg.batch_size - n_replay,), generator=gen)
                pick_r = torch.randint(max(len(replay), 1), (n_replay,), generator=gen)
                if step < start_step:
                    continue  # replay the draw so a resumed run sees the same batches
                batch = [samples[i] for i in pick] + [replay[i] for i in pick_r]
                batch_labels = [labels[i] for i in pick] + [replay_labels[i] for i in pick_r]
                share = slice(par.rank, None, par.world_size)
                fractions = _fractions(cfg, batch, batch_labels, share)
                loss, parts_t = model(batch[share], batch_labels[share], fractions,
                                      float(par.world_size))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients across ranks here
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if sparse is not None:
                    sparse_delta.project_(params, *sparse)
                parts_t = par.all_sum(parts_t.detach())  # (4,) global batch means
                parts = dict(zip(PARTS, (float(v) for v in parts_t), strict=True))
                history.append(parts)
                if on_step is not None:
                    on_step(step, parts)
        finally:
            student.train(was_training)
        wall_s = time.monotonic() - start
        state = get_peft_model_state_dict(student)
        adapter = {k: v.detach().cpu().clone() for k, v in state.items()}
        if not history:
            raise ConfigError(f"`start_step` {start_step} leaves no steps of {cfg.steps}")
        metrics = _summary(history, wall_s, len(samples), len(replay), n_replay)
        log.info("akd round done: %d steps in %.1f s, loss %.4f -> %.4f", cfg.steps, wall_s,
                 metrics["loss_first"], metrics["loss_last"])
        return DistillResult(adapter=adapter, metrics=metrics, history=tuple(history))

    def _budget(
        self, model: nn.Module, student: nn.Module, params: list[nn.Parameter],
        base: Mapping[str, torch.Tensor] | None,
        uploads: tuple[Sequence[DistillSample], Sequence[TeacherLabel]],
        replay: tuple[Sequence[DistillSample], Sequence[TeacherLabel]],
        par: DataParallel, k: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(masks, base values) of a budgeted round: LoRA B entries ranked at the base adapter
        by |summed gradient| on the uploads, over their source-domain Fisher (`source_penalty`).

        The batches come from their own generator, so a resumed round (student restored, `base`
        given) ranks the same entries as the uninterrupted one.
        """
        cfg = self.config
        current = [p.detach().clone() for p in params]
        if base is not None:
            set_peft_model_state_dict(student, dict(base))
        bases = [p.detach().clone() for p in params]
        saliency = [g.abs() for g in self._gradients(model, params, *uploads, par, squared=False)]
        if cfg.source_penalty > 0 and replay[0]:
            fisher = self._gradients(model, params, *replay, par, squared=True)
            mean = torch.cat([f.flatten() for f in fisher]).mean().clamp_min(1e-30)
            saliency = [g / (1 + cfg.source_penalty * f / mean).sqrt()
                        for g, f in zip(saliency, fisher, strict=True)]
        names = [n for n, p in student.named_parameters() if p.requires_grad]
        saliency = [torch.zeros_like(g) if sparse_delta.is_lora_a(n) else g
                    for n, g in zip(names, saliency, strict=True)]
        masks = sparse_delta.top_entries(saliency, k)
        with torch.no_grad():
            for p, c in zip(params, current, strict=True):
                p.copy_(c)
        return masks, bases

    def _gradients(
        self, model: nn.Module, params: list[nn.Parameter], samples: Sequence[DistillSample],
        labels: Sequence[TeacherLabel], par: DataParallel, *, squared: bool,
    ) -> list[torch.Tensor]:
        """Sum over `saliency_batches` batches of each parameter's gradient (or its square)."""
        cfg = self.config
        total = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        share = slice(par.rank, None, par.world_size)
        for _ in range(cfg.saliency_batches):
            pick = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
            batch, batch_labels = [samples[i] for i in pick], [labels[i] for i in pick]
            loss, _ = model(batch[share], batch_labels[share],
                            _fractions(cfg, batch, batch_labels, share), float(par.world_size))
            for p in params:
                p.grad = None
            loss.backward()  # DDP averages: every rank ranks the same gradients
            for acc, p in zip(total, params, strict=True):
                if p.grad is not None:
                    acc += p.grad.square() if squared else p.grad
        return total

    def _labels(
        self, teacher: nn.Module | None, samples: Sequence[DistillSample],
        given: Sequence[TeacherLabel] | None, formatter: PromptFormatter, what: str,
    ) -> Sequence[TeacherLabel]:
        if given is not None:
            if len(given) != len(samples):
                raise ConfigError(f"`{what}` has {len(given)} items, expected {len(samples)}")
            return given
        if not samples:
            return []
        if teacher is None:
            raise ConfigError(f"`teacher` is None and no `{what}` were given")
        return label(teacher, samples, formatter, max_new_tokens=self.config.max_new_tokens,
                     prefer_reference=self.config.prefer_reference)

    @staticmethod
    def _trainable(student: nn.Module) -> list[nn.Parameter]:
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("the student has no trainable parameters; attach LoRA first")
        stray = [n for n, _ in named if "lora_" not in n]
        if stray:
            raise ConfigError(f"only LoRA weights may train, but these are trainable: {stray[:5]}")
        return [p for _, p in named]


PARTS = ("loss", "ce", "kl", "feature")


@contextmanager
def _frozen_lora_a(student: nn.Module, enabled: bool) -> Iterator[None]:
    """While active (if `enabled`), the LoRA A matrices of `student` do not train."""
    frozen = [p for n, p in student.named_parameters()
              if enabled and p.requires_grad and sparse_delta.is_lora_a(n)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class SingleProcess:
    """`DataParallel` of a process that trains alone (the embedded cloud-server default)."""

    rank = 0
    world_size = 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module itself."""
        return module

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The values themselves."""
        return values


def _feature_rows(cfg: AKDConfig, sample: DistillSample, lab: TeacherLabel) -> int:
    return lab.answer_ids.numel() + (sample.visual_tokens.shape[0] if cfg.feature_on_visual
                                     else 0)


def _fractions(
    cfg: AKDConfig, batch: Sequence[DistillSample], labels: Sequence[TeacherLabel], share: slice,
) -> tuple[float, float]:
    """(answer tokens, feature rows) of this rank's share over those of the whole batch."""
    tokens = [lab.answer_ids.numel() for lab in labels]
    rows = [_feature_rows(cfg, s, lab) for s, lab in zip(batch, labels, strict=True)]
    return sum(tokens[share]) / sum(tokens), sum(rows[share]) / sum(rows)


class _Objective(nn.Module):
    """Student + feature projection with the AKD loss as `forward`: the unit DDP wraps, so the
    gradients of the LoRA weights and of the projection are both averaged across ranks."""

    def __init__(self, cfg: AKDConfig, student: nn.Module, projection: nn.Module,
                 formatter: PromptFormatter) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.projection = projection
        self.formatter = formatter

    def forward(
        self, samples: Sequence[DistillSample], labels: Sequence[TeacherLabel],
        fractions: tuple[float, float], world_size: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, (4,) this rank's share of the batch means of PARTS).

        Each term is a mean over this rank's tokens times this rank's share of the batch's
        tokens, so the shares sum to the batch mean; times `world_size` because DDP averages.
        """
        cfg = self.cfg
        student = self.student
        dev = _device(student)
        batch = pack(self.formatter, [s.question for s in samples],
                     [s.visual_tokens.shape[0] for s in samples], [t.answer_ids for t in labels],
                     [s.positions for s in samples])
        logits, hidden = _forward(student, batch, samples)  # (B, L, V), (B, L, Ds)
        s_logits = torch.cat([logits[i, p] for i, p in enumerate(batch.answer_positions)])
        t_logits = torch.cat([t.logits for t in labels]).to(dev)  # (N, V)
        targets = torch.cat(batch.answer_ids).to(dev)  # (N,)
        s_feat, t_feat = [], []
        for i, (p_a, p_v, t) in enumerate(zip(batch.answer_positions, batch.visual_positions,
                                              labels, strict=True)):
            k = p_v.numel()
            if cfg.feature_on_visual:
                s_feat.append(hidden[i, torch.cat([p_v, p_a])])  # (K + A, Ds)
                t_feat.append(t.hidden)
            else:
                s_feat.append(hidden[i, p_a])  # (A, Ds)
                t_feat.append(t.hidden[k:])
        token_share, row_share = fractions
        ce = losses.answer_cross_entropy(s_logits, targets) * token_share
        kl = losses.distillation_kl(s_logits, t_logits, cfg.temperature) * token_share
        feat = losses.feature_mse(torch.cat(s_feat), torch.cat(t_feat).to(dev),
                                  self.projection) * row_share
        total = cfg.ce_weight * ce + cfg.kl_weight * kl + cfg.feature_weight * feat
        parts = torch.stack([total, ce, kl, feat]).detach().float().cpu()  # (4,)
        return total * world_size, parts


def _summary(
    history: Sequence[dict[str, float]], wall_s: float, n: int, pool: int, per_batch: int,
) -> dict[str, float]:
    window = max(1, min(5, len(history) // 4))
    out = {"steps": float(len(history)), "wall_s": wall_s, "samples": float(n),
           "replay_samples": float(pool), "replay_per_batch": float(per_batch)}
    for key in history[0]:
        out[f"{key}_first"] = sum(h[key] for h in history[:window]) / window
        out[f"{key}_last"] = sum(h[key] for h in history[-window:]) / window
    return out
