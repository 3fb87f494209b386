"""First-frame conditioning of the image-to-video tasks (spec §4.5-4.6).

I2V-A14B: the image, resized to fit the area budget with its own aspect ratio, is followed by zero frames
and the whole clip is VAE-encoded; with a mask marking latent frame 0 it forms the 20 extra DiT input
channels. TI2V-5B: the image is resized to cover the output size, center-cropped, encoded alone, and its
latent replaces the first latent frame after every step (`ImageCondition.first_frame`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.config import TaskSpec
from .loop import ImageCondition


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2 - 1


def i2v_size(image_w: int, image_h: int, area: int, stride: int, patch: int) -> tuple[int, int]:
    """Output (width, height) for I2V: the image's aspect ratio within `area`, on the latent/patch grid."""
    ratio = image_h / image_w
    lat_h = round(math.sqrt(area * ratio) // stride // patch * patch)
    lat_w = round(math.sqrt(area / ratio) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"an image of {image_w}x{image_h} leaves no room in an area of {area} pixels")
    return lat_w * stride, lat_h * stride


def ti2v_size(image_w: int, image_h: int, area: int, grid: int) -> tuple[int, int]:
    """Output (width, height) for TI2V: sides on a `grid`-pixel lattice within `area`; of fitting the width
    first or the height first, the one whose aspect ratio is closer to the image's."""
    ratio = image_w / image_h
    w = math.sqrt(area * ratio)
    h = area / w
    w1 = int(w // grid * grid)
    h1 = int(area / w1 // grid * grid) if w1 else 0
    h2 = int(h // grid * grid)
    w2 = int(area / h2 // grid * grid) if h2 else 0
    if not (w1 and h1) and not (w2 and h2):
        raise ValueError(f"an image of {image_w}x{image_h} leaves no room in an area of {area} pixels")
    mismatch = lambda w, h: max(ratio * h / w, w / h / ratio) if w and h else math.inf
    return (w1, h1) if mismatch(w1, h1) < mismatch(w2, h2) else (w2, h2)  # ties go to height-first


@torch.no_grad()
def i2v_condition(vae, image: Image.Image, width: int, height: int, frames: int) -> ImageCondition:
    """`y` = [mask (4), latent of (image, zeros...) (z)] over all latent frames: [1, 4 + z, T, h, w]."""
    device = vae.conv1.weight.device
    pixels = F.interpolate(to_tensor(image)[None], size=(height, width), mode="bicubic")  # [1, 3, H, W]
    clip = torch.zeros(1, 3, frames, height, width)
    clip[:, :, 0] = pixels[0]
    latent = vae.encode(clip.to(device)).float()  # [1, z, T, h, w]
    mask = torch.zeros(1, 4, *latent.shape[2:], device=device)
    mask[:, :, 0] = 1.0  # latent frame 0 holds the given image
    return ImageCondition(y=torch.cat([mask, latent], dim=1))


@torch.no_grad()
def ti2v_condition(vae, image: Image.Image, width: int, height: int,
                   patch: tuple[int, int, int]) -> ImageCondition:
    """The clean latent of the (resized, center-cropped) image: [1, z, 1, h, w]."""
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                          Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = to_tensor(resized.crop((left, top, left + width, top + height)))
    latent = vae.encode(pixels[None, :, None].to(vae.conv1.weight.device)).float()
    return ImageCondition(first_frame=latent, patch=patch)


def image_condition(vae, image: Image.Image, task: TaskSpec, area: int,
                    frames: int) -> tuple[ImageCondition, int, int]:
    """The task's conditioning for `image` and the (width, height) of the video it sets."""
    _, stride, _ = task.vae_stride
    _, patch, _ = task.dit.patch_size
    if task.dit.model_type == "i2v":
        width, height = i2v_size(image.width, image.height, area, stride, patch)
        return i2v_condition(vae, image, width, height, frames), width, height
    if task.dit.model_type == "ti2v":
        width, height = ti2v_size(image.width, image.height, area, stride * patch)
        return ti2v_condition(vae, image, width, height, task.dit.patch_size), width, height
    raise ValueError(f"{task.name} takes no conditioning image")
