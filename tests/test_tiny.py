"""The bundled tiny model: its dataset and detector, the shipped release, prompt following, and training."""

import copy
import json

import numpy as np
import pytest
import torch

from wan_ray.models.checkpoint import TASK_FILE, load_dit, load_vae, open_checkpoint
from wan_ray.models.text_encoder import load_umt5_encoder
from wan_ray.models.vae import to_uint8
from wan_ray.tiny import RELEASE_DIR, data, train
from wan_ray.tiny.detect import accuracy, detect
from wan_ray.tiny.evaluate import TinyPipeline, eval_prompts, evaluate, generate

TARGETS = {"colour": 0.90, "direction": 0.85, "background": 0.95}  # the targets


# --------------------------------------------------------------------------------------------- dataset


def test_vocabulary_captions_and_held_out_split():
    assert data.caption("red", "square", "left", "black") == "a red square moving left on a black background"
    assert len(data.ALL_COMBOS) == 5 * 3 * 4 * 2
    assert set(data.HELD_OUT) <= set(data.ALL_COMBOS) and not set(data.HELD_OUT) & set(data.TRAIN_COMBOS)
    for i, values in enumerate((data.COLOURS, data.SHAPES, data.DIRECTIONS, data.BACKGROUNDS)):
        assert {c[i] for c in data.TRAIN_COMBOS} == set(values)  # every word is seen in training
    parsed = data.parse_caption("A Blue circle moving up on a gray background")
    assert parsed == ("blue", "circle", "up", "gray")
    with pytest.raises(ValueError, match="colour 'purple'"):
        data.parse_caption("a purple square moving up on a gray background")
    with pytest.raises(ValueError, match="not a tiny-model caption"):
        data.parse_caption("a red square")


def test_dataset_is_seeded_and_the_detector_reads_every_ground_truth_video():
    a, b = data.sample_scenes(6, seed=3), data.sample_scenes(6, seed=3)
    assert a == b and a != data.sample_scenes(6, seed=4)
    assert torch.equal(data.render(a), data.render(b))
    stream = data.batches(2, seed=5)
    first, again = next(stream), next(data.batches(2, seed=5))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert first[0].shape == (2, 3, 17, 128, 128) and first[0].min() >= -1 and first[0].max() <= 1

    rng = np.random.default_rng(0)
    scenes = [data.random_scene(rng, combo) for combo in data.ALL_COMBOS]  # every combination once
    videos = data.render(scenes)
    detections = [detect(to_uint8(v)) for v in videos]
    assert accuracy(detections, [s.attributes for s in scenes]) == {
        "colour": 1.0, "shape": 1.0, "direction": 1.0, "background": 1.0}
    blank = np.zeros((17, 128, 128, 3), np.uint8)
    assert detect(blank).as_tuple() == (None, None, None, "black")


# ------------------------------------------------------------------------------------- shipped release


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return TinyPipeline.load("tiny")


