"""The synthetic dataset of the tiny model: one flat shape moving in a straight line over a plain background.

Every video has a caption built from a fixed vocabulary, exactly in this form:

    "a {colour} {shape} moving {direction} on a {background} background"

colours `red, green, blue, yellow, white`; shapes `square, circle, triangle`; directions `left, right, up,
down`; backgrounds `black, gray`: 120 combinations, of which `HELD_OUT` (12) never appear in training and
are kept for evaluation. Videos are rendered on the fly from a seed (no files): scene parameters come from a
numpy generator, pixels from vectorised torch on any device, with one-pixel antialiased edges.

Geometry (pixels at 128 x 128, scaled with the frame size; y points down): object size 20-30 (square side,
circle diameter, triangle base and height), speed 2.5-3.5 px per frame, start chosen so the whole path stays
inside the frame.
This module knows nothing of models: it maps seeds to scenes, scenes to pixels and captions to attributes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}
CAPTION = "a {colour} {shape} moving {direction} on a {background} background"
ATTRIBUTES = ("colour", "shape", "direction", "background")

FRAMES = 17
SIZE = 128
# at SIZE x SIZE; other frame sizes scale these
OBJECT_SIZE = (20.0, 30.0)
SPEED = (2.5, 3.5)  # pixels per frame
MARGIN = 2.0

# Combinations never shown in training: every colour, shape, direction and background still appears in
# training, but not in these pairings.
HELD_OUT: tuple[tuple[str, str, str, str], ...] = (
    ("red", "circle", "up", "gray"),
    ("red", "triangle", "left", "black"),
    ("green", "square", "down", "gray"),
    ("green", "circle", "right", "black"),
    ("blue", "triangle", "up", "black"),
    ("blue", "square", "left", "gray"),
    ("yellow", "circle", "down", "black"),
    ("yellow", "triangle", "right", "gray"),
    ("white", "square", "up", "black"),
    ("white", "circle", "left", "gray"),
    ("red", "square", "right", "gray"),
    ("blue", "circle", "down", "gray"),
)
ALL_COMBOS: tuple[tuple[str, str, str, str], ...] = tuple(
    itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS))
TRAIN_COMBOS: tuple[tuple[str, str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)

_CAPTION_RE = re.compile(r"\s*a (\w+) (\w+) moving (\w+) on a (\w+) background\s*")


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    return CAPTION.format(colour=colour, shape=shape, direction=direction, background=background)


def parse_caption(text: str) -> tuple[str, str, str, str]:
    """Caption -> (colour, shape, direction, background); ValueError if it is not in the vocabulary."""
    m = _CAPTION_RE.fullmatch(text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a tiny-model caption; expected {CAPTION!r}")
    for value, allowed, name in zip(m.groups(), (COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS), ATTRIBUTES,
                                    strict=True):
        if value not in allowed:
            raise ValueError(f"{text!r}: {name} {value!r} is not one of {list(allowed)}")
    return m.groups()  # type: ignore[return-value]


def words(*texts: str) -> list[str]:
    """The tokens of `texts` as the word tokenizer splits them (words and punctuation), first-seen order."""
    return list(dict.fromkeys(w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())))


VOCABULARY: list[str] = words(*(caption(*c) for c in ALL_COMBOS))


@dataclass(frozen=True)
class Scene:
    """One video: what it shows (the caption's attributes) and where (pixels, at frame 0)."""

    colour: str
    shape: str
    direction: str
    background: str
    size: float
    x: float  # centre of the shape's bounding box at frame 0
    y: float
    speed: float  # pixels per frame along the direction

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction, self.background)

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.direction, self.background)


