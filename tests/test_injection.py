"""Stage 3: normalized Slerp, the h-space forward, pair planning, DDIM inversion and the injection stage."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffinject.core import hspace
from diffinject.core.diffusion import DiffusionConfig, build_unet, ddim_scheduler, to_model_space, train_diffusion
from diffinject.core.hspace import Evaluations, HSpace
from diffinject.core.injection import (
    InjectionConfig,
    Pairs,
    _alpha,
    _ddim_move,
    apportion,
    ddim_generate,
    ddim_invert,
    ddim_timesteps,
    inject,
    plan_pairs,
    sample_generators,
    slerp,
)
from diffinject.core.reference import bottleneck_hook


def tiny_config(**kw) -> DiffusionConfig:
    base = dict(image_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return DiffusionConfig(**(base | kw))


# ---------------------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------------------


def _norms(x):
    return x.flatten(1).norm(dim=1)


def _reference_slerp(a: np.ndarray, b: np.ndarray, g: float) -> np.ndarray:
    """Textbook normalized Slerp of two flat vectors, in float64."""
    b = b * np.linalg.norm(a) / np.linalg.norm(b)
    theta = math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return (math.sin((1 - g) * theta) * a + math.sin(g * theta) * b) / math.sin(theta)


@pytest.fixture
def h_pair():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    h_c = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    # very different norms per sample, so norm matching matters
    h_s = h_s * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5], dtype=torch.float64)[:, None, None, None]
    h_c = h_c * torch.tensor([7.0, 0.2, 1.0, 2.0, 40.0], dtype=torch.float64)[:, None, None, None]
    return h_s, h_c


def test_slerp_gamma_zero_is_style(h_pair):
    h_s, h_c = h_pair
    torch.testing.assert_close(slerp(h_s, h_c, 0.0), h_s)


def test_slerp_gamma_one_is_norm_matched_content(h_pair):
    h_s, h_c = h_pair
    expected = h_c * (_norms(h_s) / _norms(h_c))[:, None, None, None]
    torch.testing.assert_close(slerp(h_s, h_c, 1.0), expected)


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_slerp_keeps_the_style_norm(h_pair, gamma):
    h_s, h_c = h_pair
    out = slerp(h_s, h_c, gamma)
    assert out.shape == h_s.shape
    torch.testing.assert_close(_norms(out), _norms(h_s))


def test_slerp_is_per_sample(h_pair):
    h_s, h_c = h_pair
    batch = slerp(h_s, h_c, 0.35)
    for i in range(len(h_s)):
        torch.testing.assert_close(batch[i : i + 1], slerp(h_s[i : i + 1], h_c[i : i + 1], 0.35))


@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.8])
def test_slerp_rotates_orthogonal_vectors(gamma):
    # h_s = e1, h_c = 3 * e2: after norm matching h_c' = e2, and Slerp is a rotation by gamma * 90 degrees
    h_s = torch.tensor([[1.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 1)
    h_c = torch.tensor([[0.0, 3.0]], dtype=torch.float64).view(1, 2, 1, 1)
    angle = gamma * math.pi / 2
    expected = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close(slerp(h_s, h_c, gamma), expected)


@pytest.mark.parametrize("gamma", [0.2, 0.6])
def test_slerp_matches_textbook_formula(h_pair, gamma):
    h_s, h_c = h_pair
    out = slerp(h_s, h_c, gamma).flatten(1).numpy()
    for i in range(len(h_s)):
        ref = _reference_slerp(h_s[i].flatten().numpy(), h_c[i].flatten().numpy(), gamma)
        np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# bottleneck_hook
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(tiny_config()).eval()


@pytest.fixture
def unet_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.tensor([500, 100])


@torch.no_grad()
def test_bottleneck_hook_replaces_the_mid_block_output(tiny_unet, unet_input):
    x, t = unet_input
    plain = tiny_unet(x, t).sample
    seen = []

    def record(h):
        seen.append(h.clone())
        return h

    with bottleneck_hook(tiny_unet, record):
        recorded = tiny_unet(x, t).sample
    # the bottleneck of a 2-level U-Net: last block's channels, one downsampling (16 -> 8)
    assert len(seen) == 1 and seen[0].shape == (2, 32, 8, 8)
    torch.testing.assert_close(recorded, plain)  # an identity fn changes nothing

    with bottleneck_hook(tiny_unet, torch.zeros_like):
        zeroed = tiny_unet(x, t).sample
    assert (zeroed - plain).abs().max() > 1e-3

    # replacing sample 0's bottleneck by zeros touches sample 0 only
    def zero_first(h):
        return torch.cat([torch.zeros_like(h[:1]), h[1:]])

    with bottleneck_hook(tiny_unet, zero_first):
        partial = tiny_unet(x, t).sample
    torch.testing.assert_close(partial[0], zeroed[0])
    torch.testing.assert_close(partial[1], plain[1])

    assert len(tiny_unet.mid_block._forward_hooks) == 0
    torch.testing.assert_close(tiny_unet(x, t).sample, plain)


@torch.no_grad()
def test_bottleneck_hook_is_removed_on_exception(tiny_unet, unet_input):
    x, t = unet_input
    plain = tiny_unet(x, t).sample
    with pytest.raises(RuntimeError, match="boom"):
        with bottleneck_hook(tiny_unet, torch.zeros_like):
            tiny_unet(x, t)
            raise RuntimeError("boom")
    assert len(tiny_unet.mid_block._forward_hooks) == 0
    torch.testing.assert_close(tiny_unet(x, t).sample, plain)


# ---------------------------------------------------------------------------------------------------------
# plan_pairs
# ---------------------------------------------------------------------------------------------------------

LABELS = torch.tensor([i % 3 for i in range(12)])  # 3 classes, 4 images each
POOL = np.array([0, 4, 5, 10])


def test_plan_pairs_styles_come_from_other_classes_and_contents_from_the_pool():
    pairs = plan_pairs(LABELS, POOL, 40, seed=0)
    assert len(pairs.content) == len(pairs.style) == 40
    assert set(pairs.content.tolist()) <= set(POOL.tolist())
    labels = LABELS.numpy()
    assert (labels[pairs.style] != labels[pairs.content]).all()
    # contents cycle through the pool: every pool member used exactly 40 / 4 times
    assert sorted(pairs.content[: len(POOL)].tolist()) == sorted(POOL.tolist())
    assert np.bincount(pairs.content, minlength=12)[POOL].tolist() == [10, 10, 10, 10]


def test_plan_pairs_styles_cover_every_image_of_the_other_classes():
    pairs = plan_pairs(LABELS, POOL, 600, seed=3)
    labels = LABELS.numpy()
    for c in np.unique(pairs.content):
        styles = set(pairs.style[pairs.content == c].tolist())
        assert styles == set(np.flatnonzero(labels != labels[c]).tolist())


def test_plan_pairs_is_deterministic_and_seeded():
    a, b = plan_pairs(LABELS, POOL, 20, seed=7), plan_pairs(LABELS, POOL, 20, seed=7)
    np.testing.assert_array_equal(a.content, b.content)
    np.testing.assert_array_equal(a.style, b.style)
    c = plan_pairs(LABELS, POOL, 20, seed=8)
    assert not (np.array_equal(a.content, c.content) and np.array_equal(a.style, c.style))


def test_plan_pairs_prefix_stable_in_num_samples():
    short, long = plan_pairs(LABELS, POOL, 10, seed=1), plan_pairs(LABELS, POOL, 20, seed=1)
    np.testing.assert_array_equal(short.content, long.content[:10])
    np.testing.assert_array_equal(short.style, long.style[:10])


def test_plan_pairs_draws_weighted_contents_in_proportion():
    pairs = plan_pairs(LABELS, POOL, 40, seed=0, weights=[1.0, 1.0, 2.0, 4.0])
    assert np.bincount(pairs.content, minlength=12)[POOL].tolist() == [5, 5, 10, 20]
    assert (LABELS.numpy()[pairs.style] != LABELS.numpy()[pairs.content]).all()
    again = plan_pairs(LABELS, POOL, 40, seed=0, weights=[1.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(pairs.content, again.content)
    # equal weights draw every content equally often, as no weights do (in another seeded order)
    assert np.bincount(plan_pairs(LABELS, POOL, 40, seed=0, weights=[3.0] * 4).content)[POOL].tolist() == [10] * 4
    with pytest.raises(ValueError, match="3 content weights for a pool of 4"):
        plan_pairs(LABELS, POOL, 40, seed=0, weights=[1.0, 1.0, 1.0])


def test_apportion_sums_to_the_total_by_largest_remainder():
    counts = apportion([1.0, 2.0, 3.5], 10)  # exact 1.54, 3.08, 5.38: floors 1, 3, 5, the one left to 1.54
    assert counts.tolist() == [2, 3, 5]
    assert apportion([20.0, 4.5, 20.0], 3000).sum() == 3000
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        apportion([0.0, 0.0], 5)


def test_plan_pairs_empty_pool():
    with pytest.raises(ValueError):
        plan_pairs(LABELS, np.array([], dtype=np.int64), 5, seed=0)


def test_plan_pairs_needs_a_second_class():
    with pytest.raises(ValueError, match="none other than class"):
        plan_pairs(np.zeros(6, dtype=np.int64), np.array([0, 1]), 3, seed=0)


# ---------------------------------------------------------------------------------------------------------
# DDIM inversion and generation on a (quickly) trained U-Net
# ---------------------------------------------------------------------------------------------------------


def square_images() -> torch.Tensor:
    """Four 16x16 uint8 images: a flat coloured square on black, at four positions."""
    colours = torch.tensor([[220, 20, 60], [0, 128, 128], [250, 230, 20], [40, 40, 200]], dtype=torch.uint8)
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    for i, c in enumerate(colours):
        a = 2 + 2 * i
        images[i, :, a : a + 6, a : a + 6] = c[:, None, None]
    return images


TRAIN_CFG = tiny_config(steps=300, batch_size=8, lr=4e-3, ema_decay=0.95, checkpoint_every=10**6)


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory):
    """A tiny U-Net trained for 300 steps (~15 s on one core) on the four square images."""
    res = train_diffusion(square_images(), TRAIN_CFG, tmp_path_factory.mktemp("unet"), seed=3, progress=False)
    return res.unet.eval()


def _reconstruction_error(unet, x_T_fn=None, steps=30, **gen_kw):
    sched = ddim_scheduler(cfg=TRAIN_CFG)
    x0 = to_model_space(square_images(), 16)
    x_T = ddim_invert(unet, sched, x0, steps).x_T
    if x_T_fn is not None:
        x_T = x_T_fn(x_T)
    cfg = InjectionConfig(steps=steps, gamma=gen_kw.pop("gamma", 0.0), t_boost=-1)
    x = ddim_generate(unet, sched, x_T, cfg, **gen_kw)
    return (x - x0).abs().mean().item()


# Mean absolute error in [-1, 1] space; 0.1 is about 13 uint8 levels on average, far below the error of a
# wrong start point (> 1, measured in the control checks below) but above what the trained model reaches
# with 30 deterministic DDIM steps (0.03 to 0.05 over training seeds).
RECON_THRESHOLD = 0.1


def test_ddim_inversion_reconstructs_on_a_trained_model(trained_unet):
    assert _reconstruction_error(trained_unet) < RECON_THRESHOLD


def test_gamma_zero_with_content_is_plain_reconstruction(trained_unet):
    sched = ddim_scheduler(cfg=TRAIN_CFG)
    x0 = to_model_space(square_images(), 16)
    inv = ddim_invert(trained_unet, sched, x0, 30, record_h_from=500)
    # h recorded at every grid timestep >= 500 (the 30-step "leading" grid is 0, 33, ..., 957), the top included
    assert sorted(inv.h) == [33 * i for i in range(30) if 33 * i >= 500]
    h_content = {t: h.flip(0) for t, h in inv.h.items()}  # another image's h for every sample
    cfg = InjectionConfig(steps=30, t_edit=500, gamma=0.0, t_boost=-1)
    plain = ddim_generate(trained_unet, sched, inv.x_T, cfg)
    with_h = ddim_generate(trained_unet, sched, inv.x_T, cfg, h_content=h_content)
    torch.testing.assert_close(with_h, plain)
    injected = ddim_generate(trained_unet, sched, inv.x_T, InjectionConfig(steps=30, t_edit=500, gamma=0.9, t_boost=-1),
                             h_content=h_content)
    assert (injected - plain).abs().mean() > 1e-3


def test_reconstruction_check_is_meaningful(trained_unet):
    # a corrupted start point (fresh noise instead of the inverted x_T) must not reconstruct
    g = torch.Generator().manual_seed(0)
    corrupted = _reconstruction_error(trained_unet, lambda x_T: torch.randn(x_T.shape, generator=g))
    assert corrupted > 5 * RECON_THRESHOLD
    # nor does an untrained U-Net
    torch.manual_seed(0)
    untrained = build_unet(TRAIN_CFG).eval()
    assert _reconstruction_error(untrained) > 5 * RECON_THRESHOLD


# ---------------------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------------------

INJECT_LABELS = torch.tensor([0, 1, 2, 3])


def _inject(unet, cfg, seed=0, pairs=None):
    pairs = pairs or Pairs(content=np.array([0, 1, 2, 0]), style=np.array([1, 2, 3, 3]))
    return inject(unet, ddim_scheduler(cfg=TRAIN_CFG), square_images(), INJECT_LABELS, pairs, cfg, seed=seed,
                  progress=False)


def _cfg(**kw):
    return InjectionConfig(**({"steps": 10, "t_edit": 500, "gamma": 0.5, "t_boost": 200, "batch_size": 4,
                               "precision": "fp32"} | kw))


def test_inject_is_deterministic_and_batch_independent(trained_unet):
    a = _inject(trained_unet, _cfg(), seed=0)
    b = _inject(trained_unet, _cfg(), seed=0)
    assert a.images.dtype == torch.uint8 and a.images.shape == (4, 3, 16, 16)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    small = _inject(trained_unet, _cfg(batch_size=2), seed=0)
    assert (a.images.int() - small.images.int()).abs().max() <= 1
    # the stochastic (t <= t_boost) steps take their noise from the seed
    other = _inject(trained_unet, _cfg(), seed=1)
    assert (a.images.int() - other.images.int()).abs().max() > 1


def test_inject_gamma_changes_the_image(trained_unet):
    none = _inject(trained_unet, _cfg(gamma=0.0))
    full = _inject(trained_unet, _cfg(gamma=1.0))
    assert (none.images.float() - full.images.float()).abs().mean() > 2.0  # uint8 levels


def test_inject_labels_follow_label_from(trained_unet):
    pairs = Pairs(content=np.array([0, 1, 2, 0]), style=np.array([1, 2, 3, 3]))
    by_content = _inject(trained_unet, _cfg(label_from="content"), pairs=pairs)
    by_style = _inject(trained_unet, _cfg(label_from="style"), pairs=pairs)
    assert by_content.labels.tolist() == INJECT_LABELS[pairs.content].tolist() == [0, 1, 2, 0]
    assert by_style.labels.tolist() == INJECT_LABELS[pairs.style].tolist() == [1, 2, 3, 3]
    assert by_content.content.tolist() == by_style.content.tolist() == [0, 1, 2, 0]
    assert by_content.style.tolist() == by_style.style.tolist() == [1, 2, 3, 3]
    torch.testing.assert_close(by_content.images, by_style.images, rtol=0, atol=0)  # only the labels differ


# ---------------------------------------------------------------------------------------------------------
# InjectionConfig.validate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [-0.01, 1.01, 2.0])
def test_validate_rejects_gamma_outside_unit_interval(gamma):
    with pytest.raises(ValueError, match="gamma"):
        InjectionConfig(gamma=gamma).validate()


@pytest.mark.parametrize("label_from", ["both", "bias", "Content", ""])
def test_validate_rejects_bad_label_from(label_from):
    with pytest.raises(ValueError, match="label_from"):
        InjectionConfig(label_from=label_from).validate()


@pytest.mark.parametrize("kw", [{"gamma": 0.0}, {"gamma": 1.0}, {"label_from": "style"}, {}])
def test_validate_accepts_good_configs(kw):
    cfg = InjectionConfig(**kw)
    assert cfg.validate() is cfg


def test_inject_validates_its_config(tiny_unet):
    with pytest.raises(ValueError, match="gamma"):
        _inject(tiny_unet, _cfg(gamma=1.5))


# ---------------------------------------------------------------------------------------------------------
# bucket: fixed U-Net batch shapes, so a sample does not depend on its batch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_bucket_makes_a_sample_independent_of_its_batch(tiny_unet, monkeypatch, threads):
    """With ``bucket`` the same (content, style, seed, sample id) gives bit-identical float output alone, at other
    rows of batches of other sizes and batch-mates, and with its content inversion cached or fresh; without it,
    the batch shape changes the rounding (the control)."""
    monkeypatch.setattr("diffinject.core.injection.from_model_space", lambda x, *_: x.clone())  # floats, not uint8 levels
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(16) % 4
    cfg = _cfg(steps=5, t_edit=300, gamma=0.9, t_boost=600, batch_size=64)
    target = (3, 6, 5, 42)  # content, style, seed, sample id

    def run(mates, at, bucket=4, cache=None):
        """The target at row ``at`` among ``mates`` (content, style, seed, id); its output row."""
        rows = [*mates[:at], target, *mates[at:]]
        content, style, seed, ids = (np.array(col) for col in zip(*rows))
        out = inject(tiny_unet, ddim_scheduler(cfg=tiny_config()), images, labels, Pairs(content, style), cfg, seed,
                     progress=False, sample_ids=ids, content_cache=cache, bucket=bucket)
        return out.images[at]

    mates = [(c, (c + 1) % 16, 10 + c, c) for c in (0, 8, 9, 12, 13, 2, 14)]
    try:
        alone = run([], 0)
        assert torch.equal(run(mates[:3], 3), alone)  # last row of a full bucket, new contents beside it
        assert torch.equal(run(mates, 5), alone)  # second bucket, padded, its content inverted in another chunk
        cache = {}
        run([(3, 9, 1, 7), (4, 10, 1, 8)], 1, cache=cache)  # content 3 inverted beside content 4 ...
        assert 3 in cache
        assert torch.equal(run(mates[:2], 1, cache=cache), alone)  # ... and read back from the cache
        assert not torch.equal(run(mates[:3], 3, bucket=None), run([], 0, bucket=None))  # the control
    finally:
        torch.set_num_threads(before)


def test_bucket_is_checked(tiny_unet):
    pairs = Pairs(content=np.array([0]), style=np.array([1]))
    for kw in ({"bucket": 0}, {"bucket": 4, "joint_inversion": True}):
        with pytest.raises(ValueError, match="bucket"):
            inject(tiny_unet, ddim_scheduler(cfg=tiny_config()), square_images(), INJECT_LABELS, pairs, _cfg(),
                   progress=False, **kw)


# ---------------------------------------------------------------------------------------------------------
# the hook-free forward: hspace.forward against diffusers' forward and the former hook path
# ---------------------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "2-level": tiny_config(),
    "attention": tiny_config(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8),
    "4-level": tiny_config(image_size=32, block_out_channels=(8, 16, 16, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                           attention_head_dim=8),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def any_unet(request):
    torch.manual_seed(0)
    cfg = ARCHITECTURES[request.param]
    return build_unet(cfg).eval(), ddim_scheduler(cfg=cfg), cfg.image_size


def _hook_invert(unet, scheduler, x0, steps, record_h_from=None, h_rows=None):
    """``ddim_invert`` on diffusers' own forward, h recorded by ``bottleneck_hook``: the oracle."""
    grid = ddim_timesteps(scheduler, steps)[::-1]
    rows = slice(None) if h_rows is None else slice(0, h_rows)
    x, hs, captured = x0, {}, {}

    def keep(h):
        captured["h"] = h
        return h

    with torch.inference_mode(), bottleneck_hook(unet, keep):
        for i, t in enumerate(grid):
            record = record_h_from is not None and t >= record_h_from and h_rows != 0
            if i == len(grid) - 1:
                if record:
                    unet(x[rows], t)
                    hs[t] = captured["h"]
                break
            eps = unet(x, t).sample
            if record:
                hs[t] = captured["h"][rows]
            x = _ddim_move(x, eps, eps, _alpha(scheduler, t), _alpha(scheduler, grid[i + 1]))
    return x, hs


