"""Deterministic procedural video/image QA with camera domains (the project's own data, no files).

A scene is a square of 16 px cells (48 px: a 3 x 3 grid): coloured shapes sit in cells,
one shape moves two or three cells in a straight line, and a "flash" (a cross) is visible only in
middle frames. Videos carry a burnt-in progress bar along the bottom edge, as deployed cameras
stamp a time overlay. Questions come from templates whose answers need the pixels and, for video,
time: `flash` needs a frame other than the first and last, `direction` needs two frames.

Domains model what a deployed camera meets. `source` is a flat grey background in daylight; the
shifted domains are `low_light` (dim, blue-tinted, sensor noise), `clutter` (textured background
with specks), `color_cast` (a white-balance/colour-matrix error that rotates hues about the grey
axis and warms the whole frame) and `blur` (camera-shake motion blur plus defocus). Every domain
keeps the answer visible: a model that has seen the domain can answer.

Every sample is a pure function of (domain, seed, media_kind, index), so `stream` is infinite and
`batch` is its prefix; nothing is written to disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import ConfigError

DOMAINS: tuple[str, ...] = ("source", "low_light", "clutter", "color_cast", "blur")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "yellow": (225, 205, 40),
    "green": (50, 170, 60),
    "cyan": (40, 190, 200),
    "blue": (45, 75, 215),
    "purple": (165, 60, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
FLASH_SHAPE = "cross"
SHAPE_CLASSES: tuple[str, ...] = ("none", *SHAPES, FLASH_SHAPE)
"""Per-cell shape classes (index 0 = empty); the vision pre-training head predicts these."""
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
COUNT_WORDS: tuple[str, ...] = ("0", "1", "2", "3", "4")
VIDEO_QTYPES: tuple[str, ...] = ("flash", "direction", "count", "exists")
IMAGE_QTYPES: tuple[str, ...] = ("color", "shape", "count", "exists")
MIDDLE_FRAME_QTYPES: frozenset[str] = frozenset({"flash"})
"""Video question types whose answer is visible in no frame but middle ones."""
MEDIA_KINDS: tuple[str, ...] = ("video", "image")

# Question-type schedules: a fixed 20-slot cycle, so every 20 consecutive video samples hold
# exactly 7 flash questions (35% >= 1/3 need a middle frame) whatever the seed.
_VIDEO_SCHEDULE = ("flash", "direction", "count", "flash", "exists", "direction", "flash",
                   "count", "exists", "flash", "direction", "count", "flash", "exists",
                   "direction", "flash", "count", "exists", "flash", "direction")
_IMAGE_SCHEDULE = ("color", "shape", "count", "exists")
CELL = 16
"""Cell side in pixels: one pooled LLaVA-OV token (2 x 2 patches of 8 px) per cell."""


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One drawn object: its shape, colour name and centre (x, y) in pixels per frame."""

    shape: str
    color: str
    centers: np.ndarray  # (F, 2) float32 pixel coordinates
    visible: np.ndarray  # (F,) bool


@dataclass(frozen=True, slots=True)
class QASample:
    """One question about one clip or image, with the scene that produced it."""

    sample_id: str
    domain: str
    media_kind: str
    """"video" or "image"."""
    frames: torch.Tensor
    """uint8 (F, H, W, 3); F == 1 for images."""
    question: str
    answer: str
    qtype: str
    objects: tuple[SceneObject, ...] = ()
    object_map: torch.Tensor | None = field(default=None, repr=False)
    """int8 (F, H, W): index into `objects` of the object drawn at each pixel, -1 elsewhere."""


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """Geometry of the procedural scenes."""

    frame_size: int = 48
    """Side of the square frames in pixels; a multiple of 16 (48: 3 x 3 cells)."""
    num_frames: int = 8
    """Frames per video (8-16)."""

    def __post_init__(self) -> None:
        if self.frame_size < 48 or self.frame_size % CELL:
            raise ConfigError(f"`frame_size` must be a multiple of {CELL} and >= 48, "
                              f"got {self.frame_size}")
        if not 4 <= self.num_frames <= 32:
            raise ConfigError(f"`num_frames` must be in [4, 32], got {self.num_frames}")


