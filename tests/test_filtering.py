"""Label-free filtering: the consistency score ranks content-shaped samples first and reads no labels."""

import dataclasses

import pytest
import torch

from diffinject.core.filtering import consistency_scores, keep_consistent
from diffinject.core.injection import InjectionConfig, Synthetic


def _digit(shape: str, colour: tuple[int, int, int]) -> torch.Tensor:
    """A 3x12x12 uint8 image: a vertical bar ("1") or a ring ("0") in ``colour`` on black."""
    mask = torch.zeros(12, 12, dtype=torch.bool)
    if shape == "1":
        mask[2:10, 5:7] = True
    else:
        mask[2:10, 2:10] = True
        mask[4:8, 4:8] = False
    return torch.stack([mask * c for c in colour]).to(torch.uint8)


RED, GREEN = (255, 0, 0), (0, 255, 0)


def test_score_follows_the_shape_whatever_the_colour():
    images = torch.stack([_digit("1", RED), _digit("0", GREEN)])  # content 0, style 1
    samples = torch.stack([_digit("1", GREEN),  # the content's shape in the style's colour: the transfer we want
                           _digit("0", GREEN),  # the style unchanged
                           _digit("0", RED)])  # the style's shape in the content's colour
    syn = Synthetic(samples, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                    torch.ones(3, dtype=torch.long))
    scores = consistency_scores(syn, images)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] < -0.5
    assert torch.allclose(scores[1], scores[2])  # colour does not enter the score


def test_keep_consistent_keeps_the_best_in_order_and_ignores_labels():
    images = torch.stack([_digit("1", RED), _digit("0", GREEN)])
    samples = torch.stack([_digit("0", GREEN), _digit("1", GREEN), _digit("0", RED), _digit("1", RED)])
    syn = Synthetic(samples, torch.tensor([7, 8, 9, 6]), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    kept = keep_consistent(syn, images, 2)
    assert kept.labels.tolist() == [8, 6]  # samples 1 and 3 (the content's bar), original order
    relabelled = dataclasses.replace(syn, labels=torch.tensor([0, 0, 0, 0]))
    assert torch.equal(keep_consistent(relabelled, images, 2).images, kept.images)  # labels play no part
    assert keep_consistent(syn, images, 4) is syn  # nothing to drop


def test_keep_fraction_sets_how_many_are_generated():
    cfg = InjectionConfig(num_samples=300, keep_fraction=0.5)
    assert cfg.count(3000) == 300 and cfg.generated(3000) == 600
    assert InjectionConfig(synthetic_ratio=0.1).generated(3000) == 300
    with pytest.raises(ValueError, match="keep_fraction 0.0 must be in"):
        InjectionConfig(keep_fraction=0.0).validate()
