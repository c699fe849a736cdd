"""Stage 2: a DDPM U-Net (diffusers ``UNet2DModel``) trained with P2 loss weighting and an EMA copy.

Training is resumable: a checkpoint (model, EMA, optimizer, step, loss history) is written every
``checkpoint_every`` steps, and the batch and noise of step ``i`` come from a generator seeded by
``(seed, i)``, so a resumed run takes exactly the steps an uninterrupted one would.
The finished model is the EMA copy, written with ``save_pretrained`` (safetensors) plus ``train.json``
(config, steps, loss curve, what the images were) and ``loss.png``.

``hard_share`` > 0 draws that share of every batch in proportion to per-sample weights instead of uniformly: the
pipeline passes the biased classifier's relative difficulty (:func:`core.mining.difficulty`, task labels only), so
the U-Net sees the rare samples that break the shortcut far more often and learns that a class can wear other
biases (docs/experiments.md measures the effect).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from tqdm.auto import tqdm

from .artifacts import CorruptFile, read_checkpoint, save_figure, save_folder, save_json, save_torch


@dataclass
class DiffusionConfig:
    image_size: int = 32  # images are zero-padded (or resized) to this; 28 px digits pad to 32
    # four levels, attention at 8x8 and 4x4, the bottleneck h at 4x4 (4.5M parameters at 32 px): an h that carries
    # the digit apart from its colour (docs/experiments.md)
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
    # None: the batch goes through the U-Net whole; N: in chunks of N images whose gradients add up to the batch's,
    # the same step in a fraction of the memory (GroupNorm is per image); 128 px images need it (core.config)
    micro_batch: int | None = None
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
    """The DDIM scheduler matching a U-Net: from the model's own scheduler config (beside its weights, or the
    ``scheduler/`` folder of its pipeline, or a hub id's), else built from ``cfg``. Any diffusers noise scheduler's
    config serves (DDPM's included); its prediction type must be epsilon, as inversion assumes."""
    config = _scheduler_config(unet_dir) if unet_dir is not None else None
    if config is not None:
        scheduler = DDIMScheduler.from_config(config)
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"the U-Net at {unet_dir} predicts {scheduler.config.prediction_type!r}; DiffInject's "
                             "DDIM inversion needs an epsilon-prediction model")
        return scheduler
    cfg = cfg or DiffusionConfig()
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=True, prediction_type="epsilon")


def _scheduler_config(source: str | Path) -> dict | None:
    folder = unet_folder(source)
    if folder is not None:
        for candidate in (folder, folder.parent / "scheduler", Path(source) / "scheduler"):
            if (candidate / "scheduler_config.json").exists():
                return json.loads((candidate / "scheduler_config.json").read_text())
        return None
    if _is_hub_id(source):
        for kw in ({"subfolder": "scheduler"}, {}):
            try:
                return DDIMScheduler.load_config(str(source), **kw)
            except Exception:  # noqa: BLE001 - the next layout, then our default scheduler
                continue
    return None


