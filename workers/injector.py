"""The injection worker: holds one trained U-Net and injects whole batches of (content, style) pairs.

``Injector`` is plain Python around ``core.injection.inject``; ``InjectorActor`` is the same class as a Ray
actor, and the Serve deployment wraps it too. Content inversions are cached (LRU, bounded by entries) under
(model, image set, DDIM steps, t_edit, skip levels, index): a mined conflict sample is inverted once however often it
is paired. Cached and fresh inversions give the same pixels, so caching never changes a result.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffinject.core.diffusion import ddim_scheduler, is_unet, load_unet, weights_id
from diffinject.core.hspace import Evaluations, HSpace, resolve_precision
from diffinject.core.injection import InjectionConfig, Pairs, SettingError, Synthetic, inject


def resolve_model_dir(path: str | Path) -> Path:
    """A U-Net folder (any diffusers layout), or a run folder holding one in ``unet/``."""
    path = Path(path)
    for candidate in (path, path / "unet"):
        if is_unet(candidate):
            return candidate
    raise FileNotFoundError(f"no U-Net at {path} (nor in {path / 'unet'})")


def images_id(images: torch.Tensor) -> str:
    """Content hash of an image set: the cache key part that says which images an index points into."""
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


class ContentCache:
    """LRU of content inversions. ``scope(...)`` gives the index -> Inversion view ``core`` reads and fills."""

    def __init__(self, capacity: int = 4096):
        self.capacity, self.hits, self.misses = capacity, 0, 0
        self._items: OrderedDict = OrderedDict()

    def scope(self, *key) -> "_Scope":
        return _Scope(self, tuple(key))

    def stats(self) -> dict:
        return {"entries": len(self._items), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


class _Scope:
    def __init__(self, cache: ContentCache, key: tuple):
        self.cache, self.key = cache, key

    def __contains__(self, index) -> bool:
        found = (*self.key, index) in self.cache._items
        if found:
            self.cache.hits += 1
        else:
            self.cache.misses += 1
        return found

    def __getitem__(self, index):
        k = (*self.key, index)
        self.cache._items.move_to_end(k)
        return self.cache._items[k]

    def __setitem__(self, index, inversion) -> None:
        items = self.cache._items
        items[(*self.key, index)] = inversion
        items.move_to_end((*self.key, index))
        while len(items) > self.cache.capacity:
            items.popitem(last=False)


@dataclass
class InjectResult:
    synthetic: Synthetic
    evaluations: int  # U-Net evaluations, counted per image (a doubled batch of n counts 2n)
    seconds: float
    cache: dict


class Injector:
    """One U-Net, loaded once, with its content cache and its :class:`~core.hspace.HSpace` per precision and compile
    (a cast copy, a compiled graph: made on the first request that asks, kept for the next). ``threads``: torch CPU
    threads (Ray gives actors one);
    ``bucket``: U-Net batches of exactly this many images, so a sample's pixels never depend on its batch-mates
    (``core.injection.inject``); None: batches as they come, faster for odd sizes, equal up to float rounding."""

    def __init__(self, model: str | Path, threads: int | None = None, cache_size: int = 4096,
                 device: str | None = None, bucket: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_dir = resolve_model_dir(model)
        self.unet = load_unet(self.model_dir, self.device)
        self.scheduler = ddim_scheduler(self.model_dir)
        self.model_id = weights_id(self.model_dir)
        self.cache = ContentCache(cache_size)
        self.bucket = bucket
        self.hspaces: dict[tuple[str, bool], HSpace] = {}

    def inject(self, images: torch.Tensor, labels: torch.Tensor, content, style, cfg: InjectionConfig | dict,
               seed=0, sample_ids=None, images_key: str | None = None) -> InjectResult:
        """Synthetic samples for pairs (content[i], style[i]) of indices into ``images``; see ``core.inject``.

        ``seed``: one int, or one per pair; ``sample_ids`` (default 0..n-1) with it seed each sample's noise.
        ``images_key`` names the image set in the cache (default: its content hash).
        """
        cfg = InjectionConfig(**cfg) if isinstance(cfg, dict) else cfg
        # copies: Ray hands the actor read-only arrays, which torch warns about when it indexes with them
        pairs = Pairs(np.array(content, dtype=np.int64), np.array(style, dtype=np.int64))
        scope = self.cache.scope(self.model_id, images_key or images_id(images), cfg.steps, cfg.t_edit,
                                 cfg.skip_levels, cfg.precision, cfg.compile)  # what an inversion's pixels depend on
        t0, evals = time.time(), Evaluations()
        syn = inject(self.hspace(cfg), self.scheduler, images, labels, pairs, cfg, seed, self.device, progress=False,
                     sample_ids=sample_ids, content_cache=scope, bucket=self.bucket, evaluations=evals)
        return InjectResult(syn, evals.images, time.time() - t0, self.cache.stats())

    def hspace(self, cfg: InjectionConfig) -> HSpace:
        """The U-Net at ``cfg``'s precision and compile, made once."""
        key = (resolve_precision(cfg.validate().precision, self.device), cfg.compile)
        if key not in self.hspaces:
            self.hspaces[key] = HSpace(self.unet, *key)
        return self.hspaces[key]

    def info(self) -> dict:
        return {"model": str(self.model_dir), "model_id": self.model_id, "device": self.device,
                "threads": torch.get_num_threads(), "cache": self.cache.stats(), "pid": os.getpid()}


