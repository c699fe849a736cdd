"""Stage 2: U-Net training is resumable step for step, writes its artifacts, and guards its folder."""

import json
from dataclasses import asdict

import pytest
import torch

from diffinject.core.diffusion import DiffusionConfig, ddim_scheduler, is_trained, load_unet, train_diffusion


def tiny(**kw) -> DiffusionConfig:
    base = dict(image_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, batch_size=4, steps=6,
                checkpoint_every=100, ema_decay=0.9)
    return DiffusionConfig(**(base | kw))


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, train_diffusion(images, tiny(), out, seed=1, progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(images, straight, tmp_path):
    _, full = straight
    first = train_diffusion(images, tiny(steps=3), tmp_path, seed=1, progress=False)
    assert first.steps == 3 and len(first.losses) == 3
    assert first.losses == full.losses[:3]
    resumed = train_diffusion(images, tiny(steps=6), tmp_path, seed=1, progress=False)
    assert resumed.steps == 6
    assert resumed.losses == full.losses  # the same batches, noise and optimizer state: bit-identical
    a, b = _state(full.unet), _state(resumed.unet)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the EMA actually moved away from the 3-step model, so the comparison is not vacuous
    assert any(not torch.equal(v, first.unet.state_dict()[k]) for k, v in a.items())


def test_micro_batches_take_the_same_steps(images, straight, tmp_path):
    """Chunks of 1 image (memory for big images) add up to the whole batch's gradient: the same losses and
    weights up to float summation order; a folder trained whole resumes in chunks."""
    _, full = straight
    chunked = train_diffusion(images, tiny(micro_batch=1), tmp_path / "chunked", seed=1, progress=False)
    assert chunked.losses == pytest.approx(full.losses, rel=1e-5)
    a, b = _state(full.unet), _state(chunked.unet)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    train_diffusion(images, tiny(steps=3), tmp_path / "mixed", seed=1, progress=False)
    mixed = train_diffusion(images, tiny(micro_batch=2), tmp_path / "mixed", seed=1, progress=False)
    assert mixed.steps == 6 and mixed.losses == pytest.approx(full.losses, rel=1e-5)


def test_a_different_seed_trains_differently(images, straight, tmp_path):
    _, full = straight
    other = train_diffusion(images, tiny(steps=2), tmp_path, seed=2, progress=False)
    assert other.losses != full.losses[:2]


def test_output_folder_and_load(straight, images):
    out, full = straight
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "train.json",
                 "loss.png"):
        assert (out / name).is_file(), name
    assert is_trained(out)
    info = json.loads((out / "train.json").read_text())
    assert info["steps"] == 6 and info["seed"] == 1 and info["num_images"] == 8
    assert info["config"]["block_out_channels"] == [8, 16]

    unet = load_unet(out)
    assert not unet.training
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, full.unet(x, t).sample)
    # the saved scheduler is the one the config describes
    sched = ddim_scheduler(out)
    assert sched.config.num_train_timesteps == 1000 and sched.config.clip_sample is False
    torch.testing.assert_close(sched.alphas_cumprod, ddim_scheduler(cfg=tiny()).alphas_cumprod)


def test_load_unet_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_unet(tmp_path)
    assert not is_trained(tmp_path)


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"block_out_channels": (8, 8)}, {"p2_gamma": 0.5},
                                    {"batch_size": 2}])
def test_other_config_on_the_same_folder_is_refused(straight, images, change):
    out, _ = straight
    with pytest.raises(ValueError, match="another"):
        train_diffusion(images, tiny(**change), out, seed=1, progress=False)


def test_other_seed_on_the_same_folder_is_refused(straight, images):
    out, _ = straight
    with pytest.raises(ValueError):
        train_diffusion(images, tiny(), out, seed=2, progress=False)


def test_config_lists_become_tuples():
    """YAML/JSON give lists; the config (and so the resume check) must not depend on that."""
    cfg = tiny()
    again = DiffusionConfig(**json.loads(json.dumps(asdict(cfg))))
    assert again.block_out_channels == (8, 16) and again.up_block_types == ("UpBlock2D", "UpBlock2D")
    assert again == cfg and asdict(again) == asdict(cfg)


def test_other_images_on_the_same_folder_are_refused(straight, images):
    out, _ = straight
    with pytest.raises(ValueError, match="other images"):
        train_diffusion(255 - images, tiny(), out, seed=1, progress=False)


def test_time_budget_stops_early_and_resumes_exactly(images, straight, tmp_path, monkeypatch):
    """``max_seconds`` stops between checkpoints and saves; the next call resumes to the uninterrupted model."""
    import diffinject.core.diffusion as diffusion

    clock = iter(range(10**6))  # a fake clock that ticks one second per reading: the stop step is deterministic
    monkeypatch.setattr(diffusion.time, "time", lambda: float(next(clock)))
    cut = train_diffusion(images, tiny(), tmp_path, seed=1, progress=False, max_seconds=5)
    assert 0 < cut.steps < 6
    assert (tmp_path / "checkpoint.pt").is_file() and is_trained(tmp_path)
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == cut.steps
    monkeypatch.undo()
    _, full = straight
    resumed = train_diffusion(images, tiny(), tmp_path, seed=1, progress=False)
    assert resumed.steps == 6 and resumed.losses == full.losses
    for k, v in _state(full.unet).items():
        assert torch.equal(v, resumed.unet.state_dict()[k]), k


def test_train_diffusion_cli_reads_a_config_file(tmp_path, capsys):
    from diffinject.workers.cli import main

    cfg = tmp_path / "unet.yaml"
    cfg.write_text("block_out_channels: [8, 16]\ndown_block_types: [DownBlock2D, DownBlock2D]\n"
                   "up_block_types: [UpBlock2D, UpBlock2D]\nnorm_num_groups: 4\nbatch_size: 4\n")
    out = tmp_path / "unet"
    assert main(["train-diffusion", "--config", str(cfg), "--steps", "2", "--split", "corpus", "--no-progress",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    trained = json.loads((out / "train.json").read_text())["config"]
    assert trained["block_out_channels"] == [8, 16] and trained["batch_size"] == 4 and trained["steps"] == 2

    cfg.write_text("block_out_channel: [8, 16]\n")  # a typo is named, before any data is loaded
    assert main(["train-diffusion", "--config", str(cfg), "--out", str(tmp_path / "other")]) == 2
    assert "unknown diffusion setting(s) block_out_channel" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