def _hook_generate(unet, scheduler, x_T, cfg, h_content, generators):
    """``ddim_generate`` on diffusers' own forward, injecting by ``bottleneck_hook`` on the doubled batch: the
    oracle."""
    grid = ddim_timesteps(scheduler, cfg.steps)
    x, n = x_T, len(x_T)
    with torch.inference_mode():
        for i, t in enumerate(grid):
            a_t, a_prev = _alpha(scheduler, t), _alpha(scheduler, grid[i + 1] if i + 1 < len(grid) else -1)
            if t >= cfg.t_edit:
                def mix(h, h_c=h_content[t]):
                    return torch.cat([h[:n], slerp(h[n:], h_c, cfg.gamma)])

                with bottleneck_hook(unet, mix):
                    eps, eps_inj = unet(torch.cat([x, x]), t).sample.chunk(2)
                x = _ddim_move(x, eps_inj, eps, a_t, a_prev, cfg.dt_lambda if t >= 950 else 1.0)
                continue
            eps = unet(x, t).sample
            if t <= cfg.t_boost and i + 1 < len(grid):
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
                x = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
            else:
                x = _ddim_move(x, eps, eps, a_t, a_prev, cfg.dt_lambda if t >= 950 else 1.0)
    return x


@torch.inference_mode()
def test_hspace_forward_is_diffusers_forward(any_unet):
    unet, _, size = any_unet
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, size, size, generator=g)
    seen = []
    with bottleneck_hook(unet, lambda h: seen.append(h) or h):
        expected = unet(x, 700).sample
    for t in (700, torch.tensor(700), torch.tensor([700]), torch.tensor([700, 700, 700])):
        eps, h = hspace.forward(unet, x, t)
        assert torch.equal(eps, expected) and torch.equal(h, seen[0])


