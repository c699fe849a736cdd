"""Stage 2: a DDPM U-Net (diffusers ``UNet2DModel``) trained with P2 loss weighting and an EMA copy.

Training is resumable: a checkpoint (model, EMA, optimizer, step, loss history) is written every
``checkpoint_every`` steps, and the batch and noise of step ``i`` come from a generator seeded by
``(seed, i)``, so a resumed run takes exactly the steps an uninterrupted one would.
The finished model is the EMA copy, written with ``save_pretrained`` (safetensors) plus ``train.json``
(config, steps, loss curve, what the images were) and ``loss.png``.

``hard_share`` > 0 draws that share of every batch in proportion to per-sample weights instead of uniformly: the
pipeline passes the biased classifier's relative difficulty (:func:`core.mining.difficulty`, task labels only), so
the U-Net sees the rare samples that break the shortcut far more often and learns that a class can wear other
biases (benchmarks/results/experiments.md measures the effect).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm


@dataclass
class DiffusionConfig:
    image_size: int = 32  # images are zero-padded (or resized) to this; 28 px digits pad to 32
    # four levels, attention at 8x8 and 4x4, the bottleneck h at 4x4 (4.5M parameters at 32 px): the first
    # architecture whose h carried the digit apart from its colour (benchmarks/results/experiments.md); the
    # former default, 32/64/64 with h at 8x8, is benchmarks/configs/unet-small.yaml
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    norm_num_groups: int = 16
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p2_k: float = 1.0
    p2_gamma: float = 1.0  # 0 turns P2 weighting off
    ema_decay: float = 0.999  # reference checkpoints: 0.9999, which needs far more steps than CPU runs take
    lr: float = 2e-4
    batch_size: int = 64
    steps: int = 2000
    checkpoint_every: int = 250
    hard_share: float = 0.0  # share of each batch drawn by sample weight (the biased model's difficulty); 0: uniform

    def __post_init__(self):  # YAML/JSON give lists
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            setattr(self, name, tuple(getattr(self, name)))
        if not 0.0 <= self.hard_share <= 1.0:
            raise ValueError(f"hard_share {self.hard_share} must be in [0, 1]")


def build_unet(cfg: DiffusionConfig, channels: int = 3) -> UNet2DModel:
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
    )


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule="linear", prediction_type="epsilon")


def ddim_scheduler(unet_dir: str | Path | None = None, cfg: DiffusionConfig | None = None) -> DDIMScheduler:
    """The DDIM scheduler matching a trained model (from its saved scheduler config, else from ``cfg``)."""
    if unet_dir is not None and (Path(unet_dir) / "scheduler_config.json").exists():
        return DDIMScheduler.from_pretrained(unet_dir)
    cfg = cfg or DiffusionConfig()
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=True, prediction_type="epsilon")


def p2_weights(alphas_cumprod: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """P2 weighting: lambda_t = 1 / (k + SNR_t) ** gamma with SNR_t = abar_t / (1 - abar_t)."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return 1.0 / (k + snr) ** gamma


