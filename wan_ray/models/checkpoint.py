"""Finding and loading Wan2.2 checkpoints in the official and the diffusers release layouts.

Official release (e.g. `Wan2.2-T2V-A14B/`): `high_noise_model/` and `low_noise_model/` (each `config.json` +
`diffusion_pytorch_model*.safetensors`), or for TI2V-5B the same files in the root; `Wan2.1_VAE.pth` or
`Wan2.2_VAE.pth`; `models_t5_umt5-xxl-enc-bf16.pth`; the tokenizer in `google/umt5-xxl/`.

Diffusers release (`*-Diffusers`): `model_index.json`, `transformer/` (the high-noise expert for A14B),
`transformer_2/` (low-noise), `vae/`, `text_encoder/`, `tokenizer/`.

Loading never builds a float32 copy of a large model in host memory: modules are built on the meta device
and each stored tensor is read on its own (safetensors one tensor at a time, `.pth` files memory-mapped),
converted to the target dtype and device, and assigned. Every key must be consumed and every shape must
match; errors name the file and the key.

An optional `wan_ray.json` in a release root names the task preset (`{"task": "tiny"}`) for checkpoints
whose task cannot be recognised from their structure (the bundled tiny model, fine-tunes of other sizes);
its other keys override fields of that `TaskSpec` (e.g. `"sample_steps": 30`, or `"vae_config"` for a VAE
of non-standard size with its own latent statistics).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .config import DiTConfig, TaskSpec, get_preset
from .dit import FP32_PARAMS, WanDiT, dit_config_from_diffusers, dit_key_from_diffusers
from .text_encoder import UMT5TextEncoder, load_tokenizer, load_umt5_encoder
from .vae import WanVAE, build_vae, vae_config_from_diffusers, vae_state_dict_from_diffusers

Layout = Literal["official", "diffusers"]
TASK_FILE = "wan_ray.json"


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, incomplete or malformed."""


# ---------------------------------------------------------------------------------------------------------
# Reading tensors


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those listed by an index JSON, else all of them."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = _read_json(indexes[0])
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{indexes[0]} has no weight_map")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {missing} listed in {indexes[0].name} are missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors weights")
    return files


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time from a .safetensors/.pth file or a folder of safetensors shards."""
    path = Path(path)
    if path.is_dir():
        for file in _weight_files(path):
            yield from iter_tensors(file)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, f.get_tensor(key)
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        yield from state.items()
    elif not path.exists():
        raise CheckpointError(f"{path} does not exist")
    else:
        raise CheckpointError(f"{path}: unsupported weight file (accepted: .safetensors, .pth, .pt, .bin, or "
                              "a folder of safetensors shards)")


def list_keys(path: str | Path) -> list[str]:
    """The tensor names of a weight file or folder, without reading the tensors (safetensors headers)."""
    path = Path(path)
    if path.is_dir():
        return [k for f in _weight_files(path) for k in list_keys(f)]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    return [k for k, _ in iter_tensors(path)]  # .pth: memory-mapped, so only the index is read


def load_into(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], *, source: str,
              device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
              keep_fp32: tuple[str, ...] = (), rename: Callable[[str], str] = lambda k: k,
              assign: Callable[[nn.Module, str, torch.Tensor], None] | None = None) -> nn.Module:
    """Assign `tensors` to the parameters of `module` (built on the meta device), strictly.

    Floating tensors are converted to `dtype` (or keep their stored dtype when it is None), except names
    containing a `keep_fp32` fragment, which become float32. Raises `CheckpointError` naming `source` on
    unexpected, missing or misshaped keys. `assign(module, key, tensor)` stores one tensor (default: as a
    new parameter; a sharded model keeps only its slice).
    """
    assign = assign or _assign
    expected = dict(module.state_dict(keep_vars=True))
    seen: set[str] = set()
    for stored_key, tensor in tensors:
        key = rename(stored_key)
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {stored_key!r} (not a parameter of "
                                  f"{type(module).__name__})")
        target = expected[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: {stored_key!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(target.shape)}")
        if tensor.is_floating_point():
            want = torch.float32 if any(f in key for f in keep_fp32) else (dtype or tensor.dtype)
        else:
            want = tensor.dtype
        converted = tensor.to(device=device, dtype=want)
        if converted.data_ptr() == tensor.data_ptr():
            # still a view of the memory-mapped file: own a copy, so rewriting the file can't reach us
            converted = converted.clone()
        assign(module, key, converted)
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing {len(missing)} key(s): {shown}")
    return module


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[name] = tensor


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# The DiT


def read_dit_config(folder: str | Path) -> tuple[DiTConfig, Layout]:
    """The DiT architecture of a model folder, from its official or diffusers config.json."""
    config = _read_json(Path(folder) / "config.json")
    if config.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in config:
        return DiTConfig.from_dict(dit_config_from_diffusers(config)), "diffusers"
    try:
        return DiTConfig.from_dict(config), "official"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {err}") from None


def load_dit(path: str | Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> WanDiT:
    """Load one DiT (an expert folder, a TI2V root or a diffusers `transformer/` folder).

    `dtype` is the compute dtype of the big weights (default: as stored); the timestep path, modulation and
    head stay float32 (`FP32_PARAMS`). Weights go straight to `device` (default CPU).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a model folder (expected config.json + *.safetensors)")
    config, layout = read_dit_config(folder)
    with torch.device("meta"):
        model = WanDiT(**config.to_dict())
    rename = dit_key_from_diffusers if layout == "diffusers" else (lambda k: k)
    load_into(model, iter_tensors(folder), source=str(folder), device=device or "cpu", dtype=dtype,
              keep_fp32=FP32_PARAMS, rename=rename)
    return model.eval()


