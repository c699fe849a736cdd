"""Stage 3: DDIM inversion and h-space content injection with normalized Slerp (InjectFusion/Asyrp form).

For each synthetic sample a *content* image (from the mined bias-conflict pool) and a *style* image (any
training image of another class) are inverted with deterministic DDIM. While the content image is inverted,
the U-Net's h (:mod:`core.hspace`: the middle block's output) is recorded at every timestep. The style image is
then regenerated from its inverted x_T; at every step with t >= t_edit the running h_s is replaced by
``slerp(h_s, h_c, gamma)``. Skip connections stay those of the style trajectory, so the style keeps its
low-level appearance while the content supplies the semantics. Every U-Net call goes through
:class:`~core.hspace.HSpace`, which hands h out and takes its replacement in.

Timesteps. With n DDIM steps the generation visits t_n > ... > t_1 (e.g. 950, 900, ..., 0 for n = 20) and
ends at alpha = 1. Inversion walks the same grid upwards: x_0 is taken as the state at t_1, and n - 1
deterministic steps reach x_{t_n}. The content's h at t_n comes from one more U-Net call on x_{t_n}.

Update (Asyrp form) at an injection step: the predicted x0 uses the *injected* epsilon, the direction term the
*non-injected* one; both come from one U-Net call on the doubled batch ``[x, x]`` whose second half is injected
(its down path runs once, :func:`core.hspace.forward`'s ``copies``). For t <= t_boost the steps are stochastic
(eta = 1, "quality boost"); the noise of sample i comes from its own generator seeded by (seed, i), so a
sample's pixels do not depend on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .artifacts import load_torch, save_torch
from .diffusion import from_model_space, to_model_space, unet_problem
from .hspace import PRECISION_CHOICES, Evaluations, HSpace, SettingError, resolve_precision


@dataclass
class InjectionConfig:
    """The injection stage's settings: DDIM, where and how strongly h is injected, how many samples, how the
    U-Net runs. :meth:`validate` names the first one out of range."""

    # Each bounded setting's inclusive range, written once: validate() checks it, the service's schema states it.
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "steps": (2, 1000), "t_edit": (0, 999), "gamma": (0.0, 1.0), "t_boost": (-1, 999), "skip_levels": (0, 8)}

    steps: int = 10  # DDIM steps for inversion and generation (the reference code's: 1000)
    t_edit: int = 300  # inject h at every generation step with t >= t_edit (the paper's: 500)
    gamma: float = 0.9  # Slerp strength: 0 = no injection, 1 = the (norm-matched) content h (the paper's: 0.5)
    # 0: h is the middle block's output alone (the paper's h-space); N: h also holds the skip connections that the N
    # coarsest up blocks read, which carry much of the style's shape (core.hspace)
    skip_levels: int = 0
    t_boost: int = 200  # stochastic eta = 1 steps for t <= t_boost ("quality boost"); -1 turns it off
    dt_lambda: float = 0.9985  # scale on the noise direction for t >= 950 (reference setting)
    # synthetic samples = ratio * |train| (a run's default: core.config.EVERYDAY_SYNTHETIC_RATIO) ...
    synthetic_ratio: float = 1.0
    num_samples: int | None = None  # ... unless given here
    label_from: str = "content"  # which image's label a synthetic sample takes: "content" or "style"
    batch_size: int = 64
    # "bf16": the U-Net's calls in bfloat16 (a copy of its weights, cast once), the DDIM state, the Slerp and the
    # images in float32; "auto": bf16 on a CPU with AVX-512 BF16 or AMX, else fp32 (core.hspace.resolve_precision)
    precision: str = "auto"
    # True: the U-Net's calls go through torch.compile (inductor, its weights frozen as constants) of a copy of it,
    # padded to this batch size so that two graphs serve a run. Each graph compiles for a minute or so on a CPU
    # (less when inductor's on-disk cache holds it), more than a first default run saves.
    compile: bool = False

    def count(self, train_size: int) -> int:
        """Synthetic samples for a training set of ``train_size`` images."""
        return self.num_samples if self.num_samples is not None else int(round(self.synthetic_ratio * train_size))

    def validate(self) -> "InjectionConfig":
        """Raises :class:`SettingError` naming the first setting out of its range."""
        if not isinstance(self.skip_levels, int) or isinstance(self.skip_levels, bool):
            raise SettingError("skip_levels", f"skip_levels {self.skip_levels!r} must be a whole number")
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise SettingError(name, f"{name} {value} is outside [{lo:g}, {hi:g}]")
        if self.label_from not in ("content", "style"):
            raise SettingError("label_from", f"label_from {self.label_from!r} must be 'content' or 'style'")
        if self.precision not in PRECISION_CHOICES:
            choices = ", ".join(PRECISION_CHOICES)
            raise SettingError("precision", f"precision {self.precision!r} must be one of {choices}")
        if not isinstance(self.compile, bool):
            raise SettingError("compile", f"compile {self.compile!r} must be true or false")
        if not 0.0 < self.synthetic_ratio <= 10.0:
            raise SettingError("synthetic_ratio", f"synthetic_ratio {self.synthetic_ratio} must be in (0, 10]")
        return self


# ---------------------------------------------------------------------------------------------------------
# Slerp
# ---------------------------------------------------------------------------------------------------------


def slerp(h_s: torch.Tensor, h_c: torch.Tensor, gamma: float) -> torch.Tensor:
    """Normalized Slerp per sample: rescale h_c to ||h_s||, then interpolate on the sphere by ``gamma``.

    ``gamma = 0`` returns h_s, ``gamma = 1`` returns h_c * ||h_s|| / ||h_c||; the result keeps ||h_s||.
    Norms and angles are taken per sample over C*H*W.
    """
    flat_s, flat_c = h_s.flatten(1), h_c.flatten(1)
    norm_s = flat_s.norm(dim=1, keepdim=True)
    flat_c = flat_c * norm_s / flat_c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = ((flat_s * flat_c).sum(1, keepdim=True) / norm_s.pow(2).clamp_min(1e-24)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    # Where h_s and h_c are (nearly) parallel Slerp tends to linear interpolation.
    safe = sin.abs() > 1e-6
    w_s = torch.where(safe, torch.sin((1 - gamma) * theta) / torch.where(safe, sin, 1.0), 1.0 - gamma)
    w_c = torch.where(safe, torch.sin(gamma * theta) / torch.where(safe, sin, 1.0), torch.full_like(sin, gamma))
    return (w_s * flat_s + w_c * flat_c).view_as(h_s)



# ---------------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------------


def ddim_timesteps(scheduler: DDIMScheduler, steps: int) -> list[int]:
    """The generation grid, descending (e.g. [950, 900, ..., 0])."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def _alpha(scheduler: DDIMScheduler, t: int) -> float:
    return float(scheduler.alphas_cumprod[t]) if t >= 0 else float(scheduler.final_alpha_cumprod)


