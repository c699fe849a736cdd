"""The Injector deployment: batched injection over the registered datasets' U-Nets.

Requests that arrive together are generated in one batch (``@serve.batch``; size and wait come from the Serve
config's ``user_config``). Each dataset's U-Net is a multiplexed model (loaded on first use, at most
``max_models_per_replica`` per replica, least recently used first out), and Serve splits a batch by model id, so
one batch runs one U-Net. Per-sample seeds and fixed-size U-Net batches (``bucket``) make a sample's pixels exactly
independent of the batch it lands in. A job that fails inside a batch fails alone; its batch-mates get their images.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import threading
import weakref
from dataclasses import asdict

import numpy as np
import torch
from ray import serve

from diffinject.core.export import png_bytes
from diffinject.core.injection import InjectionConfig
from diffinject.workers.injector import Injector, check_job, run_isolated

from .datasets import DatasetRegistry
from .job import InjectJob


def multiplexed(load, max_models: int):
    """``load`` (an async model id -> model) behind Serve's model multiplexing, holding at most ``max_models``.

    The bound is a setting of the Serve config, and ``@serve.multiplexed`` on a method takes a constant, so the
    public decorator is applied here, to a plain function, when the replica starts."""
    if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
        raise ValueError(f"max_models_per_replica {max_models!r} must be a whole number, at least 1")

    async def load_model(model_id: str):
        return await load(model_id)

    return serve.multiplexed(max_num_models_per_replica=max_models)(load_model)


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _problem(status: int, field: str | None, message: str) -> dict:
    return {"status": status, "field": field, "message": message}


@serve.deployment(name="Injector")
class InjectorDeployment:
    """The registered datasets (:class:`~diffinject.service.datasets.DatasetRegistry`) and one
    ``workers.injector.Injector`` per U-Net in use.

    ``threads``: torch threads (default: the replica's CPUs; with ``bucket``, rounded down to a power of two);
    ``cache_size``: content inversions kept per U-Net; ``bucket``: the fixed U-Net batch size (None: batches as
    they come); ``max_models_per_replica``: U-Nets one replica holds at once."""

    def __init__(self, datasets: dict, root: str = "runs/serve", data_root: str = ".", threads: int | None = None,
                 cache_size: int = 4096, bucket: int | None = 8, max_models_per_replica: int = 2):
        self.datasets = DatasetRegistry(datasets, root, data_root)
        threads = threads or _assigned_cpus()
        if bucket:  # pixels are batch-independent at power-of-two thread counts up to the bucket (core.injection)
            threads = 1 << (min(threads, bucket).bit_length() - 1)
        self.threads, self.cache_size, self.bucket = threads, cache_size, bucket
        self.loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # name -> Injector, while held
        self.injector = multiplexed(self._load, max_models_per_replica)
        # one injection at a time: an Injector's U-Net and content cache are not thread-safe
        self._model_lock = threading.Lock()

    async def _load(self, name: str) -> Injector:
        """The U-Net of a registered dataset, loaded off the event loop."""
        unet = self.datasets[name].unet
        injector = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Injector(unet, threads=self.threads, cache_size=self.cache_size, bucket=self.bucket))
        self.loaded[name] = injector
        return injector

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings from the Serve config: ``max_batch_size``, ``batch_wait_timeout_s``."""
        self.generate.set_max_batch_size(int(user_config.get("max_batch_size", 16)))
        self.generate.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.05)))

    def describe(self) -> dict:
        return self.datasets.describe()

    def info(self) -> dict:
        """This replica's process and the U-Nets it holds (the fault benchmark and tests find a replica by its pid)."""
        gc.collect()  # a U-Net Serve's LRU let go of is gone once collected
        return {"pid": os.getpid(), "loaded": {name: inj.info() for name, inj in self.loaded.items()}}

    def mine(self, name: str, k: int) -> list[int]:
        return self.datasets.mine(name, k).tolist()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[InjectJob]) -> list[dict]:
        """Jobs that share a dataset, U-Net and injection settings go through ``inject`` together.

        Each job answers for itself: a job that fails its checks, or fails inside ``inject`` when run alone, comes
        back as ``{"error": {status, field, message}}`` while its batch-mates get their images."""
        results: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            problem = self._check(job)
            if problem is not None:
                results[i] = {"error": problem}
                continue
            key = (job.dataset, job.images_key, job.model, tuple(sorted(asdict(job.cfg).items())))
            groups.setdefault(key, []).append(i)
        loop = asyncio.get_running_loop()
        for members in groups.values():  # computed off the event loop, so the next batch can fill meanwhile
            injector = await self.injector(jobs[members[0]].model)
            out = await loop.run_in_executor(None, run_isolated, [jobs[i] for i in members],
                                             functools.partial(self._inject_group, injector))
            for i, result in zip(members, out):
                results[i] = result
        return [r | {"batch_requests": len(jobs)} for r in results]

    def _check(self, job) -> dict | None:
        """What is wrong with a job (core's checks, for any handle caller, behind the Ingress's own), or None."""
        if not isinstance(job, InjectJob):
            return _problem(400, None, f"a job must be an InjectJob, not {type(job).__name__}")
        if job.inline and (job.images is None or job.labels is None):
            return _problem(400, "images", "a job without a registered dataset must carry its images and labels")
        if not job.inline and job.dataset not in self.datasets:
            return _problem(404, "dataset", f"unknown dataset {job.dataset!r}")
        if job.model not in self.datasets:
            return _problem(404, "model", f"unknown model {job.model!r}")
        if not isinstance(job.cfg, InjectionConfig):
            return _problem(400, "cfg", f"cfg must be an InjectionConfig, not {type(job.cfg).__name__}")
        pairs = {"seed": job.seed, "content": job.content, "style": job.style, "cfg": job.cfg}
        return check_job(pairs, len(self._images(job)[1]))

    def _images(self, job: InjectJob) -> tuple[torch.Tensor, torch.Tensor]:
        return (job.images, job.labels) if job.inline else self.datasets.images(job.dataset)

    def _inject_group(self, injector: Injector, jobs: list[InjectJob]) -> list[dict]:
        first = jobs[0]
        images, labels = self._images(first)
        seeds = np.concatenate([np.full(len(j.content), j.seed, dtype=np.int64) for j in jobs])
        ids = np.concatenate([np.arange(len(j.content)) for j in jobs])
        with self._model_lock:
            result = injector.inject(images, labels, np.concatenate([j.content for j in jobs]),
                                     np.concatenate([j.style for j in jobs]), first.cfg, seeds, ids, first.images_key)
        syn, out, start = result.synthetic, [], 0
        for j in jobs:
            sl = slice(start, start + len(j.content))
            start = sl.stop
            # PNG coding here, in the replica's executor thread, not on the ingress's single event loop
            out.append({"png": [png_bytes(im) for im in syn.images[sl]], "labels": syn.labels[sl].tolist(),
                        "content": syn.content[sl].tolist(), "style": syn.style[sl].tolist(),
                        "inject_seconds": result.seconds, "unet": injector.model_id,
                        "evaluations_per_sample": result.evaluations / max(1, len(syn.labels))})
        return out
