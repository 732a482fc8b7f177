"""Frame preparation shared by every media source: temporal sampling, resizing, normalisation.

The transformers 5.x video processors need torchvision, which does not work beside the pinned CPU
torch, so this is the project's own (pure torch) replacement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.errors import ConfigError


def sample_indices(num_total: int, num_frames: int) -> torch.Tensor:
    """Indices of `num_frames` frames spread uniformly over a clip of `num_total` frames.

    Each kept frame is the centre of one of `num_frames` equal segments, so a short event in the
    middle of the clip survives sampling. Shorter clips repeat frames.
    """
    if num_total <= 0:
        raise ConfigError(f"`num_total` must be > 0 frames, got {num_total}")
    if num_frames <= 0:
        raise ConfigError(f"`num_frames` must be > 0, got {num_frames}")
    centres = (torch.arange(num_frames, dtype=torch.float64) + 0.5) * num_total / num_frames
    return centres.floor().long().clamp_(0, num_total - 1)  # (num_frames,)


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 frames (F, H, W, 3) to a square (F, size, size, 3) uint8 (area/bilinear)."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ConfigError(f"`frames` must be (F, H, W, 3), got shape {tuple(frames.shape)}")
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    x = frames.permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    shrinking = frames.shape[1] > size and frames.shape[2] > size
    x = F.interpolate(x, size=(size, size), mode="area" if shrinking else "bilinear",
                      align_corners=None if shrinking else False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def normalize(frames: torch.Tensor, mean: tuple[float, float, float],
              std: tuple[float, float, float]) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (F, 3, H, W), scaled to [0, 1] then standardised."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # (F, 3, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
