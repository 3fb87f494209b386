"""umT5 text encoder: official-key loading into HF's UMT5EncoderModel, tokenizer, prompt cleaning, encode.

Parity is checked against a from-scratch umT5 encoder written here from the spec's formulas (§6.1) and fed the
official-keyed tensors directly, so a wrong key mapping (e.g. swapping the FFN's gate and linear branches)
cannot cancel out.
"""

import math

import pytest
import torch
from transformers import UMT5Config, UMT5EncoderModel

from wan_ray.models.text_encoder import (
    UMT5TextEncoder,
    build_word_tokenizer,
    clean_prompt,
    load_tokenizer,
    load_umt5_encoder,
)
from wan_ray.stages import TextEncoder

VOCAB, DIM, FFN, HEADS, LAYERS = 100, 32, 48, 4, 3
WORDS = ["a", "cat", "sits", "on", "the", "mat", "under", "warm", "sun", "light"]


def official_state_dict(seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights with the official Wan key names and shapes (spec §6.3)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {"token_embedding.weight": r(VOCAB, DIM)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = 1 + 0.2 * r(DIM)
        for n in "qkvo":
            sd[b + f"attn.{n}.weight"] = r(DIM, DIM, std=DIM**-0.5)
        sd[b + "norm2.weight"] = 1 + 0.2 * r(DIM)
        sd[b + "ffn.gate.0.weight"] = r(FFN, DIM, std=DIM**-0.5)
        sd[b + "ffn.fc1.weight"] = r(FFN, DIM, std=DIM**-0.5)
        sd[b + "ffn.fc2.weight"] = r(DIM, FFN, std=FFN**-0.5)
        sd[b + "pos_embedding.embedding.weight"] = r(32, HEADS)  # large, so the position bias matters
    sd["norm.weight"] = 1 + 0.2 * r(DIM)
    return sd


# ----------------------------------------------------------------- independent reference (spec §6.1)


def ref_bucket(rel: torch.Tensor) -> torch.Tensor:
    """Bidirectional T5 bucket, 32 buckets, max distance 128; rel = key position - query position."""
    half, exact = 16, 8
    dist = rel.abs()
    log_part = torch.log(dist.clamp(min=1).double() / exact) / math.log(128 / exact) * (half - exact)
    far = (exact + log_part.floor().long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


def ref_encoder(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """umT5 encoder forward straight from official-keyed tensors: [B, L] ids -> [B, L, D]."""

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    B, L = ids.shape
    pos = torch.arange(L)
    buckets = ref_bucket(pos[None, :] - pos[:, None])  # [Lq, Lk]
    x = sd["token_embedding.weight"][ids]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = rms(x, w["norm1.weight"])
        q, k, v = ((h @ w[f"attn.{n}.weight"].T).view(B, L, HEADS, -1).transpose(1, 2) for n in "qkv")
        scores = q @ k.transpose(-1, -2) + w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))  # no 1/sqrt(d) scaling
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, DIM)
        x = x + att @ w["attn.o.weight"].T
        h = rms(x, w["norm2.weight"])
        gated = gelu_tanh(h @ w["ffn.gate.0.weight"].T) * (h @ w["ffn.fc1.weight"].T)
        x = x + gated @ w["ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def run(model: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 140), generator=g)  # > 128 tokens: reaches the capped far buckets
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_reference_bucket_spot_values():
    rel = torch.tensor([0, 1, -1, 7, -7, -8, -12, 16, -127, -128, 300, -300])
    # |rel| < 8 exact; else 8 + floor(ln(|rel|/8) / ln(16) * 8), capped at 15; +16 when rel > 0
    assert ref_bucket(rel).tolist() == [0, 17, 1, 23, 7, 8, 9, 26, 15, 15, 31, 15]


def test_loaded_model_matches_independent_reference(batch):
    ids, mask = batch
    sd = official_state_dict()
    model = load_umt5_encoder(sd)
    out, ref = run(model, ids, mask), ref_encoder(sd, ids, mask)
    assert out.shape == (3, 140, DIM)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    # the mapping must not be symmetric in the FFN branches: swapping them changes the output
    swapped = dict(sd)
    for i in range(LAYERS):
        swapped[f"blocks.{i}.ffn.gate.0.weight"], swapped[f"blocks.{i}.ffn.fc1.weight"] = (
            sd[f"blocks.{i}.ffn.fc1.weight"], sd[f"blocks.{i}.ffn.gate.0.weight"])
    assert (run(load_umt5_encoder(swapped), ids, mask) - ref).abs().max() > 1e-2


def test_config_is_inferred_from_the_weights():
    cfg = load_umt5_encoder(official_state_dict()).config
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.d_kv) == (
        VOCAB, DIM, FFN, LAYERS, HEADS, DIM // HEADS)
    assert cfg.relative_attention_num_buckets == 32 and cfg.relative_attention_max_distance == 128
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.layer_norm_epsilon == 1e-6


def test_every_source_form_loads_the_same_model(tmp_path, batch):
    ids, mask = batch
    sd = official_state_dict()
    expected = run(load_umt5_encoder(sd), ids, mask)
    torch.save(sd, tmp_path / "umt5.pth")
    explicit = dict(vocab_size=VOCAB, d_model=DIM, d_kv=DIM // HEADS, d_ff=FFN, num_layers=LAYERS,
                    num_heads=HEADS)
    hf_model = load_umt5_encoder(tmp_path / "umt5.pth", UMT5Config(**explicit))
    hf_model.save_pretrained(tmp_path / "hf")
    forms = [
        load_umt5_encoder(str(tmp_path / "umt5.pth")),
        load_umt5_encoder(sd, explicit),
        hf_model,
        load_umt5_encoder(tmp_path / "hf"),
        load_umt5_encoder(hf_model.state_dict()),  # HF-keyed dict, with the tied copy of the embedding
    ]
    for model in forms:
        assert torch.equal(run(model, ids, mask), expected)
        assert model.shared.weight is model.encoder.embed_tokens.weight
        assert torch.equal(model.shared.weight, sd["token_embedding.weight"])
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dtype_conversion_and_no_extra_copies():
    sd = official_state_dict()
    model = load_umt5_encoder(sd, dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    assert torch.equal(model.encoder.block[1].layer[1].DenseReluDense.wi_0.weight,
                       sd["blocks.1.ffn.gate.0.weight"].bfloat16())
    # tensors already in the target dtype are assigned, not copied
    bf16 = {k: v.bfloat16() for k, v in sd.items()}
    model = load_umt5_encoder(bf16)
    assert model.shared.weight.data_ptr() == bf16["token_embedding.weight"].data_ptr()
    assert model.encoder.final_layer_norm.weight.data_ptr() == bf16["norm.weight"].data_ptr()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("blocks.1.ffn.fc1.weight"), r"missing keys \['blocks.1.ffn.fc1.weight'\]"),
        (lambda sd: sd.update({"blocks.0.attn.q.weight": torch.zeros(DIM, DIM + 1)}),
         r"'blocks.0.attn.q.weight' has shape \[32, 33\], expected \[32, 32\]"),
        (lambda sd: sd.update({"blocks.0.attn.bias": torch.zeros(DIM)}),
         r"unexpected keys.*blocks.0.attn.bias"),
        (lambda sd: sd.update({"lm_head.weight": torch.zeros(1)}), r"unexpected keys.*lm_head.weight"),
        (lambda sd: sd.update({"norm.weight": "x"}), r"not a tensor: \['norm.weight'\]"),
    ],
)
def test_bad_state_dict_names_the_key(edit, message):
    sd = official_state_dict()
    edit(sd)
    with pytest.raises((ValueError, TypeError), match=message):
        load_umt5_encoder(sd)