def _ddim_move(x, eps_x0, eps_dir, a_from: float, a_to: float, dir_scale: float = 1.0):
    """Deterministic DDIM move between noise levels: x0 predicted with ``eps_x0``, direction from ``eps_dir``."""
    x0 = (x - (1 - a_from) ** 0.5 * eps_x0) / a_from**0.5
    return a_to**0.5 * x0 + dir_scale * (1 - a_to) ** 0.5 * eps_dir


@dataclass
class Inversion:
    """Result of :func:`ddim_invert`: the noised latent x_T and the bottleneck h at each recorded timestep."""

    x_T: torch.Tensor
    h: dict[int, torch.Tensor] = field(default_factory=dict)  # timestep -> (B, C', H', W')


@torch.inference_mode()
def ddim_invert(unet: UNet2DModel | HSpace, scheduler: DDIMScheduler, x0: torch.Tensor, steps: int,
                record_h_from: int | None = None, h_rows: int | None = None, skip_levels: int = 0,
                evaluations: Evaluations | None = None) -> Inversion:
    """Deterministic DDIM inversion of a batch ``x0`` (model space, [-1, 1]).

    If ``record_h_from`` is given, h is recorded for every grid timestep t >= record_h_from, including the top one
    (one extra U-Net call on x_T). ``h_rows`` limits the recording, and that extra call, to the first ``h_rows``
    images of the batch: contents and styles are inverted in one U-Net call per step, and only the contents need
    their h. ``skip_levels``: which h (:mod:`core.hspace`). The U-Net's calls are counted into ``evaluations``.
    """
    hspace = HSpace.of(unet)
    grid = ddim_timesteps(scheduler, steps)[::-1]  # ascending
    rows = slice(None) if h_rows is None else slice(0, h_rows)
    x, hs = x0, {}
    for i, t in enumerate(grid):
        record = record_h_from is not None and t >= record_h_from and h_rows != 0
        if i == len(grid) - 1:
            if record:
                hs[t] = hspace(x[rows], t, skip_levels=skip_levels, evaluations=evaluations).h
            break
        eps, h = hspace(x, t, skip_levels=skip_levels, evaluations=evaluations)
        if record:
            hs[t] = h[rows]
        x = _ddim_move(x, eps, eps, _alpha(scheduler, t), _alpha(scheduler, grid[i + 1]))
    return Inversion(x, hs)


def _noise(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def sample_generators(seed, sample_ids) -> list[torch.Generator]:
    """One generator per synthetic sample, seeded by (seed, sample id): batching never changes a sample.

    ``seed`` is one int for all samples or one per sample (a service batch mixes requests with their own seeds).
    """
    seeds = np.broadcast_to(np.asarray(seed, dtype=np.int64), (len(sample_ids),))
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([int(s), int(i)]).generate_state(1)[0]))
            for s, i in zip(seeds, sample_ids)]


@torch.inference_mode()
def ddim_generate(unet: UNet2DModel | HSpace, scheduler: DDIMScheduler, x_T: torch.Tensor, cfg: InjectionConfig,
                  h_content: dict[int, torch.Tensor] | None = None, generators: list[torch.Generator] | None = None,
                  evaluations: Evaluations | None = None) -> torch.Tensor:
    """Generate from ``x_T``; inject ``h_content[t]`` with Slerp(gamma) at steps t >= cfg.t_edit. ``h_content`` is
    recorded at ``cfg.skip_levels`` (``ddim_invert``): one Slerp over the middle block's output and those skips.

    Without ``h_content`` (or with gamma = 0) this is plain DDIM (with the quality-boost steps if t_boost >= 0).
    An injection step evaluates the doubled batch ``[x, x]``, its second half with the content's h; both halves
    have the same input, so the down path and the middle block run once for both (``copies`` 2). ``evaluations``
    counts the doubled batch twice, and its second half as ``shared``.
    """
    hspace = HSpace.of(unet)
    grid = ddim_timesteps(scheduler, cfg.steps)
    x, n = x_T, len(x_T)
    inject = h_content is not None and cfg.gamma > 0
    for i, t in enumerate(grid):
        a_t, a_prev = _alpha(scheduler, t), _alpha(scheduler, grid[i + 1] if i + 1 < len(grid) else -1)
        if inject and t >= cfg.t_edit:

            def mix(h, h_c=h_content[t]):  # the second half of the doubled batch gets the content's h
                return torch.cat([h[:n], slerp(h[-n:], h_c, cfg.gamma)])

            out = hspace(torch.cat([x, x]), t, mix, copies=2, skip_levels=cfg.skip_levels, evaluations=evaluations)
            eps, eps_inj = out.eps.chunk(2)
            x = _ddim_move(x, eps_inj, eps, a_t, a_prev, cfg.dt_lambda if t >= 950 else 1.0)
            continue
        eps = hspace(x, t, evaluations=evaluations).eps
        if t <= cfg.t_boost and i + 1 < len(grid):  # the last step (to alpha = 1) adds no noise anyway
            noise = _noise(generators or [None] * n, x.shape[1:], x.device)
            x = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        else:
            x = _ddim_move(x, eps, eps, a_t, a_prev, cfg.dt_lambda if t >= 950 else 1.0)
    return x


# ---------------------------------------------------------------------------------------------------------
# Pairs and the generation stage
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    content: np.ndarray  # indices into the training set (from the mined pool)
    style: np.ndarray  # indices into the training set, of a class other than the content's


def plan_pairs(labels: torch.Tensor, pool: np.ndarray, num_samples: int, seed: int, style_pool=None,
               weights=None) -> Pairs:
    """Content i cycles through a seeded shuffle of ``pool``; style i is drawn uniformly from the training
    images (or ``style_pool``) of any other class, with a generator seeded by (seed, i). Reads task labels only.

    With ``weights`` (one per pool entry, e.g. :attr:`Mined.weights <core.mining.Mined.weights>`) each content
    appears in proportion to its weight instead (largest-remainder rounding, so the counts sum to ``num_samples``),
    in a seeded shuffle."""
    labels = np.asarray(labels)
    pool = np.asarray(pool)
    styles = np.arange(len(labels)) if style_pool is None else np.asarray(style_pool)
    if len(pool) == 0:
        raise ValueError("the content pool is empty")
    for c in np.unique(labels[pool]):
        if not (labels[styles] != c).any():
            raise ValueError(f"style images must come from another class, but there is none other than class {c}")
    if weights is not None and len(weights) != len(pool):
        raise ValueError(f"{len(weights)} content weights for a pool of {len(pool)}")
    if weights is None:
        order = np.random.default_rng([seed, 1]).permutation(pool)
        content = order[np.arange(num_samples) % len(order)]
    else:
        content = np.random.default_rng([seed, 1]).permutation(np.repeat(pool, apportion(weights, num_samples)))
    style = np.empty(num_samples, dtype=np.int64)
    for i, c in enumerate(content):
        others = styles[labels[styles] != labels[c]]
        style[i] = others[np.random.default_rng([seed, 2, i]).integers(len(others))]
    return Pairs(content.astype(np.int64), style)


def apportion(weights, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainder; ties by position)."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("content weights must be non-negative with a positive sum")
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:total - counts.sum()]] += 1
    return counts


@dataclass
class Synthetic:
    """Synthetic bias-conflict samples (uint8 images at the dataset's size) and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor

    def save(self, path) -> None:
        save_torch(path, {"images": self.images, "labels": self.labels, "content": self.content, "style": self.style})

    @classmethod
    def load(cls, path) -> "Synthetic":
        return cls(**load_torch(path))

    @classmethod
    def cat(cls, parts: list["Synthetic"]) -> "Synthetic":
        """The samples of ``parts``, in order."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


class _ContentInversions:
    """The h-trajectories of content images (t >= t_edit), each inverted once: from ``cache`` when it holds
    them (a mapping from image index to Inversion, e.g. an actor's LRU, specific to this U-Net, image set,
    ``cfg.steps``, ``cfg.t_edit`` and ``cfg.skip_levels``), else inverted beside a batch's styles and stored there
    too."""

    def __init__(self, cache=None):
        self.cache = cache
        self.done: dict[int, Inversion] = {}

    def missing(self, index: np.ndarray) -> np.ndarray:
        """The distinct images of ``index`` neither inverted yet nor in the cache."""
        uniq = [int(c) for c in np.unique(index)]
        for c in uniq:
            if c not in self.done and self.cache is not None and c in self.cache:
                self.done[c] = self.cache[c]
        return np.array([c for c in uniq if c not in self.done], dtype=np.int64)

    def add(self, index: np.ndarray, inv: Inversion) -> None:
        for j, c in enumerate(index):
            # copies, so a cached content does not pin the whole batch's tensors in memory
            h = {t: h_t[j : j + 1].clone() for t, h_t in inv.h.items()}
            self.done[int(c)] = Inversion(inv.x_T[j : j + 1].clone(), h)
            if self.cache is not None:
                self.cache[int(c)] = self.done[int(c)]

    def h(self, index: np.ndarray) -> dict[int, torch.Tensor]:
        first = self.done[int(index[0])].h
        return {t: torch.cat([self.done[int(c)].h[t] for c in index]) for t in first}


def _padded(index: np.ndarray, size: int | None) -> np.ndarray:
    """``index`` followed by copies of its last entry up to ``size`` entries (unchanged when ``size`` is None)."""
    if size is None:
        return index
    return np.concatenate([index, np.repeat(index[-1:], size - len(index))])


def inject(unet: UNet2DModel | HSpace, scheduler: DDIMScheduler, images: torch.Tensor, labels: torch.Tensor,
           pairs: Pairs, cfg: InjectionConfig, seed=0, device: str = "cpu", progress: bool = True,
           sample_ids=None, content_cache=None, joint_inversion: bool | None = None,
           bucket: int | None = None, evaluations: Evaluations | None = None) -> Synthetic:
    """Generate one synthetic sample per pair: the style image regenerated with the content's h injected.

    ``unet``: a U-Net, or an :class:`~core.hspace.HSpace` of one at ``cfg``'s precision and compile (an actor
    serving many requests keeps one, so it casts and compiles once). ``images``/``labels`` are the training set
    (uint8, task labels); bias labels are never passed in. The U-Net's calls are counted into ``evaluations``.
    ``sample_ids`` (default 0..n-1) seed each sample's noise, so any split of the pairs over batches or
    workers gives the same pixels up to float rounding of other batch shapes (exactly, with ``bucket``);
    ``seed`` may also be one per pair. Each distinct content is inverted once, with the first batch of styles
    that needs it. ``content_cache`` (a mapping from image index to Inversion, e.g. an actor's LRU, specific to
    this U-Net, image set, ``cfg.steps``, ``cfg.t_edit`` and ``cfg.skip_levels``) supplies the inversions it holds
    and receives the new ones.
    ``joint_inversion`` inverts a batch's styles and its new contents in the same U-Net calls (default: on CUDA
    only, never with ``bucket``). A GPU pays per call at these sizes, so this saves a third of the calls; a CPU
    pays per image, so there it saves nothing, and separate calls keep the output bit-identical whether or not a
    content was cached (batch shape changes float rounding).
    ``bucket`` fixes the shape of every U-Net call: pairs go in micro-batches of exactly ``bucket`` (instead of
    ``cfg.batch_size``) and new contents are inverted in chunks of exactly ``bucket`` images, a short last one
    padded with copies of its last entry whose outputs are discarded. A sample's pixels then do not depend on its
    batch-mates, the request order, or whether its content was cached, at the price of the padding's evaluations.
    On CPU that holds at one torch thread for any ``bucket``; with more threads a sample's row can still change
    its rounding where a thread's share of an op ends inside a sample (SiLU switches between its vectorised and
    scalar paths there; Linear's GEMM tiles rows), so it holds with ``bucket`` and the thread count both powers of
    two, threads <= ``bucket`` (tests/test_injection.py checks 1 and 2 threads). With ``cfg.compile`` the bucket
    defaults to ``cfg.batch_size``: a compiled graph serves one batch shape, and each new shape costs a compile.
    """
    parts = [samples for _, samples in inject_batches(unet, scheduler, images, labels, pairs, cfg, seed, device,
                                                       progress, sample_ids, content_cache, joint_inversion, bucket,
                                                       evaluations=evaluations)]
    return Synthetic.cat(parts)