def p2_weights(alphas_cumprod: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """P2 weighting: lambda_t = 1 / (k + SNR_t) ** gamma with SNR_t = abar_t / (1 - abar_t)."""
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    return 1.0 / (k + snr) ** gamma


def to_model_space(images: torch.Tensor, size: int, channels: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at ``size`` (zero-pad when smaller, resize when larger); grey images
    repeated to ``channels`` = 3 for an RGB model."""
    x = images.float() / 127.5 - 1.0
    if channels is not None and channels != x.shape[1]:
        x = x.expand(-1, channels, -1, -1)  # 1 -> 3 (unet_problem refuses the other mismatches)
    h = x.shape[-1]
    if h == size:
        return x
    if h < size and (size - h) % 2 == 0:
        p = (size - h) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)  # pad with black, the digits' background
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def from_model_space(x: torch.Tensor, size: int, channels: int | None = None) -> torch.Tensor:
    """Inverse of :func:`to_model_space`: float in [-1, 1] -> uint8 (N, C, size, size); an RGB model's output
    averaged to ``channels`` = 1 for grey images."""
    if channels is not None and channels != x.shape[1]:
        x = x.mean(1, keepdim=True)
    h = x.shape[-1]
    if h > size and (h - size) % 2 == 0:
        p = (h - size) // 2
        x = x[..., p : h - p, p : h - p]
    elif h != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


ESTIMATE_AFTER = 5  # timed steps before train_diffusion prints its estimate of the time to go


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
    channels, size = images.shape[1], cfg.image_size  # images stay uint8: each batch goes to model space alone
    unet = build_unet(cfg, channels).to(device)
    # diffusers' EMA: decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so the random initial weights
    # do not linger in the average of a short run (0.999 ** 1500 would still leave them 22 % of it)
    # foreach: one fused update instead of a kernel per tensor, which dominates a small model's step on a GPU
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=torch.device(device).type == "cuda")
    opt = torch.optim.Adam(unet.parameters(), lr=cfg.lr)
    sched = ddpm_scheduler(cfg)
    acp = sched.alphas_cumprod.to(device)
    weights = p2_weights(acp, cfg.p2_k, cfg.p2_gamma)

    digest = hashlib.sha256(images.contiguous().numpy().data)  # resume only on the same images (and weights)
    if sample_weights is not None:
        digest.update(sample_weights.numpy().tobytes())
    data_id = digest.hexdigest()[:16]
    ckpt_path = out / "checkpoint.pt"
    step, losses, seconds = 0, [], 0.0
    ckpt = read_checkpoint(ckpt_path, device, weights_only=False)  # {}: none, or unreadable (then said)
    if ckpt:
        # checkpoints from before hard_share trained uniformly; the steps to reach and the chunking may change
        saved = {"hard_share": 0.0} | ckpt["config"] | {"micro_batch": cfg.micro_batch}
        if saved != asdict(cfg) | {"steps": saved["steps"]} or ckpt.get("seed", 0) != seed:
            raise ValueError(f"{ckpt_path} was written by another diffusion config; use another output folder")
        if ckpt.get("data_id", data_id) != data_id:
            raise ValueError(f"{ckpt_path} was trained on other images; use another output folder")
        unet.load_state_dict(ckpt["unet"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, losses, seconds = ckpt["step"], ckpt["losses"], ckpt["seconds"]

    def save_checkpoint():
        save_torch(ckpt_path, {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "step": step, "losses": losses, "seconds": seconds, "config": asdict(cfg), "seed": seed,
                               "data_id": data_id})

    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="diffusion", disable=not progress, dynamic_ncols=True)
    t0, started = time.time() - seconds, time.time()
    first, warm = step, time.time()
    while step < cfg.steps and (max_seconds is None or time.time() - started < max_seconds):
        g = _step_generator(seed, step)
        idx = draw_batch(len(images), cfg, g, sample_weights)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn((cfg.batch_size, channels, size, size), generator=g)
        t, noise = t.to(device), noise.to(device)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for part in torch.arange(cfg.batch_size).split(cfg.micro_batch or cfg.batch_size):
            x0 = to_model_space(images[idx[part]], size).to(device)
            pred = unet(sched.add_noise(x0, noise[part], t[part]), t[part]).sample
            per_sample = (pred - noise[part]).pow(2).mean(dim=(1, 2, 3))
            part_loss = (per_sample * weights[t[part]]).mean() * (len(part) / cfg.batch_size)  # x 1.0 when whole
            part_loss.backward()
            loss += part_loss.item()
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss)
        step += 1
        seconds = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if progress and step - first == ESTIMATE_AFTER + 1 and step < cfg.steps:  # the first step warms up: not timed
            per_step = (time.time() - warm) / ESTIMATE_AFTER
            tqdm.write(f"diffusion: about {per_step * (cfg.steps - step) / 60:.1f} min to go for {cfg.steps} steps "
                       f"on {device} ({per_step:.2f} s a step, from the first {ESTIMATE_AFTER}); --max-minutes "
                       "time-boxes it, and rerunning resumes")
        if step - first == 1:
            warm = time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    if step % cfg.checkpoint_every and step < cfg.steps:  # stopped by the time budget between checkpoints
        save_checkpoint()
    bar.close()

    ema_unet = build_unet(cfg, channels).to(device)
    ema.copy_to(ema_unet.parameters())
    ema_unet.eval()
    save_folder(out, lambda folder: (ema_unet.save_pretrained(folder), ddim_scheduler(cfg=cfg).save_pretrained(folder)))
    plot_loss(losses, out / "loss.png")
    save_json(out / "train.json", {"config": asdict(cfg), "seed": seed, "steps": step, "seconds": round(seconds, 1),
                                   "num_images": len(images), "data": about, "loss_every_50": _smooth(losses, 50)})
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
    save_figure(path, fig)
    plt.close(fig)


WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def unet_folder(path: str | Path) -> Path | None:
    """The folder holding a U-Net's ``config.json`` and weights (safetensors or bin): ``path`` itself (ours, or any
    ``save_pretrained`` folder) or its ``unet/`` (a pipeline folder, e.g. ``DDPMPipeline.save_pretrained``)."""
    for candidate in (Path(path), Path(path) / "unet"):
        if (candidate / "config.json").exists() and any((candidate / w).exists() for w in WEIGHTS):
            return candidate
    return None


def is_unet(path: str | Path) -> bool:
    """A U-Net folder in any layout :func:`load_unet` reads (with or without our ``train.json``)."""
    return unet_folder(path) is not None


def _is_hub_id(source: str | Path) -> bool:
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/"))


def unet_problem(config: dict, channels: int, where: str) -> str | None:
    """Why a U-Net (its ``config.json``) cannot serve images of ``channels`` channels, in one line, or None.

    DiffInject needs an unconditional pixel-space ``UNet2DModel`` with a middle block (its h-space); grey images go
    into an RGB model (repeated, and averaged back), never the other way round."""
    kind = config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        conditional = " (a conditional U-Net)" if "Condition" in kind else ""
        return f"{where} is a {kind}{conditional}: DiffInject needs an unconditional UNet2DModel"
    cin, cout = config.get("in_channels", 3), config.get("out_channels", 3)
    if cin != cout or cin not in (1, 3):
        return (f"{where} takes {cin} channels and gives {cout}: a latent-space model? DiffInject needs a "
                "pixel-space U-Net of 1 or 3 channels")
    if channels != cin and not (channels == 1 and cin == 3):
        return f"{where} takes {cin}-channel images, the dataset's have {channels}: a channel mismatch"
    if config.get("mid_block_type", "UNetMidBlock2D") is None:
        return f"{where} has no middle block (mid_block_type null): no h-space to inject"
    return None


# What this project reads from a U-Net's config.json beyond diffusers' defaults: the blocks, where h-space lives
UNET_CONFIG_LISTS = ("block_out_channels", "down_block_types", "up_block_types")


def read_unet_config(folder: str | Path) -> dict:
    """A U-Net folder's ``config.json``, checked for the settings this project reads from it; a one-line
    ``ValueError`` naming the file and the setting when it is not JSON, not a mapping, or lacks or mistypes one."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must be a mapping of the U-Net's settings, not a {type(config).__name__}")
    for key in UNET_CONFIG_LISTS:
        if key not in config:
            raise ValueError(f"{path} lacks {key}: it is not a diffusers UNet2DModel config")
        if not isinstance(config[key], list) or not config[key]:
            raise ValueError(f"{path}: {key} must be a non-empty list, not {config[key]!r}")
    for key in ("in_channels", "out_channels"):
        if key in config and (not isinstance(config[key], int) or isinstance(config[key], bool)):
            raise ValueError(f"{path}: {key} must be a whole number, not {config[key]!r}")
    return config


