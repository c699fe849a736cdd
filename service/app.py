"""The DiffInject service: Ray Serve with a FastAPI ingress, laid out the way Ray documents it.

    Ingress (FastAPI: validation, pairing, PNG coding)  --DeploymentHandle-->  Injector (@serve.batch)

``Injector`` holds the registered datasets (each one a ``core.pipeline.Run`` folder: images, biased classifier,
U-Net) and one ``workers.injector.Injector`` per U-Net; requests that arrive together are generated in one
batch (size and wait come from the Serve config's ``user_config``). Per-sample seeds make a sample's pixels
independent of the batch it lands in. Start it with ``serve run deploy/serve.yaml``.
"""


import asyncio
import base64
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from core.injection import InjectionConfig, plan_pairs
from core.mining import mine
from core.pipeline import Run, make_config
from workers.injector import Injector, images_id

from .schemas import DatasetInfo, InjectRequest, InjectResponse, SyntheticSample

api = FastAPI(title="diffinject", version="0.1.0",
              description="Synthetic bias-conflict images by diffusion h-space injection (DiffInject).")


def _error(status: int, field: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"field": field, "message": message})


def encode_png(image: torch.Tensor) -> str:
    """uint8 (C, H, W) -> base64 PNG."""
    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str, channels: int) -> torch.Tensor:
    """base64 PNG -> uint8 (C, H, W); raises ValueError on anything that is not a readable PNG."""
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        if im.format != "PNG":
            raise ValueError(f"{im.format} is not PNG")
        array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as e:
        raise ValueError(f"not a base64 PNG image ({str(e).splitlines()[0]})") from None
    return torch.from_numpy(array.copy()).reshape(*array.shape[:2], channels).permute(2, 0, 1).contiguous()


