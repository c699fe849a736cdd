"""Resume inside a stage: the generation stage's shards, classifier epoch checkpoints, and a pipeline killed with
SIGKILL at chosen points that ends with the artifacts of an uninterrupted run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.diffusion import DiffusionConfig, build_unet, ddim_scheduler
from core.injection import InjectionConfig, Pairs, inject, plan_pairs
from core.pipeline import generate_in_process

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
    Contents recur across batches, so a regenerated batch needs inversions its skipped predecessors made."""
    monkeypatch.setattr("core.injection.from_model_space", lambda x, size: x.clone())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(16) % 4
    pairs = plan_pairs(labels, np.array([0, 1, 2, 3, 5]), 10, seed=0)  # five contents cycled over ten pairs
    cfg = InjectionConfig(steps=5, t_edit=300, gamma=0.9, t_boost=600, batch_size=3)
    args = (tiny_unet_dir, images, labels, pairs, cfg, 7)
    plain, plain_evals, _ = generate_in_process(*args, progress=False)
    shards = tmp_path / "shards"
    full, full_evals, _ = generate_in_process(*args, progress=False, shards=shards)
    assert torch.equal(full.images, plain.images) and full_evals == plain_evals
    assert sorted(p.name for p in shards.iterdir()) == ["0000000.pt", "0000003.pt", "0000006.pt", "0000009.pt"]

    (shards / "0000006.pt").unlink()  # lost: batch 2 needs contents first inverted in batches 0 and 1
    wrong = torch.load(shards / "0000000.pt", weights_only=True)
    torch.save(wrong, shards / "0000003.pt")  # another batch's pairs: ignored and made again
    again, evals, _ = generate_in_process(*args, progress=False, shards=shards)
    assert torch.equal(again.images, full.images) and evals == full_evals
    assert torch.equal(torch.load(shards / "0000003.pt", weights_only=True)["content"],
                       torch.as_tensor(pairs.content[3:6]))
    # the control: batch 2's pairs on their own invert their contents in another grouping, which rounds otherwise
    alone = inject(build_unet_from(tiny_unet_dir), ddim_scheduler(tiny_unet_dir), images, labels,
                   Pairs(pairs.content[6:9], pairs.style[6:9]), cfg, 7, progress=False, sample_ids=np.arange(6, 9))
    assert not torch.equal(alone.images, full.images[6:9])


def build_unet_from(folder):
    from core.diffusion import load_unet

    return load_unet(folder)