def load_vae(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
             config: dict[str, Any] | None = None) -> WanVAE:
    """Load a Wan VAE: the official `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` or a diffusers `vae/` folder.

    The version is read from the keys (official) or config.json (diffusers); `config` overrides constructor
    fields (needed for VAEs of non-standard size, e.g. the bundled tiny model). Default dtype: float32.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE weights {path} do not exist")
    keys = list_keys(path)
    if path.is_dir():
        version, kwargs = vae_config_from_diffusers(_read_json(path / "config.json"))
        try:
            official = vae_state_dict_from_diffusers(dict(zip(keys, keys, strict=True)))
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        to_official = {stored: ours for ours, stored in official.items()}
        rename = to_official.__getitem__
    else:
        nested = any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in keys)
        version, kwargs, rename = ("2.2" if nested else "2.1"), {}, (lambda k: k)
    kwargs.update(config or {})
    try:
        with torch.device("meta"):
            vae = build_vae(version, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build a Wan{version} VAE from {kwargs}: {err}") from None
    load_into(vae, iter_tensors(path), source=str(path), device=device or "cpu",
              dtype=dtype or torch.float32, rename=rename)
    return vae.eval()


# ---------------------------------------------------------------------------------------------------------
# Whole releases


@dataclass(frozen=True)
class Checkpoint:
    """Where each component of a release lives, and which task it is."""

    root: Path
    layout: Layout
    task: TaskSpec
    experts: dict[str, Path]  # "high"/"low" for two-expert tasks, "single" otherwise
    vae: Path  # a .pth file (official) or a folder (diffusers)
    text_encoder: Path  # the umT5 .pth (official) or a folder (diffusers)
    tokenizer: Path

    def load_expert(self, name: str, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> WanDiT:
        if name not in self.experts:
            raise CheckpointError(f"{self.root} has no expert {name!r}; it has {sorted(self.experts)}")
        return load_dit(self.experts[name], device, dtype)

    def load_vae(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WanVAE:
        return load_vae(self.vae, device, dtype, config=self.task.vae_config)

    def load_text_encoder(self, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> UMT5TextEncoder:
        model = load_umt5_encoder(self.text_encoder, device=device, dtype=dtype)
        return UMT5TextEncoder(model, load_tokenizer(self.tokenizer), text_len=self.task.text_len)


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Recognise a release folder (official or diffusers layout, or a bundled name such as `tiny`) and check
    that its components exist."""
    root = resolve_checkpoint(root)
    if (root / "model_index.json").is_file():
        return _open_diffusers(root)
    return _open_official(root)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path.parent} is missing {path.name} ({what})")
    return path


def _task_for(root: Path, dit: DiTConfig, two_experts: bool) -> TaskSpec:
    """The task preset, named by `wan_ray.json` or recognised by architecture, with the stored DiT config."""
    if (root / TASK_FILE).is_file():
        fields = _read_json(root / TASK_FILE)
        name = fields.pop("task", None)
        if not name:
            raise CheckpointError(f"{root / TASK_FILE} must name a task, e.g. {{\"task\": \"t2v-A14B\"}}")
        try:
            spec = _with_overrides(get_preset(name), fields)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{root / TASK_FILE}: {err}") from None
    else:
        name = {("t2v", True): "t2v-A14B", ("i2v", True): "i2v-A14B", ("ti2v", False): "ti2v-5B"}.get(
            (dit.model_type, two_experts))
        if name is None:
            raise CheckpointError(f"{root}: a {'two' if two_experts else 'single'}-expert {dit.model_type} "
                                  f"model matches no known task; add {TASK_FILE} naming one")
        spec = get_preset(name)
    if spec.is_moe != two_experts:
        raise CheckpointError(f"{root}: task {spec.name} needs {'two experts' if spec.is_moe else 'one DiT'}")
    return dataclasses.replace(spec, dit=dit)