@pytest.mark.parametrize("variant", ["fourier-centred", "skip-blocks"])
@torch.inference_mode()
def test_hspace_forward_follows_diffusers_rarer_options(variant):
    """The Fourier time embedding (its 1/t output scaling), input centring, and the skip blocks' extra path."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if variant == "fourier-centred":
        unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           time_embedding_type="fourier", center_input_sample=True).eval()
    else:
        unet = UNet2DModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1,  # their groups: 32
                           down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                           up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), attention_head_dim=8).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.3, 0.3]) if variant == "fourier-centred" else 400
    expected = unet(x, t).sample
    assert torch.equal(hspace.forward(unet, x, t)[0], expected)
    torch.testing.assert_close(hspace.forward(unet, torch.cat([x, x]), t, copies=2)[0],
                               torch.cat([expected, expected]))


@torch.inference_mode()
def test_hspace_forward_replaces_h_by_a_tensor_or_a_function(tiny_unet, unet_input):
    x, t = unet_input
    zeroed = torch.zeros(2, 32, 8, 8)
    with bottleneck_hook(tiny_unet, torch.zeros_like):
        expected = tiny_unet(x, t).sample
    eps, h = hspace.forward(tiny_unet, x, t, h_replace=zeroed)
    assert torch.equal(eps, expected) and h.abs().max() > 0  # h is the middle block's, not the replacement
    assert torch.equal(hspace.forward(tiny_unet, x, t, h_replace=torch.zeros_like)[0], expected)


@torch.inference_mode()
def test_copies_run_the_down_path_once_and_the_up_path_on_every_copy(tiny_unet, unet_input):
    """``copies`` 2: h has one copy's rows, ``mid`` returns both, and each copy's output is what its own h gives."""
    x, t = unet_input
    rows = []
    handle = tiny_unet.mid_block.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        eps, h = hspace.forward(tiny_unet, torch.cat([x, x]), t.repeat(2),
                                lambda h: torch.cat([h, torch.zeros_like(h)]), copies=2)
    finally:
        handle.remove()
    assert rows == [2] and h.shape == (2, 32, 8, 8) and eps.shape == (4, 3, 16, 16)
    # against batches of other shapes: equal up to float rounding
    torch.testing.assert_close(eps[:2], tiny_unet(x, t).sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eps[2:], hspace.forward(tiny_unet, x, t, h_replace=torch.zeros_like)[0], rtol=1e-5,
                               atol=1e-6)


def _skips_of_first_up_blocks(unet, levels: int) -> int:
    return sum(len(block.resnets) for block in unet.up_blocks[:levels])


@pytest.mark.parametrize("levels", [1, 2])
@torch.inference_mode()
def test_skip_levels_widen_h_to_the_skips_the_coarsest_up_blocks_read(any_unet, levels):
    """h at ``skip_levels`` N is [middle block's output, the skips of the N coarsest up blocks], flattened per
    image; a replacement goes to exactly those places, against hooks on diffusers' own forward (the oracle)."""
    unet, _, size = any_unet
    if levels > len(unet.up_blocks):
        pytest.skip("a 2-level U-Net has two up blocks")
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 3, size, size, generator=g), 600
    k = _skips_of_first_up_blocks(unet, levels)
    seen = {"h": [], "skips": []}
    handles = [unet.mid_block.register_forward_hook(lambda m, a, out: seen["h"].append(out))]
    for block in unet.up_blocks[:levels]:  # diffusers calls an up block as block(x, its skips, emb)
        handles.append(block.register_forward_pre_hook(lambda m, a: seen["skips"].append(a[1])))
    try:
        plain = unet(x, t).sample
    finally:
        for handle in handles:
            handle.remove()
    # the skips in the down path's order: the coarsest block reads the last ones
    parts = [seen["h"][0], *[r for skips in reversed(seen["skips"]) for r in skips]]
    assert len(parts) == 1 + k
    eps, h = hspace.forward(unet, x, t, skip_levels=levels)
    assert torch.equal(eps, plain) and h.shape == (2, sum(p[0].numel() for p in parts))
    assert torch.equal(h, torch.cat([p.flatten(1) for p in parts], dim=1))
    # h put back as it came out: the same values, in another memory layout (attention's output is strided)
    torch.testing.assert_close(hspace.forward(unet, x, t, h_replace=lambda h: h, skip_levels=levels)[0], plain)
    # zero the first skip of h (the first one the last injected up block reads): as a hook zeroing it in diffusers
    zeroed = h.clone()
    zeroed[:, parts[0][0].numel() : sum(p[0].numel() for p in parts[:2])] = 0
    handle = unet.up_blocks[levels - 1].register_forward_pre_hook(
        lambda m, a: (a[0], (torch.zeros_like(a[1][0]), *a[1][1:]), *a[2:]))
    try:
        expected = unet(x, t).sample
    finally:
        handle.remove()
    torch.testing.assert_close(hspace.forward(unet, x, t, h_replace=zeroed, skip_levels=levels)[0], expected)
    assert (expected - plain).abs().max() > 1e-4  # the zeroed skip mattered


