"""The fast generation path against the reference loop: same pixels, and U-Net evaluations as the formula says.

``core.injection.inject`` batches everything (content inversions once per distinct content, style inversions,
the doubled injection batch); ``core.reference.reference_inject`` runs each pair alone with two U-Net calls per
injection step. Same seed, same pixels, up to float rounding: a convolution over a batch of 12 does not add in
the same order as over a batch of 1, so the floats differ in the last bits (about 1e-6), and a uint8 pixel sitting
on a .5 boundary can round the other way. Hence "max abs diff <= 1 on a few pixels", not equality.

The U-Net is random and tiny (16 px, blocks 16/32), with its output layer scaled down so that DDIM does not
saturate every pixel: a mistake in the update (gamma, t_edit, the boost noise, dt_lambda) moves hundreds of
pixels by far more than 1, which ``test_the_comparison_is_sensitive`` checks.
"""

import dataclasses
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinject.core.diffusion import DiffusionConfig, build_unet, ddim_scheduler
from diffinject.core.hspace import Evaluations, HSpace
from diffinject.core.injection import InjectionConfig, Pairs, ddim_generate, inject
from diffinject.core.reference import evaluations_per_sample, injection_steps, reference_inject

TINY = DiffusionConfig(image_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
# 6 pairs over 3 distinct contents; batch 4 splits them 4 + 2
PAIRS = Pairs(np.array([0, 1, 2, 0, 1, 0]), np.array([3, 4, 5, 6, 7, 8]))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    unet = build_unet(TINY).eval()
    with torch.no_grad():  # smaller eps: fewer pixels clamped to 0 or 255, a stricter comparison
        unet.conv_out.weight.mul_(0.3)
        unet.conv_out.bias.mul_(0.3)
    return unet, ddim_scheduler(cfg=TINY)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 3, 14, 14), generator=g, dtype=torch.uint8)  # padded to 16 px
    return images, torch.arange(12) % 3


def assert_same_pixels(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1, f"max abs diff {diff.max()}"
    assert (diff > 0).float().mean() < 0.01, f"{int((diff > 0).sum())} of {diff.numel()} pixels differ"


# 8 steps: grid 875..0, injection at 875..500, boost at 250 and 125; 20 steps: grid 950..0, so dt_lambda acts
# float32, as the reference runs, also on a CPU where the default "auto" gives bf16
CONFIGS = {"8-steps": InjectionConfig(steps=8, t_edit=500, t_boost=300, dt_lambda=0.9, batch_size=4, precision="fp32"),
           "20-steps": InjectionConfig(steps=20, t_edit=600, t_boost=200, dt_lambda=0.9, gamma=0.7, batch_size=4,
                                       precision="fp32")}


@pytest.mark.parametrize("joint", [False, True], ids=["separate-inversions", "joint-inversions"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_path_matches_reference(model, data, name, joint):
    """Also with styles and contents inverted in the same U-Net calls (the default on CUDA)."""
    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS[name]
    seed = 3 if name == "8-steps" else np.array([5, 6, 7, 5, 6, 7])  # one seed, or one per pair
    ref = reference_inject(unet, scheduler, images, labels, PAIRS, cfg, seed=seed)
    evals = Evaluations()
    fast = inject(unet, scheduler, images, labels, PAIRS, cfg, seed=seed, progress=False, joint_inversion=joint,
                  evaluations=evals)
    assert evals.images == 6 * evaluations_per_sample(cfg, False, contents_per_sample=3 / 6, scheduler=scheduler)
    assert fast.images.shape == ref.images.shape == (6, 3, 14, 14)
    assert_same_pixels(fast.images, ref.images)
    for field in ("labels", "content", "style"):
        assert torch.equal(getattr(fast, field), getattr(ref, field))


def test_joint_inversion_saves_calls_not_evaluations(model, data):
    unet, scheduler = model
    images, labels = data
    counts = {}
    for joint in (False, True):
        counts[joint] = Evaluations()
        inject(unet, scheduler, images, labels, PAIRS, CONFIGS["8-steps"], progress=False, joint_inversion=joint,
               evaluations=counts[joint])
    assert counts[True].images == counts[False].images
    # 8 steps, batches of 4 + 2 pairs: the first batch's 3 contents ride along with its styles (7 calls saved)
    assert counts[False].calls - counts[True].calls == 7


def test_fast_path_with_a_content_cache_matches_reference(model, data):
    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS["8-steps"]
    ref = reference_inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3)
    cache = {}
    first_evals = Evaluations()
    first = inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False, content_cache=cache,
                   evaluations=first_evals)
    assert sorted(cache) == [0, 1, 2]
    second_evals = Evaluations()
    second = inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False, content_cache=cache,
                    evaluations=second_evals)
    assert_same_pixels(first.images, ref.images)
    assert torch.equal(second.images, first.images)  # cached inversions are the very tensors the first call made
    per_sample = lambda c: evaluations_per_sample(cfg, False, contents_per_sample=c, scheduler=scheduler)  # noqa: E731
    assert first_evals.images == 6 * per_sample(3 / 6)  # 3 distinct contents inverted
    assert second_evals.images == 6 * per_sample(0)  # all from the cache


