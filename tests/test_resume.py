"""Resume inside a stage: the generation stage's shards, classifier epoch checkpoints, and a pipeline killed with
SIGKILL at chosen points that ends with the artifacts of an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinject.core import methods as registry
from diffinject.core.classifier import ClassifierConfig
from diffinject.core.diffusion import DiffusionConfig, build_unet, ddim_scheduler, load_unet
from diffinject.core.injection import InjectionConfig, Pairs, inject, plan_pairs
from diffinject.workers.cli import main
from diffinject.core.stages import generate_in_process

REPO = Path(__file__).resolve().parent.parent

TINY = DiffusionConfig(image_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory):
    """A random tiny U-Net saved as a model folder (generation reads it from disk)."""
    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    build_unet(TINY).save_pretrained(folder)
    ddim_scheduler(cfg=TINY).save_pretrained(folder)
    return folder


def test_generation_resumes_from_its_shards(tiny_unet_dir, tmp_path, monkeypatch):
    """Batches whose shard holds their planned pairs are read back, the others made again: the samples (compared
    as floats, before uint8 rounding hides a last-bit difference) and the evaluations equal an uninterrupted run's.
    Contents recur across batches, so a regenerated batch needs inversions its skipped predecessors made, in the
    groups they made them: an inversion's batch shape changes its rounding on most CPUs."""
    from diffinject.core.injection import _ContentInversions

    monkeypatch.setattr("diffinject.core.injection.from_model_space", lambda x, *_: x.clone())
    groups, real_add = [], _ContentInversions.add  # the contents inverted together, call by call

    def add(self, index, inv):
        groups.append(sorted(int(c) for c in index))
        real_add(self, index, inv)

    monkeypatch.setattr(_ContentInversions, "add", add)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(16) % 4
    # six contents cycled over twelve pairs in batches of four: batch 0 inverts four new contents, batch 1 two,
    # batch 2 none (it reuses both groups)
    pairs = plan_pairs(labels, np.array([0, 1, 2, 3, 5, 6]), 12, seed=0)
    cfg = InjectionConfig(steps=5, t_edit=300, gamma=0.9, t_boost=600, batch_size=4)
    args = (tiny_unet_dir, images, labels, pairs, cfg, 7)
    plain, plain_evals, _ = generate_in_process(*args, progress=False)
    made_in = list(groups)
    assert [len(g) for g in made_in] == [4, 2]
    shards = tmp_path / "shards"
    full, full_evals, _ = generate_in_process(*args, progress=False, shards=shards)
    assert torch.equal(full.images, plain.images) and full_evals == plain_evals
    assert sorted(p.name for p in shards.iterdir()) == ["0000000.pt", "0000004.pt", "0000008.pt"]

    (shards / "0000008.pt").unlink()  # lost: batch 2 needs the contents inverted with batches 0 and 1
    torch.save(torch.load(shards / "0000000.pt", weights_only=True), shards / "0000004.pt")  # other pairs: made again
    kept = (shards / "0000000.pt").stat().st_mtime_ns
    groups.clear()
    again, evals, _ = generate_in_process(*args, progress=False, shards=shards)
    assert groups == made_in  # batch 0 skipped, its contents still inverted together, as batch 1's
    assert torch.equal(again.images, full.images) and evals == full_evals
    assert (shards / "0000000.pt").stat().st_mtime_ns == kept  # read back, not made again
    assert torch.equal(torch.load(shards / "0000004.pt", weights_only=True)["content"],
                       torch.as_tensor(pairs.content[4:8]))
    # the control: batch 2's pairs on their own invert their four contents in one group, not as the run did
    groups.clear()
    inject(load_unet(tiny_unet_dir), ddim_scheduler(tiny_unet_dir), images, labels,
           Pairs(pairs.content[8:], pairs.style[8:]), cfg, 7, progress=False, sample_ids=np.arange(8, 12))
    assert len(groups) == 1 and groups[0] != made_in[0] and groups[0] != made_in[1]


# ---------------------------------------------------------------------------------------------------------
# classifier epoch checkpoints
# ---------------------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands in for SIGKILL right after a checkpoint is written."""


