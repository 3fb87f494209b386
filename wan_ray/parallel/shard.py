"""FSDP-style weight sharding of a DiT across a gang, so a 14B expert fits smaller GPUs.

Each rank keeps 1/N of the big weights (self-attention, cross-attention, FFN, text embedding); torch's
FSDP2 gathers a module's full weights just before it runs and frees them after. The small float32 tables
(timestep MLP, modulation, head) stay replicated: FSDP needs one dtype per sharded unit, and they are a
fraction of a percent of the parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models.checkpoint import iter_tensors, load_into, read_dit_config
from ..models.dit import FP32_PARAMS, WanDiT, cast_dit, dit_key_from_diffusers

SHARDED_UNITS = ("self_attn", "cross_attn", "ffn")


def shard_dit(model: WanDiT, mesh: DeviceMesh) -> WanDiT:
    for block in model.blocks:
        for name in SHARDED_UNITS:
            fully_shard(getattr(block, name), mesh=mesh, reshard_after_forward=True)
    fully_shard(model.text_embedding, mesh=mesh, reshard_after_forward=True)
    return model


def _assign_shard(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Keep only this rank's slice of a sharded parameter (every rank reads the full tensor once)."""
    param = module.get_parameter(key)
    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(tensor)


def load_sharded_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype | None,
                     mesh: DeviceMesh | None = None, before_shard=None) -> WanDiT:
    """Build an expert on the meta device, shard it, then materialise and fill only this rank's shards.

    `before_shard(model)` runs on the meta model first (e.g. installing sequence parallelism).
    """
    config, layout = read_dit_config(folder)
    with torch.device("meta"):
        model = WanDiT(**config.to_dict())
    if dtype is not None:
        cast_dit(model, dtype)
    if before_shard is not None:
        before_shard(model)
    mesh = mesh or init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    shard_dit(model, mesh)
    model.to_empty(device=device)
    rename = dit_key_from_diffusers if layout == "diffusers" else (lambda k: k)
    load_into(model, iter_tensors(folder), source=str(folder), device=device, dtype=dtype,
              keep_fp32=FP32_PARAMS, rename=rename, assign=_assign_shard)
    return model.eval()