def test_config_mismatch_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.2.norm1.weight'"):
        load_umt5_encoder(official_state_dict(), dict(vocab_size=VOCAB, d_model=DIM, d_kv=8, d_ff=FFN,
                                                      num_layers=2, num_heads=HEADS))
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_umt5_encoder(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"without config\.json"):
        load_umt5_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder not found: .*google/umt5-xxl"):
        load_tokenizer(tmp_path / "google" / "umt5-xxl")


# ------------------------------------------------------------------------------ tokenizer and encode


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_word_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


def test_word_tokenizer_loads_as_fast_tokenizer(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert tok.is_fast
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(["A cat, zebra"], padding="max_length", max_length=7, truncation=True)
    # a=3, cat=4, ',' and 'zebra' unknown, then </s> and padding
    assert enc["input_ids"] == [[3, 4, 2, 2, 1, 0, 0]]
    assert enc["attention_mask"] == [[1, 1, 1, 1, 1, 0, 0]]


def test_encode_trims_to_true_length(tokenizer_dir):
    sd = official_state_dict()
    encoder = UMT5TextEncoder(load_umt5_encoder(sd), load_tokenizer(tokenizer_dir), text_len=24)
    prompts = ["A cat  sits on the mat", "warm &amp; sun", "", " ".join(["cat"] * 40)]
    outs = encoder.encode(prompts)
    assert [tuple(o.shape) for o in outs] == [(6 + 1, DIM), (3 + 1, DIM), (1, DIM), (24, DIM)]
    # each output equals the reference run over the padded slots with the mask, then cut
    batch = encoder.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=24,
                              truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[3, -1] == 1  # truncation keeps the EOS
    ref = ref_encoder(sd, ids, mask)
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, ref[i, : len(out)], rtol=1e-5, atol=2e-5)
        # padding is masked out: encoding the unpadded tokens alone gives the same result
        alone = run(encoder.model, ids[i : i + 1, : len(out)], mask[i : i + 1, : len(out)])[0]
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=2e-5)
    assert encoder.encode([]) == []
    with pytest.raises(TypeError, match="list of prompt strings"):
        encoder.encode("a cat")