def to_model_space(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at ``size`` (zero-pad when smaller, resize when larger)."""
    x = images.float() / 127.5 - 1.0
    h = x.shape[-1]
    if h == size:
        return x
    if h < size and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)  # pad with black, the digits' background
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def from_model_space(x: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`to_model_space`: float in [-1, 1] -> uint8 (N, C, size, size)."""
    h = x.shape[-1]
    if h > size and (h - size) % 2 == 0:
        p = (h - size) // 2
        x = x[..., p : h - p, p : h - p]
    elif h != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainResult:
    unet: UNet2DModel  # the EMA model
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def draw_batch(n: int, cfg: DiffusionConfig, g: torch.Generator, weights: torch.Tensor | None) -> torch.Tensor:
    """Indices of one batch: ``cfg.hard_share`` of it drawn in proportion to ``weights`` (with replacement), the
    rest uniformly."""
    hard = int(round(cfg.hard_share * cfg.batch_size)) if weights is not None else 0
    idx = torch.randint(0, n, (cfg.batch_size - hard,), generator=g)
    if hard:
        idx = torch.cat([idx, torch.multinomial(weights, hard, replacement=True, generator=g)])
    return idx


def train_diffusion(images: torch.Tensor, cfg: DiffusionConfig, out_dir: str | Path, seed: int = 0,
                    device: str = "cpu", progress: bool = True, max_seconds: float | None = None,
                    sample_weights: torch.Tensor | None = None, about: dict | None = None) -> TrainResult:
    """Train (or resume training) a U-Net on uint8 ``images`` and save the EMA model to ``out_dir``.

    The loss at timestep t is mean((eps - eps_theta)^2) * p2_weights(t). Only images are read, never labels.
    ``sample_weights`` (N,), non-negative, are required when ``cfg.hard_share`` > 0: that share of each batch is
    drawn in proportion to them. ``about`` describes what the images are (for example ``{"split": "train",
    "bias_knowledge": False}``); it goes into ``train.json`` so every table can say what its U-Net learnt from.
    ``max_seconds`` is a time budget for this call: training stops at the first step past it and saves the
    checkpoint and the EMA model as at the end, so calling again with the same config resumes towards
    ``cfg.steps`` (a time-boxed job on a lent GPU, a nightly slot). Returns the EMA model; ``out_dir`` then holds
    ``config.json``, ``diffusion_pytorch_model.safetensors``, ``scheduler_config.json``, ``train.json`` and
    ``loss.png``.
    """
    if cfg.hard_share > 0:
        if sample_weights is None or len(sample_weights) != len(images) or not (sample_weights >= 0).all() \
                or sample_weights.sum() <= 0:
            raise ValueError("hard_share > 0 needs one non-negative sample weight per image, not all zero")
        sample_weights = sample_weights.double()
    else:
        sample_weights = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    about = about or {}
    data = to_model_space(images, cfg.image_size)
    unet = build_unet(cfg, data.shape[1]).to(device)
    # diffusers' EMA: decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so the random initial weights
    # do not linger in the average of a short run (0.999 ** 1500 would still leave them 22 % of it)
    # foreach: one fused update instead of a kernel per tensor, which dominates a small model's step on a GPU
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=torch.device(device).type == "cuda")
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    sched = ddpm_scheduler(cfg)
    acp = sched.alphas_cumprod.to(device)
    weights = p2_weights(acp, cfg.p2_k, cfg.p2_gamma)

    digest = hashlib.sha256(images.numpy().tobytes())  # resume only on the same images (and weights)
    if sample_weights is not None:
        digest.update(sample_weights.numpy().tobytes())
    data_id = digest.hexdigest()[:16]
    ckpt_path = out / "checkpoint.pt"
    step, losses, seconds = 0, [], 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = {"hard_share": 0.0} | ckpt["config"]  # checkpoints from before hard_share trained uniformly
        if saved != asdict(cfg) | {"steps": saved["steps"]} or ckpt.get("seed", 0) != seed:
            raise ValueError(f"{ckpt_path} was written by another diffusion config; use another --out")
        if ckpt.get("data_id", data_id) != data_id:
            raise ValueError(f"{ckpt_path} was trained on other images; use another --out")
        unet.load_state_dict(ckpt["unet"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, losses, seconds = ckpt["step"], ckpt["losses"], ckpt["seconds"]

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "losses": losses, "seconds": seconds, "config": asdict(cfg), "seed": seed, "data_id": data_id}, tmp)
        tmp.replace(ckpt_path)

    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="diffusion", disable=not progress, dynamic_ncols=True)
    t0, started = time.time() - seconds, time.time()
    while step < cfg.steps and (max_seconds is None or time.time() - started < max_seconds):
        g = _step_generator(seed, step)
        idx = draw_batch(len(data), cfg, g, sample_weights)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, *data.shape[1:]), generator=g)
        x0, t, noise = data[idx].to(device), t.to(device), noise.to(device)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        step += 1
        seconds = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    if step % cfg.checkpoint_every and step < cfg.steps:  # stopped by the time budget between checkpoints
        save_checkpoint()
    bar.close()

    ema_unet = build_unet(cfg, data.shape[1]).to(device)
    ema.copy_to(ema_unet.parameters())
    ema_unet.eval()
    ema_unet.save_pretrained(out)
    ddim_scheduler(cfg=cfg).save_pretrained(out)
    (out / "train.json").write_text(json.dumps({"config": asdict(cfg), "seed": seed, "steps": step, "seconds": round(seconds, 1),
                                                "num_images": len(data), "data": about, "loss_every_50": _smooth(losses, 50)}, indent=1))
    plot_loss(losses, out / "loss.png")
    return TrainResult(ema_unet, step, losses, seconds)


def _smooth(losses: list[float], window: int) -> list[float]:
    return [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 5) for i in range(0, len(losses), window)]


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 100)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(0, len(losses), window), _smooth(losses, window))
    ax.set_xlabel("step")
    ax.set_ylabel("P2-weighted loss")
    ax.set_yscale("log")
    ax.set_title(f"U-Net training ({len(losses)} steps)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_unet(path: str | Path, device: str = "cpu") -> UNet2DModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no U-Net at {path} (expected config.json and diffusion_pytorch_model.safetensors)")
    return UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False).to(device).eval()


def load_checkpoint_unet(checkpoint: str | Path, device: str = "cpu", ema: bool = False) -> tuple[UNet2DModel, int]:
    """The U-Net of a training ``checkpoint.pt`` (raw weights, or the EMA's with ``ema``) and its step, for
    experiments on a training run that has not finished."""
    ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
    unet = build_unet(DiffusionConfig(**ckpt["config"])).to(device)
    unet.load_state_dict(ckpt["unet"])
    if ema:
        average = EMAModel(unet.parameters())
        average.load_state_dict(ckpt["ema"])
        average.copy_to(unet.parameters())
    return unet.eval(), ckpt["step"]


def is_trained(path: str | Path) -> bool:
    return (Path(path) / "diffusion_pytorch_model.safetensors").exists() and (Path(path) / "train.json").exists()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