@torch.inference_mode()
def test_skip_levels_share_the_down_path_between_copies(tiny_unet, unet_input):
    x, t = unet_input
    eps, h = hspace.forward(tiny_unet, torch.cat([x, x]), t.repeat(2), lambda h: torch.cat([h, torch.zeros_like(h)]),
                            copies=2, skip_levels=1)
    assert h.shape[0] == 2
    torch.testing.assert_close(eps[:2], tiny_unet(x, t).sample, rtol=1e-5, atol=1e-6)
    alone = hspace.forward(tiny_unet, x, t, h_replace=torch.zeros_like, skip_levels=1)[0]
    torch.testing.assert_close(eps[2:], alone, rtol=1e-5, atol=1e-6)
    bottleneck_only = hspace.forward(tiny_unet, x, t, h_replace=torch.zeros_like)[0]
    assert (alone - bottleneck_only).abs().max() > 1e-4  # the skips zeroed too


def test_skip_levels_beyond_the_up_blocks_or_not_whole_are_refused(tiny_unet, unet_input):
    from diffinject.core.hspace import SettingError

    x, t = unet_input
    with pytest.raises(ValueError, match="skip_levels 3 must be between 0 and the U-Net's 2 up blocks"):
        hspace.forward(tiny_unet, x, t, skip_levels=3)
    for value, message in ((9, "skip_levels 9 is outside"), (1.5, "skip_levels 1.5 must be a whole number"),
                           (True, "skip_levels True must be a whole number")):
        with pytest.raises(SettingError, match=message) as err:
            InjectionConfig(skip_levels=value).validate()
        assert err.value.field == "skip_levels"