MAX_SEED = 2**63 - 1


def check_job(job: dict, n_images: int) -> dict | None:
    """What is wrong with one injection job (``seed``, ``content``, ``style``, ``cfg``), as ``{status, field,
    message}``, or None. The Serve deployment runs it on every job, so a bad one from any caller fails alone."""

    def problem(field: str, message: str) -> dict:
        return {"status": 400, "field": field, "message": message}

    seed = job.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        return problem("seed", f"seed {seed!r} must be an integer in [0, 2^63 - 1]")
    for field in ("content", "style"):
        index = np.asarray(job.get(field, []))
        if index.dtype.kind not in "iu" or len(index) != len(job.get("content", [])):
            return problem(field, f"{field} must be integer indices, one per sample")
        if len(index) and (index.min() < 0 or index.max() >= n_images):
            return problem(field, f"{field} indices must be in [0, {n_images - 1}]")
    cfg = job.get("cfg", {})
    try:
        (cfg if isinstance(cfg, InjectionConfig) else InjectionConfig(**cfg)).validate()
    except SettingError as e:
        return problem(f"cfg.{e.field}", str(e))
    except TypeError as e:  # an unknown setting
        return problem("cfg", str(e))
    return None


def run_isolated(jobs: list, run_group) -> list[dict]:
    """``run_group(jobs)`` (one result per job), such that a job that fails fails alone: a group that raises is
    split in halves and each half run again, down to single jobs, which answer ``{"error": {...}}`` (status 500,
    the exception's type and first line; 400 naming the field for a setting the U-Net cannot take). With ``bucket``
    set a job's pixels do not depend on its group."""
    try:
        return run_group(jobs)
    except Exception as e:  # noqa: BLE001 - any failure of one job must not reach its batch-mates
        if len(jobs) == 1:
            if isinstance(e, SettingError):
                return [{"error": {"status": 400, "field": f"cfg.{e.field}", "message": str(e)}}]
            message = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            return [{"error": {"status": 500, "field": None, "message": message}}]
        half = len(jobs) // 2
        return run_isolated(jobs[:half], run_group) + run_isolated(jobs[half:], run_group)


def injector_actor(model: str | Path, threads: int = 1, cache_size: int = 4096):
    """A Ray actor running ``Injector``: one GPU when the cluster has one, else ``threads`` CPUs."""
    import ray

    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor = ray.remote(num_cpus=threads, num_gpus=gpus)(Injector)
    return actor.remote(str(model), threads=threads, cache_size=cache_size)


def fan_out(actors: list, images: torch.Tensor, labels: torch.Tensor, pairs: Pairs, cfg: InjectionConfig,
            seed: int = 0) -> tuple[Synthetic, int]:
    """Split the pairs into one contiguous chunk per actor; per-sample ids keep the pixels of a one-actor run."""
    import ray

    images_ref, labels_ref = ray.put(images), ray.put(labels)
    key = images_id(images)
    chunks = [c for c in np.array_split(np.arange(len(pairs.content)), len(actors)) if len(c)]
    refs = [actor.inject.remote(images_ref, labels_ref, pairs.content[c], pairs.style[c], asdict(cfg), seed, c, key)
            for actor, c in zip(actors, chunks)]
    results = ray.get(refs)
    syn = Synthetic(*(torch.cat([getattr(r.synthetic, f) for r in results])
                      for f in ("images", "labels", "content", "style")))
    return syn, sum(r.evaluations for r in results)


def ray_generator(workers: int, threads: int = 1):
    """A ``generate`` for ``core.pipeline.Run``: the generation stage fanned out over ``workers`` actors."""

    def generate(unet_dir, images, labels, pairs, cfg, seed, device="cpu", progress=True):
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=None if ray_address() else max(workers * threads, 1), log_to_driver=False)
        actors = [injector_actor(unet_dir, threads) for _ in range(workers)]
        try:
            return fan_out(actors, images, labels, pairs, cfg, seed)
        finally:
            for a in actors:
                ray.kill(a)

    return generate


def ray_address() -> str | None:
    """The cluster to join (``RAY_ADDRESS``, set by ``ray job submit``), or None for a local one."""
    return os.environ.get("RAY_ADDRESS")
