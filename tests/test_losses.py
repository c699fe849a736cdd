"""Losses and metrics: P2 weighting, GCE, top-K mining, mining quality, group metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffinject.core.classifier import gce_loss, group_metrics
from diffinject.core.diffusion import DiffusionConfig, _step_generator, build_unet, ddpm_scheduler, p2_weights, train_diffusion
from diffinject.core.mining import MiningConfig, mine, mining_quality, top_k_per_class

# ---------------------------------------------------------------------------------------------------------
# P2 weighting
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alphas_cumprod():
    return ddpm_scheduler(DiffusionConfig()).alphas_cumprod


def _p2_closed_form(acp, k, gamma):
    return torch.tensor([1.0 / (k + a / (1.0 - a)) ** gamma for a in acp.double().tolist()], dtype=torch.float64)


@pytest.mark.parametrize("k,gamma", [(1.0, 1.0), (1.0, 0.5), (2.0, 1.0), (1.0, 0.0)])
def test_p2_weights_closed_form(alphas_cumprod, k, gamma):
    w = p2_weights(alphas_cumprod, k, gamma)
    assert w.shape == (1000,)
    torch.testing.assert_close(w.double(), _p2_closed_form(alphas_cumprod, k, gamma), rtol=1e-5, atol=1e-7)


def test_p2_weights_special_cases(alphas_cumprod):
    # k = 1, gamma = 1: 1 / (1 + abar / (1 - abar)) = 1 - abar
    torch.testing.assert_close(p2_weights(alphas_cumprod, 1.0, 1.0), 1.0 - alphas_cumprod, rtol=1e-4, atol=1e-6)
    # gamma = 0 turns weighting off
    assert torch.equal(p2_weights(alphas_cumprod, 1.0, 0.0), torch.ones(1000))
    # gamma = 0.5 is the square root of gamma = 1
    torch.testing.assert_close(p2_weights(alphas_cumprod, 1.0, 0.5), p2_weights(alphas_cumprod, 1.0, 1.0).sqrt())
    # low-noise steps (high SNR) get down-weighted: the weights grow with t
    w = p2_weights(alphas_cumprod, 1.0, 1.0)
    assert (w[1:] > w[:-1]).all() and w[0] < 1e-3 and w[-1] > 0.99


def test_ddpm_training_loss_is_p2_weighted(tmp_path):
    """The first recorded loss equals mean(MSE_i * (1 - abar_{t_i})) for the step's own batch, noise and t."""
    cfg = DiffusionConfig(image_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, batch_size=4, steps=1,
                          checkpoint_every=10**6)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    res = train_diffusion(images, cfg, tmp_path / "p2", seed=5, progress=False)

    torch.manual_seed(5)  # the model's initial weights, as train_diffusion builds them
    unet = build_unet(cfg, 3)
    g = _step_generator(5, 0)
    idx = torch.randint(0, 6, (4,), generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn((4, 3, 8, 8), generator=g)
    acp = ddpm_scheduler(cfg).alphas_cumprod
    x0 = images[idx].float() / 127.5 - 1.0
    xt = acp[t].sqrt()[:, None, None, None] * x0 + (1 - acp[t]).sqrt()[:, None, None, None] * noise
    with torch.no_grad():
        mse = (unet(xt, t).sample - noise).pow(2).mean(dim=(1, 2, 3))
    expected = (mse * (1 - acp[t])).mean().item()
    unweighted = mse.mean().item()
    assert res.losses[0] == pytest.approx(expected, rel=1e-4)
    assert abs(unweighted - expected) > 1e-3 * unweighted  # the check can tell weighted from unweighted


# ---------------------------------------------------------------------------------------------------------
# GCE
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def logits_targets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g, dtype=torch.float64) * 2.0, torch.randint(0, 5, (16,), generator=g)


@pytest.mark.parametrize("q", [0.7, 0.3])
def test_gce_loss_value(logits_targets, q):
    logits, y = logits_targets
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    p_y = p[torch.arange(16), y]
    expected = -torch.log(p_y) * p_y**q * q
    torch.testing.assert_close(gce_loss(logits, y, q, reduction="none"), expected)
    torch.testing.assert_close(gce_loss(logits, y, q), expected.mean())


def test_gce_default_q_is_0_7(logits_targets):
    logits, y = logits_targets
    torch.testing.assert_close(gce_loss(logits, y), gce_loss(logits, y, 0.7))


