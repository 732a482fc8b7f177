"""The project's own multimodal processor for both architectures (no torchvision).

Turns frames + questions (+ answers) into model inputs: prompt ids with the right number of
visual placeholder tokens, pixel tensors in the layout of the target class, attention mask,
`mm_token_type_ids` for Qwen2-VL, and labels on the answer only. Prompt layouts:

    visual_first:   <bos> [visual block] question <ans> | answer words <eos>
    question_first: <bos> question [visual block] <ans> | answer words <eos>
    question_both:  <bos> question [visual block] question <ans> | answer words <eos>

where the visual block is N x <video> (or <image>) for LLaVA-OneVision and
<|vision_start|> N x <video> <|vision_end|> for Qwen2-VL. Padding is on the left, so one
`generate` call serves a batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

from shared.errors import ConfigError
from shared.media.frames import normalize, resize_frames, sample_indices
from shared.media.procedural import QASample
from shared.models import tokenizer as T
from shared.models.architectures import ARCHITECTURES, VLMSpec

PROCESSOR_FILE = "cdca_processor.json"
PROMPT_LAYOUTS: tuple[str, ...] = ("visual_first", "question_first", "question_both")


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    """Everything the processor needs besides the tokenizer; saved as `cdca_processor.json`."""

    architecture: str = "llava_onevision"
    image_size: int = 48
    patch_size: int = 8
    num_frames: int = 8
    """Frames kept per video (uniform temporal sampling)."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    merge_size: int = 2
    """Qwen2-VL spatial merge (2 x 2 patches -> 1 token)."""
    temporal_patch_size: int = 2
    """Qwen2-VL frames per temporal patch."""
    prompt_layout: str = "visual_first"
    """`visual_first` (<vis> q), `question_first` (q <vis>) or `question_both` (q <vis> q): a
    question before the visual block lets visual tokens attend to it; one after it lets text
    tokens (SparseVLM's raters) attend to the visual tokens."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"`architecture` must be one of {sorted(ARCHITECTURES)}, "
                              f"got {self.architecture!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"`image_size` ({self.image_size}) must be a multiple of "
                              f"`patch_size` ({self.patch_size})")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ConfigError(f"`prompt_layout` must be one of {PROMPT_LAYOUTS}, "
                              f"got {self.prompt_layout!r}")
        if self.num_frames < 1:
            raise ConfigError(f"`num_frames` must be >= 1, got {self.num_frames}")
        if self.architecture == "qwen2_vl" and self.num_frames % self.temporal_patch_size:
            raise ConfigError(f"`num_frames` ({self.num_frames}) must be a multiple of "
                              f"`temporal_patch_size` ({self.temporal_patch_size})")


class VLMProcessor:
    """Prepares images and videos for `llava_onevision` or `qwen2_vl`; save/load round-trips."""

    def __init__(self, config: ProcessorConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._spec = VLMSpec(architecture=config.architecture, image_size=config.image_size,
                             patch_size=config.patch_size, num_frames=config.num_frames)
        ids = tokenizer.convert_tokens_to_ids(
            [T.BOS, T.EOS, T.ANSWER, T.IMAGE, T.VIDEO, T.VISION_START, T.VISION_END])
        unk = tokenizer.convert_tokens_to_ids(T.UNK)
        if any(i is None or i == unk for i in ids):
            raise ConfigError(f"tokenizer lacks a special token of {T.SPECIAL_TOKENS}")
        (self.bos_id, self.eos_id, self.answer_id, self.image_id, self.video_id,
         self.vision_start_id, self.vision_end_id) = ids
        self.pad_id = tokenizer.pad_token_id

    @classmethod
    def from_spec(cls, spec: VLMSpec, tokenizer: PreTrainedTokenizerFast,
                  prompt_layout: str = "visual_first") -> VLMProcessor:
        """A processor matching the model sizes of `spec`."""
        return cls(ProcessorConfig(architecture=spec.architecture, image_size=spec.image_size,
                                   patch_size=spec.patch_size, num_frames=spec.num_frames,
                                   prompt_layout=prompt_layout),
                   tokenizer)

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `cdca_processor.json` and the tokenizer files into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {"processor_class": type(self).__name__, **asdict(self.config)}
        (d / PROCESSOR_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        self.tokenizer.save_pretrained(d)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VLMProcessor:
        """Load what `save_pretrained` wrote."""
        d = Path(directory)
        path = d / PROCESSOR_FILE
        if not path.is_file():
            raise ConfigError(f"no {PROCESSOR_FILE} in {str(d)!r}; expected a directory "
                              "written by VLMProcessor.save_pretrained")
        payload = json.loads(path.read_text())
        payload.pop("processor_class", None)
        for key in ("image_mean", "image_std"):
            payload[key] = tuple(payload[key])
        tok = PreTrainedTokenizerFast.from_pretrained(d)
        return cls(ProcessorConfig(**payload), tok)

    # ------------------------------------------------------------------ token counts

    def num_visual_tokens(self, media_kind: str) -> int:
        """Placeholder tokens of one image or one video in the prompt."""
        arch = ARCHITECTURES[self.config.architecture]
        if media_kind == "video":
            return arch.tokens_per_video(self._spec, self.config.num_frames)
        if media_kind == "image":
            return arch.tokens_per_image(self._spec)
        raise ConfigError(f"`media_kind` must be 'video' or 'image', got {media_kind!r}")

    # ------------------------------------------------------------------ main entry

    def __call__(self, samples: Sequence[QASample] | tuple[Sequence[object], Sequence[str]],
                 answers: Sequence[str] | bool | None = None) -> BatchFeature:
        """Model inputs for a batch.

        Args:
            samples: `QASample`s, or a pair (frames list, questions list) where each frames item
                is uint8 (F, H, W, 3) (F == 1 for an image).
            answers: answer strings (adds `labels`), True to take them from the samples, or None.
        """
        if isinstance(samples, tuple) and len(samples) == 2 and not isinstance(
                samples[0], QASample):
            frames_list, questions = list(samples[0]), list(samples[1])
        else:
            frames_list = [s.frames for s in samples]  # type: ignore[union-attr]
            questions = [s.question for s in samples]  # type: ignore[union-attr]
            if answers is True:
                answers = [s.answer for s in samples]  # type: ignore[union-attr]
        if answers is True or answers is False:
            raise ConfigError("`answers`=True needs QASample inputs")
        if len(frames_list) != len(questions) or not frames_list:
            raise ConfigError(f"need as many frames items as questions (> 0), got "
                              f"{len(frames_list)} and {len(questions)}")
        if answers is not None and len(answers) != len(questions):
            raise ConfigError(f"`answers` has {len(answers)} items, expected {len(questions)}")
        frames = [self._prepare_frames(f) for f in frames_list]
        kinds = {"image" if f.shape[0] == 1 else "video" for f in frames}
        if len(kinds) > 1:
            raise ConfigError("a batch must be all images or all videos, got both")
        kind = kinds.pop()
        if kind == "video":
            frames = [f[sample_indices(f.shape[0], self.config.num_frames)] for f in frames]
        out = self._pixels(frames, kind)
        out.update(self.text_inputs(questions, answers, kind))
        return BatchFeature(out)

    def decode_answers(self, generated: torch.Tensor) -> list[str]:
        """Answer strings from generated continuation ids (B, T)."""
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    # ------------------------------------------------------------------ pieces

    def _prepare_frames(self, frames: object) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise ConfigError(f"frames must be a uint8 tensor (F, H, W, 3), got "
                              f"{type(frames).__name__} {getattr(frames, 'dtype', '')}")
        if frames.dim() == 3:
            frames = frames[None]
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise ConfigError(f"frames must be (F, H, W, 3), got {tuple(frames.shape)}")
        return resize_frames(frames, self.config.image_size)

    def _pixels(self, frames: list[torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
        c = self.config
        norm = [normalize(f, c.image_mean, c.image_std) for f in frames]  # (F, 3, S, S) each
        if c.architecture == "llava_onevision":
            if kind == "video":
                return {"pixel_values_videos": torch.stack(norm)}  # (B, F, 3, S, S)
            # anyres with one crop at the tower's size: base view + the same view as the crop
            pv = torch.stack([torch.cat([x, x]) for x in norm])  # (B, 2, 3, S, S)
            sizes = torch.tensor([[c.image_size, c.image_size]] * len(norm), dtype=torch.long)
            return {"pixel_values": pv, "image_sizes": sizes}
        tp = c.temporal_patch_size
        patches, grids = [], []
        for x in norm:
            if kind == "image":
                x = x.repeat(tp, 1, 1, 1)  # an image is a temporal pair of itself
            flat, grid = self._qwen_patches(x)
            patches.append(flat)
            grids.append(grid)
        key = "pixel_values" if kind == "image" else "pixel_values_videos"
        grid_key = "image_grid_thw" if kind == "image" else "video_grid_thw"
        return {key: torch.cat(patches), grid_key: torch.tensor(grids, dtype=torch.long)}

    def _qwen_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(T, 3, S, S) -> (gt * gh * gw, 3 * tp * p * p) in Qwen2-VL's patch order."""
        c = self.config
        t, ch, h, w = x.shape
        tp, p, m = c.temporal_patch_size, c.patch_size, c.merge_size
        gt, gh, gw = t // tp, h // p, w // p
        x = x.reshape(gt, tp, ch, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
        return x.reshape(gt * gh * gw, ch * tp * p * p), [gt, gh, gw]

    def placeholder_id(self, kind: str) -> int:
        """Token id that stands for one visual token of `kind` ("video" or "image") media."""
        return self.video_id if kind == "video" else self.image_id

    def text_inputs(self, questions: Sequence[str], answers: Sequence[str] | None,
                    kind: str) -> dict[str, torch.Tensor]:
        """Token-side inputs only (ids, mask, labels, Qwen2-VL token types) for `kind` media.

        With `mm_encoder_outputs` (precomputed or device-compressed visual tokens) these are
        all a forward pass needs besides the Qwen2-VL grid sizes.
        """
        n_vis = self.num_visual_tokens(kind)
        placeholder = self.placeholder_id(kind)
        if self.config.architecture == "qwen2_vl":
            visual = [self.vision_start_id] + [placeholder] * n_vis + [self.vision_end_id]
        else:
            visual = [placeholder] * n_vis
        q_ids = self.tokenizer(list(questions), add_special_tokens=False).input_ids
        a_ids = (self.tokenizer(list(answers), add_special_tokens=False).input_ids
                 if answers is not None else None)
        seqs, labels = [], []
        for i, q in enumerate(q_ids):
            layout = self.config.prompt_layout
            if layout == "question_first":
                prompt = [self.bos_id, *q, *visual, self.answer_id]
            elif layout == "question_both":
                prompt = [self.bos_id, *q, *visual, *q, self.answer_id]
            else:
                prompt = [self.bos_id, *visual, *q, self.answer_id]
            tail = [*a_ids[i], self.eos_id] if a_ids is not None else []
            seqs.append(prompt + tail)
            labels.append([-100] * len(prompt) + tail)
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        lab = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, length - len(s):] = torch.tensor(s)
            mask[i, length - len(s):] = 1
            lab[i, length - len(s):] = torch.tensor(labels[i])
        out = {"input_ids": input_ids, "attention_mask": mask}
        if a_ids is not None:
            out["labels"] = lab
        if self.config.architecture == "qwen2_vl":
            tt = torch.zeros_like(input_ids)
            tt[input_ids == placeholder] = 2 if kind == "video" else 1
            out["mm_token_type_ids"] = tt
        return out
