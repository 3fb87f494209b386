"""TextEncoder: prompts and negative prompts to umT5 embeddings, each distinct text encoded once."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..models.checkpoint import Checkpoint
from ..models.text_encoder import UMT5TextEncoder
from .base import Stage, default_device, default_dtype
from .records import Item, PromptEmbeds


class TextEncoder(Stage):
    """`encoder` may be given instead of a checkpoint to load it from (a benchmark's random weights)."""

    name = "text_encode"

    def __init__(self, checkpoint: Checkpoint | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 8, cache_size: int = 1024, *,
                 encoder: UMT5TextEncoder | None = None):
        if encoder is None:
            if checkpoint is None:
                raise ValueError("TextEncoder needs a checkpoint (to load umT5 from) or an encoder")
            device = device or default_device()
            dtype = dtype or default_dtype(device)
            encoder = checkpoint.load_text_encoder(device, dtype)
        self.encoder = encoder
        self.gpus = 1.0 if encoder.device.type == "cuda" else 0.0
        self.batch_size = batch_size
        # Most rows of a job share the negative prompt, and prompts repeat: keep recent embeddings.
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def embed(self, texts: list[str]) -> list[torch.Tensor]:
        """[L_i, D] CPU tensors for `texts`, encoding only those not seen recently."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for text, emb in zip(chunk, self.encoder.encode(chunk), strict=True):
                self._cache[text] = emb.cpu()
        out = []
        for text in texts:
            self._cache.move_to_end(text)
            out.append(self._cache[text])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def process_batch(self, items: list[Item]) -> list[Item]:
        texts = [t for item in items for t in (item.request.prompt, item.request.negative_prompt)]
        embs = self.embed(texts)
        return [item.replace(embeds=PromptEmbeds(embs[2 * i], embs[2 * i + 1]))
                for i, item in enumerate(items)]
