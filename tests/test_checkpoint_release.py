"""Whole releases: open_checkpoint recognises both layouts, each component loads and equals what was saved."""

import json
import shutil

import pytest
import torch
from releases import SIZE, build_components, diffusers_vae_config, write_release

from wan_ray.models.checkpoint import CheckpointError, load_vae, open_checkpoint, resolve_checkpoint


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("task", ["t2v", "i2v", "ti2v"])
def test_release_components_load_and_match(tmp_path, task, layout):
    root = write_release(tmp_path / "release", task, layout, seed=3)
    _, dits, vae, t5 = build_components(task, seed=3)  # the same weights, built again
    ckpt = open_checkpoint(root)
    assert ckpt.layout == layout
    assert ckpt.task.name == {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B"}[task]
    assert ckpt.task.sizes == ((SIZE, SIZE),) and ckpt.task.sample_steps == 4
    assert sorted(ckpt.experts) == sorted(dits)

    for name, ref in dits.items():
        model = ckpt.load_expert(name)
        x = torch.randn(1, ref.config.in_dim, 2, 4, 4)
        ctx = torch.randn(1, 3, 16)
        with torch.no_grad():
            assert torch.equal(model(x, torch.tensor([500.0]), ctx), ref(x, torch.tensor([500.0]), ctx))

    loaded = ckpt.load_vae()
    assert loaded.version == vae.version and loaded.latents_std == vae.latents_std
    latent = torch.randn(1, vae.z_dim, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(latent), vae.decode(latent))

    encoder = ckpt.load_text_encoder()
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        assert torch.allclose(encoder.model(ids).last_hidden_state, t5(ids).last_hidden_state, atol=1e-5)
    (emb,) = encoder.encode(["a red cat runs"])
    assert emb.shape == (5, 16)  # four words and EOS


def test_vae_folder_written_by_diffusers_loads_with_parity(tmp_path):
    """An independent writer: diffusers' own AutoencoderKLWan.save_pretrained."""
    from diffusers import AutoencoderKLWan

    config = diffusers_vae_config("2.1", dict(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1))
    torch.manual_seed(0)
    theirs = AutoencoderKLWan(**config).eval()
    theirs.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    mean = torch.tensor(theirs.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(theirs.config.latents_std).view(1, -1, 1, 1, 1)
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        ref = theirs.decode(z * std + mean).sample.clamp(-1, 1)
        out = ours.decode(z)
    assert ((out - ref).norm() / ref.norm()) < 2e-5


def test_missing_or_malformed_parts_are_named(tmp_path):
    root = write_release(tmp_path / "r", "t2v")
    shutil.rmtree(root / "low_noise_model")
    with pytest.raises(CheckpointError, match=r"missing low_noise_model \(the low-noise expert\)"):
        open_checkpoint(root)
    root = write_release(tmp_path / "r2", "t2v")
    (root / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"missing Wan2.1_VAE.pth"):
        open_checkpoint(root)
    root = write_release(tmp_path / "r3", "t2v")
    shutil.rmtree(root / "google")
    with pytest.raises(CheckpointError, match=r"missing (umt5-xxl|google)"):
        open_checkpoint(root)
    root = write_release(tmp_path / "r4", "t2v")
    (root / "wan_ray.json").write_text(json.dumps({"task": "t2v-A14B", "sample_stepz": 3}))
    with pytest.raises(CheckpointError, match="unknown task fields"):
        open_checkpoint(root)
    (root / "wan_ray.json").write_text(json.dumps({"task": "nope"}))
    with pytest.raises(CheckpointError, match="unknown task 'nope'"):
        open_checkpoint(root)
    with pytest.raises(CheckpointError, match="neither a bundled model"):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"is not a Wan2\.2 release"):
        open_checkpoint(tmp_path)


def test_a_vae_of_the_wrong_size_names_the_key(tmp_path):
    root = write_release(tmp_path / "r", "t2v")
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: 'encoder.conv1.weight' has shape"):
        load_vae(root / "Wan2.1_VAE.pth")  # without the release's vae_config: the real 2.1 sizes
