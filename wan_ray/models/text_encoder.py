"""The umT5-XXL text encoder: official Wan weights in transformers' `UMT5EncoderModel`, plus its tokenizer.

The official checkpoint (`models_t5_umt5-xxl-enc-bf16.pth`) is a plain state dict of Wan's own T5 module.
Its architecture is exactly HF's umT5 encoder (per-layer relative position bias, gated GELU-tanh FFN, no
attention scaling, RMS norms), so we rename its keys 1:1 (`OFFICIAL_TO_HF`) and let transformers run it
rather than keep a second T5 implementation. Weights go straight from the file (memory-mapped) into a model
built on the meta device, converted tensor by tensor, so no float32 copy of the 5.7 B parameters is ever made.

`UMT5TextEncoder` reproduces the official prompt path: clean the text, tokenize to a fixed 512 slots with
EOS, run the encoder over all slots with the padding mask, and cut each output to its true length.
What the DiT does with those variable-length outputs (zero re-padding) is not this module's business.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds, and Ray workers that never
    # touch the text encoder (denoise, decode, write) should not pay for it at start-up
    from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

DEFAULT_WEIGHTS_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
DEFAULT_TOKENIZER_DIR = "google/umt5-xxl"

# Official Wan key -> HF UMT5EncoderModel key. "{i}" is the layer index; every entry is a plain rename.
OFFICIAL_TO_HF: dict[str, str] = {
    "token_embedding.weight": "shared.weight",
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    "blocks.{i}.pos_embedding.embedding.weight": (
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
HF_TO_OFFICIAL = {hf: wan for wan, hf in OFFICIAL_TO_HF.items()}

# HF ties the encoder's input embedding to `shared`; only `shared.weight` is loaded, the other is re-pointed.
_TIED_KEY = "encoder.embed_tokens.weight"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Rename one key through a table of "{i}" templates; None if the table has no such key."""
    m = _LAYER_INDEX.search(key)
    template = key if m is None else key[: m.start()] + ".{i}." + key[m.end() :]
    target = table.get(template)
    return None if target is None else target.replace("{i}", m.group(1) if m else "")


def umt5_state_dict_to_official(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """An HF `UMT5EncoderModel`'s weights under the official Wan keys (as in `models_t5_umt5-*.pth`)."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key == _TIED_KEY:
            continue
        official = _rename(key, HF_TO_OFFICIAL)
        if official is None:
            raise ValueError(f"{key!r} has no official umT5 name")
        out[official] = tensor
    return out


# --------------------------------------------------------------------------------------- checkpoint sources


class _SafetensorsTensors(Mapping[str, torch.Tensor]):
    """Tensors of one or more .safetensors files, each read from disk only when asked for."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self._file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    self._file[k] = f
                    self.shapes[k] = tuple(h.get_slice(k).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._open(str(self._file[key]), framework="pt") as h:
            return h.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    if isinstance(tensors, _SafetensorsTensors):
        return tensors.shapes
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict values must be tensors; not a tensor: {bad[:5]}")
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _open_checkpoint(source: Mapping[str, torch.Tensor] | str | Path) -> tuple[Mapping, UMT5Config | None]:
    """Tensors by name (lazily where possible) and, for an HF folder, its config."""
    if isinstance(source, Mapping):
        return source, None
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json; expected an HF-layout "
                                    "folder (config.json + *.safetensors, as written by save_pretrained)")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in the HF-layout folder {path}")
        from transformers import UMT5Config

        return _SafetensorsTensors(files), UMT5Config.from_pretrained(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"umT5 checkpoint not found: {path} (expected a .pth/.safetensors file or an "
                                "HF-layout folder)")
    if path.suffix == ".safetensors":
        return _SafetensorsTensors([path]), None
    # mmap: tensors stay on disk until converted, one at a time, into the model's dtype.
    state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    return state, None


def _to_hf_names(keys: list[str]) -> tuple[dict[str, str], bool]:
    """Map HF key -> source key, accepting either the official layout or the HF layout (not a mix)."""
    official = "token_embedding.weight" in keys or any(k.startswith("blocks.") for k in keys)
    if official:
        unknown = [k for k in keys if _rename(k, OFFICIAL_TO_HF) is None]
        if unknown:
            raise ValueError(f"unexpected keys in the official umT5 state dict: {unknown[:5]}; accepted: "
                             f"{sorted(OFFICIAL_TO_HF)}")
        return {_rename(k, OFFICIAL_TO_HF): k for k in keys}, True
    names = {k: k for k in keys}
    if _TIED_KEY in names:  # a tied copy of shared.weight; keep one
        source = names.pop(_TIED_KEY)
        names.setdefault("shared.weight", source)
    return names, False


def _infer_config(shapes: dict[str, tuple[int, ...]], shown: Callable[[str], str]) -> UMT5Config:
    """umT5 config from tensor shapes (HF names), with the fixed umT5-XXL choices for the rest."""

    def shape(hf_key: str) -> tuple[int, ...]:
        if hf_key not in shapes:
            raise ValueError(f"missing key {shown(hf_key)!r}, needed to infer the umT5 config; accepted are "
                             "official Wan keys ('token_embedding.weight', 'blocks.0.attn.q.weight', ...) "
                             "or HF UMT5EncoderModel keys ('shared.weight', 'encoder.block.0...')")
        return shapes[hf_key]

    vocab, d_model = shape("shared.weight")
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not divisible by the relative bias table's {heads} heads")
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,  # gated-gelu runs the tanh GELU (gelu_new)
    )