def test_corrupted_mnist_widens_h_under_its_presets_and_a_setting_still_wins():
    """h stays at the middle block (the core's default) but on Corrupted MNIST, whose entry in the per-dataset
    defaults widens it under the default and table presets; the paper preset keeps the paper's h, and a flag or a
    settings file still wins there."""
    from diffinject.core.config import make_config

    assert InjectionConfig().skip_levels == 0 and make_config("paper").injection.skip_levels == 0
    assert make_config().injection.skip_levels == 0  # the embedded cmnist
    assert make_config("default", {"dataset": "corrupted_mnist"}).injection.skip_levels == 1
    assert make_config("table", {"dataset": "corrupted_mnist"}).injection.skip_levels == 1
    assert make_config("paper", {"dataset": "corrupted_mnist"}).injection.skip_levels == 0
    folder = {"dataset": "cifar10c", "data_root": "/data"}
    assert make_config("default", folder).injection.skip_levels == 0
    assert make_config("default", {"dataset": "corrupted_mnist", "injection": {"skip_levels": 0}}).injection.skip_levels == 0
    assert make_config("default", folder | {"injection": {"skip_levels": 1}}).injection.skip_levels == 1


def test_the_embedded_benchmarks_mine_with_a_cnn_and_a_preset_or_a_file_still_wins():
    """The miner is the MLP with K = 10 by default but on the two embedded benchmarks (a CNN with K = 5, keeping
    only its confident mistakes; on Corrupted MNIST each drawn by its capped loss, and LfF's biased model the same
    CNN), also read from a folder; the debiased classifiers keep the shared architecture, and a preset's or a
    file's setting wins key by key."""
    from diffinject.core.config import make_config

    corrupted = make_config("default", {"dataset": "corrupted_mnist"})
    assert (corrupted.mining.k, corrupted.mining.classifier.arch, corrupted.mining.min_loss) == (5, "cnn", 4.0)
    assert corrupted.mining.loss_weight_cap == 20.0  # contents drawn by their capped CE there alone
    assert corrupted.mining.classifier.epochs == 50 and corrupted.classifier.arch == "auto"  # merged key by key
    for coloured in (make_config(), make_config("default", {"data_root": "/data"})):
        assert (coloured.mining.k, coloured.mining.classifier.arch, coloured.mining.min_loss) == (5, "cnn", 4.0)
        assert coloured.mining.loss_weight_cap == 0.0
    assert make_config("default", {"mining": {"min_loss": 0.0}}).mining.min_loss == 0.0  # a flag or file wins
    assert make_config("paper").mining.k == 10  # a preset wins over the dataset's entry
    other = make_config("default", {"dataset": "cifar10c", "data_root": "/data"})
    assert (other.mining.k, other.mining.classifier.arch, other.mining.min_loss) == (10, "auto", 0.0)
    mlp = make_config("default", {"dataset": "corrupted_mnist", "mining": {"classifier": {"arch": "mlp"}}})
    assert (mlp.mining.k, mlp.mining.classifier.arch) == (5, "mlp")
    assert corrupted.hparams == {"lff": {"biased_arch": "cnn"}, "lff+diffinject": {"biased_arch": "cnn"}}  # LfF's too
    assert make_config().hparams == {}
    own = make_config("default", {"dataset": "corrupted_mnist", "hparams": {"lff": {"ema_alpha": 0.5}}})
    assert own.hparams["lff"] == {"biased_arch": "cnn", "ema_alpha": 0.5}  # a file's hyperparameters merge in


