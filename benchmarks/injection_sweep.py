"""Injection report over (t_edit, gamma) for one U-Net, isolated from mining: contents are the true conflict
samples (bias labels used to pick the pool: an experiment instrument, not a method), 64 pairs, 20 DDIM steps.

    python benchmarks/injection_sweep.py                 # the shipped U-Net (EMA weights)
    python benchmarks/injection_sweep.py --checkpoint F  # raw weights of a training checkpoint.pt
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.data import load_dataset  # noqa: E402
from core.diagnostics import ShapeReader, injection_report  # noqa: E402
from core.diffusion import DiffusionConfig, build_unet, ddim_scheduler, load_unet  # noqa: E402
from core.injection import InjectionConfig, inject, plan_pairs  # noqa: E402
from core.pipeline import PRETRAINED  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--unet", default=str(PRETRAINED / "cmnist-1pct"))
p.add_argument("--checkpoint", default=None)
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)
cfg = DiffusionConfig()
if args.checkpoint:
    ck = torch.load(args.checkpoint, weights_only=False)
    unet = build_unet(cfg); unet.load_state_dict(ck["unet"]); unet.eval()
    print("raw weights at step", ck["step"], flush=True)
else:
    unet = load_unet(args.unet)
    print("EMA model", args.unet, flush=True)
ds = load_dataset(); tr = ds.train; sch = ddim_scheduler(cfg=cfg); reader = ShapeReader(ds)
conflict = np.flatnonzero((tr.labels != tr.bias).numpy())   # oracle pool: isolates injection from mining
pairs = plan_pairs(tr.labels, conflict, 64, 0)
for t_edit, g in [(500,0.5),(500,0.9),(300,0.5),(300,0.9),(700,0.9),(200,0.9)]:
    syn = inject(unet, sch, tr.images, tr.labels, pairs, InjectionConfig(gamma=g, t_edit=t_edit), progress=False)
    r = injection_report(syn, tr.images, tr.labels, reader)
    style_digit = round(100.0 * (reader(syn.images) == tr.labels[syn.style]).float().mean().item(), 2)
    keys = ("content_digit", "style_colour", "both", "reverse", "neither", "content_digit_other_colour")
    print(json.dumps({"t_edit": t_edit, "gamma": g, **{k: r[k] for k in keys}, "style_digit": style_digit}), flush=True)
