"""ImageEncoder: the conditioning image of an i2v or ti2v request to its latent (VAE encoder)."""

from __future__ import annotations

import torch

from ..io.media import load_image
from ..models.checkpoint import Checkpoint
from ..models.vae import fold_time_into_channels
from ..sampling.conditioning import image_condition
from .base import Stage, default_device
from .records import ImageLatents, Item


class ImageEncoder(Stage):
    name = "image_encode"

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, dtype: torch.dtype = torch.float32):
        self.task = checkpoint.task
        device = device or default_device()
        self.vae = fold_time_into_channels(checkpoint.load_vae(device, dtype))  # see Decoder
        self.gpus = 1.0 if device.startswith("cuda") else 0.0

    def process(self, item: Item) -> Item:
        request = item.request
        if request.image is None:  # ti2v without an image is text-to-video
            return item
        image = load_image(request.image)
        condition, width, height = image_condition(self.vae, image, self.task, request.width * request.height,
                                                   request.frames)
        return item.replace(image=ImageLatents(condition.to("cpu"), width, height))