def _check(domain: str, media_kind: str) -> None:
    if domain not in DOMAINS:
        raise ConfigError(f"`domain` must be one of {DOMAINS}, got {domain!r}")
    if media_kind not in MEDIA_KINDS:
        raise ConfigError(f"`media_kind` must be one of {MEDIA_KINDS}, got {media_kind!r}")


def sample(domain: str, seed: int, index: int, media_kind: str = "video",
           config: GeneratorConfig | None = None) -> QASample:
    """The `index`-th sample of the stream (domain, seed, media_kind); random access."""
    _check(domain, media_kind)
    cfg = config or GeneratorConfig()
    rng = np.random.default_rng(
        [seed & 0xFFFFFFFF, DOMAINS.index(domain), MEDIA_KINDS.index(media_kind), index])
    if media_kind == "video":
        qtype = _VIDEO_SCHEDULE[index % len(_VIDEO_SCHEDULE)]
        return _make(rng, cfg, domain, qtype, cfg.num_frames, f"{domain}-v-{seed}-{index}")
    qtype = _IMAGE_SCHEDULE[index % len(_IMAGE_SCHEDULE)]
    return _make(rng, cfg, domain, qtype, 1, f"{domain}-i-{seed}-{index}")


def stream(domain: str, seed: int, media_kind: str = "video",
           config: GeneratorConfig | None = None) -> Iterator[QASample]:
    """Infinite deterministic stream of samples of one domain."""
    _check(domain, media_kind)
    index = 0
    while True:
        yield sample(domain, seed, index, media_kind, config)
        index += 1


def batch(domain: str, n: int, seed: int, media_kind: str = "video",
          config: GeneratorConfig | None = None, start: int = 0) -> list[QASample]:
    """Samples `start .. start + n - 1` of the stream (domain, seed, media_kind)."""
    if n < 0:
        raise ConfigError(f"`n` must be >= 0, got {n}")
    return [sample(domain, seed, start + i, media_kind, config) for i in range(n)]


# ----------------------------------------------------------------------------- scene layout


def _cell_center(cell: int, size: int, rng: np.random.Generator) -> np.ndarray:
    grid = size // CELL
    c = float(CELL)
    r, col = divmod(cell, grid)
    jitter = rng.uniform(-0.03, 0.03, size=2) * c
    # the bottom row sits a little higher: the progress bar occupies the last pixel rows
    y = (r + 0.5) * c - (0.12 * c if r == grid - 1 else 0.0)
    return np.array([(col + 0.5) * c, y], dtype=np.float32) + jitter.astype(np.float32)


def _other_colors(rng: np.random.Generator, k: int, exclude: set[str]) -> list[str]:
    pool = [c for c in COLOR_NAMES if c not in exclude]
    return [pool[i] for i in rng.integers(0, len(pool), size=k)]


