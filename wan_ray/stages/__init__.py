"""Plain stage classes, one per step of a video: built from a checkpoint, called on lists of `Item`s.

No Ray Data or Serve here: `wan_ray.runtime`, `wan_ray.batch` and `wan_ray.serve` wrap these classes.
"""

from .base import Stage
from .decode import Decoder
from .denoise import Denoiser
from .image import ImageEncoder
from .records import ImageLatents, Item, PromptEmbeds, Result, Video
from .text import TextEncoder
from .write import Writer

__all__ = ["Decoder", "Denoiser", "ImageEncoder", "ImageLatents", "Item", "PromptEmbeds", "Result", "Stage",
           "TextEncoder", "Video", "Writer"]