def random_scene(rng: np.random.Generator, combo: Sequence[str], frames: int = FRAMES,
                 size: int = SIZE) -> Scene:
    """A scene showing `combo` (colour, shape, direction, background), placed so its path stays in frame."""
    colour, shape, direction, background = combo
    scale = size / SIZE
    s = rng.uniform(*OBJECT_SIZE) * scale
    speed = rng.uniform(*SPEED) * scale * (FRAMES - 1) / max(frames - 1, 1)  # same path length at any length
    travel = speed * (frames - 1)
    lo, hi = s / 2 + MARGIN * scale, size - s / 2 - MARGIN * scale
    dx, dy = DIRECTIONS[direction]
    along = rng.uniform(lo, hi - travel)  # start coordinate along the motion, measured forwards
    across = rng.uniform(lo, hi)
    if dx:
        x, y = (along if dx > 0 else size - along), across
    else:
        x, y = across, (along if dy > 0 else size - along)
    return Scene(colour, shape, direction, background, float(s), float(x), float(y), float(speed))


def sample_scenes(n: int, seed: int, combos: Sequence[Sequence[str]] = TRAIN_COMBOS,
                  frames: int = FRAMES, size: int = SIZE) -> list[Scene]:
    """`n` scenes with combinations drawn uniformly from `combos`; the same seed gives the same scenes."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(combos), size=n)
    return [random_scene(rng, combos[i], frames, size) for i in picks]


def _coverage(scenes: Sequence[Scene], frames: int, size: int, device: torch.device) -> torch.Tensor:
    """Fraction of each pixel covered by the shape: [B, F, H, W] in [0, 1], one-pixel antialiased edge."""
    f32 = dict(dtype=torch.float32, device=device)
    as_tensor = lambda values: torch.tensor(values, **f32).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    step = torch.tensor([DIRECTIONS[s.direction] for s in scenes], **f32)  # [B, 2]
    t = torch.arange(frames, **f32).view(1, -1, 1, 1)  # [1, F, 1, 1]
    travel = t * as_tensor([s.speed for s in scenes])  # [B, F, 1, 1] pixels from the start
    cx = as_tensor([s.x for s in scenes]) + travel * step[:, 0].view(-1, 1, 1, 1)
    cy = as_tensor([s.y for s in scenes]) + travel * step[:, 1].view(-1, 1, 1, 1)
    half = as_tensor([s.size / 2 for s in scenes])
    pix = torch.arange(size, **f32) + 0.5  # pixel centres
    px, py = (pix.view(1, 1, 1, -1) - cx), (pix.view(1, 1, -1, 1) - cy)  # [B, F, 1, W], [B, F, H, 1]
    # signed distance to the outline (negative inside) of each shape, then the scene's own one
    square = torch.maximum(px.abs(), py.abs()) - half
    circle = torch.sqrt(px**2 + py**2) - half
    # isosceles triangle, apex up: base at y = +half, sides through (0, -half) and (+-half, +half)
    triangle = torch.maximum(py - half, (2 * px.abs() - (py + half)) / 5**0.5)
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device).view(-1, 1, 1, 1)
    distance = torch.where(kind == 0, square, torch.where(kind == 1, circle, triangle))
    return (0.5 - distance).clamp(0, 1)


def render(scenes: Sequence[Scene], frames: int = FRAMES, size: int = SIZE,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] (the VAE's range), float32 on `device`."""
    device = torch.device(device)
    alpha = _coverage(scenes, frames, size, device).unsqueeze(1)  # [B, 1, F, H, W]
    colour = torch.tensor([COLOURS[s.colour] for s in scenes], device=device).view(-1, 3, 1, 1, 1)
    background = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=device).view(-1, 3, 1, 1, 1)
    return (background + alpha * (colour - background)) * 2 - 1


def batches(batch_size: int, seed: int, combos: Sequence[Sequence[str]] = TRAIN_COMBOS, frames: int = FRAMES,
            size: int = SIZE, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, list[str]]]:
    """An endless, seeded stream of (videos [B, 3, F, H, W], captions)."""
    for i in itertools.count():
        scenes = sample_scenes(batch_size, seed=seed * 1_000_003 + i, combos=combos, frames=frames, size=size)
        yield render(scenes, frames, size, device), [s.caption for s in scenes]