def test_the_comparison_is_sensitive(model, data):
    """Each knob of the update changes many pixels by far more than the rounding tolerance."""
    unet, scheduler = model
    images, labels = data
    cfg, pairs = CONFIGS["20-steps"], Pairs(PAIRS.content[:3], PAIRS.style[:3])
    ref = reference_inject(unet, scheduler, images, labels, pairs, cfg, seed=3)
    for change in (dict(gamma=0.6), dict(t_edit=700), dict(t_boost=-1), dict(dt_lambda=1.0), dict(seed=4)):
        seed = change.pop("seed", 3)
        other = reference_inject(unet, scheduler, images, labels, pairs, dataclasses.replace(cfg, **change), seed=seed)
        moved = int(((other.images.int() - ref.images.int()).abs() > 1).sum())
        assert moved > 50, (change, seed, moved)


# ---------------------------------------------------------------------------------------------------------
# evaluation counts
# ---------------------------------------------------------------------------------------------------------


def test_formula_at_the_default_settings():
    cfg = InjectionConfig()  # 10 steps, t_edit 300: injection at 900, 800, ..., 300
    assert injection_steps(cfg) == 7
    assert evaluations_per_sample(cfg, reference=True) == 36  # 10 content + 9 style + 17 generation
    assert evaluations_per_sample(cfg, reference=False, contents_per_sample=1.0) == 36
    assert evaluations_per_sample(cfg, reference=False, contents_per_sample=0.0) == 26
    assert evaluations_per_sample(cfg, reference=False, contents_per_sample=100 / 300) == pytest.approx(29 + 1 / 3)
    assert evaluations_per_sample(dataclasses.replace(cfg, gamma=0.0), reference=True) == 19  # plain inversion + DDIM
    old = dataclasses.replace(cfg, steps=20, t_edit=500)  # the former defaults: injection at 950, 900, ..., 500
    assert injection_steps(old) == 10 and evaluations_per_sample(old, reference=True) == 69


@pytest.mark.parametrize("steps,t_edit,gamma", [
    (5, 500, 0.5),  # grid 800..0: k = 2
    (6, 0, 0.5),  # every step injects
    (10, 950, 0.5),  # top of the grid is 900 < t_edit: k = 0, but the content is still inverted
    (7, 500, 0.0),  # gamma = 0: no content inversion, plain regeneration
])
def test_evaluation_counts_match_the_formula(model, data, steps, t_edit, gamma):
    unet, scheduler = model
    images, labels = data
    cfg = InjectionConfig(steps=steps, t_edit=t_edit, gamma=gamma, batch_size=4, precision="fp32")
    pairs = Pairs(PAIRS.content[:4], PAIRS.style[:4])  # contents 0, 1, 2, 0: 3 distinct over 4 samples
    ref = Evaluations()
    reference_inject(unet, scheduler, images, labels, Pairs(pairs.content[:2], pairs.style[:2]), cfg, evaluations=ref)
    fast = Evaluations()
    inject(unet, scheduler, images, labels, pairs, cfg, progress=False, evaluations=fast)
    assert ref.images == 2 * evaluations_per_sample(cfg, reference=True, scheduler=scheduler)
    assert fast.images == 4 * evaluations_per_sample(cfg, reference=False, contents_per_sample=3 / 4,
                                                        scheduler=scheduler)
    plain = Evaluations()
    ddim_generate(unet, scheduler, torch.randn(3, 3, 16, 16), dataclasses.replace(cfg, t_boost=-1), evaluations=plain)
    assert plain.images == 3 * steps


