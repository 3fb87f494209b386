"""The `wan-ray` command."""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Sequence

from .batch import command as batch_command
from .serve import cli as serve_command


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ---------------------------------------------------------------------------------------------------------
# wan-ray run: one video, with the official generate.py flags


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="t2v-A14B, i2v-A14B, ti2v-5B or tiny (default: the checkpoint's own task)")
    p.add_argument("--ckpt_dir", "--model", dest="ckpt_dir", default=None,
                   help="release folder (official or diffusers layout) or a bundled name; default: tiny")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--size", default=None, help='"WIDTH*HEIGHT"; default: the task\'s first size')
    p.add_argument("--image", default=None, help="first-frame image for i2v / ti2v")
    p.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1")
    p.add_argument("--sample_solver", default=None, choices=["unipc", "dpm++", "euler"])
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--sample_shift", type=float, default=None)
    p.add_argument("--sample_guide_scale", type=float, default=None, help="one scale for both experts")
    p.add_argument("--base_seed", type=int, default=-1, help="-1 picks a random seed")
    p.add_argument("--offload_model", type=_bool, default=False,
                   help="keep only the active expert on the GPU (True/False)")
    p.add_argument("--convert_model_dtype", action="store_true",
                   help="accepted for compatibility: weights are always converted to the compute dtype")
    p.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--save_file", default=None, help="output .mp4 (default: named after task, size, prompt)")


def run_one(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import Generator
    from .sampling.request import RequestError

    model = args.ckpt_dir or ("tiny" if args.task in (None, "tiny") else None)
    if model is None:
        print(f"--task {args.task} needs --ckpt_dir (the release folder)", file=sys.stderr)
        return 2
    generator = Generator(model, device=args.device, offload_model=args.offload_model, t5_cpu=args.t5_cpu)
    if args.task and args.task != generator.task.name:
        print(f"--task {args.task} does not match the checkpoint's {generator.task.name}", file=sys.stderr)
        return 2
    seed = random.randint(0, 2**31 - 1) if args.base_seed < 0 else args.base_seed
    try:
        request = generator.request(args.prompt, negative_prompt=args.negative_prompt, size=args.size,
                                    image=args.image, frames=args.frame_num, solver=args.sample_solver,
                                    steps=args.sample_steps, shift=args.sample_shift,
                                    guide_scale=args.sample_guide_scale, seed=seed)
    except RequestError as err:
        print(f"invalid request: {err}", file=sys.stderr)
        return 2
    with tqdm(total=request.steps, desc="denoising", unit="step") as bar:
        video = generator.run(request, on_step=lambda done, total: bar.update(done - bar.n))
    path = args.save_file or _default_file_name(request.task, request.size, request.prompt)
    video.save(path)
    shape = video.frames.shape
    print(f"saved {path}: {shape[0]} frames {shape[2]}x{shape[1]} at {video.fps} fps, seed {request.seed}; "
          + ", ".join(f"{k} {v:.2f}s" for k, v in video.timings.items()))
    return 0


def _default_file_name(task: str, size: str, prompt: str) -> str:
    words = re.sub(r"[\s/]+", "_", prompt[:50])
    words = re.sub(r"[^\w.-]", "", words)
    return f"{task}_{size}_1_{words}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"


# ---------------------------------------------------------------------------------------------------------


def _eval_tiny_arguments(p: argparse.ArgumentParser) -> None:
    from .tiny import evaluate

    evaluate.add_arguments(p)


def _eval_tiny(args: argparse.Namespace) -> int:
    from .tiny import evaluate

    evaluate.run(args)
    return 0


# name, help, arguments, runner
COMMANDS = [
    ("run", "make one video in this process (flags of the official generate.py)", _run_arguments, run_one),
    ("generate", "batch job: a Parquet manifest in, videos and a results manifest out, on Ray",
     batch_command.generate_arguments, batch_command.generate),
    ("validate", "check a manifest without running anything", batch_command.validate_arguments,
     batch_command.validate),
    ("serve", "the online endpoint: a Ray Serve app speaking the OpenAI Videos API",
     serve_command.add_arguments, serve_command.serve_main),
    ("eval-tiny", "how well the tiny model follows its prompts: generate, detect, print accuracy",
     _eval_tiny_arguments, _eval_tiny),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-ray", description="Wan2.2 video generation on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, runner in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(runner=runner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.runner(args)


if __name__ == "__main__":
    sys.exit(main())