@serve.deployment(name="Injector")
class InjectorDeployment:
    """Registered datasets and their U-Nets; batches injection jobs from many requests."""

    def __init__(self, datasets: dict, root: str = "runs/serve", data_root: str = ".", threads: int | None = None,
                 cache_size: int = 4096):
        if not datasets:
            raise ValueError("the service needs at least one registered dataset (args.datasets)")
        data_root = Path(data_root).resolve()
        self.runs: dict[str, Run] = {}
        self.injectors: dict[str, Injector] = {}
        # one injection at a time: the U-Net's h hook and the content cache are not thread-safe
        self._model_lock = threading.Lock()
        for name, spec in datasets.items():
            spec = dict(spec or {})
            cfg = make_config(spec.pop("preset", "default"), spec)
            if cfg.data_root is not None:  # folder datasets stay inside the configured data root
                path = (data_root / cfg.data_root).resolve()
                if not path.is_relative_to(data_root):
                    raise ValueError(f"dataset {name!r}: data_root {cfg.data_root!r} is outside {data_root}")
                cfg.data_root = str(path)
            run = Run(Path(root) / name, cfg, progress=False)
            self.runs[name] = run
            self.injectors[name] = Injector(run.unet_dir(), threads=threads or _assigned_cpus(), cache_size=cache_size)

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings from the Serve config: ``max_batch_size``, ``batch_wait_timeout_s``."""
        self.generate.set_max_batch_size(int(user_config.get("max_batch_size", 16)))
        self.generate.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.05)))

    def describe(self) -> dict:
        return {name: {"labels": run.ds.train.labels.tolist(), "num_classes": run.ds.num_classes,
                       "image_size": list(run.ds.image_shape), "k": run.cfg.mining.k,
                       "model": str(self.injectors[name].model_dir)}
                for name, run in self.runs.items()}

    def mine(self, name: str, k: int) -> list[int]:
        """Top-K per class by the dataset's biased classifier (trained once, kept in the run folder), filtered as
        the run's mining settings say."""
        run = self.runs[name]
        tr = run.ds.train
        return mine(run.biased(), tr.images, tr.labels, k,
                    misclassified_only=run.cfg.mining.misclassified_only).indices.tolist()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        """Jobs that share a dataset, U-Net and injection settings go through ``inject`` together."""
        results: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = (job["dataset"], job.get("images_key"), job["model"], tuple(sorted(job["cfg"].items())))
            groups.setdefault(key, []).append(i)
        loop = asyncio.get_running_loop()
        for members in groups.values():  # computed off the event loop, so the next batch can fill meanwhile
            out = await loop.run_in_executor(None, self._inject_group, [jobs[i] for i in members])
            for i, result in zip(members, out):
                results[i] = result | {"batch_requests": len(jobs)}
        return results

    def _inject_group(self, jobs: list[dict]) -> list[dict]:
        first = jobs[0]
        if first.get("images") is not None:
            images, labels = first["images"], first["labels"]
        else:
            images, labels = self.runs[first["dataset"]].ds.train.images, self.runs[first["dataset"]].ds.train.labels
        seeds = np.concatenate([np.full(len(j["content"]), j["seed"]) for j in jobs])
        ids = np.concatenate([np.arange(len(j["content"])) for j in jobs])
        with self._model_lock:
            result = self.injectors[first["model"]].inject(
                images, labels, np.concatenate([j["content"] for j in jobs]),
                np.concatenate([j["style"] for j in jobs]), first["cfg"], seeds, ids, first.get("images_key"))
        syn, out, start = result.synthetic, [], 0
        for j in jobs:
            sl = slice(start, start + len(j["content"]))
            start = sl.stop
            out.append({"images": syn.images[sl], "labels": syn.labels[sl].tolist(), "content": syn.content[sl].tolist(),
                        "style": syn.style[sl].tolist(), "inject_seconds": result.seconds,
                        "evaluations_per_sample": result.evaluations / max(1, len(syn.labels))})
        return out


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def _openapi() -> dict:
    """FastAPI's schema plus the request model: /inject reads its body itself (size check before parsing)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        request = InjectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(request.pop("$defs", {}))
        schema["components"]["schemas"]["InjectRequest"] = request
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


# Module-level helpers of the ingress sit above it: Serve pickles the FastAPI app when the class is decorated.
def _check_indices(indices: list[int] | None, field: str, n_images: int) -> np.ndarray | None:
    if indices is None:
        return None
    if not indices:
        raise _error(400, field, "is empty")
    array = np.asarray(indices)
    if len(np.unique(array)) != len(array):
        raise _error(400, field, "has duplicate indices")
    bad = array[(array < 0) | (array >= n_images)]
    if len(bad):
        raise _error(400, field, f"index {int(bad[0])} is out of range [0, {n_images - 1}]")
    return array


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP edge: checks requests (400/404/413/422/401 with a JSON body naming the field), pairs, encodes."""

    def __init__(self, injector: DeploymentHandle, api_key: str | None = None, max_samples: int = 256,
                 max_steps: int = 100, max_body_bytes: int = 8_000_000, max_inline_images: int = 1024):
        self.injector = injector
        self.api_key = api_key or os.environ.get("DIFFINJECT_API_KEY") or None
        self.max_body_bytes = max_body_bytes
        self.max_samples, self.max_steps, self.max_inline_images = max_samples, max_steps, max_inline_images
        self._meta: dict | None = None

    async def meta(self) -> dict:
        if self._meta is None:
            self._meta = await self.injector.describe.remote()
        return self._meta

    def _check_key(self, request: Request) -> None:
        if self.api_key and request.headers.get("x-api-key") != self.api_key:
            raise _error(401, "x-api-key", "missing or wrong API key")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/datasets", response_model=list[DatasetInfo])
    async def datasets(self, request: Request) -> list[DatasetInfo]:
        self._check_key(request)
        return [DatasetInfo(name=n, images=len(m["labels"]), num_classes=m["num_classes"], image_size=m["image_size"],
                            k=m["k"], model=m["model"]) for n, m in (await self.meta()).items()]

    @api.post("/inject", response_model=InjectResponse, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InjectRequest"}}}}})
    async def inject(self, request: Request) -> InjectResponse:
        """Synthetic bias-conflict samples for a registered or inline dataset (see the InjectRequest schema)."""
        t0 = time.time()
        req = await self._read_request(request)
        meta = await self.meta()
        job, labels = await self._resolve_dataset(req, meta)
        self._check_settings(req)
        n_images = len(labels)
        content = await self._content_pool(req, job, meta, n_images)
        style_pool = _check_indices(req.style_indices, "style_indices", n_images)
        try:
            pairs = plan_pairs(labels, content, req.num_samples, req.seed, style_pool)
        except ValueError as e:
            raise _error(400, "style_indices" if style_pool is not None else "dataset", str(e)) from None
        cfg = InjectionConfig(steps=req.steps, t_edit=req.t_edit, gamma=req.gamma, num_samples=req.num_samples)
        job |= {"content": pairs.content, "style": pairs.style, "seed": req.seed,
                "cfg": {"steps": cfg.steps, "t_edit": cfg.t_edit, "gamma": cfg.gamma}}
        t1 = time.time()
        out = await self.injector.generate.remote(job)
        t2 = time.time()
        samples = [SyntheticSample(image=encode_png(im), label=lab, content=c, style=s)
                   for im, lab, c, s in zip(out["images"], out["labels"], out["content"], out["style"])]
        return InjectResponse(dataset=job["dataset"], samples=samples,
                              unet_evaluations_per_sample=round(out["evaluations_per_sample"], 2),
                              batch_requests=out["batch_requests"],
                              timings={"queue_and_batch": round(t2 - t1 - out["inject_seconds"], 4),
                                       "inject_batch": round(out["inject_seconds"], 4),
                                       "total": round(time.time() - t0, 4)})

    # -- request checks (401 / 413 / 422 / 400 / 404), each naming its field ------------------------------------
    async def _read_request(self, request: Request) -> InjectRequest:
        """Key first, then size (before the body is read whole), then the schema."""
        self._check_key(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise _error(413, "body", f"request body of {size} bytes is over the limit of {self.max_body_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise _error(413, "body", f"request body is over the limit of {self.max_body_bytes} bytes")
        try:
            return InjectRequest.model_validate_json(body)
        except ValidationError as e:  # FastAPI's own 422 shape: a list of {loc, msg, type}
            raise HTTPException(422, detail=e.errors(include_url=False, include_context=False,
                                                     include_input=False)) from None

    async def _resolve_dataset(self, req: InjectRequest, meta: dict) -> tuple[dict, np.ndarray]:
        if (req.dataset is None) == (req.inline is None):
            raise _error(400, "dataset", "give exactly one of 'dataset' (a registered name) or 'inline'")
        if req.dataset is not None:
            if req.dataset not in meta:
                raise _error(404, "dataset", f"unknown dataset {req.dataset!r}; registered: {', '.join(meta)}")
            return {"dataset": req.dataset, "model": req.dataset}, np.asarray(meta[req.dataset]["labels"])
        model = req.model or next(iter(meta))
        if model not in meta:
            raise _error(404, "model", f"unknown model {model!r}; registered: {', '.join(meta)}")
        inline = req.inline
        if not inline.images or len(inline.images) != len(inline.labels):
            raise _error(400, "inline", f"{len(inline.images)} images and {len(inline.labels)} labels: "
                                        "need the same non-zero number")
        if len(inline.images) > self.max_inline_images:
            raise _error(400, "inline.images", f"{len(inline.images)} images is over the limit of {self.max_inline_images}")
        channels = meta[model]["image_size"][0]
        try:
            images = [decode_png(d, channels) for d in inline.images]
        except ValueError as e:
            raise _error(400, "inline.images", str(e)) from None
        if len({tuple(im.shape) for im in images}) != 1:
            raise _error(400, "inline.images", "images must all have the same size")
        if min(inline.labels) < 0 or max(inline.labels) >= meta[model]["num_classes"]:
            raise _error(400, "inline.labels", f"labels must be in [0, {meta[model]['num_classes'] - 1}]")
        images = torch.stack(images)
        labels = torch.tensor(inline.labels, dtype=torch.int64)
        job = {"dataset": "inline", "model": model, "images": images, "labels": labels, "images_key": images_id(images)}
        return job, labels.numpy()

    def _check_settings(self, req: InjectRequest) -> None:
        if not 0.0 <= req.gamma <= 1.0:
            raise _error(400, "gamma", f"gamma {req.gamma} is outside [0, 1]")
        if not 1 <= req.num_samples <= self.max_samples:
            raise _error(400, "num_samples", f"num_samples {req.num_samples} must be between 1 and {self.max_samples}")
        if not 2 <= req.steps <= self.max_steps:
            raise _error(400, "steps", f"steps {req.steps} must be between 2 and {self.max_steps}")
        if not 0 <= req.t_edit <= 999:
            raise _error(400, "t_edit", f"t_edit {req.t_edit} must be between 0 and 999")

    async def _content_pool(self, req: InjectRequest, job: dict, meta: dict, n_images: int) -> np.ndarray:
        if req.conflict_indices is not None:
            return _check_indices(req.conflict_indices, "conflict_indices", n_images)
        if job["dataset"] == "inline":
            raise _error(400, "conflict_indices", "inline datasets need conflict_indices (there is no biased "
                                                  "classifier to mine them with)")
        k = req.k or meta[job["dataset"]]["k"]
        counts = np.bincount(np.asarray(meta[job["dataset"]]["labels"]))
        if not 1 <= k <= counts.min():
            raise _error(400, "k", f"k {k} must be between 1 and {counts.min()} (the smallest class)")
        return np.asarray(await self.injector.mine.remote(job["dataset"], k))


def build_app(args: dict):
    """Serve application builder (``import_path: service.app:build_app``): ``args`` come from the Serve config.

    ``datasets``: name -> run settings (a preset plus ``RunConfig`` overrides); ``root``: where their run folders
    live; ``data_root``: the only folder dataset paths may resolve into; ``api_key``; request limits.
    """
    args = dict(args)
    injector_keys = ("datasets", "root", "data_root", "threads", "cache_size")
    injector = InjectorDeployment.bind(**{k: args.pop(k) for k in injector_keys if k in args})
    return Ingress.bind(injector, **args)