def check_unet(source: str | Path, channels: int) -> None:
    """One-line ``ValueError`` for a U-Net (folder or hub id) that cannot work on ``channels``-channel images, read
    from its config; ``FileNotFoundError`` when there is none; :class:`~core.artifacts.CorruptFile` when its
    safetensors weights are cut short or not safetensors (read from their header, before any stage runs)."""
    folder = unet_folder(source)
    if folder is None:
        if not _is_hub_id(source):
            raise FileNotFoundError(f"no U-Net at {source} (expected a diffusers U-Net folder: config.json and "
                                    f"{WEIGHTS[0]} or .bin, or a pipeline folder with unet/, or a hub id)")
        return  # a hub id: checked once fetched (fetch_unet)
    pipeline = folder.parent if folder.name == "unet" else folder
    index = pipeline / "model_index.json"
    if any((pipeline / sub).is_dir() for sub in ("vae", "vqvae")) or (
            index.exists() and any(k in index.read_text() for k in ("VQModel", "AutoencoderKL"))):
        raise ValueError(f"{source} is a latent-space pipeline (it has an autoencoder): DiffInject needs a "
                         "pixel-space U-Net")
    problem = unet_problem(read_unet_config(folder), channels, str(source))
    if problem:
        raise ValueError(problem)
    weights = folder / WEIGHTS[0]
    if weights.exists():
        try:
            with safe_open(str(weights), "pt"):  # checks the header against the file's length
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' own error type
            raise CorruptFile(weights, f"not a whole safetensors file ({(str(e).splitlines() or [''])[0]})") from None


