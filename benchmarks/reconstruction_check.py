"""Plain DDIM inversion + regeneration (gamma = 0) of 64 training images: how often the digit (shape reader)
and the colour (colour reader) survive, with and without the quality-boost steps.

    python benchmarks/reconstruction_check.py                # the corpus U-Net
    python benchmarks/reconstruction_check.py --unet DIR     # any U-Net folder
"""

import argparse

import numpy as np
import torch

from diffinject.core.data import load_dataset
from diffinject.core.diagnostics import Readers
from diffinject.core.diffusion import ddim_scheduler, load_unet
from diffinject.core.injection import InjectionConfig, Pairs, inject
from diffinject.core.run import CORPUS_UNET


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", default=str(CORPUS_UNET))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_unet(args.unet)

    ds = load_dataset()
    tr, readers, scheduler = ds.train, Readers(ds), ddim_scheduler(args.unet)
    idx = np.arange(64)
    digit_in, colour_in = tr.labels[idx], readers.read_bias(tr.images[idx])
    for t_boost in (200, -1):
        cfg = InjectionConfig(gamma=0.0, t_boost=t_boost)
        syn = inject(unet, scheduler, tr.images, tr.labels, Pairs(idx, idx), cfg, progress=False)
        digit, colour = readers.read_class(syn.images) == digit_in, readers.read_bias(syn.images) == colour_in
        pct = lambda m: round(100.0 * m.float().mean().item(), 1)  # noqa: E731
        print(f"t_boost {t_boost}: digit kept {pct(digit)}, colour kept {pct(colour)}, both {pct(digit & colour)}",
              flush=True)


if __name__ == "__main__":
    main()
