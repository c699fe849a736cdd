"""The stages of a run as functions of their inputs, shared by :class:`~core.run.Run` and every Tune trial:
generate the synthetic samples (:func:`synthesize`, in this process by :func:`generate_in_process` or by any
generator with its signature) and fit a method on the training split plus its extra data (:func:`fit_method`).
Mining (:func:`core.mining.mine`) and U-Net training (:func:`core.diffusion.train_diffusion`) are their own modules'.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import methods as registry
from .artifacts import CorruptFile, load_torch, save_torch
from .classifier import ClassifierConfig
from .data import ImageSet
from .diffusion import ddim_scheduler, load_unet
from .hspace import Evaluations
from .injection import InjectionConfig, Synthetic, inject_batches, plan_pairs


def generate_in_process(unet_dir: Path, images: torch.Tensor, labels: torch.Tensor, pairs, cfg: InjectionConfig,
                        seed: int, device: str = "cpu", progress: bool = True,
                        shards: Path | None = None) -> tuple[Synthetic, int, float]:
    """The generation stage in this process: the synthetic samples, the U-Net evaluations (images) and the seconds
    they took.

    With ``shards`` (a folder) each batch of ``cfg.batch_size`` pairs is saved there as it is made, with its pairs,
    evaluations and seconds; a rerun reads back every batch whose shard holds the pairs planned for it and
    generates the rest, to the pixels, evaluations and (summed) seconds of an uninterrupted run (see
    :func:`~core.injection.inject_batches` for why its contents are still inverted).
    """
    unet = load_unet(unet_dir, device)
    saved = {}
    if shards is not None:
        shards.mkdir(parents=True, exist_ok=True)
        saved = _saved_shards(shards, pairs, cfg.batch_size)
    made = dict(saved)
    evals, mark, t0 = Evaluations(), 0, time.time()
    for rows, syn in inject_batches(unet, ddim_scheduler(unet_dir), images, labels, pairs, cfg, seed, device,
                                    progress, skip=set(saved), evaluations=evals):
        spent, mark = evals.images - mark, evals.images
        if syn is not None:  # a saved batch's inversions were counted when it was made
            made[rows.start] = {**vars(syn), "evaluations": spent, "seconds": time.time() - t0}
            if shards is not None:
                save_torch(_shard_path(shards, rows.start), made[rows.start])
        t0 = time.time()
    parts = [made[start] for start in sorted(made)]
    syn = Synthetic.cat([Synthetic(**{f.name: p[f.name] for f in fields(Synthetic)}) for p in parts])
    return syn, sum(p["evaluations"] for p in parts), sum(p["seconds"] for p in parts)


def _shard_path(shards: Path, start: int) -> Path:
    return shards / f"{start:07d}.pt"


def _saved_shards(shards: Path, pairs, batch_size: int) -> dict[int, dict]:
    """The shards in ``shards`` that hold the pairs planned for their batch, by the batch's first row; any other
    (from other pairs, or unreadable) is ignored, so its batch is generated again."""
    saved = {}
    for start in range(0, len(pairs.content), batch_size):
        try:
            shard = load_torch(_shard_path(shards, start))
        except (FileNotFoundError, CorruptFile):  # absent, or not a complete torch file
            continue
        rows = slice(start, start + batch_size)
        if np.array_equal(shard["content"], pairs.content[rows]) and np.array_equal(shard["style"], pairs.style[rows]):
            saved[start] = shard
    return saved


@dataclass
class Synthesized:
    """What :func:`synthesize` made: the samples, the U-Net evaluations and the seconds they took."""

    samples: Synthetic
    evaluations: int
    seconds: float


def synthesize(unet_dir: Path, train: ImageSet, pool: np.ndarray, cfg: InjectionConfig, seed: int, generate=None,
               device: str = "cpu", progress: bool = True, shards: Path | None = None, weights=None) -> Synthesized:
    """Stage 3 after mining, for the pipeline and every Tune trial alike: pair ``cfg.count`` contents from ``pool``
    (drawn by their ``weights``, see :func:`~core.injection.plan_pairs`) with styles and generate with ``generate``
    (default :func:`generate_in_process`).

    A generator returns ``(samples, evaluations)``, or ``(samples, evaluations, seconds)`` when it knows better
    than the wall clock how long its samples took (resumed from shards); ``shards`` reaches it only if it takes a
    ``shards`` argument (the Ray fan-out does not).
    """
    generate = generate or generate_in_process
    pairs = plan_pairs(train.labels, pool, cfg.count(len(train)), seed, weights=weights)
    kw = {"shards": shards} if shards is not None and _takes(generate, "shards") else {}
    t0 = time.time()
    syn, evaluations, *seconds = generate(unet_dir, train.images, train.labels, pairs, cfg, seed, device, progress,
                                          **kw)
    return Synthesized(syn, evaluations, seconds[0] if seconds else time.time() - t0)


def fit_method(method: registry.Method, train: ImageSet, extra, valid: ImageSet, num_classes: int,
               cfg: ClassifierConfig, seed: int, device: str = "cpu", progress: bool = True,
               on_epoch=None, checkpoint: Path | None = None) -> registry.Trained:
    """Stage 4, for the pipeline and every Tune trial alike: ``method`` trained on the training split plus its
    ``extra`` ``(images, labels)``, with every bias label blanked first, so no method can read one; the split's
    ``extras["from_extra"]`` marks the samples that came from ``extra`` (provenance, not bias). ``checkpoint``
    (epoch checkpoints, see :meth:`Method.fit <core.methods.base.Method.fit>`) reaches methods that take it."""
    images, labels = train.images, train.labels
    from_extra = torch.zeros(len(labels), dtype=torch.bool)  # provenance, not bias: which samples are the extra data
    if extra is not None:
        images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
        from_extra = torch.cat([from_extra, torch.ones(len(extra[1]), dtype=torch.bool)])
    kw = {"checkpoint": checkpoint} if checkpoint is not None and _takes(method.fit, "checkpoint") else {}
    return method.fit(ImageSet(images, labels, torch.full_like(labels, -1), {"from_extra": from_extra}),
                      valid.blind(), num_classes, cfg, seed, device, progress, on_epoch, **kw)


def _takes(fn, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (optional protocol arguments go only to those that take them)."""
    return name in inspect.signature(fn).parameters