def fetch_unet(source: str | Path, out: str | Path, channels: int) -> Path:
    """Copy a U-Net (any layout :func:`unet_folder` reads) with its scheduler config into ``out``, or save a hub
    model there (``from_pretrained``, online only); checked first (:func:`check_unet`). Returns ``out``."""
    out = Path(out)
    check_unet(source, channels)
    if is_unet(source):
        save_folder(out, lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True,
                                                         ignore=shutil.ignore_patterns("checkpoint.pt")))
        return out
    try:
        unet = _from_hub(str(source))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, not a UNet2DModel: one line
        raise ValueError(f"cannot load {source!r} from the hub ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    problem = unet_problem(dict(unet.config), channels, str(source))
    if problem:
        raise ValueError(problem)
    save_folder(out, lambda folder: (unet.save_pretrained(folder), ddim_scheduler(source).save_pretrained(folder)))
    return out


def _from_hub(hub_id: str) -> UNet2DModel:
    try:
        return UNet2DModel.from_pretrained(hub_id, subfolder="unet")
    except Exception:  # noqa: BLE001 - a bare model repository rather than a pipeline
        return UNet2DModel.from_pretrained(hub_id)


def load_unet(path: str | Path, device: str = "cpu") -> UNet2DModel:
    """A U-Net from any layout :func:`unet_folder` reads (safetensors or bin weights), in eval mode."""
    folder = unet_folder(path)
    if folder is None:
        raise FileNotFoundError(f"no U-Net at {path} (expected config.json and {WEIGHTS[0]} or .bin, here or in unet/)")
    return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()


def weights_id(path: str | Path) -> str:
    """A short content hash of a U-Net's weights file: names the model in caches and manifests."""
    folder = unet_folder(path)
    weights = next(folder / w for w in WEIGHTS if (folder / w).exists())
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def is_trained(path: str | Path) -> bool:
    """A U-Net this project trained (its ``train.json`` records how far); see :func:`is_unet` for any U-Net."""
    return (Path(path) / "diffusion_pytorch_model.safetensors").exists() and (Path(path) / "train.json").exists()


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