def _make(rng: np.random.Generator, cfg: GeneratorConfig, domain: str, qtype: str,
          num_frames: int, sample_id: str) -> QASample:
    size = cfg.frame_size
    grid = size // CELL
    is_video = num_frames > 1
    cells = list(range(grid * grid))
    centers: list[np.ndarray] = []  # (F, 2) each
    visible: list[np.ndarray] = []
    direction = ""
    if is_video:
        direction = DIRECTIONS[rng.integers(0, 4)]
        length = int(rng.integers(1, grid))
        lane = int(rng.integers(0, grid))
        start = int(rng.integers(0, grid - length))
        forward = direction in ("right", "down")
        a, b = (start, start + length) if forward else (start + length, start)
        if direction in ("left", "right"):
            p0, p1 = lane * grid + a, lane * grid + b
            cells = [c for c in cells if c // grid != lane]
        else:
            p0, p1 = a * grid + lane, b * grid + lane
            cells = [c for c in cells if c % grid != lane]
        c0, c1 = _cell_center(p0, size, rng), _cell_center(p1, size, rng)
        if direction in ("left", "right"):
            c1[1] = c0[1]
        else:
            c1[0] = c0[0]
        t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None]
        centers.append(c0[None] * (1 - t) + c1[None] * t)
        visible.append(np.ones(num_frames, dtype=bool))
    n_static = int(rng.integers(2, 4))
    chosen = rng.choice(len(cells), size=n_static + 1, replace=False)
    for k in chosen[:n_static]:
        centers.append(np.repeat(_cell_center(cells[k], size, rng)[None], num_frames, axis=0))
        visible.append(np.ones(num_frames, dtype=bool))
    n_obj = len(centers)
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=n_obj)]
    colors = _other_colors(rng, n_obj, set())

    answer = ""
    question = ""
    if qtype == "count":
        target = COLOR_NAMES[rng.integers(0, len(COLOR_NAMES))]
        n = int(rng.integers(0, min(n_obj, 3) + 1))
        who = set(rng.choice(n_obj, size=n, replace=False).tolist())
        others = iter(_other_colors(rng, n_obj, {target}))
        colors = [target if i in who else next(others) for i in range(n_obj)]
        question, answer = f"how many {target} objects are there?", COUNT_WORDS[n]
    elif qtype == "exists":
        present = set(zip(colors, shapes, strict=True))
        if rng.random() < 0.5:
            i = int(rng.integers(0, n_obj))
            col, shp, answer = colors[i], shapes[i], "yes"
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            near = [p for p in absent if p[0] in colors or p[1] in shapes]
            pool = near if near and rng.random() < 0.7 else absent
            col, shp = pool[rng.integers(0, len(pool))]
            answer = "no"
        question = f"is there a {col} {shp}?"
    elif qtype == "color":
        target = SHAPES[rng.integers(0, len(SHAPES))]
        i = int(rng.integers(0, n_obj))
        rest = [s for s in SHAPES if s != target]
        shapes = [target if j == i else rest[rng.integers(0, 2)] for j in range(n_obj)]
        question, answer = f"what colour is the {target}?", colors[i]
    elif qtype == "shape":
        target = COLOR_NAMES[rng.integers(0, len(COLOR_NAMES))]
        i = int(rng.integers(0, n_obj))
        others = iter(_other_colors(rng, n_obj, {target}))
        colors = [target if j == i else next(others) for j in range(n_obj)]
        question, answer = f"what shape is the {target} object?", shapes[i]
    elif qtype == "direction":
        question, answer = "which way is the object moving?", direction
    elif qtype != "flash":
        raise ConfigError(f"`qtype` {qtype!r} is not a known question type")

    objects = [SceneObject(s, c, ce, v) for s, c, ce, v in
               zip(shapes, colors, centers, visible, strict=True)]
    if is_video:
        flash_color = COLOR_NAMES[rng.integers(0, len(COLOR_NAMES))]
        duration = max(1, num_frames // 4)
        first = int(rng.integers(1, num_frames - duration))  # never frame 0 nor the last
        vis = np.zeros(num_frames, dtype=bool)
        vis[first:first + duration] = True
        center = _cell_center(cells[chosen[n_static]], size, rng)
        objects.append(SceneObject(FLASH_SHAPE, flash_color,
                                   np.repeat(center[None], num_frames, axis=0), vis))
        if qtype == "flash":
            question, answer = "what colour was the flash?", flash_color
    frames, object_map = _render(rng, objects, num_frames, size, domain, is_video)
    return QASample(sample_id=sample_id, domain=domain,
                    media_kind="video" if is_video else "image",
                    frames=torch.from_numpy(frames), question=question, answer=answer,
                    qtype=qtype, objects=tuple(objects), object_map=torch.from_numpy(object_map))


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.82 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base at +r
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)
    if shape == FLASH_SHAPE:
        t = 0.38 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ConfigError(f"`shape` {shape!r} is not one of {SHAPE_CLASSES[1:]}")


