"""wan_ray.io: storage round trips (local, file://, S3 over real HTTP to moto) and media encoding."""

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wan_ray.io import media, storage

# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("form", ["path", "file_uri"])
def test_local_round_trip(tmp_path, form):
    base = str(tmp_path) if form == "path" else tmp_path.as_uri()
    uri = storage.join(base, "out", "run1", "a.mp4")
    storage.write_bytes(uri, b"video")  # creates the folders
    storage.write_bytes(storage.join(base, "out", "b.json"), b"{}")
    storage.write_bytes(storage.join(base, "outside.txt"), b"x")

    assert storage.read_bytes(uri) == b"video"
    assert (tmp_path / "out" / "run1" / "a.mp4").read_bytes() == b"video"
    assert storage.exists(uri) and not storage.exists(storage.join(base, "out"))  # a folder is no object
    assert storage.list_uris(storage.join(base, "out")) == [storage.join(base, "out/b.json"), uri]
    assert storage.list_uris(storage.join(base, "nothing-here")) == []

    storage.write_bytes(uri, b"new")  # overwrite
    assert storage.read_bytes(uri) == b"new"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting a missing object is fine
    with pytest.raises(FileNotFoundError, match=r"a\.mp4"):
        storage.read_bytes(uri)


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.mp4"
    storage.write_bytes(str(target), b"old")

    def crash(*args):
        raise OSError("disk died before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        storage.write_bytes(str(target), b"half-written")
    monkeypatch.undo()

    assert target.read_bytes() == b"old"  # the old file or the new one, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["x.mp4"]  # no temp file left behind
    (tmp_path / ".x.mp4.0123456789ab.part").write_bytes(b"stray from a killed process")
    assert storage.list_uris(str(tmp_path)) == [str(target)]
    assert not storage.exists(str(tmp_path / "y.mp4"))


def test_s3_round_trip(s3_env):
    uri = storage.join(s3_env, "out/run1", "a.mp4")
    storage.write_bytes(uri, b"video")
    storage.write_bytes(storage.join(s3_env, "out/b.json"), b"{}")
    storage.write_bytes(storage.join(s3_env, "outside/c.txt"), b"x")  # shares the string prefix "out"
    bucket, _ = storage.split_s3(s3_env)
    storage.s3_client().put_object(Bucket=bucket, Key="out/folder-marker/", Body=b"")  # not an object

    assert storage.read_bytes(uri) == b"video"
    head = storage.s3_client().head_object(Bucket=bucket, Key="out/run1/a.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == 5
    assert storage.exists(uri) and not storage.exists(storage.join(s3_env, "out/run1/zzz.mp4"))
    assert storage.list_uris(storage.join(s3_env, "out")) == [f"{s3_env}/out/b.json", uri]
    assert len(storage.list_uris(s3_env)) == 3

    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)
    with pytest.raises(FileNotFoundError, match=f"no such object: {uri}"):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError, match="'no-such-bucket-xyz' does not exist"):
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    with pytest.raises(FileNotFoundError, match="'no-such-bucket-xyz' does not exist"):
        storage.write_bytes("s3://no-such-bucket-xyz/k", b"x")


def test_s3_multipart_upload(s3_env):
    mib = 2**20
    big = np.random.default_rng(0).integers(0, 256, 11 * mib, dtype=np.uint8).tobytes()
    uri = storage.join(s3_env, "big.mp4")
    storage.write_bytes(uri, big, part_size=5 * mib)  # S3's smallest part size
    small = storage.join(s3_env, "small.mp4")
    storage.write_bytes(small, b"tiny", part_size=5 * mib)

    def etag(u):
        bucket, key = storage.split_s3(u)
        return storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')

    assert etag(uri).endswith("-3")  # multipart ETags end in -<number of parts>: 5 + 5 + 1 MiB
    assert "-" not in etag(small)
    assert storage.read_bytes(uri) == big


def test_endpoint_from_service_specific_variable(s3_env, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)  # wins for S3, as in every AWS SDK
    storage.reset_s3_client()
    uri = storage.join(s3_env, "k.bin")
    storage.write_bytes(uri, b"abc")
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"abc"


def test_region_from_aws_region(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")  # botocore alone would ignore this one
    storage.reset_s3_client()
    fs, path = storage.arrow_filesystem(storage.join(s3_env, "a", "b.parquet"))
    assert storage.s3_client().meta.region_name == fs.region == "eu-west-3"
    assert path == f"{s3_env[len('s3://'):]}/a/b.parquet"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_through_arrow_filesystem(where, tmp_path, request):
    base = request.getfixturevalue("s3_env") if where == "s3" else str(tmp_path)
    uri = storage.join(base, "_results", "part-0.parquet")
    table = pa.table({"id": ["a", "b"], "status": ["ok", "failed"], "seconds": [1.5, 0.25]})

    fs, path = storage.arrow_filesystem(uri)
    if where == "local":
        fs.create_dir(path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)

    assert pq.read_table(path, filesystem=fs).equals(table)
    # the same object through the other client (boto3 / plain file)
    assert storage.list_uris(storage.join(base, "_results")) == [uri]
    assert pq.read_table(io.BytesIO(storage.read_bytes(uri))).equals(table)


def test_s3_secrets_stay_out_of_messages(s3_env, monkeypatch):
    secret = "wanray-SECRET-do-not-print"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any credentials
    storage.reset_s3_client()
    fs, path = storage.arrow_filesystem(storage.join(s3_env, "x.bin"))
    assert secret not in repr(fs) and secret not in str(fs)
    with fs.open_output_stream(path) as f:  # the credentials did reach pyarrow
        f.write(b"1")
    assert storage.read_bytes(storage.join(s3_env, "x.bin")) == b"1"
    with pytest.raises(FileNotFoundError) as err:
        storage.read_bytes(storage.join(s3_env, "missing.bin"))
    assert secret not in str(err.value) and secret not in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/key", r"unsupported URI scheme 'gs'.*plain paths, file:// URIs and s3://"),
        ("https://example.com/a.mp4", "unsupported URI scheme 'https'"),
        ("s3://Bad_Bucket/key", "invalid S3 bucket name 'Bad_Bucket'"),
        ("s3://ab/key", "invalid S3 bucket name 'ab'"),
        ("s3://bucket", "names no object"),
        ("s3://bucket/folder/", "names no object"),
        ("file://otherhost/tmp/x", "names host 'otherhost'"),
    ],
)
def test_bad_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        storage.read_bytes(uri)