def test_gce_gradient_treats_p_y_as_constant(logits_targets):
    logits, y = logits_targets
    q = 0.7
    logits = logits.clone().requires_grad_(True)
    gce_loss(logits, y, q, reduction="none").sum().backward()

    with torch.no_grad():
        p = F.softmax(logits, dim=1)
        p_y = p[torch.arange(16), y]
        d_ce = p - F.one_hot(y, 5).double()  # dCE/dlogits
        expected = q * p_y[:, None] ** q * d_ce
    torch.testing.assert_close(logits.grad, expected)

    # the non-detached formula has another gradient: the test above would catch a missing .detach()
    other = logits.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(other, y, reduction="none")
    (ce * F.softmax(other, 1)[torch.arange(16), y] ** q * q).sum().backward()
    assert (other.grad - logits.grad).abs().max() > 1e-3
    # and it differs from plain CE's gradient
    assert (d_ce - logits.grad).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# top-K mining and its quality
# ---------------------------------------------------------------------------------------------------------


def test_top_k_per_class_finds_planted_samples():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 8 + [2] * 2)
    rng.shuffle(labels)
    losses = rng.uniform(0.0, 1.0, size=len(labels))
    planted = {}
    for c, k_planted in ((0, 3), (1, 3)):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=k_planted, replace=False)
        losses[chosen] = 10.0 + np.arange(k_planted)  # distinct, far above the rest
        planted[c] = chosen[np.argsort(-losses[chosen])]  # highest first
    picked = top_k_per_class(losses, labels, 3)

    assert len(picked) == 3 + 3 + 2
    for c in (0, 1):
        mine = picked[labels[picked] == c]
        assert mine.tolist() == planted[c].tolist()  # exactly the planted ones, highest loss first
    # class 2 has fewer than K members: all of them, highest loss first
    members2 = np.flatnonzero(labels == 2)
    assert picked[labels[picked] == 2].tolist() == members2[np.argsort(-losses[members2])].tolist()
    # grouped by class
    assert labels[picked].tolist() == sorted(labels[picked].tolist())


def test_top_k_per_class_ties_broken_by_index():
    labels = np.array([1, 0, 1, 0, 1, 0, 1])
    losses = np.ones(7)
    assert top_k_per_class(losses, labels, 2).tolist() == [1, 3, 0, 2]


