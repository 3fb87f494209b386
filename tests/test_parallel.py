"""Gangs on CPU with gloo: Ulysses, CFG parallelism and weight sharding give the single-process latent."""

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from wan_ray.models.checkpoint import load_dit, save_dit
from wan_ray.models.dit import WanDiT
from wan_ray.sampling.loop import ImageCondition, sample, seeded_noise
from wan_ray.sampling.plan import make_plan

DIT = dict(dim=32, ffn_dim=48, num_heads=4, num_layers=2, text_dim=16, freq_dim=16, text_len=12)
VARIANTS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (16, 16)}
LATENT = (1, 16, 3, 6, 6)  # 3 x 3 x 3 = 27 tokens: not a multiple of 2 or 4, so padding is exercised


def write_models(root: Path) -> None:
    for i, (variant, (in_dim, out_dim)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = WanDiT(model_type=variant, in_dim=in_dim, out_dim=out_dim, **DIT)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_dit(model, root / variant)


def inputs(variant: str):
    g = torch.Generator().manual_seed(7)
    ctx, null = torch.randn(1, 5, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    if variant == "i2v":
        condition = ImageCondition(y=torch.randn(1, 20, *LATENT[2:], generator=g))
    elif variant == "ti2v":
        first = torch.randn(1, 16, 1, *LATENT[3:], generator=g)
        condition = ImageCondition(first_frame=first, patch=(1, 2, 2))
    else:
        condition = None
    return ctx, null, condition


def run_sample(model, variant: str) -> torch.Tensor:
    ctx, null, condition = inputs(variant)
    plan = make_plan(3, 5.0, "unipc", guide_scale=4.0)
    return sample({"single": model}, seeded_noise(LATENT, 3), ctx, null, plan, condition, batched_cfg=True)


def _rank(rank: int, world: int, port: int, root: str, cases: list) -> None:
    from wan_ray.parallel import init_gang, load_parallel_dit, make_groups

    torch.set_num_threads(1)
    init_gang(rank, world, f"127.0.0.1:{port}", backend="gloo")
    for variant, cfg_parallel, shard in cases:
        groups = make_groups(cfg_parallel)
        model = load_parallel_dit(Path(root) / variant, groups, device="cpu", shard_weights=shard)
        latent = run_sample(model, variant)
        if rank == 0:
            torch.save(latent, Path(root) / f"out-{world}-{variant}-{cfg_parallel}-{shard}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    2: [("t2v", False, False), ("t2v", True, False), ("i2v", False, True), ("ti2v", True, True)],
    4: [("t2v", False, False), ("i2v", True, False), ("ti2v", False, True), ("t2v", True, True),
        ("i2v", False, False), ("ti2v", True, False)],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gang")
    write_models(root)
    return root


@pytest.mark.parametrize("world", [2, 4])
def test_gang_equals_single_process(models, world):
    mp.spawn(_rank, args=(world, free_port(), str(models), CASES[world]), nprocs=world, join=True)
    for variant, cfg_parallel, shard in CASES[world]:
        reference = run_sample(load_dit(models / variant), variant)
        got = torch.load(models / f"out-{world}-{variant}-{cfg_parallel}-{shard}.pt")
        err = ((got - reference).norm() / reference.norm()).item()
        assert err <= 1e-5, (world, variant, cfg_parallel, shard, err)


def test_gang_size_must_divide_heads():
    from wan_ray.parallel.ulysses import check_heads

    check_heads(40, 8)
    with pytest.raises(ValueError, match=r"size 3 does not divide the model's 40 heads; .* \[1, 2, 4, 5, 8"):
        check_heads(40, 3)
