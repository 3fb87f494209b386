"""Text encoding for a batch of videos: our TextEncoder stage against diffusers' prompt encoding.

Both sides run one and the same transformers `UMT5EncoderModel` (random bf16 weights at the umT5-XXL size,
5.68 B parameters, loaded through our `load_umt5_encoder`) over 512 padded slots per text, as the official
code does, with the same word-level tokenizer (the real umT5 tokenizer cannot be downloaded here; the slot
count, not the tokenizer, sets the work). The work is the text side of `--videos` videos, each with its own
prompt and the task's default negative prompt:

- ``diffusers``: `WanPipeline.encode_prompt(prompt, negative_prompt, max_sequence_length=512)` once per
  video, as its pipeline does for each video it makes: two forwards of batch 1 per video.
- ``ours``: the `TextEncoder` stage on all the videos' texts, as the batch job runs it: each distinct text
  once (the shared negative prompt once for all), in batches of `--batch-size`.
- ``ours, distinct negatives``: the same with a different negative prompt per video, so that only
  batching helps (diffusers is timed on those texts too, in the row beside it).

Each row gives the median of `--repeat` runs after a warm-up (a fresh stage each run, so its cache of
recent texts never helps), videos per second, and the relative L2 of our embeddings against diffusers'.

    python benchmarks/bench_text.py --videos 32 --out text.json
    python benchmarks/bench_text.py --tiny            # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e

from wan_ray.models.config import PRESETS
from wan_ray.models.text_encoder import (
    UMT5TextEncoder,
    build_word_tokenizer,
    load_tokenizer,
    load_umt5_encoder,
)
from wan_ray.stages.text import TextEncoder

# umT5-XXL's encoder (the spec's section 6.1); TINY keeps its structure at toy size
XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
TINY = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
_VOCABULARY = """a red blue green white golden small large cat dog fox horse car boat kite robot runs walks
flies jumps slowly quickly across through over the city forest beach river snow night morning sunset street
park field mountain camera pans follows close-up wide shot cinematic lighting soft warm cold detailed
realistic style with its of and in under by light shadow rain wind dust"""
WORDS = _VOCABULARY.split()


def random_encoder(tiny: bool, device: str) -> torch.nn.Module:
    """A umT5 encoder with random bf16 weights, through the same loader as a real checkpoint."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**(TINY if tiny else XXL), relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5EncoderModel(config).state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if name == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        if len(shape) == 1:  # RMS norm gains
            weight = torch.ones(shape, device=device)
        else:  # unit-variance embeddings, a small position bias, projections scaled by their fan-in
            std = (1.0 if name == "shared.weight" else 0.1 if "relative_attention_bias" in name
                   else shape[-1] ** -0.5)
            weight = torch.randn(shape, generator=g, device=device) * std
        state[name] = weight.to(torch.bfloat16)
    return load_umt5_encoder(state, config, device=device, dtype=torch.bfloat16)


def prompts(count: int, seed: int) -> list[str]:
    """`count` distinct prompts of 40-120 words."""
    rng = random.Random(seed)
    return [f"video {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(40, 120))) for i in range(count)]


def timed_runs(fn, repeat: int, device: str) -> tuple[float, list[float], object]:
    """(median seconds, all times, the last result) of `repeat` calls after a warm-up."""
    runs = [bench_e2e.timed(fn, device) for _ in range(repeat + 1)][1:]
    return statistics.median(t for t, _ in runs), [t for t, _ in runs], runs[-1][1]


def rel_l2(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Relative L2 of our per-text embeddings against diffusers' (theirs are zero-padded to 512: cut them)."""
    pairs = zip(ours, theirs, strict=True)
    num = sum(((o.float() - t[: o.shape[0]].float().cpu()) ** 2).sum() for o, t in pairs)
    den = sum((t.float() ** 2).sum() for t in theirs)
    return (num / den).sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward in our stage")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a toy-size encoder, for a CPU smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from diffusers import WanPipeline

    task = PRESETS["t2v-A14B"]
    texts = prompts(args.videos, seed=0)
    negatives = {"shared negative": [task.negative_prompt] * args.videos,
                 "distinct negatives": [f"{task.negative_prompt} {i}" for i in range(args.videos)]}
    with tempfile.TemporaryDirectory() as tmp:
        vocabulary = [*WORDS, "video", *map(str, range(args.videos))]
        tokenizer = load_tokenizer(build_word_tokenizer(vocabulary, tmp))
    model = random_encoder(args.tiny, device)
    encoder = UMT5TextEncoder(model, tokenizer, text_len=task.text_len)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, scheduler=None, transformer=None)

    def diffusers_loop(negative: list[str]) -> list[torch.Tensor]:
        out = []
        for prompt, neg in zip(texts, negative, strict=True):
            embeds, null = pipe.encode_prompt(prompt, neg, max_sequence_length=task.text_len, device=device)
            out += [embeds[0], null[0]]
        return out

    def ours(negative: list[str]) -> list[torch.Tensor]:
        stage = TextEncoder(encoder=encoder, batch_size=args.batch_size)  # fresh: an empty cache
        return stage.embed([t for pair in zip(texts, negative, strict=True) for t in pair])

    rows = []
    with torch.no_grad():
        for label, negative in negatives.items():
            base, base_times, reference = timed_runs(lambda n=negative: diffusers_loop(n), args.repeat,
                                                     device)
            rows.append(dict(texts=label, impl="diffusers", seconds=base, times=base_times,
                             videos_per_s=args.videos / base, forwards=2 * args.videos))
            seconds, times, embeds = timed_runs(lambda n=negative: ours(n), args.repeat, device)
            distinct = len(set(texts) | set(negative))
            rows.append(dict(texts=label, impl="ours", seconds=seconds, times=times,
                             videos_per_s=args.videos / seconds, ratio=seconds / base,
                             forwards=-(-distinct // args.batch_size),
                             rel_l2_vs_diffusers=rel_l2(embeds, reference)))
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"card: {card}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}  {args.videos} videos, "
          f"umT5 {'tiny' if args.tiny else 'XXL'}, batch {args.batch_size}")
    print(f"{'texts':18} {'impl':9} {'forwards':>8} {'seconds':>8} {'videos/s':>8} {'ratio':>6} "
          f"{'rel L2':>8}")
    for r in rows:
        print(f"{r['texts']:18} {r['impl']:9} {r['forwards']:8d} {r['seconds']:8.3f} "
              f"{r['videos_per_s']:8.1f} {r.get('ratio', 1.0):6.3f} {r.get('rel_l2_vs_diffusers', 0.0):8.2e}")
    if args.out:
        result = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                  "videos": args.videos, "batch_size": args.batch_size, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
