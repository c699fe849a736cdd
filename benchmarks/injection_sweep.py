"""Injection report over (t_edit, gamma) for one U-Net, isolated from mining: contents are the true conflict
samples (bias labels pick the pool: an experiment instrument, not a method), 64 pairs, the default DDIM steps.

    python benchmarks/injection_sweep.py                 # the corpus U-Net (EMA weights)
    python benchmarks/injection_sweep.py --unet DIR --dataset corrupted_mnist --ratio 1  # any U-Net, benchmark
    python benchmarks/injection_sweep.py --pairs 256 --skip-levels 1  # more pairs, h widened to the coarsest skips
"""

import argparse
import json

import numpy as np
import torch

from diffinject.core.data import load_dataset
from diffinject.core.diagnostics import REPORT_KEYS, Readers, injection_report
from diffinject.core.diffusion import ddim_scheduler, load_unet
from diffinject.core.injection import InjectionConfig, inject, plan_pairs
from diffinject.core.run import CORPUS_UNET

SETTINGS = [(500, 0.5), (500, 0.9), (300, 0.5), (300, 0.9), (700, 0.9), (200, 0.9)]  # (t_edit, gamma)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=str(CORPUS_UNET))
    p.add_argument("--dataset", default="cmnist", help="an embedded benchmark: cmnist or corrupted_mnist")
    p.add_argument("--ratio", type=float, default=1.0, help="its bias-conflict percent")
    p.add_argument("--settings", nargs="+", default=None, metavar="T_EDIT:GAMMA",
                   help=f"(t_edit, gamma) pairs to run (default: {' '.join(f'{t}:{g}' for t, g in SETTINGS)})")
    p.add_argument("--pairs", type=int, default=64, help="content-style pairs per setting")
    p.add_argument("--skip-levels", type=int, default=0, help="InjectionConfig.skip_levels for every setting")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    settings = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in args.settings] if args.settings else SETTINGS
    torch.set_num_threads(args.threads)
    unet = load_unet(args.unet)
    print(f"EMA model {args.unet}", flush=True)

    ds = load_dataset(args.dataset, args.ratio)
    tr, readers, scheduler = ds.train, Readers(ds), ddim_scheduler(args.unet)
    conflict = np.flatnonzero((tr.labels != tr.bias).numpy())
    pairs = plan_pairs(tr.labels, conflict, args.pairs, 0)
    for t_edit, gamma in settings:
        cfg = InjectionConfig(gamma=gamma, t_edit=t_edit, skip_levels=args.skip_levels)
        syn = inject(unet, scheduler, tr.images, tr.labels, pairs, cfg, progress=False)
        report = injection_report(syn, tr.images, tr.labels, readers)
        style_digit = 100.0 * (readers.read_class(syn.images) == tr.labels[syn.style]).float().mean().item()
        print(json.dumps({"t_edit": t_edit, "gamma": gamma, "skip_levels": args.skip_levels,
                          **{k: report[k] for k in REPORT_KEYS}, "style_digit": round(style_digit, 2)}), flush=True)


if __name__ == "__main__":
    main()