@pytest.mark.parametrize("name", [n for n, m in registry.REGISTRY.items() if m.extra is None])
def test_every_learner_resumes_from_its_epoch_checkpoint_to_the_same_weights(name, tmp_path, monkeypatch, planted):
    """Killed after its 1st checkpoint and again 3 checkpoints later (JTT: inside its ERM phase, then inside its
    second phase; DeNetDM, 5 later: inside its first stage, then inside its second), a method resumed from the file
    ends with the weights (and JTT's error set) of an uninterrupted run."""
    from diffinject.core import classifier

    train, valid = planted(240, 0), planted(80, 1)
    cfg = ClassifierConfig(epochs=4, batch_size=32)
    method = registry.get(name, {"first_epochs": 2} if name == "jtt" else None)
    plain = method.fit(train, valid, 2, cfg, seed=0, progress=False)
    real_save, saves = classifier.save_torch, []

    def save_then_die_at(*kills):
        def save(path, obj):
            real_save(path, obj)
            saves.append(path)
            if len(saves) in kills:
                raise Killed

        return save

    checkpoint = tmp_path / f"{name}.ckpt.pt"
    monkeypatch.setattr(classifier, "save_torch", save_then_die_at(1, 6 if name == "denetdm" else 4))
    for _ in range(2):
        with pytest.raises(Killed):
            method.fit(train, valid, 2, cfg, seed=0, progress=False, checkpoint=checkpoint)
        torch.manual_seed(123)  # a resumed process starts with its own global RNG state
    resumed = method.fit(train, valid, 2, cfg, seed=0, progress=False, checkpoint=checkpoint)
    # every epoch checkpointed once: no epoch ran twice
    assert len(saves) == cfg.epochs + {"jtt": 2, "denetdm": cfg.epochs}.get(name, 0)
    a, b = plain.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.info == plain.info


# ---------------------------------------------------------------------------------------------------------
# the pipeline killed with SIGKILL inside its stages, then rerun
# ---------------------------------------------------------------------------------------------------------

# A quick run made smaller: the kills need every stage to outlast the poll by a few epochs or batches.
SMALL = """\
methods: [diffinject, lff, jtt]
mining: {classifier: {epochs: 6}}
diffusion: {steps: 12, checkpoint_every: 4}
injection: {num_samples: 16, batch_size: 4}
classifier: {epochs: 4}
hparams: {jtt: {first_epochs: 2}}
"""


def _argv(config, out):
    return ["run", "--preset", "quick", "--config", str(config), "--out", str(out), "--no-progress", "--threads", "1"]


def _run_until(argv, trigger, timeout=300):
    """Run the CLI in a subprocess and SIGKILL it as soon as ``trigger()`` holds (polled every 20 ms)."""
    proc = subprocess.Popen([sys.executable, "-m", "diffinject.workers.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not trigger():
            assert proc.poll() is None, f"finished (exit {proc.returncode}) before the kill: {proc.stderr.read()}"
            assert time.time() < deadline, "the trigger never came"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: nothing gets to clean up
        proc.wait()


def _holds_phase(path, phase):
    try:
        return phase in torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return False


def _untimed(obj):
    """``obj`` without its timing entries (any key naming seconds)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "second" not in k}
    return obj


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_to_the_uninterrupted_artifacts(tmp_path):
    """SIGKILL inside the biased classifier, the U-Net's training, the generation stage (after its first shard),
    LfF and JTT's second phase; rerun until done: every artifact equals an uninterrupted run's, timing aside."""
    config = tmp_path / "small.yaml"
    config.write_text(SMALL)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(config, a)) == 0
    kills = [  # (trigger, the stage's artifact the kill must have landed before)
        (lambda: (b / "biased/model.ckpt.pt").exists(), "biased/model.pt"),
        (lambda: (b / "unet/checkpoint.pt").exists(), "unet/train.json"),
        (lambda: (b / "synthetic/shards/0000000.pt").exists(), "synthetic/samples.pt"),
        (lambda: (b / "classifiers/lff.ckpt.pt").exists(), "classifiers/lff.json"),
        (lambda: _holds_phase(b / "classifiers/jtt.ckpt.pt", "jtt"), "classifiers/jtt.json"),
    ]
    for trigger, artifact in kills:
        _run_until(_argv(config, b), trigger)
        assert not (b / artifact).exists(), f"the kill landed after {artifact} was written"
    done = subprocess.run([sys.executable, "-m", "diffinject.workers.cli", *_argv(config, b)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    assert not list(b.rglob("*.ckpt.pt")) and not (b / "synthetic/shards").exists()  # cleaned up
    load = lambda folder, name: torch.load(folder / name, weights_only=True)  # noqa: E731
    assert _same_tensors(load(a, "synthetic/samples.pt"), load(b, "synthetic/samples.pt"))
    for name in ("biased/model.pt", "classifiers/diffinject.pt", "classifiers/lff.pt", "classifiers/jtt.pt"):
        assert _same_tensors(load(a, name), load(b, name)), name
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    for name in ("metrics.json", "synthetic/injection.json", "unet/train.json", "biased/mining.json"):
        assert _untimed(json.loads((a / name).read_text())) == _untimed(json.loads((b / name).read_text())), name


@pytest.mark.parametrize("command", [["run", "--preset", "quick"], ["train-diffusion"]])
@pytest.mark.parametrize("where", ["file", "file/below"])
def test_out_at_a_file_is_a_one_line_error(command, where, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a run folder\n")
    assert main([*command, "--out", str(tmp_path / where), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffinject: error: --out ") and "is a file, not a folder" in err and err.count("\n") == 1
    assert file.read_text() == "not a run folder\n" and list(tmp_path.iterdir()) == [file]
