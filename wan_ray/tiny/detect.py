"""A deterministic detector that reads a tiny-model video back into caption attributes, and its scoring.

It looks only at pixels (uint8 frames `[F, H, W, 3]`, what a generator returns), never at a model:

- background: the median colour of the whole video (the object covers a few percent of it), snapped to
  the nearest background of the vocabulary;
- object: the pixels whose largest channel difference from that background exceeds `OBJECT_THRESHOLD`;
- colour: the mean colour of the clearly-object pixels (difference above `CORE_THRESHOLD`, so antialiased
  edges do not pull it towards the background), snapped to the nearest colour of the vocabulary;
- direction: the motion of the object's centroid from its first to its last visible frame, by its larger
  axis; less than `MIN_MOTION` of the width is no direction;
- shape (a stretch: coarse by design): the median over frames of the object's area over its bounding box's
  area, about 1 for a square, pi/4 for a circle, 1/2 for a triangle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import ATTRIBUTES, BACKGROUNDS, COLOURS, DIRECTIONS

OBJECT_THRESHOLD = 0.25  # in [0, 1] pixel units; the weakest object/background contrast is 0.5
CORE_THRESHOLD = 0.35
MIN_PIXELS = 12  # fewer object pixels than this in a frame: nothing visible there
MIN_MOTION = 1 / 16  # of the frame width; ground truth moves 40-56 px in 128
FILL_SQUARE, FILL_CIRCLE = 0.89, 0.64  # boundaries between 1 (square), pi/4 (circle) and 1/2 (triangle)


@dataclass(frozen=True)
class Detection:
    colour: str | None
    shape: str | None
    direction: str | None
    background: str
    motion: tuple[float, float]  # centroid displacement (dx, dy) in pixels, first to last visible frame
    fill: float  # median area / bounding-box area of the object
    visible: float  # fraction of frames where the object is visible

    def as_tuple(self) -> tuple[str | None, str | None, str | None, str]:
        return (self.colour, self.shape, self.direction, self.background)


def _nearest(value: np.ndarray, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(value - np.asarray(palette[n])) for n in names]
    return names[int(np.argmin(distances))]


def detect(frames: np.ndarray) -> Detection:
    """Attributes of one video, uint8 `[F, H, W, 3]` (or float in [0, 1])."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"detect expects frames [F, H, W, 3], got shape {frames.shape}")
    x = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    background_rgb = np.median(x.reshape(-1, 3), axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    diff = np.abs(x - background_rgb).max(axis=-1)  # [F, H, W]
    mask = diff > OBJECT_THRESHOLD
    core = diff > CORE_THRESHOLD

    colour = _nearest(x[core].mean(axis=0), COLOURS) if core.sum() >= MIN_PIXELS else None
    centroids, fills = [], []
    for m in mask:
        ys, xs = np.nonzero(m)
        if len(xs) < MIN_PIXELS:
            continue
        centroids.append((xs.mean(), ys.mean()))
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        fills.append(len(xs) / box)
    if not centroids:
        return Detection(colour, None, None, background, (0.0, 0.0), 0.0, 0.0)

    dx, dy = np.subtract(centroids[-1], centroids[0])
    direction = None
    if max(abs(dx), abs(dy)) >= MIN_MOTION * frames.shape[2]:
        step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, d in DIRECTIONS.items() if d == step)
    fill = float(np.median(fills))
    shape = "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"
    return Detection(colour, shape, direction, background, (float(dx), float(dy)), fill,
                     len(centroids) / len(mask))


def accuracy(detections: Sequence[Detection], expected: Sequence[Sequence[str]]) -> dict[str, float]:
    """Per attribute, the fraction of videos whose detection equals the expected (colour, shape, ...)."""
    if len(detections) != len(expected) or not detections:
        raise ValueError(f"need one expected tuple per detection, got {len(detections)} and {len(expected)}")
    return {name: float(np.mean([d.as_tuple()[i] == e[i] for d, e in zip(detections, expected, strict=True)]))
            for i, name in enumerate(ATTRIBUTES)}