def test_from_checkpoint_folder(tmp_path):
    sd = official_state_dict(seed=3)
    torch.save(sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    build_word_tokenizer(WORDS, tmp_path / "google" / "umt5-xxl")
    encoder = UMT5TextEncoder.from_checkpoint(tmp_path, text_len=16)
    direct = UMT5TextEncoder(load_umt5_encoder(sd), load_tokenizer(tmp_path / "google/umt5-xxl"), 16)
    for a, b in zip(encoder.encode(["the cat", "sun"]), direct.encode(["the cat", "sun"]), strict=True):
        assert torch.equal(a, b)
    torch.save(sd, tmp_path / "t5.pth")
    build_word_tokenizer(WORDS, tmp_path / "tok")
    custom = UMT5TextEncoder.from_checkpoint(tmp_path, dtype=torch.bfloat16, weights_file="t5.pth",
                                             tokenizer_dir="tok")
    assert custom.encode(["a cat"])[0].dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="missing"):
        UMT5TextEncoder.from_checkpoint(tmp_path, tokenizer_dir="missing")


def test_stage_encodes_each_distinct_text_once_in_batches(tokenizer_dir):
    encoder = UMT5TextEncoder(load_umt5_encoder(official_state_dict()), load_tokenizer(tokenizer_dir), 16)
    calls = []
    encode = encoder.encode
    encoder.encode = lambda texts: calls.append(list(texts)) or encode(texts)
    stage = TextEncoder(encoder=encoder, batch_size=2)
    assert stage.gpus == 0.0
    texts = ["a cat", "the sun", "a cat", "warm light", "the sun", "mat"]
    outs = stage.embed(texts)
    assert calls == [["a cat", "the sun"], ["warm light", "mat"]]  # distinct texts, in order, 2 per call
    direct = {t: encode([t])[0] for t in texts}
    for text, out in zip(texts, outs, strict=True):
        torch.testing.assert_close(out, direct[text], rtol=1e-5, atol=2e-5)  # batching changes nothing
    stage.embed(["mat", "sun"])  # "mat" is cached, only "sun" is new
    assert calls[2:] == [["sun"]]
    with pytest.raises(ValueError, match=r"checkpoint .* or an encoder"):
        TextEncoder()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a\t\n  cat \u3000 sits\u00a0 ", "a cat sits"),
        ("fish &amp; chips", "fish & chips"),
        ("&amp;lt;b&amp;gt;bold", "<b>bold"),  # unescaped twice
        ("caf&eacute;", "café"),
        ("The Mona Lisa doesnâ€™t smile", "The Mona Lisa doesn't smile"),  # mojibake repaired by ftfy
        ("", ""),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean
