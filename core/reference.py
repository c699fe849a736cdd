"""The reference generator: DiffInject's sampling loop written out for one pair at a time.

:func:`core.injection.inject` is the fast path: it inverts each distinct content image once for all its
pairings (and can keep the inversions in a cache), inverts the style images in batches, and computes the
non-injected and injected predictions of an injection step in one U-Net call on the doubled batch ``[x, x]``.
:func:`reference_inject` is the same algorithm as the reference code runs it: for every pair, with a batch of
one, invert the content image (recording its h), invert the style image, then regenerate the style with two
separate calls of diffusers' own U-Net forward per injection step, h replaced by a forward hook on the middle
block (:func:`bottleneck_hook`). It is slow on purpose, and it is here to be read and to be compared against:
``tests/test_fastpath.py`` checks that both give the same pixels for the same seed, and
``benchmarks/generation.py`` measures how much faster the fast path is.

Per generation step t (grid t_n > ... > t_1 = 0, ``a_t`` the cumulative alpha, ``a_prev`` the next one):

- t >= t_edit (injection, Asyrp form): ``eps = U(x, t)``, ``eps' = U(x, t | h <- slerp(h, h_content[t], gamma))``;
  x0 is predicted with eps', the direction term uses eps (scaled by ``dt_lambda`` for t >= 950).
- t <= t_boost, except the last step (quality boost): a stochastic DDIM step (eta = 1) whose noise comes from the
  sample's own generator, seeded by (seed, sample id).
- otherwise: a deterministic DDIM step.

U-Net evaluations per synthetic sample (:func:`evaluations_per_sample`), with n DDIM steps and k injection steps
(grid timesteps t >= t_edit; k = 0 when gamma = 0):

- style inversion: n - 1; content inversion: n - 1, plus one call on x_T for its top h when k > 0 (none at all
  when gamma = 0); generation: n + k (an injection step evaluates the U-Net twice, in either path).
- reference: ``(n - 1 + [k > 0]) + (n - 1) + (n + k)`` = 3n - 2 + k + [k > 0] with gamma > 0.
- fast path: the content term times ``c``, the distinct contents inverted per sample: d / N when N pairs share d
  contents, 1 without sharing, 0 when every content comes from the cache. Plain DDIM sampling costs n.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from .diffusion import ddim_scheduler, from_model_space, to_model_space
from .hspace import Evaluations
from .injection import (
    InjectionConfig,
    Pairs,
    Synthetic,
    _alpha,
    _ddim_move,
    ddim_invert,
    ddim_timesteps,
    sample_generators,
    slerp,
)


@contextlib.contextmanager
def bottleneck_hook(unet: UNet2DModel, fn):
    """Route the middle block's output through ``fn(h) -> h'`` while the context is open; removed afterwards."""
    handle = unet.mid_block.register_forward_hook(lambda module, inputs, output: fn(output))
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def reference_inject(unet: UNet2DModel, scheduler: DDIMScheduler, images: torch.Tensor, labels: torch.Tensor,
                     pairs: Pairs, cfg: InjectionConfig, seed=0, device: str = "cpu",
                     evaluations: Evaluations | None = None) -> Synthetic:
    """One synthetic sample per pair, computed pair by pair with a batch of one; same result as ``inject``.

    ``images``/``labels``: the training set (uint8, task labels). ``seed``: one int, or one per pair; sample i's
    quality-boost noise comes from ``sample_generators(seed, [i])``, as in the fast path with default sample ids.
    ``cfg.batch_size`` is ignored. The U-Net's calls are counted into ``evaluations``.
    """
    cfg.validate()
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    grid = ddim_timesteps(scheduler, cfg.steps)  # descending: t_n, ..., t_1
    seeds = np.broadcast_to(np.asarray(seed), (len(pairs.content),))
    results = []

    def eps_of(x, t, h_fn=None):  # diffusers' forward, h replaced by ``h_fn`` when given
        if evaluations is not None:
            evaluations.add(len(x))
        with bottleneck_hook(unet, h_fn) if h_fn else contextlib.nullcontext():
            return unet(x, t).sample

    for i, (content, style) in enumerate(zip(pairs.content, pairs.style)):
        generator = sample_generators(seeds[i], [i])[0]

        # 1. invert the content image, recording its bottleneck h at every grid timestep t >= t_edit
        h_content = {}
        if cfg.gamma > 0:
            x0 = to_model_space(images[int(content)][None], size).to(device)
            h_content = ddim_invert(unet, scheduler, x0, cfg.steps, record_h_from=cfg.t_edit, evaluations=evaluations).h

        # 2. invert the style image: the generation starts from its x_T
        x0 = to_model_space(images[int(style)][None], size).to(device)
        x = ddim_invert(unet, scheduler, x0, cfg.steps, evaluations=evaluations).x_T

        # 3. regenerate the style, injecting the content's h at t >= t_edit
        for step, t in enumerate(grid):
            last = step + 1 == len(grid)
            a_t, a_prev = _alpha(scheduler, t), _alpha(scheduler, -1 if last else grid[step + 1])
            dir_scale = cfg.dt_lambda if t >= 950 else 1.0
            if cfg.gamma > 0 and t >= cfg.t_edit:
                eps = eps_of(x, t)  # the style's own prediction: the direction term
                eps_injected = eps_of(x, t, lambda h, h_c=h_content[t]: slerp(h, h_c, cfg.gamma))  # the predicted x0
                x = _ddim_move(x, eps_injected, eps, a_t, a_prev, dir_scale)
            elif t <= cfg.t_boost and not last:  # quality boost: stochastic DDIM (eta = 1)
                eps = eps_of(x, t)
                noise = torch.randn(x.shape, generator=generator).to(device)
                x = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
            else:
                eps = eps_of(x, t)
                x = _ddim_move(x, eps, eps, a_t, a_prev, dir_scale)
        results.append(from_model_space(x.cpu(), images.shape[-1]))

    source = pairs.content if cfg.label_from == "content" else pairs.style
    return Synthetic(torch.cat(results), labels[torch.as_tensor(source)].clone(),
                     torch.as_tensor(pairs.content), torch.as_tensor(pairs.style))


def injection_steps(cfg: InjectionConfig, scheduler: DDIMScheduler | None = None) -> int:
    """k: the generation steps that inject (grid timesteps t >= t_edit), 0 when gamma = 0."""
    if cfg.gamma <= 0:
        return 0
    return sum(t >= cfg.t_edit for t in ddim_timesteps(scheduler or ddim_scheduler(), cfg.steps))


def evaluations_per_sample(cfg: InjectionConfig, reference: bool, contents_per_sample: float = 1.0,
                           scheduler: DDIMScheduler | None = None) -> float:
    """U-Net evaluations (images through the U-Net) per synthetic sample, as :class:`Evaluations` counts them.

    With n = ``cfg.steps`` and k = :func:`injection_steps`:
    ``c * (n - 1 + [k > 0]) * [gamma > 0]  +  (n - 1)  +  (n + k)``
    (content inversion, style inversion, generation). The reference inverts every pair's content, c = 1; the fast
    path inverts each distinct content once per call, c = ``contents_per_sample`` (distinct contents not already
    in the cache / samples). ``scheduler`` gives the DDIM grid (default: the project's linear-beta DDIM).
    """
    n, k = cfg.steps, injection_steps(cfg, scheduler)
    c = 1.0 if reference else float(contents_per_sample)
    content = (n - 1 + (k > 0)) if cfg.gamma > 0 else 0
    return c * content + (n - 1) + (n + k)