# ----------------------------------------------------------------------------- media


def smooth_video(f=9, h=40, w=56):
    """A gradient drifting right: smooth content H.264 reproduces closely. 40x56 is even but not a
    multiple of 16, so an encoder that rescales would show up in the size."""
    y, x = np.mgrid[0:h, 0:w]
    t = np.arange(f)[:, None, None]
    r = 40 + 3 * (x + 2 * t)
    g = 60 + 2 * y + 0 * t
    b = 200 - 2 * x + 0 * t
    return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)  # [F, H, W, 3]


def test_mp4_round_trip():
    frames = smooth_video()
    data = media.encode_mp4(frames, fps=16)

    assert data[4:8] == b"ftyp"
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: index first, playable while loading
    assert media.probe_mp4(data) == {
        "frames": 9, "width": 56, "height": 40, "fps": 16.0, "codec": "h264", "pix_fmt": "yuv420p"
    }
    decoded, fps = media.decode_mp4(data)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8 and fps == 16.0
    error = np.abs(decoded.astype(float) - frames)
    # ~1.5 is what yuv420p itself costs (RGB->YUV rounding, chroma at half resolution) even losslessly
    assert error.mean() < 2.5 and error.max() <= 10


def test_stages_import_without_imageio_ffmpeg():
    # text-encoding and denoising workers, and GPU benchmark hosts, never touch an MP4: no ffmpeg needed
    code = """
import sys
class NoFFmpeg:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("imageio_ffmpeg"):
            raise ImportError(name)
sys.meta_path.insert(0, NoFFmpeg())
import wan_ray.stages, wan_ray.io.media
assert "imageio_ffmpeg" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mp4_bad_input():
    frames = smooth_video()
    with pytest.raises(ValueError, match="even height and width, got 39x56"):
        media.encode_mp4(frames[:, :39], fps=16)
    with pytest.raises(TypeError, match="uint8"):
        media.encode_mp4(frames.astype(np.float32), fps=16)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        media.encode_mp4(frames[..., :1], fps=16)
    with pytest.raises(ValueError, match="fps must be positive"):
        media.encode_mp4(frames, fps=0)
    with pytest.raises(ValueError, match="cannot decode video"):
        media.decode_mp4(b"not a video at all")
    with pytest.raises(ValueError, match="not a readable video"):
        media.probe_mp4(b"not a video at all")


def jpeg_image(data):
    assert data[:2] == b"\xff\xd8"  # JPEG magic
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB")).astype(int)


def test_thumbnail_and_spritesheet():
    levels = np.arange(10) * 25  # frame i is flat grey 25*i
    frames = np.broadcast_to(levels[:, None, None, None], (10, 48, 64, 3)).astype(np.uint8)

    thumb = jpeg_image(media.thumbnail(frames))
    assert thumb.shape == (48, 64, 3) and np.abs(thumb - 125).max() <= 2  # the middle frame, 5

    sheet = jpeg_image(media.spritesheet(frames, columns=3, max_frames=5, tile_width=32))
    assert sheet.shape == (2 * 24, 3 * 32, 3)  # 5 tiles of 32x24 in 3 columns
    tiles = [sheet[r * 24 : (r + 1) * 24, c * 32 : (c + 1) * 32] for r in range(2) for c in range(3)]
    means = [round(t[4:-4, 4:-4].mean()) for t in tiles]  # centres, away from JPEG edge ringing
    assert means == pytest.approx([0, 50, 100, 175, 225, 0], abs=3)  # frames 0,2,4,7,9, then black

    few = jpeg_image(media.spritesheet(frames[:2], columns=5))  # fewer frames than columns
    assert few.shape == (48, 128, 3)  # tiles never scaled up


def test_load_image(tmp_path, s3_env):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    storage.write_bytes(str(tmp_path / "in.png"), buf.getvalue())
    storage.write_bytes(storage.join(s3_env, "in.png"), buf.getvalue())

    for source in (buf.getvalue(), str(tmp_path / "in.png"), storage.join(s3_env, "in.png")):
        image = media.load_image(source)
        assert image.mode == "RGB" and image.size == (20, 10)
        assert image.getpixel((0, 0))[0] == 255

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, display rotated by 90 degrees
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, format="JPEG", exif=exif)
    assert media.load_image(buf.getvalue()).size == (10, 20)

    with pytest.raises(ValueError, match="cannot read an image from 9 bytes"):
        media.load_image(b"not a png")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        media.load_image(str(tmp_path / "missing.png"))
