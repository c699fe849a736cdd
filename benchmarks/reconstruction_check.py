"""Plain DDIM inversion + regeneration (gamma = 0) of 64 training images with the shipped U-Net: how often the
digit (shape reader) and the colour (colour reader) survive, EMA against raw weights, with and without the
quality-boost steps. Needs the training checkpoint beside the shipped model (not committed).

    python benchmarks/reconstruction_check.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch
torch.set_num_threads(1)
from core.data import load_dataset
from core.diffusion import DiffusionConfig, build_unet, ddim_scheduler, load_unet
from core.injection import InjectionConfig, inject, Pairs
from core.diagnostics import ShapeReader, read_colour
ds = load_dataset(); tr = ds.train; cfg = DiffusionConfig(); sch = ddim_scheduler(cfg=cfg); reader = ShapeReader(ds)
ck = torch.load("core/pretrained/cmnist-1pct/checkpoint.pt", weights_only=False)
raw = build_unet(cfg); raw.load_state_dict(ck["unet"]); raw.eval()
ema = load_unet("core/pretrained/cmnist-1pct")
idx = np.arange(64)
for name, u in (("ema", ema), ("raw", raw)):
    for tb in (200, -1):
        syn = inject(u, sch, tr.images, tr.labels, Pairs(idx, idx), InjectionConfig(gamma=0.0, t_boost=tb), progress=False)
        d = (reader(syn.images) == tr.labels[idx]).float().mean().item(); c = (read_colour(syn.images) == read_colour(tr.images[idx])).float().mean().item()
        print(name, "t_boost", tb, "digit kept", round(100*d,1), "colour kept", round(100*c,1), "both", round(100*((reader(syn.images) == tr.labels[idx]) & (read_colour(syn.images) == read_colour(tr.images[idx]))).float().mean().item(),1), flush=True)