def _with_overrides(spec: TaskSpec, fields: dict[str, Any]) -> TaskSpec:
    allowed = {f.name for f in dataclasses.fields(TaskSpec)} - {"name", "dit"}
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown task fields {sorted(unknown)}; accepted: {sorted(allowed)}")
    return dataclasses.replace(spec, **{k: v if k == "vae_config" else _tuples(v) for k, v in fields.items()})


def _tuples(value: Any) -> Any:
    """JSON lists -> the tuples TaskSpec holds (sizes, strides, guide-scale pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


BUNDLED = {"tiny": "assets/tiny"}  # model names that resolve to a release shipped inside the package


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A bundled model name (`tiny`) or a release folder -> the folder."""
    if str(name_or_path) in BUNDLED:
        return Path(str(importlib.resources.files("wan_ray") / BUNDLED[str(name_or_path)]))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model {str(name_or_path)!r} is neither a bundled model ({sorted(BUNDLED)}) "
                              "nor an existing checkpoint folder")
    return path


def _open_official(root: Path) -> Checkpoint:
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        experts = {"high": _require(root / "high_noise_model", "the high-noise expert"),
                   "low": _require(root / "low_noise_model", "the low-noise expert")}
    elif (root / "config.json").is_file():
        experts = {"single": root}
    else:
        raise CheckpointError(f"{root} is not a Wan2.2 release: expected high_noise_model/ and "
                              "low_noise_model/ (A14B), config.json + weights (TI2V-5B), or model_index.json "
                              "(diffusers layout)")
    configs = {}
    for name, folder in experts.items():
        configs[name], _ = read_dit_config(folder)
        _weight_files(folder)
    if len(set(configs.values())) > 1:
        raise CheckpointError(f"{root}: the experts' config.json files describe different architectures")
    task = _task_for(root, next(iter(configs.values())), len(experts) == 2)
    return Checkpoint(
        root=root, layout="official", task=task, experts=experts,
        vae=_require(root / task.vae_file, f"the Wan{task.vae_version} VAE"),
        text_encoder=_require(root / task.text_encoder_file, "the umT5 text encoder"),
        tokenizer=_require(root / task.tokenizer_dir, "the umT5 tokenizer folder"),
    )


def _open_diffusers(root: Path) -> Checkpoint:
    index = _read_json(root / "model_index.json")
    two = index.get("transformer_2") not in (None, [None, None])
    if two:
        experts = {"high": root / "transformer", "low": root / "transformer_2"}
    else:
        experts = {"single": root / "transformer"}
    for name, folder in experts.items():
        _require(folder, f"the {name} transformer")
        _weight_files(folder)
    dit, _ = read_dit_config(experts["high" if two else "single"])
    task = _task_for(root, dit, two)
    if two and index.get("boundary_ratio") is not None:
        task = dataclasses.replace(task, boundary=float(index["boundary_ratio"]))
    return Checkpoint(
        root=root, layout="diffusers", task=task, experts=experts,
        vae=_require(root / "vae", "the VAE"),
        text_encoder=_require(root / "text_encoder", "the umT5 text encoder"),
        tokenizer=_require(root / "tokenizer", "the tokenizer"),
    )


def save_dit(model: WanDiT, folder: str | Path, *, layout: Layout = "official",
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as a release model folder: config.json + safetensors shards (+ index when sharded)."""
    from safetensors.torch import save_file

    from .dit import dit_key_to_diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if layout == "official":
        config = {"_class_name": "WanModel", **cfg.to_dict()}
        rename = lambda k: k
    else:
        config = {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
                  "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
                  "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
                  "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
                  "cross_attn_norm": cfg.cross_attn_norm, "eps": cfg.eps,
                  "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None}
        rename = dit_key_to_diffusers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][rename(key)] = tensor.detach().contiguous().cpu()
        size += nbytes
    stem = "diffusion_pytorch_model"
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"))
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