# ---------------------------------------------------------------------------------------------------------
# switches: bf16 autocast (benchmarks/generation.py), precision, compiling; the core's defaults
# ---------------------------------------------------------------------------------------------------------


def _generation_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
    spec = importlib.util.spec_from_file_location("generation_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bf16_is_off_by_default_and_on_cpu_only_when_forced(model):
    bench = _generation_benchmark()
    unet, _ = model
    x = torch.randn(2, 3, 16, 16)

    def output_dtype(ctx):
        with ctx, torch.inference_mode():
            return unet(x, 500).sample.dtype

    assert output_dtype(bench.unet_autocast("cpu")) == torch.float32  # off by default
    assert output_dtype(bench.unet_autocast("cpu", bf16=True)) == torch.float32  # CPU: only when forced
    assert output_dtype(bench.unet_autocast("cpu", bf16=True, force=True)) == torch.bfloat16


def test_the_core_runs_float32_eager_and_with_the_down_path_shared_by_default(model, data):
    """inject's defaults: no autocast, nothing compiled, an injection step's two halves share one down path (the
    middle block sees each pair once per step, Evaluations still counts both halves)."""
    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS["8-steps"]
    dtypes, mid_rows = set(), []
    hooks = [unet.conv_out.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype)),
             unet.mid_block.register_forward_hook(lambda module, args, out: (dtypes.add(out.dtype),
                                                                              mid_rows.append(len(out)))[0])]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    evals = Evaluations()
    try:
        inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False, evaluations=evals)
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == {torch.float32}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert sum(mid_rows) == evals.images - injection_steps(cfg) * len(PAIRS.content)


def test_bf16_precision_runs_the_unet_in_bf16_and_keeps_the_rest_in_float32(model, data, monkeypatch):
    """``precision="bf16"``: every U-Net call in bfloat16 on a cast copy (the caller's U-Net stays float32), the
    Slerp on float32 h, uint8 images, the same ones on a rerun. How far they are from float32's is a property of
    the trained U-Net, measured on it (docs): on this random one bf16's rounding moves pixels as much as
    gamma + 0.05 does."""
    import diffinject.core.injection as injection

    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS["8-steps"]
    conv_dtypes, slerp_dtypes = set(), set()
    real_slerp = injection.slerp
    monkeypatch.setattr(injection, "slerp", lambda h_s, h_c, g: (slerp_dtypes.add((h_s.dtype, h_c.dtype)),
                                                                    real_slerp(h_s, h_c, g))[1])
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x, f=torch.nn.Conv2d.forward:
                        (conv_dtypes.add(x.dtype), f(self, x))[1])
    low = inject(unet, scheduler, images, labels, PAIRS, dataclasses.replace(cfg, precision="bf16"), seed=3,
                 progress=False)
    assert conv_dtypes == {torch.bfloat16} and slerp_dtypes == {(torch.float32, torch.float32)}
    assert unet.dtype == torch.float32
    conv_dtypes.clear()
    full = inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False)
    assert conv_dtypes == {torch.float32}
    assert low.images.dtype == torch.uint8 and not torch.equal(low.images, full.images)
    again = inject(unet, scheduler, images, labels, PAIRS, dataclasses.replace(cfg, precision="bf16"), seed=3,
                   progress=False)
    assert torch.equal(again.images, low.images)