def test_release_has_the_official_layout_and_loads_with_the_real_loaders():
    files = [p for p in RELEASE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    spec = json.loads((RELEASE_DIR / TASK_FILE).read_text())
    assert spec["task"] == "tiny" and len(spec["vae_config"]["latents_std"]) == spec["vae_config"]["z_dim"]

    ckpt = open_checkpoint("tiny")
    assert ckpt.root.resolve() == RELEASE_DIR and ckpt.layout == "official" and ckpt.task.name == "tiny"
    assert sorted(ckpt.experts) == ["high", "low"]
    high, low = (load_dit(ckpt.experts[n], dtype=torch.float32) for n in ("high", "low"))
    assert high.config == low.config == ckpt.task.dit
    assert high.config.model_type == "t2v" and high.config.patch_size == (1, 2, 2)
    assert high.config.in_dim == high.config.out_dim == spec["vae_config"]["z_dim"]
    assert not torch.equal(high.blocks[0].ffn[0].weight, low.blocks[0].ffn[0].weight)
    encoder = load_umt5_encoder(ckpt.text_encoder)
    assert encoder.config.d_model == ckpt.task.dit.text_dim
    vae = load_vae(ckpt.vae, config=ckpt.task.vae_config)
    assert vae.stride == (4, 8, 8) and vae.z_dim == spec["vae_config"]["z_dim"]
    assert (ckpt.tokenizer / "tokenizer.json").is_file()


def test_shipped_model_generates_a_default_video(pipe):
    video = generate(pipe, ["a green triangle moving down on a black background"], [7])
    assert video.shape == (1, 17, 128, 128, 3) and video.dtype == np.uint8
    d = detect(video[0])
    assert (d.colour, d.background) == ("green", "black") and d.visible > 0.9


# ------------------------------------------------------------------------------------ prompt following


PROMPTS = eval_prompts(seen=12, seed=0)  # the 12 held-out combinations + 12 seen ones


@pytest.fixture(scope="module")
def default_report(pipe):
    return evaluate(pipe, PROMPTS, batch_size=12)


def test_shipped_model_follows_prompts_including_held_out_combinations(default_report):
    for subset in (default_report.accuracy(), default_report.accuracy(held_out_only=True)):
        for name, target in TARGETS.items():
            assert subset[name] >= target, (name, subset, default_report.table())


@pytest.mark.parametrize("sabotage", ["no guidance", "inverted guidance", "swapped experts"])
def test_score_drops_when_guidance_or_expert_routing_is_broken(pipe, default_report, sabotage):
    settings = {
        "no guidance": dict(guide_scale=0.0),  # the text is ignored: unconditional velocity only
        "inverted guidance": dict(guide_scale=-3.0),  # pushed away from the prompt
        "swapped experts": dict(experts={"high": pipe.experts["low"], "low": pipe.experts["high"]}),
    }[sabotage]
    prompts = PROMPTS[::2]
    broken = evaluate(pipe, prompts, batch_size=12, **settings).accuracy()
    good = default_report.accuracy()
    # measured drops (colour, direction) on these 12 prompts: (0.67, 0.92), (0.75, 0.92), (0.75, 0.42)
    assert good["colour"] - broken["colour"] >= 0.5, (sabotage, broken, good)
    assert good["direction"] - broken["direction"] >= 0.3, (sabotage, broken, good)


# ------------------------------------------------------------------------------------------- training


def test_flow_matching_loss_and_sigma_ranges():
    gen = torch.Generator().manual_seed(0)
    sigma = train.sample_sigmas(4000, 3.0, 0.875, 1.0, generator=gen)
    assert sigma.min() >= 0.875 and sigma.max() < 1.0
    low = train.sample_sigmas(4000, 3.0, 0.0, 0.875, generator=gen)
    assert low.min() >= 0.0 and low.max() < 0.875
    # shifted-uniform: the fraction below the median of the shift applied to u = 0.5 is one half
    full = train.sample_sigmas(4000, 3.0, 0.0, 1.0, generator=gen)
    assert abs((full < train.shift_sigma(torch.tensor(0.5), 3.0)).float().mean() - 0.5) < 0.03

    class Exact(torch.nn.Module):  # the true velocity of a batch whose x0 and noise are known
        def forward(self, x, t, context):
            return noise - x0

    x0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    loss = train.flow_matching_loss(Exact(), x0, torch.tensor([0.1, 0.5, 0.9]), torch.zeros(3, 2, 8), noise)
    assert loss.item() == 0.0


def test_training_reduces_both_losses_on_micro_models():
    torch.manual_seed(0)
    videos, _ = next(data.batches(2, seed=0, frames=5, size=32))
    vae = train.build_vae("2.1", dim=4, z_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1,
                          temperal_downsample=(True, True), latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    train.narrow_posterior(vae)
    cfg = train.VAETraining(steps=12, lr=1e-2, crop=None, log_every=1000)
    before = train.vae_loss(vae, videos, cfg)[1]["l1"]
    train.train_vae(vae, iter(lambda: videos, None), cfg, log=lambda _: None)
    assert train.vae_loss(vae, videos, cfg)[1]["l1"] < 0.95 * before  # 1.73 -> 1.58

    dit = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, in_dim=4, out_dim=4, text_dim=8, text_len=8)
    experts = {n: train.WanDiT(**dit) for n in ("high", "low")}
    for m in experts.values():
        m.init_weights()
    initial = {n: copy.deepcopy(m) for n, m in experts.items()}
    x0, captions = torch.randn(4, 4, 2, 4, 4), ["a", "bb", "ccc", "dddd"]
    embed = lambda caps: [torch.full((3, 8), float(len(c))) for c in caps]
    ranges = {"high": (0.875, 1.0), "low": (0.0, 0.875)}
    cfg = train.DiTTraining(steps=150, batch_size=4, lr=3e-3, warmup=5, log_every=1000)
    final, summary = train.train_experts(experts, ranges, iter(lambda: (x0, captions), None), embed, "", cfg,
                                         log=lambda _: None)
    assert summary["steps"] == 150 and set(final) == {"high", "low"}
    gen = torch.Generator().manual_seed(1)
    context = torch.stack(embed(captions))
    for name, (lo, hi) in ranges.items():
        sigma = train.sample_sigmas(4, 3.0, lo, hi, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            before = train.flow_matching_loss(initial[name], x0, sigma, context, noise).item()
            after = train.flow_matching_loss(final[name], x0, sigma, context, noise).item()
        assert after < 0.8 * before, (name, before, after)


def test_inflating_an_image_vae_gives_a_frame_repeating_video_vae():
    torch.manual_seed(0)
    vae = train.build_vae("2.1", dim=4, z_dim=4, dim_mult=(1, 1, 1), num_res_blocks=1,
                          temperal_downsample=(True, True), latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    video = data.render(data.sample_scenes(1, seed=0, size=32), size=32)[:, :, :9]
    frame = lambda k: train.vae_reconstruct(vae, train.vae_posterior(vae, video[:, :, k : k + 1])[0])
    with torch.no_grad():
        before = [frame(k) for k in range(9)]
        train.inflate_image_vae(vae)
        assert all(torch.equal(before[k], frame(k)) for k in range(9))  # single frames: unchanged
        recon = train.vae_reconstruct(vae, train.vae_posterior(vae, video)[0])  # [1, 3, 9, 32, 32]
    for f in range(9):  # frame 0 alone, then each chunk of four shows its last frame
        torch.testing.assert_close(recon[:, :, f], before[0 if f == 0 else 4 * ((f + 3) // 4)][:, :, 0])


def test_training_command_writes_a_release_that_loads(tmp_path):
    small = ["--device", "cpu", "--size", "32", "--stats-videos", "2"]
    vae_only = train.main(["--out", str(tmp_path / "vae"), *small, "--stop-after", "vae",
                           "--vae-image-steps", "2", "--vae-image-batch", "2", "--vae-steps", "2",
                           "--vae-batch", "1", "--vae-crop", "16"])
    assert not (vae_only / "high_noise_model").exists() and (vae_only / "Wan2.1_VAE.pth").is_file()
    out = train.main(["--out", str(tmp_path / "rel"), "--init", str(vae_only), *small,
                      "--vae-image-steps", "0", "--vae-steps", "0", "--bank", "4", "--dit-steps", "2",
                      "--dit-batch", "2"])
    ckpt = open_checkpoint(out)
    assert ckpt.task.name == "tiny" and sorted(ckpt.experts) == ["high", "low"]
    assert ckpt.task.vae_config["z_dim"] == ckpt.task.dit.in_dim
    spec = json.loads((vae_only / TASK_FILE).read_text())
    assert json.loads((out / TASK_FILE).read_text()) == spec  # no VAE steps: VAE and statistics kept
    pipe = TinyPipeline(ckpt.task, {n: ckpt.load_expert(n, dtype=torch.float32) for n in ckpt.experts},
                        ckpt.load_vae(), ckpt.load_text_encoder())
    video = generate(pipe, ["a red square moving left on a black background"], [0], steps=2)
    assert video.shape == (1, 17, 128, 128, 3)
    runs = json.loads((out / "training_log.json").read_text())["runs"]
    assert [sorted(r) for r in runs] == [["args", "device", "vae", "vae_image", "vae_reconstruction"],
                                         ["args", "device", "dit", "seconds"]]
    assert runs[1]["dit"]["steps"] == 2

    # --experts high fine-tunes one expert and keeps the other exactly as --init has it
    only_high = train.main(["--out", str(tmp_path / "high"), "--init", str(out), *small, "--vae-image-steps",
                            "0", "--vae-steps", "0", "--bank", "4", "--dit-steps", "2", "--dit-batch", "2",
                            "--experts", "high"])
    weights = lambda rel, name: (rel / name / "diffusion_pytorch_model.safetensors").read_bytes()
    assert weights(only_high, "low_noise_model") == weights(out, "low_noise_model")
    assert weights(only_high, "high_noise_model") != weights(out, "high_noise_model")
    with pytest.raises(SystemExit, match="no expert named"):
        train.main(["--out", str(tmp_path / "bad"), "--init", str(out), *small, "--vae-image-steps", "0",
                    "--vae-steps", "0", "--bank", "4", "--dit-steps", "1", "--experts", "middle"])
    with pytest.raises(SystemExit, match="come from --init"):
        train.main(["--out", str(tmp_path / "bad"), *small, "--experts", "high"])


def test_eval_tiny_command_prints_the_accuracy_table(capsys):
    from wan_ray.cli import main

    assert main(["eval-tiny", "--seen", "2", "--steps", "4", "--batch", "14"]) == 0
    table = capsys.readouterr().out
    assert "all (14)" in table and "held-out (12)" in table
    assert [line.split()[0] for line in table.splitlines()[1:5]] == list(data.ATTRIBUTES)
