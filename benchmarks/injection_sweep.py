"""Injection report over (t_edit, gamma) for one U-Net, isolated from mining: contents are the true conflict
samples (bias labels used to pick the pool: an experiment instrument, not a method), 64 pairs, 20 DDIM steps.

    python benchmarks/injection_sweep.py   # reads the raw (non-EMA) weights of the shipped U-Net's checkpoint
"""
import torch, numpy as np, json, sys
torch.set_num_threads(1)
from core.data import load_dataset
from core.diffusion import DiffusionConfig, build_unet, ddim_scheduler
from core.injection import InjectionConfig, inject, plan_pairs
from core.diagnostics import ShapeReader, injection_report
ck = torch.load("core/pretrained/cmnist-1pct/checkpoint.pt", weights_only=False)
cfg = DiffusionConfig(); unet = build_unet(cfg); unet.load_state_dict(ck["unet"]); unet.eval()
ds = load_dataset(); tr = ds.train; sch = ddim_scheduler(cfg=cfg); reader = ShapeReader(ds)
conflict = np.flatnonzero((tr.labels != tr.bias).numpy())   # oracle pool: isolates injection from mining
pairs = plan_pairs(tr.labels, conflict, 64, 0)
print("step", ck["step"], flush=True)
for t_edit, g in [(500,0.5),(500,0.9),(300,0.5),(300,0.9),(700,0.9),(200,0.9)]:
    syn = inject(unet, sch, tr.images, tr.labels, pairs, InjectionConfig(gamma=g, t_edit=t_edit), progress=False)
    r = injection_report(syn, tr.images, tr.labels, reader)
    print(json.dumps({"t_edit": t_edit, "gamma": g, **{k: r[k] for k in ("content_digit","style_colour","both","reverse","neither","content_digit_other_colour")}}), flush=True)