def test_an_hspace_casts_a_copy_and_tells_when_the_weights_changed_after_it(model, data):
    """fp32 of a float32 U-Net is the U-Net itself; bf16 a cast copy, which does not follow later writes to the
    weights, so inject refuses it then (and an HSpace at other settings than the config's)."""
    unet, scheduler = model
    images, labels = data
    cfg = dataclasses.replace(CONFIGS["8-steps"], precision="bf16")
    torch.manual_seed(0)
    own = build_unet(TINY).eval()
    assert HSpace(own, "fp32").model is own and HSpace(own).precision == "fp32"
    low = HSpace(own, "bf16")
    assert low.model is not own and low.model.dtype == torch.bfloat16 and own.dtype == torch.float32
    assert torch.equal(low.model.conv_out.bias, own.conv_out.bias.to(torch.bfloat16)) and not low.stale()
    with torch.no_grad():
        own.conv_out.bias.add_(0.0)  # an in-place write, even of the same values, bumps the version counter
    assert low.stale() and not HSpace(own, "fp32").stale()
    kept = HSpace(unet, "bf16")
    same = inject(kept, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False)
    assert torch.equal(same.images, inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False).images)
    with pytest.raises(ValueError, match="an HSpace at bf16, compile False, for settings that ask for fp32"):
        inject(kept, scheduler, images, labels, PAIRS, CONFIGS["8-steps"], progress=False)
    with pytest.raises(ValueError, match="weights changed after its HSpace was made"):
        inject(low, scheduler, images, labels, PAIRS, cfg, progress=False)


def test_compile_runs_every_unet_call_through_a_frozen_graph_of_a_copy_and_matches_eager(model, data, monkeypatch):
    """``compile=True``: the U-Net's calls go through inductor's graphs of a copy (compiled on first use, kept
    with the HSpace: a second run on it compiles nothing and calls the compiled function for every U-Net call),
    padded to fixed shapes, so two graphs serve the whole run (the batch, and the doubled injection batch), where
    unpadded calls would have had five shapes here; with the evaluations and the pixels of the eager run at the same
    bucket, up to float rounding (fused kernels add in another order)."""
    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS["8-steps"]
    stats = torch._dynamo.utils.counters["stats"]
    eager_evals = Evaluations()
    eager = inject(unet, scheduler, images, labels, PAIRS, cfg, seed=3, progress=False, bucket=cfg.batch_size,
                   evaluations=eager_evals)
    graphs = stats["unique_graphs"]
    compiled = HSpace(unet, "fp32", compile=True)
    assert compiled.model is not unet
    evals = Evaluations()
    first = inject(compiled, scheduler, images, labels, PAIRS, dataclasses.replace(cfg, compile=True), seed=3,
                   progress=False, evaluations=evals)
    compiled_graphs = stats["unique_graphs"] - graphs
    assert evals == eager_evals and compiled_graphs == 2
    calls, graph = [], compiled._forward
    monkeypatch.setattr(compiled, "_forward", lambda *args, **kwargs: (calls.append(1), graph(*args, **kwargs))[1])
    evals = Evaluations()
    second = inject(compiled, scheduler, images, labels, PAIRS, dataclasses.replace(cfg, compile=True), seed=3,
                    progress=False, evaluations=evals)
    assert len(calls) == evals.calls == eager_evals.calls and stats["unique_graphs"] - graphs == compiled_graphs
    assert_same_pixels(first.images, eager.images)
    assert torch.equal(second.images, first.images)


def test_an_unknown_compile_value_from_a_settings_file_is_refused_naming_the_field():
    from diffinject.core.injection import SettingError

    with pytest.raises(SettingError, match="compile 'yes' must be true or false") as err:
        InjectionConfig(compile="yes").validate()
    assert err.value.field == "compile"


def test_evaluations_are_counted_alike_at_either_precision_and_on_a_kept_hspace(model, data):
    """The counter goes with the call, not with the U-Net: bf16 (a cast copy) counts as float32 does, and a kept
    HSpace's second request (an actor's) as its first, with nothing left on the U-Net."""
    unet, scheduler = model
    images, labels = data
    cfg = CONFIGS["8-steps"]
    kept = HSpace(unet, "bf16")
    counts = []
    for precision, target in (("fp32", unet), ("bf16", unet), ("bf16", kept), ("bf16", kept)):
        evals = Evaluations()
        inject(target, scheduler, images, labels, PAIRS, dataclasses.replace(cfg, precision=precision), seed=3,
               progress=False, evaluations=evals)
        counts.append(evals)
    assert counts[0] == counts[1] == counts[2] == counts[3] and counts[0].images > 0
    assert not unet._forward_pre_hooks and not kept.model._forward_pre_hooks