def inject_batches(unet: UNet2DModel | HSpace, scheduler: DDIMScheduler, images: torch.Tensor, labels: torch.Tensor,
                   pairs: Pairs, cfg: InjectionConfig, seed=0, device: str = "cpu", progress: bool = True,
                   sample_ids=None, content_cache=None, joint_inversion: bool | None = None,
                   bucket: int | None = None, skip=frozenset(),
                   evaluations: Evaluations | None = None) -> Iterator[tuple[slice, Synthetic | None]]:
    """:func:`inject` one batch at a time: yields ``(rows, samples)`` per batch, ``rows`` its slice of the pairs.

    A batch whose first row is in ``skip`` (its samples made earlier, e.g. saved by an interrupted run) yields
    ``(rows, None)``, neither its styles inverted nor its samples generated; its new contents are still inverted
    as the batch would have (beside its styles with joint inversion), because on CPU an inversion's batch shape
    changes its rounding: the batches after it then give the pixels of an uninterrupted run. A skipped batch after
    the last generated one inverts nothing.
    """
    cfg.validate()
    hspace = _hspace(unet, cfg, device)
    config = hspace.unet.config
    if cfg.compile and bucket is None and not joint_inversion:
        bucket = cfg.batch_size  # fixed shapes: two compiled graphs (batch, doubled injection batch), never more
    if bucket is not None and (bucket < 1 or joint_inversion):
        raise ValueError(f"bucket {bucket} must be a positive batch size, and cannot be combined with joint_inversion")
    problem = unet_problem(dict(config), images.shape[1], "the U-Net")
    if problem:
        raise ValueError(problem)
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    channels = config.in_channels  # grey images go into an RGB model and come back grey
    n, step = len(pairs.content), bucket or cfg.batch_size
    sample_ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
    seeds = np.broadcast_to(np.asarray(seed), (n,))
    source = pairs.content if cfg.label_from == "content" else pairs.style
    contents = _ContentInversions(content_cache)
    joint = (torch.device(device).type == "cuda" and bucket is None) if joint_inversion is None else joint_inversion
    last = max((start for start in range(0, n, step) if start not in skip), default=-1)

    def invert(index, **kw):
        return ddim_invert(hspace, scheduler, to_model_space(images[torch.as_tensor(index)], size, channels).to(device),
                           cfg.steps, skip_levels=cfg.skip_levels, evaluations=evaluations, **kw)

    def invert_contents(new):  # in one call, or in padded chunks of ``bucket``
        for i in range(0, len(new), bucket or max(1, len(new))):
            chunk = new[i : i + (bucket or len(new))]
            contents.add(chunk, invert(_padded(chunk, bucket), record_h_from=cfg.t_edit))

    def styles_x_T(c_idx, s_idx, styles: bool):
        """Invert the batch's new contents, and its styles (always with joint inversion): the styles' x_T."""
        new = contents.missing(c_idx) if cfg.gamma > 0 else np.zeros(0, dtype=np.int64)
        if joint:  # styles and new contents in one U-Net call per step
            inv = invert(np.concatenate([new, s_idx]), record_h_from=cfg.t_edit, h_rows=len(new))
            contents.add(new, inv)
            return inv.x_T[len(new) :]
        invert_contents(new)
        return invert(s_idx).x_T if styles else None

    bar = tqdm(total=n, desc="inject", disable=not progress, dynamic_ncols=True)
    if hspace.compiled:  # the first batches wait on the compiler, which prints nothing
        bar.set_postfix_str("compiling the U-Net's calls (minutes on a CPU) ...")
    try:
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            c_idx, s_idx, ids, batch_seeds = (_padded(a[rows], bucket) for a in (pairs.content, pairs.style,
                                                                                 sample_ids, seeds))
            samples = None
            if start <= last:
                x_T = styles_x_T(c_idx, s_idx, styles=start not in skip)
                if start not in skip:
                    h = contents.h(c_idx) if cfg.gamma > 0 else None
                    x = ddim_generate(hspace, scheduler, x_T, cfg, h, sample_generators(batch_seeds, ids), evaluations)
                    real = rows.stop - start  # the rest is padding
                    samples = Synthetic(from_model_space(x[:real].cpu(), images.shape[-1], images.shape[1]),
                                        labels[torch.as_tensor(source[rows])],
                                        torch.as_tensor(pairs.content[rows]), torch.as_tensor(pairs.style[rows]))
            bar.set_postfix_str("")
            bar.update(rows.stop - start)
            yield rows, samples
    finally:
        bar.close()


def _hspace(unet: UNet2DModel | HSpace, cfg: InjectionConfig, device: str) -> HSpace:
    """The :class:`~core.hspace.HSpace` that ``cfg`` asks for on ``device``: ``unet`` if it is one (checked), else
    one made of it here."""
    precision = resolve_precision(cfg.precision, device)
    if not isinstance(unet, HSpace):
        return HSpace(unet, precision, cfg.compile)
    if (unet.precision, unet.compiled) != (precision, cfg.compile):
        raise ValueError(f"an HSpace at {unet.precision}, compile {unet.compiled}, for settings that ask for "
                         f"{precision}, compile {cfg.compile}")
    if unet.stale():
        raise ValueError("the U-Net's weights changed after its HSpace was made: make a new HSpace")
    return unet
