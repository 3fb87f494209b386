"""Media encoding: frames to MP4 (H.264) and JPEG, and back.

Frames are uint8 RGB arrays: a video is [F, H, W, 3], an image [H, W, 3]. MP4s go through the ffmpeg
binary that imageio-ffmpeg ships (libx264, yuv420p, `+faststart` so players can start before the
download ends); images through Pillow. Everything is bytes in, bytes out: where the bytes are stored
is `storage`'s business, and `load_image` is the one function that reads a URI.

Choices, all about matching what the official Wan2.2 scripts write:
- CRF 10: the official writer uses imageio's `quality=8`, which imageio-ffmpeg turns into
  `-crf int((1 - 8/10) * 51) = 10` for libx264 (visually lossless, ~3x the size of the default 23).
- No resizing, ever. imageio pads sizes up to multiples of 16 by *scaling*, which we switch off
  (`macro_block_size=1`). yuv420p halves the chroma planes, so H and W must be even: odd sizes are
  an error, not silently padded, since every Wan size (multiples of 16) is even and an odd one means
  a bug upstream.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wan_ray.io import storage

CRF = 10  # = imageio quality 8, the official setting (see module docstring)
PRESET = "medium"  # libx264's default speed/size trade-off


def _ffmpeg():
    """imageio-ffmpeg, imported where a video is written or read: a process that never touches an MP4 (a
    text-encoding or denoising worker, a GPU benchmark host without the 68 MB wheel) does not need it."""
    import imageio_ffmpeg

    return imageio_ffmpeg


def _check_frames(frames: np.ndarray, ndim: int, what: str) -> None:
    shape = "[F, H, W, 3]" if ndim == 4 else "[H, W, 3]"
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        kind = getattr(frames, "dtype", type(frames).__name__)
        raise TypeError(f"{what} must be a uint8 numpy array {shape}, got {kind}")
    if frames.ndim != ndim or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"{what} must have shape {shape} (RGB, non-empty), got {list(frames.shape)}")


# ----------------------------------------------------------------------------- MP4


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """H.264/yuv420p MP4 of uint8 RGB frames [F, H, W, 3] at `fps`; H and W must be even."""
    _check_frames(frames, 4, "frames")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs an even height and width, got {h}x{w} (H x W)")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with tempfile.TemporaryDirectory(prefix="wan-ray-mp4-") as tmp:
        path = str(Path(tmp) / "video.mp4")  # mp4 needs a seekable output to write its index
        writer = _ffmpeg().write_frames(
            path,
            (w, h),
            fps=Fraction(fps).limit_denominator(1001),
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # rate control comes from output_params
            macro_block_size=1,  # never rescale
            ffmpeg_log_level="error",
            output_params=["-crf", str(CRF), "-preset", PRESET, "-movflags", "+faststart"],
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return Path(path).read_bytes()


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """Frames uint8 [F, H, W, 3] and fps of an encoded video."""
    with _as_file(data) as path:
        reader = _ffmpeg().read_frames(path)
        try:
            meta = next(reader)
            w, h = meta["size"]
            frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot decode video ({len(data)} bytes): {_last_line(str(err))}") from err
        finally:
            reader.close()
    if not frames:
        raise ValueError(f"video ({len(data)} bytes) has no frames")
    return np.stack(frames), float(meta["fps"])


def probe_mp4(data: bytes) -> dict:
    """{frames, width, height, fps, codec, pix_fmt} of the first video stream, read from ffmpeg's
    log while it copies the stream to nowhere (no decoding, so it is cheap)."""
    with _as_file(data) as path:
        cmd = [_ffmpeg().get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path]
        cmd += ["-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
        log = subprocess.run(cmd, capture_output=True, text=True, errors="replace").stderr
    stream = re.search(r"Stream #0:\d+\S*: Video: (.*)", log)
    counts = re.findall(r"frame=\s*(\d+)", log)
    if stream is None or not counts:
        raise ValueError(f"not a readable video ({len(data)} bytes): {_last_line(log)}")
    # e.g. "h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 64x48, 19 kb/s, 16 fps, ..."
    fields = [f.strip() for f in re.split(r",(?![^(]*\))", stream.group(1))]  # commas outside ()
    size = next(re.fullmatch(r"(\d+)x(\d+)( .*)?", f) for f in fields if re.match(r"\d+x\d+", f))
    fps = next((float(f.split()[0]) for f in fields if f.endswith(" fps")), 0.0)
    return {
        "frames": int(counts[-1]),
        "width": int(size.group(1)),
        "height": int(size.group(2)),
        "fps": fps,
        "codec": fields[0].split()[0],
        "pix_fmt": re.match(r"\w+", fields[1]).group(0),
    }


@contextlib.contextmanager
def _as_file(data: bytes) -> Iterator[str]:
    """Bytes as a temporary file path: ffmpeg needs to seek in an mp4 (its index may be at the end)."""
    with tempfile.TemporaryDirectory(prefix="wan-ray-mp4-") as tmp:
        path = Path(tmp) / "video.mp4"
        path.write_bytes(data)
        yield str(path)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output from ffmpeg"


# ----------------------------------------------------------------------------- images


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of one uint8 RGB frame [H, W, 3]."""
    _check_frames(frame, 3, "frame")
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail(frames: np.ndarray, quality: int = 90) -> bytes:
    """JPEG of the middle frame of [F, H, W, 3], at full size."""
    _check_frames(frames, 4, "frames")
    return encode_jpeg(frames[len(frames) // 2], quality)


def spritesheet(
    frames: np.ndarray, columns: int = 5, max_frames: int = 25, tile_width: int = 320, quality: int = 85
) -> bytes:
    """JPEG grid of up to `max_frames` evenly spaced frames (first and last included), row by row,
    `columns` wide; each tile is scaled down to `tile_width` (never up), empty cells are black."""
    _check_frames(frames, 4, "frames")
    if columns < 1 or max_frames < 1 or tile_width < 1:
        got = f"{columns}, {max_frames}, {tile_width}"
        raise ValueError(f"columns, max_frames and tile_width must be >= 1, got {got}")
    picks = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))
    _, h, w, _ = frames.shape
    tw = min(w, tile_width)
    th = max(1, round(h * tw / w))
    cols = min(columns, len(picks))
    rows = -(-len(picks) // cols)
    sheet = Image.new("RGB", (cols * tw, rows * th))
    for n, i in enumerate(picks):
        tile = Image.fromarray(frames[i])
        if tile.size != (tw, th):
            tile = tile.resize((tw, th), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((n % cols) * tw, (n // cols) * th))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_image(source: str | Path | bytes) -> Image.Image:
    """An RGB image from a URI (any `storage` URI) or encoded bytes, upright per its EXIF orientation."""
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    data = bytes(source) if is_bytes else storage.read_bytes(str(source))
    name = f"{len(data)} bytes" if is_bytes else str(source)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read an image from {name}: expected PNG, JPEG, WebP or another format "
                         f"Pillow reads ({type(err).__name__})") from err
    return ImageOps.exif_transpose(image).convert("RGB")