def test_an_unknown_precision_is_refused_naming_the_field():
    from diffinject.core.injection import SettingError

    with pytest.raises(SettingError, match="precision 'fp16' must be one of fp32, bf16, auto") as err:
        InjectionConfig(precision="fp16").validate()
    assert err.value.field == "precision"


def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_and_the_default_preset_asks_for_it(monkeypatch):
    """The core's default is the default preset's "auto": bf16 on a CPU that has bf16 arithmetic and float32
    elsewhere (a GPU's calls at these sizes are bound by launches); "fp32" and "bf16" are taken as they are."""
    from diffinject.core import hspace
    from diffinject.core.config import make_config

    assert InjectionConfig().precision == make_config().injection.precision == "auto"
    for cpu_has_it in (True, False):
        monkeypatch.setattr(hspace, "has_bf16", lambda device, v=cpu_has_it: v)
        assert hspace.resolve_precision("auto", "cpu") == ("bf16" if cpu_has_it else "fp32")
        assert hspace.resolve_precision("auto", "cuda") == "fp32"
        assert [hspace.resolve_precision(p, "cpu") for p in ("fp32", "bf16")] == ["fp32", "bf16"]


def test_the_benchmark_counts_the_flops_of_the_work_done(model):
    """FLOPs per evaluation against torch's counter on diffusers' own forward (by module), and each fast variant's
    FLOPs from its evaluations less the down paths it shared."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    bench = _generation_benchmark()
    unet, _ = model
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 3, 16, 16), 500)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    down = [n for n in by_module if re.fullmatch(r"UNet2DModel\.(time_embedding|conv_in|mid_block|down_blocks\.\d+)", n)]
    flops = bench.flops_per_evaluation(unet, "cpu")
    assert flops["total"] == by_module["Global"] > 0
    assert flops["down_and_middle"] == sum(by_module[n] for n in down) > 0


def test_the_benchmark_counts_the_shared_down_paths_and_channels_last_changes_no_work():
    bench = _generation_benchmark()
    opts = {"unet": str(bench.CORPUS_UNET), "device": "cpu", "threads": 1, "steps": 3, "batch_size": 2, "pairs": 2,
            "reference_pairs": 1, "contents": 2, "seed": 0, "bf16": False, "compile": False}
    rows = {v: bench.measure(v, opts) for v in ("fast", "fast-channels-last")}
    k = injection_steps(InjectionConfig(steps=3))  # grid 666, 333, 0: t_edit 300 injects twice
    assert k == 2 and rows["fast"]["shared_down_images"] == k * 2
    for row in rows.values():
        f = row["flops_per_evaluation"]
        evals = row["evals_per_image"] * row["images"]
        assert row["gflop"] == round((evals * f["total"] - row["shared_down_images"] * f["down_and_middle"]) / 1e9, 2)
    # channels_last changes the convolutions' memory order, not the work: same evaluations, same images to a level
    assert rows["fast-channels-last"]["shared_down_images"] == k * 2
    assert rows["fast-channels-last"]["evals_per_image"] == rows["fast"]["evals_per_image"]
    assert (rows["fast-channels-last"]["_images"].int() - rows["fast"]["_images"].int()).abs().max() <= 1


def test_the_cli_sets_precision_compile_skip_levels_and_the_sample_share_in_the_injection_settings():
    from diffinject.workers.cli import build_parser
    from diffinject.workers.flags import flag_overrides

    def injection(*flags):
        return flag_overrides(build_parser().parse_args(["run", *flags])).get("injection", {})

    assert injection() == {}  # unset flags leave the preset's settings alone
    assert injection("--precision", "bf16", "--compile") == {"precision": "bf16", "compile": True}
    assert injection("--no-compile") == {"compile": False}
    assert injection("--skip-levels", "1") == {"skip_levels": 1}
    assert injection("--synthetic-ratio", "0.3") == {"synthetic_ratio": 0.3}