class _FixedLogits(torch.nn.Module):
    """A 'biased model' whose logits for image i are row i of a table (image i holds the value i)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[(x.flatten(1)[:, 0] * 255).round().long()]


def test_mine_misclassified_only_keeps_the_wrongly_predicted_of_each_top_k():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = torch.tensor([1, 0, 2, 0, 1, 1, 1, 0, 2, 2])  # wrong: 0 and 2 (class 0), 7 (class 2); class 1 none
    confidence = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 1.0, 2.0, 6.0, 1.0, 3.0])
    logits = torch.zeros(10, 3)
    logits[torch.arange(10), predicted] = confidence  # CE is highest where the wrong class is most confident
    images = torch.arange(10, dtype=torch.uint8)[:, None, None, None]
    model = _FixedLogits(logits)

    top = mine(model, images, labels, k=3, misclassified_only=False, min_loss=0.0).indices
    assert top.tolist() == [0, 2, 1, 5, 6, 4, 7, 8, 9]  # plain top 3 per class, highest loss first
    kept = mine(model, images, labels, k=3, misclassified_only=True, min_loss=0.0).indices
    # class 0: its two wrong ones; class 1: none wrong, so its single highest-loss sample; class 2: the wrong one
    assert kept.tolist() == [0, 2, 5, 7]
    # only what the top k held: with k = 1, class 0 keeps sample 0 alone
    assert mine(model, images, labels, k=1, misclassified_only=True, min_loss=0.0).indices.tolist() == [0, 5, 7]


def test_mine_min_loss_keeps_only_confident_mistakes_and_drops_classes_without_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    logits = torch.zeros(7, 3)
    # class 0: sample 0 all but certain of class 1 (CE about 8), sample 1 a hesitant mistake (CE about 1)
    logits[0, 1], logits[1, 2], logits[1, 0], logits[2, 0] = 8.0, 1.0, 0.7, 3.0
    logits[3, 0], logits[4, 1] = 2.0, 4.0  # class 1: sample 3 a hesitant mistake only
    logits[5, 0], logits[6, 2] = 9.0, 5.0  # class 2: sample 5 a confident mistake
    images = torch.arange(7, dtype=torch.uint8)[:, None, None, None]
    model = _FixedLogits(logits)
    losses = F.cross_entropy(logits, labels, reduction="none")
    assert losses[0] > 4 and losses[5] > 4 and losses[1] < 4 and losses[3] < 4

    assert mine(model, images, labels, k=2, misclassified_only=True, min_loss=0.0).indices.tolist() == [0, 1, 3, 5]
    # past 4 nats: class 0 keeps its confident mistake, class 1 has none and gives no content (not its top one)
    assert mine(model, images, labels, k=2, misclassified_only=True, min_loss=4.0).indices.tolist() == [0, 5]
    # the threshold also filters the plain top k
    assert mine(model, images, labels, k=2, misclassified_only=False, min_loss=4.0).indices.tolist() == [0, 5]
    # a threshold no sample passes falls back to every class's top one, as misclassified_only does
    assert mine(model, images, labels, k=2, misclassified_only=True, min_loss=50.0).indices.tolist() == [0, 3, 5]


def test_mine_loss_weight_cap_weighs_each_content_by_its_capped_loss():
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.zeros(4, 2)
    logits[0, 1], logits[1, 1], logits[2, 0], logits[3, 0] = 30.0, 3.0, 8.0, 1.0  # all four misclassified
    images = torch.arange(4, dtype=torch.uint8)[:, None, None, None]
    model = _FixedLogits(logits)
    losses = F.cross_entropy(logits, labels, reduction="none").numpy()

    plain = mine(model, images, labels, k=2, misclassified_only=True, min_loss=0.0)
    assert plain.weights is None  # off: every content drawn equally often
    weighted = mine(model, images, labels, k=2, misclassified_only=True, min_loss=0.0, loss_weight_cap=10.0)
    np.testing.assert_array_equal(weighted.indices, plain.indices)  # the same contents, only drawn differently
    assert weighted.indices.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(weighted.weights, [10.0, losses[1], losses[2], losses[3]], rtol=1e-6)


def test_negative_mining_thresholds_are_refused():
    with pytest.raises(ValueError, match="min_loss"):
        MiningConfig(min_loss=-1.0)
    with pytest.raises(ValueError, match="loss_weight_cap"):
        MiningConfig(loss_weight_cap=-1.0)


def test_mining_quality_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    bias = torch.tensor([0, 1, 2, 1, 1, 0, 2, 2, 2, 0])  # conflicts: 1, 2, 5, 9
    mined = np.array([1, 5, 0, 3, 6])  # hits: 1, 5
    q = mining_quality(mined, labels, bias)
    assert q["mined"] == 5
    assert q["true_conflicts"] == 4
    assert q["precision"] == pytest.approx(40.0)
    assert q["recall"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------------------
# group metrics
# ---------------------------------------------------------------------------------------------------------


def test_group_metrics_by_hand():
    #               (label 0, bias 0)  (0, 1)  (1, 1)     (1, 0)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    bias = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    correct = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    pred = torch.where(correct, labels, 1 - labels)
    m = group_metrics(pred, labels, bias)
    assert m["unbiased"] == pytest.approx(100 * 7 / 12, abs=0.01)
    assert m["aligned"] == pytest.approx(100 * 5 / 6, abs=0.01)  # groups (0,0): 3/3 and (1,1): 2/3
    assert m["conflicting"] == pytest.approx(100 * 2 / 6, abs=0.01)  # groups (0,1): 1/2 and (1,0): 1/4
    assert m["worst_group"] == pytest.approx(25.0, abs=0.01)


def test_group_metrics_skips_empty_groups_and_reports_nan_without_conflicts():
    labels = torch.tensor([0, 0, 1, 1, 2])
    bias = labels.clone()  # all aligned: groups (0,0), (1,1), (2,2) only
    pred = torch.tensor([0, 1, 1, 1, 2])
    m = group_metrics(pred, labels, bias)
    assert m["unbiased"] == pytest.approx(80.0)
    assert m["aligned"] == pytest.approx(80.0)
    assert math.isnan(m["conflicting"])
    assert m["worst_group"] == pytest.approx(50.0)  # not 0 from a (label, bias) pair that never occurs