def test_injection_with_skip_levels_records_the_wider_h_and_moves_the_samples(tiny_unet):
    """The whole stage at ``skip_levels`` 1: contents recorded with their skips, a different result from the
    bottleneck alone, and reproducible."""
    scheduler = ddim_scheduler(cfg=tiny_config())
    g = torch.Generator().manual_seed(8)
    images = (torch.rand(8, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pairs = plan_pairs(labels, np.array([0, 2, 4]), 6, seed=0)
    x0 = to_model_space(images[:1], 16)
    cfg = InjectionConfig(steps=6, t_edit=300, gamma=1.0, skip_levels=1)
    h = ddim_invert(tiny_unet, scheduler, x0, cfg.steps, record_h_from=cfg.t_edit, skip_levels=1).h
    bottleneck = ddim_invert(tiny_unet, scheduler, x0, cfg.steps, record_h_from=cfg.t_edit).h
    k = _skips_of_first_up_blocks(tiny_unet, 1)
    assert all(h[t].dim() == 2 and h[t].shape[1] > bottleneck[t][0].numel() for t in h) and k == 2
    wide = inject(tiny_unet, scheduler, images, labels, pairs, cfg, seed=1, progress=False)
    plain = inject(tiny_unet, scheduler, images, labels, pairs, replace(cfg, skip_levels=0), seed=1, progress=False)
    assert (wide.images.int() - plain.images.int()).abs().max() > 0
    again = inject(tiny_unet, scheduler, images, labels, pairs, cfg, seed=1, progress=False)
    assert torch.equal(again.images, wide.images)


def test_an_hspace_call_leaves_the_unet_as_it_was_even_on_error(tiny_unet, unet_input):
    """No forward swapped in, no hook left: the U-Net answers as diffusers' own afterwards, and counts stay explicit."""
    x, t = unet_input
    evals = Evaluations()
    with pytest.raises(RuntimeError, match="boom"):
        HSpace(tiny_unet)(x, 500, h_replace=lambda h: (_ for _ in ()).throw(RuntimeError("boom")), evaluations=evals)
    assert "forward" not in tiny_unet.__dict__ and not tiny_unet._forward_pre_hooks
    assert not tiny_unet.mid_block._forward_hooks and evals == Evaluations(images=2, calls=1, shared=0)
    with torch.inference_mode():
        assert torch.equal(HSpace(tiny_unet)(x, 500).eps, tiny_unet(x, 500).sample)


@pytest.mark.parametrize("h_rows", [None, 3, 0])
def test_inversion_equals_the_hook_path(any_unet, h_rows):
    unet, scheduler, size = any_unet
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 3, size, size, generator=g) * 2 - 1
    x_T, hs = _hook_invert(unet, scheduler, x0, 6, record_h_from=300, h_rows=h_rows)
    inv = ddim_invert(unet, scheduler, x0, 6, record_h_from=300, h_rows=h_rows)
    assert torch.equal(inv.x_T, x_T)
    assert sorted(inv.h) == sorted(hs) and (h_rows == 0) == (not hs)
    for t in hs:
        assert torch.equal(inv.h[t], hs[t])


def test_generation_equals_the_hook_path(any_unet):
    """Injection, the boost's noise and dt_lambda (20 steps: t = 950) all against the hook path on diffusers' own
    forward: the down path runs on half the rows, which may round differently, so within float tolerance."""
    unet, scheduler, size = any_unet
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(4, 3, size, size, generator=g)
    h_content = ddim_invert(unet, scheduler, torch.rand(4, 3, size, size, generator=g) * 2 - 1, 20,
                            record_h_from=500).h
    cfg = InjectionConfig(steps=20, t_edit=500, gamma=0.8, t_boost=200, dt_lambda=0.9)
    expected = _hook_generate(unet, scheduler, x_T, cfg, h_content, sample_generators(5, range(4)))
    out = ddim_generate(unet, scheduler, x_T, cfg, h_content, sample_generators(5, range(4)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = ddim_generate(unet, scheduler, x_T, cfg, None, sample_generators(5, range(4)))
    assert (plain - out).abs().max() > 1e-2  # the injection did something


def test_an_injection_step_runs_the_middle_block_on_one_copy_and_counts_two(tiny_unet):
    scheduler = ddim_scheduler(cfg=tiny_config())
    cfg = InjectionConfig(steps=8, t_edit=500, t_boost=-1)  # injection at 875, 750, 625, 500
    x_T = torch.randn(3, 3, 16, 16)
    h_content = ddim_invert(tiny_unet, scheduler, x_T, 8, record_h_from=500).h
    seen, evals = [], Evaluations()
    handle = tiny_unet.mid_block.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        ddim_generate(tiny_unet, scheduler, x_T, cfg, h_content, evaluations=evals)
    finally:
        handle.remove()
    assert seen == [3] * 8
    # the doubled batch counts twice, its second copy's down path as shared
    assert evals == Evaluations(images=3 * (8 + 4), calls=8, shared=3 * 4)


# ---------------------------------------------------------------------------------------------------------
# pictures: read without a caption
# ---------------------------------------------------------------------------------------------------------


def _tiles(n: int) -> torch.Tensor:
    return torch.randint(0, 200, (n, 3, 16, 16), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


def _has_text(region: np.ndarray) -> bool:
    """White pixels: the labels are drawn in white, the tiles here stay below 200."""
    return int((region == 255).all(axis=-1).sum()) > 5


def test_the_injection_grid_has_a_header_over_each_column_of_its_two_triples(tmp_path):
    from PIL import Image

    from diffinject.core.diagnostics import injection_grid, save_grid
    from diffinject.core.injection import Synthetic

    images = _tiles(8)
    syn = Synthetic(images[4:], torch.zeros(4, dtype=torch.long), torch.arange(4), torch.arange(4, 8))
    injection_grid(images, syn, tmp_path / "grid.png")
    rows = [torch.stack([images[4 + i], images[i], images[4 + i], images[6 + i], images[2 + i], images[6 + i]])
            for i in range(2)]  # style | content | result, twice: what the grid shows under its header
    save_grid(rows, tmp_path / "plain.png")
    grid, plain = np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(Image.open(tmp_path / "plain.png"))
    band, W = grid.shape[0] - plain.shape[0], 16 * 3 + 2  # a tile upscaled 3 times and its gap
    assert band >= 10 and not _has_text(plain)
    assert np.array_equal(grid[band:, : 3 * W + 2], plain[:, : 3 * W + 2])  # the first triple as without labels
    lefts = [2 + j * W + (8 if j >= 3 else 0) for j in range(6)]  # the second triple a wider gap to the right
    headers = [grid[:band, x : x + W - 2] for x in lefts]
    assert all(_has_text(h) for h in headers)
    assert not np.array_equal(headers[0], headers[1]) and np.array_equal(headers[0], headers[3])  # style ... style


def test_the_mined_grid_labels_every_class_row_even_an_empty_one(tmp_path):
    from PIL import Image

    from diffinject.core.diagnostics import mined_grid, save_grid

    images, labels = _tiles(6), torch.tensor([0, 0, 1, 1, 2, 2])
    mined_grid(images, labels, np.array([0, 1, 3]), 3, tmp_path / "mined.png")  # none mined from class 2
    save_grid([images[[0, 1]], images[[3]]], tmp_path / "plain.png")
    grid, plain = np.asarray(Image.open(tmp_path / "mined.png")), np.asarray(Image.open(tmp_path / "plain.png"))
    H, margin = 16 * 3 + 2, grid.shape[1] - plain.shape[1]
    assert grid.shape[0] == 3 * H + 2 and margin >= 20  # three rows, the empty one kept
    assert np.array_equal(grid[: 2 * H + 2, margin:], plain)  # the tiles as without labels
    labels_drawn = [grid[2 + i * H : 2 + i * H + H - 2, :margin] for i in range(3)]
    assert all(_has_text(label) for label in labels_drawn)
    assert not np.array_equal(labels_drawn[0], labels_drawn[1])  # "class 0", "class 1"