def _background(rng: np.random.Generator, domain: str, size: int) -> np.ndarray:
    level = rng.uniform(95, 135)
    bg = np.full((size, size, 3), level, dtype=np.float32)
    if domain == "clutter":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        tex = np.zeros((size, size), dtype=np.float32)
        for _ in range(3):
            ang = rng.uniform(0, math.pi)
            freq = rng.uniform(0.15, 0.6)
            tex += np.sin(freq * (xx * math.cos(ang) + yy * math.sin(ang)) + rng.uniform(0, 6.3))
        checker = ((xx // rng.integers(3, 7) + yy // rng.integers(3, 7)) % 2) * 2 - 1
        tint = rng.uniform(-12, 12, size=3).astype(np.float32)
        bg = bg + (14 * tex + 16 * checker)[..., None] + tint
        for _ in range(int(rng.integers(10, 18))):  # neutral specks: dust, leaves, gravel
            x, y = rng.integers(0, size - 3, size=2)
            w = int(rng.integers(2, 4))
            bg[y:y + w, x:x + w] = rng.uniform(20, 235)
    return bg


def _hue_rotation(theta: float) -> np.ndarray:
    k = np.full(3, 1 / math.sqrt(3), dtype=np.float64)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    c, s = math.cos(theta), math.sin(theta)
    rot = c * np.eye(3) + s * kx + (1 - c) * np.outer(k, k)  # Rodrigues: rotate about grey
    return rot.astype(np.float32)


def _render(rng: np.random.Generator, objects: list[SceneObject], num_frames: int, size: int,
            domain: str, is_video: bool) -> tuple[np.ndarray, np.ndarray]:
    img = np.repeat(_background(rng, domain, size)[None], num_frames, axis=0)  # (F, H, W, 3)
    omap = np.full((num_frames, size, size), -1, dtype=np.int8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for i, obj in enumerate(objects):
        r = rng.uniform(5.4, 6.4)
        dx = xx[None] - obj.centers[:, 0, None, None]  # (F, H, W)
        dy = yy[None] - obj.centers[:, 1, None, None]
        m = _shape_mask(obj.shape, dx, dy, r) & obj.visible[:, None, None]
        color = np.asarray(COLORS[obj.color], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        img[m] = color
        omap[m] = i
    if is_video:  # progress bar: the filled fraction is (t + 1) / F
        bar = 3
        for t in range(num_frames):
            img[t, size - bar:, : round(size * (t + 1) / num_frames)] = 235.0
            img[t, size - bar:, round(size * (t + 1) / num_frames):] = 30.0
    img = _camera(rng, img, domain)
    return img.round().clip(0, 255).astype(np.uint8), omap


def _camera(rng: np.random.Generator, img: np.ndarray, domain: str) -> np.ndarray:
    """Apply the domain's camera effects to float frames (F, H, W, 3) in [0, 255]."""
    if domain == "low_light":
        img = img * rng.uniform(0.22, 0.32) * np.array([0.85, 0.95, 1.15], dtype=np.float32)
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(5, 8)
    elif domain == "color_cast":
        rot = _hue_rotation(math.radians(rng.uniform(45, 55)))
        img = img @ rot.T * np.array([1.15, 1.0, 0.78], dtype=np.float32)
    elif domain == "blur":
        length = int(rng.integers(5, 8))
        axis = 2 if rng.random() < 0.5 else 1  # shake along x or y
        acc = np.zeros_like(img)
        for s in range(length):
            acc += np.roll(img, s - length // 2, axis=axis)
        img = acc / length
        img = (img + np.roll(img, 1, axis=1) + np.roll(img, 1, axis=2)
               + np.roll(img, -1, axis=1) + np.roll(img, -1, axis=2)) / 5  # defocus
    if domain != "low_light":
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * 2.0
    return img
