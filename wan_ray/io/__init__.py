"""wan_ray.io: storage by URI (plain paths, file://, s3://) and media encoding (MP4, JPEG).

The lowest layer: it imports nothing from wan_ray.
"""

from wan_ray.io.media import (
    decode_mp4,
    encode_jpeg,
    encode_mp4,
    load_image,
    probe_mp4,
    spritesheet,
    thumbnail,
)
from wan_ray.io.storage import (
    arrow_filesystem,
    delete,
    exists,
    is_s3,
    join,
    list_uris,
    read_bytes,
    reset_s3_client,
    s3_client,
    split_s3,
    write_bytes,
)

__all__ = [
    "arrow_filesystem",
    "decode_mp4",
    "delete",
    "encode_jpeg",
    "encode_mp4",
    "exists",
    "is_s3",
    "join",
    "list_uris",
    "load_image",
    "probe_mp4",
    "read_bytes",
    "reset_s3_client",
    "s3_client",
    "split_s3",
    "spritesheet",
    "thumbnail",
    "write_bytes",
]