def load_umt5_encoder(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
    config: UMT5Config | Mapping[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> UMT5EncoderModel:
    """Build an eval-mode, frozen `UMT5EncoderModel` holding the given umT5 encoder weights.

    Accepts a state dict (official Wan keys, see `OFFICIAL_TO_HF`, or HF keys), a path to the official
    `.pth` (or a `.safetensors` file), or an HF-layout folder (`config.json` + `*.safetensors`). Without
    `config` it is read from the folder or inferred from the weights' shapes. Every key must be used and
    every shape must match, else ValueError naming the key. `device` defaults to CPU; `dtype=None` keeps the
    stored dtypes (bf16 for the official file). Tensors already in the target dtype/device are used as-is.
    """
    tensors, folder_config = _open_checkpoint(state_dict_or_path)
    shapes = _shapes(tensors)
    names, official = _to_hf_names(list(shapes))
    # errors name keys the way the caller spelled them
    shown = (lambda k: _rename(k, HF_TO_OFFICIAL) or k) if official else (lambda k: k)
    hf_shapes = {hf: shapes[src] for hf, src in names.items()}

    if config is None:
        config = folder_config or _infer_config(hf_shapes, shown)
    elif isinstance(config, Mapping):
        from transformers import UMT5Config

        config = UMT5Config(**config)
    with torch.device("meta"):  # no storage: weights are assigned below
        from transformers import UMT5EncoderModel

        model = UMT5EncoderModel(config)

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _TIED_KEY}
    missing = [shown(k) for k in expected if k not in names]
    unexpected = [names[k] for k in names if k not in expected]
    if missing or unexpected:
        raise ValueError(f"umT5 weights do not match the config: missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}")
    for k, want in expected.items():
        if hf_shapes[k] != want:
            raise ValueError(f"umT5 key {names[k]!r} has shape {list(hf_shapes[k])}, expected {list(want)} "
                             f"for {config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}, "
                             f"{config.num_heads} heads, vocab {config.vocab_size}")

    device = torch.device(device or "cpu")
    loaded = {}
    for hf, src in names.items():  # one source tensor at a time: only the target-dtype copies accumulate
        t = tensors[src]
        loaded[hf] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(loaded, strict=False, assign=True)  # strict checks were done above, with our names
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assign replaced `shared.weight`
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"umT5 tensors left unloaded on the meta device: {left[:5]}")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The HF tokenizer in a local folder (the checkpoint's `google/umt5-xxl/`); never goes online."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path} (expected a local folder with "
                                "tokenizer.json / tokenizer_config.json, e.g. <checkpoint>/google/umt5-xxl)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no pad token; prompts are padded to a fixed length")
    return tokenizer


def build_word_tokenizer(words: list[str], out_dir: str | Path) -> Path:
    """Write a tiny word-level tokenizer to `out_dir` and return the folder; for toy models and tests.

    Vocabulary: `<pad>`=0, `</s>`=1, `<unk>`=2 (umT5's special-token ids), then `words` in order.
    Text is lowercased and split on whitespace and punctuation; unknown words become `<unk>`; `</s>` is
    appended to every sequence. The folder (`tokenizer.json` + `tokenizer_config.json`) loads with
    `AutoTokenizer.from_pretrained(out_dir)` / `load_tokenizer(out_dir)` as a fast tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials, *(w.lower() for w in words)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    meta = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": 512, "padding_side": "right"}
    (out / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))
    return out


def clean_prompt(text: str) -> str:
    """The official "whitespace" cleaning: ftfy repair, HTML-unescape twice, collapse whitespace, strip."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    # ftfy has removed the ASCII separators \x1c-\x1f, the only characters on which `re`'s \s differs
    # from the `regex` package's \s that the official code uses.
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------------- text encoder


class UMT5TextEncoder:
    """Prompts -> umT5 embeddings `[L_i, d_model]`, each cut to its true length (EOS included).

    Knows tokenization and the encoder; holds no opinion on batching across requests or on devices beyond
    running where the model lives.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512):
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        text_len: int = 512,
        weights_file: str = DEFAULT_WEIGHTS_FILE,
        tokenizer_dir: str = DEFAULT_TOKENIZER_DIR,
    ) -> UMT5TextEncoder:
        """Load `<ckpt_dir>/<weights_file>` and the tokenizer in `<ckpt_dir>/<tokenizer_dir>`."""
        ckpt_dir = Path(ckpt_dir)
        tokenizer = load_tokenizer(ckpt_dir / tokenizer_dir)
        model = load_umt5_encoder(ckpt_dir / weights_file, device=device, dtype=dtype)
        return cls(model, tokenizer, text_len)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One `[L_i, d_model]` tensor per prompt, in the model's dtype and on its device."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode takes a list of prompt strings; wrap a single prompt in a list")
        if not prompts:
            return []
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.text_len, add_special_tokens=True, return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # [B, text_len]
        mask = batch["attention_mask"].to(self.device)  # [B, text_len], 1 on real tokens
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, d_model]
        lengths = mask.sum(dim=1).tolist()
        # clone: a view would keep the whole padded batch alive for as long as any one prompt is kept
        return [h[:n].clone() for h, n in zip(hidden, lengths, strict=True)]
