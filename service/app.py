"""The DiffInject service: Ray Serve with a FastAPI ingress, laid out the way Ray documents it.

    Ingress (FastAPI: validation, pairing, PNG coding)  --DeploymentHandle-->  Injector (@serve.batch)

``Injector`` holds the registered datasets (each one a ``core.pipeline.Run`` folder: images, biased classifier,
U-Net) and one ``workers.injector.Injector`` per U-Net; requests that arrive together are generated in one
batch (size and wait come from the Serve config's ``user_config``). Per-sample seeds and fixed-size U-Net batches
(``bucket``) make a sample's pixels exactly independent of the batch it lands in. Start it with
``serve run deploy/serve.yaml``.

Faults: a request that fails inside a batch fails alone (its batch-mates get their images); a request held by an
injector replica that dies is retried once on another, and answers 503 with ``Retry-After`` if that fails too.
Trust: see deploy/README.md (keys from the environment or a file, docs behind the key, one client's queue bounded).
"""


import asyncio
import base64
import collections
import contextlib
import functools
import gc
import hmac
import io
import os
import threading
import time
import weakref
from dataclasses import asdict, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from diffinject.core.export import made_by, png_bytes, synthetic_entries, zip_bytes
from diffinject.core.injection import InjectionConfig, SettingError, plan_pairs
from diffinject.core.mining import mine
from diffinject.core.classifier import MLP, SmallCNN, build_classifier
from diffinject.core.diffusion import is_unet
from diffinject.core.pipeline import SHIPPED, Run, make_config
from diffinject.workers.injector import Injector, check_job, images_id, run_isolated

from .schemas import DatasetInfo, ErrorResponse, InjectRequest, InjectResponse, SyntheticSample

# FastAPI's own docs routes are off: the Ingress serves /docs, /redoc and /openapi.json itself, behind the key.
api = FastAPI(title="diffinject", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
              description="Synthetic bias-conflict images by diffusion h-space injection (DiffInject).")

_STATUS = {400: "a value out of its range or inconsistent with the dataset; `detail.field` names it",
           401: "missing or wrong `x-api-key` (when the service has a key)",
           404: "unknown dataset or model",
           413: "request body over `max_body_bytes`",
           422: "body not valid against the schema (wrong type, unknown field): FastAPI's list of errors",
           429: "this key (or client) already has `max_requests_per_key` requests in flight; see `Retry-After`",
           503: "the injector replica holding the request stopped, or none is up yet; retry after `Retry-After`"}


def _responses(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _STATUS[c]} for c in codes}


def _error(status: int, field: str | None, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, detail={"field": field, "message": message}, headers=headers)


def check_relative(value: str, what: str) -> None:
    """Settings that name files (a dataset's ``data_root``, its ``unet``) must stay under the service's folders:
    an absolute path or a ``..`` is refused, whatever it resolves to."""
    path = PurePosixPath(str(value).replace("\\", "/"))
    if path.is_absolute() or Path(str(value)).is_absolute() or ".." in path.parts:
        raise ValueError(f"{what} {value!r} must be a relative path without '..'")


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


def registered_runs(datasets: dict, root: str = "runs/serve", data_root: str = ".") -> dict[str, Run]:
    """The run folder of every registered dataset (``name -> settings``: a preset plus ``RunConfig`` overrides).

    A dataset's file settings (``data_root``, ``unet``) must be relative without ``..``; folder datasets resolve
    inside ``data_root``. Builds no model: see :func:`unprepared` and ``diffinject prepare``."""
    if not datasets:
        raise ValueError("the service needs at least one registered dataset (args.datasets)")
    base = Path(data_root).resolve()
    runs = {}
    for name, spec in datasets.items():
        spec = dict(spec or {})
        cfg = make_config(spec.pop("preset", "default"), spec)
        for key in ("data_root", "unet"):  # file settings stay under the service's folders
            if getattr(cfg, key) not in (None, SHIPPED):
                check_relative(getattr(cfg, key), f"dataset {name!r}: {key}")
        if cfg.data_root is not None:
            cfg.data_root = str((base / cfg.data_root).resolve())
        runs[name] = Run(Path(root) / name, cfg, progress=False)
    return runs


def unprepared(run: Run) -> list[str]:
    """What a run folder lacks before it can be served: its U-Net (unless one is to be copied: a shipped or given
    folder), and its biased classifier (mining) unless that is the MLP or the small CNN of small images, which train
    in seconds (the embedded benchmarks' CNN: under half a minute on two cores).
    The rest takes minutes to hours: never inside a replica."""
    missing = []
    if run.unet_source() is None and not is_unet(run.dir / "unet"):
        missing.append(f"a trained U-Net in {run.dir / 'unet'}")
    model = build_classifier(run.cfg.mining.classifier, run.ds.image_shape, run.ds.num_classes)
    quick = isinstance(model, (MLP, SmallCNN))
    if not quick and not (run.dir / "biased" / "model.pt").exists():
        missing.append(f"the biased classifier {run.dir / 'biased' / 'model.pt'}")
    return missing


@serve.deployment(name="Injector")
class InjectorDeployment:
    """Registered datasets, their U-Nets loaded on demand (Serve's model multiplexing, at most
    ``max_models_per_replica`` per replica, least recently used first out); batches injection jobs from many
    requests, one dataset's U-Net per batch (Serve splits batches by model id)."""

    def __init__(self, datasets: dict, root: str = "runs/serve", data_root: str = ".", threads: int | None = None,
                 cache_size: int = 4096, bucket: int | None = 8, max_models_per_replica: int = 2):
        self.runs = registered_runs(datasets, root, data_root)
        missing = {name: unprepared(run) for name, run in self.runs.items()}
        if any(missing.values()):
            lines = "; ".join(f"{n} lacks {' and '.join(m)}" for n, m in missing.items() if m)
            raise ValueError(f"registered datasets are not prepared ({lines}): make them before serving with "
                             "`diffinject prepare deploy/serve.yaml` (or the pipeline as a `ray job submit`, "
                             "deploy/README.md), into the same `root`")
        for run in self.runs.values():  # what takes seconds: a shipped or given U-Net copied, a small biased model
            run.unet_dir()
            run.biased()
        threads = threads or _assigned_cpus()
        if bucket:  # pixels are batch-independent at power-of-two thread counts up to the bucket (core.injection)
            threads = 1 << (min(threads, bucket).bit_length() - 1)
        self.threads, self.cache_size, self.bucket = threads, cache_size, bucket
        self.loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # name -> Injector, while held
        _bound_models(self, type(self).injector, max_models_per_replica)
        # one injection at a time: the U-Net's h hook and the content cache are not thread-safe
        self._model_lock = threading.Lock()

    @serve.multiplexed(max_num_models_per_replica=2)  # the bound is set per deployment in __init__
    async def injector(self, name: str) -> Injector:
        """The U-Net of a registered dataset, loaded on first use and kept while Serve's LRU holds it."""
        run = self.runs[name]
        injector = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Injector(run.dir / "unet", threads=self.threads, cache_size=self.cache_size,
                                   bucket=self.bucket))
        self.loaded[name] = injector
        return injector

    def reconfigure(self, user_config: dict) -> None:
        """Batch settings from the Serve config: ``max_batch_size``, ``batch_wait_timeout_s``."""
        self.generate.set_max_batch_size(int(user_config.get("max_batch_size", 16)))
        self.generate.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.05)))

    def describe(self) -> dict:
        return {name: {"labels": run.ds.train.labels.tolist(), "num_classes": run.ds.num_classes,
                       "image_size": list(run.ds.image_shape), "k": run.cfg.mining.k, "model": str(run.dir / "unet"),
                       "injection": asdict(run.cfg.injection)}
                for name, run in self.runs.items()}

    def info(self) -> dict:
        """This replica's process and the U-Nets it holds (the fault benchmark and tests find a replica by its pid)."""
        gc.collect()  # a U-Net Serve's LRU let go of is gone once collected
        return {"pid": os.getpid(), "loaded": {name: inj.info() for name, inj in self.loaded.items()}}

    def mine(self, name: str, k: int) -> list[int]:
        """Top-K per class by the dataset's biased classifier (trained once, kept in the run folder), filtered as
        the run's mining settings say."""
        run = self.runs[name]
        tr = run.ds.train
        return mine(run.biased(), tr.images, tr.labels, k,
                    **run.cfg.mining.filters).indices.tolist()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[dict]) -> list[dict]:
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
            if isinstance(job["cfg"], dict):  # a handle caller's plain settings
                job["cfg"] = InjectionConfig(**job["cfg"])
            key = (job["dataset"], job.get("images_key"), job["model"], tuple(sorted(asdict(job["cfg"]).items())))
            groups.setdefault(key, []).append(i)
        loop = asyncio.get_running_loop()
        for members in groups.values():  # computed off the event loop, so the next batch can fill meanwhile
            injector = await self.injector(jobs[members[0]]["model"])
            out = await loop.run_in_executor(None, run_isolated, [jobs[i] for i in members],
                                             functools.partial(self._inject_group, injector))
            for i, result in zip(members, out):
                results[i] = result
        return [r | {"batch_requests": len(jobs)} for r in results]

    def _check(self, job: dict) -> dict | None:
        """What is wrong with a job that does not come through the Ingress's checks (any handle caller), or None."""
        if job.get("images") is None and job.get("dataset") not in self.runs:
            return {"status": 404, "field": "dataset", "message": f"unknown dataset {job.get('dataset')!r}"}
        if job.get("model") not in self.runs:
            return {"status": 404, "field": "model", "message": f"unknown model {job.get('model')!r}"}
        return check_job(job, len(self._images(job)[1]))

    def _images(self, job: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if job.get("images") is not None:
            return job["images"], job["labels"]
        train = self.runs[job["dataset"]].ds.train
        return train.images, train.labels

    def _inject_group(self, injector: Injector, jobs: list[dict]) -> list[dict]:
        first = jobs[0]
        images, labels = self._images(first)
        seeds = np.concatenate([np.full(len(j["content"]), j["seed"], dtype=np.int64) for j in jobs])
        ids = np.concatenate([np.arange(len(j["content"])) for j in jobs])
        with self._model_lock:
            result = injector.inject(
                images, labels, np.concatenate([j["content"] for j in jobs]),
                np.concatenate([j["style"] for j in jobs]), first["cfg"], seeds, ids, first.get("images_key"))
        syn, out, start = result.synthetic, [], 0
        for j in jobs:
            sl = slice(start, start + len(j["content"]))
            start = sl.stop
            # PNG coding here, in the replica's executor thread, not on the ingress's single event loop
            out.append({"png": [png_bytes(im) for im in syn.images[sl]], "labels": syn.labels[sl].tolist(),
                        "content": syn.content[sl].tolist(),
                        "style": syn.style[sl].tolist(), "inject_seconds": result.seconds, "unet": injector.model_id,
                        "evaluations_per_sample": result.evaluations / max(1, len(syn.labels))})
        return out


def _bound_models(deployment, loader, bound: int) -> None:
    """Set the per-replica bound of ``@serve.multiplexed`` from the Serve config (the decorator takes a constant):
    Serve keeps its LRU of models on the object under this attribute, made on first use unless already there."""
    from ray.serve.multiplex import _ModelMultiplexWrapper

    if bound < 1:
        raise ValueError(f"max_models_per_replica {bound} must be at least 1")
    setattr(deployment, "__serve_multiplex_wrapper", _ModelMultiplexWrapper(loader.__wrapped__, deployment, bound))


def _assigned_cpus() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def openapi_schema(max_samples: int, max_steps: int) -> dict:
    """FastAPI's schema plus the request model (/inject reads its body itself, size check before parsing), with
    this deployment's maxima stated on ``num_samples`` and ``steps`` and in the route's description."""
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    request = InjectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    request["properties"]["num_samples"]["maximum"] = max_samples
    request["properties"]["steps"]["anyOf"][0]["maximum"] = max_steps
    schema.setdefault("components", {}).setdefault("schemas", {}).update(request.pop("$defs", {}))
    schema["components"]["schemas"]["InjectRequest"] = request
    route = schema["paths"]["/inject"]["post"]
    route["description"] = (route.get("description", "") + f"\n\nThis deployment's limits: num_samples <= "
                            f"{max_samples}, steps <= {max_steps} (also in GET /datasets).")
    return schema


# Module-level helpers of the ingress sit above it: Serve pickles the FastAPI app when the class is decorated.
def _check_indices(indices: list[int] | None, field: str, n_images: int) -> np.ndarray | None:
    if indices is None:
        return None
    array = np.asarray(indices, dtype=np.int64)  # the schema bounds every index to [0, 2^31 - 1]
    if len(np.unique(array)) != len(array):
        raise _error(400, field, "has duplicate indices")
    bad = array[array >= n_images]
    if len(bad):
        raise _error(400, field, f"index {int(bad[0])} is out of range [0, {n_images - 1}]")
    return array


# pydantic's error types for a value of the right type outside its stated range: 400, not 422
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                 "finite_number"}


def _validation_error(errors: list[dict]) -> HTTPException:
    """A range error answers 400 naming its field (``inline.labels``), anything else FastAPI's 422 list."""
    ranges = [e for e in errors if e["type"] in _RANGE_ERRORS]
    if ranges and len(ranges) == len(errors):
        e = ranges[0]
        field = ".".join(str(part) for part in e["loc"] if isinstance(part, str))
        return _error(400, field, f"{field}: {e['msg']}")
    return HTTPException(422, detail=errors)


def read_keys(api_key_env: str | None, api_key_file: str | None) -> list[str]:
    """The accepted API keys: one per line of ``api_key_file``, else the value of the environment variable
    ``api_key_env`` (comma-separated for several). Never from the Serve config itself, which Serve prints and logs."""
    if api_key_file:
        try:
            text = Path(api_key_file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read api_key_file {api_key_file}: {e.strerror}") from None
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        if not keys:
            raise ValueError(f"api_key_file {api_key_file} holds no key")
        return keys
    value = os.environ.get(api_key_env or "", "")
    return [k.strip() for k in value.split(",") if k.strip()]


# the replica died (or is being replaced) while it held the request, or none is up: a retry can succeed
_REPLICA_GONE: tuple = ()
try:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    _REPLICA_GONE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError)
except ImportError:  # older Ray: actor errors only
    from ray.exceptions import RayActorError

    _REPLICA_GONE = (RayActorError,)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP edge: checks requests (400/401/404/413/422/429 with a JSON body naming the field), pairs, encodes.

    ``api_key_env``/``api_key_file``: where the keys are (never the config itself); ``require_api_key``: refuse to
    start without one; ``docs``: serve /docs, /redoc and /openapi.json (behind the key when there is one);
    ``max_requests_per_key``: requests one key (or, without keys, one client address) may have in flight at this
    replica; ``retry_after_s``: the ``Retry-After`` of a 429 or 503.
    """

    def __init__(self, injector: DeploymentHandle, api_key_env: str | None = "DIFFINJECT_API_KEY",
                 api_key_file: str | None = None, require_api_key: bool = False, docs: bool = True,
                 max_samples: int = 256, max_steps: int = 100, max_body_bytes: int = 8_000_000,
                 max_inline_images: int = 1024, max_requests_per_key: int = 64, retry_after_s: int = 10):
        self.injector = injector
        self._keys = [k.encode() for k in read_keys(api_key_env, api_key_file)]
        if require_api_key and not self._keys:
            raise ValueError(f"require_api_key is set but no key was found (api_key_file {api_key_file!r}, "
                             f"environment variable {api_key_env!r})")
        self.docs, self.max_body_bytes = docs, max_body_bytes
        self.max_samples, self.max_steps, self.max_inline_images = max_samples, max_steps, max_inline_images
        self.max_requests_per_key, self.retry_after_s = max_requests_per_key, retry_after_s
        self._in_flight: collections.Counter = collections.Counter()
        self._meta: dict | None = None

    async def meta(self) -> dict:
        if self._meta is None:
            self._meta = await self._call(self.injector.describe)
        return self._meta

    async def _call(self, method, *args):
        """A call to the injector deployment. A replica that dies holding it costs one retry (Serve routes it to
        another replica when there is one), then a 503 with ``Retry-After``: the request is safe to repeat."""
        for attempt in range(2):  # the first try, and one retry
            try:
                return await method.remote(*args)
            except _REPLICA_GONE as e:
                gone = e
                await asyncio.sleep(0.2 * (attempt + 1))
        raise _error(503, None, f"the injector is unavailable ({type(gone).__name__}); retry after "
                                f"{self.retry_after_s} s", headers={"Retry-After": str(self.retry_after_s)})

    def _client(self, request: Request) -> str:
        """Which key the request carries (its position among the keys), checked in constant time; 401 if none.
        Without keys, the client's address stands in for the key (the per-key bound)."""
        if not self._keys:
            return f"addr:{request.client.host if request.client else '?'}"
        given = request.headers.get("x-api-key", "").encode()
        matched = None
        for i, key in enumerate(self._keys):  # every key compared, so timing tells nothing about which
            if hmac.compare_digest(given, key):
                matched = i
        if matched is None:
            raise _error(401, "x-api-key", "missing or wrong API key")
        return f"key:{matched}"

    @contextlib.contextmanager
    def _slot(self, client: str):
        """Bounds one key's (or address's) requests in flight, so one client cannot fill the injector's queue."""
        if self._in_flight[client] >= self.max_requests_per_key:
            raise _error(429, "x-api-key", f"{self.max_requests_per_key} requests of this key are already in "
                                           "flight; wait for one to finish", headers={"Retry-After": "1"})
        self._in_flight[client] += 1
        try:
            yield
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    # -- docs: behind the key like every route but /healthz, or off (``docs: false``) -----------------------------
    def _check_docs(self, request: Request) -> None:
        if not self.docs:
            raise _error(404, None, "docs are off in this deployment (docs: false)")
        self._client(request)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._check_docs(request)
        return JSONResponse(openapi_schema(self.max_samples, self.max_steps))

    @api.get("/docs", include_in_schema=False)
    async def swagger(self, request: Request) -> HTMLResponse:
        self._check_docs(request)
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title=f"{api.title} - docs")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        self._check_docs(request)
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                              title=f"{api.title} - ReDoc")

    @api.get("/datasets", response_model=list[DatasetInfo], responses=_responses(401, 503))
    async def datasets(self, request: Request) -> list[DatasetInfo]:
        self._client(request)
        return [DatasetInfo(name=n, images=len(m["labels"]), num_classes=m["num_classes"], image_size=m["image_size"],
                            k=m["k"], model=m["model"], injection=m["injection"], max_samples=self.max_samples,
                            max_steps=self.max_steps)
                for n, m in (await self.meta()).items()]

    @api.post("/inject", response_model=InjectResponse, responses=_responses(400, 401, 404, 413, 422, 429, 503) | {
                  200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                        "description": "JSON (InjectResponse), or with `\"format\": \"zip\"` the image folder as a zip"}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/InjectRequest"}}}}})
    async def inject(self, request: Request) -> InjectResponse:
        """Synthetic bias-conflict samples for a registered or inline dataset (see the InjectRequest schema)."""
        t0 = time.time()
        client = self._client(request)
        with self._slot(client):
            req = await self._read_request(request)
            meta = await self.meta()
            job, labels = await self._resolve_dataset(req, meta)
            cfg = self._injection(req, meta[job["model"]]["injection"])
            n_images = len(labels)
            content = await self._content_pool(req, job, meta, n_images)
            style_pool = _check_indices(req.style_indices, "style_indices", n_images)
            try:
                pairs = plan_pairs(labels, content, req.num_samples, req.seed, style_pool)
            except ValueError as e:  # every pool class has no other class to take a style from
                field = "style_indices" if style_pool is not None else "inline.labels" if req.inline else "dataset"
                raise _error(400, field, str(e)) from None
            job |= {"content": pairs.content, "style": pairs.style, "seed": req.seed, "cfg": cfg}
            t1 = time.time()
            out = await self._call(self.injector.options(multiplexed_model_id=job["model"]).generate, job)
            t2 = time.time()
        if "error" in out:  # failed alone inside its batch
            raise _error(out["error"]["status"], out["error"]["field"], out["error"]["message"])
        if req.format == "zip":
            made = made_by(cfg, req.seed, out["unet"])
            items = synthetic_entries(out["labels"], out["content"], out["style"], out["png"], made)
            return Response(zip_bytes(items), media_type="application/zip",
                            headers={"Content-Disposition": 'attachment; filename="synthetic.zip"'})
        samples = [SyntheticSample(image=base64.b64encode(png).decode(), label=lab, content=c, style=s)
                   for png, lab, c, s in zip(out["png"], out["labels"], out["content"], out["style"])]
        return InjectResponse(dataset=job["dataset"], samples=samples,
                              unet_evaluations_per_sample=round(out["evaluations_per_sample"], 2),
                              batch_requests=out["batch_requests"],
                              timings={"queue_and_batch": round(t2 - t1 - out["inject_seconds"], 4),
                                       "inject_batch": round(out["inject_seconds"], 4),
                                       "total": round(time.time() - t0, 4)})

    # -- request checks (413 / 422 / 400 / 404), each naming its field -------------------------------------------
    async def _read_request(self, request: Request) -> InjectRequest:
        """Size (before the body is read whole), then the schema: ranges answer 400, other schema errors 422."""
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
            raise _validation_error(e.errors(include_url=False, include_context=False, include_input=False)) from None
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
        if len(inline.images) != len(inline.labels):
            raise _error(400, "inline", f"{len(inline.images)} images and {len(inline.labels)} labels: "
                                        "need the same non-zero number")
        if len(inline.images) > self.max_inline_images:
            raise _error(400, "inline.images", f"{len(inline.images)} images is over the limit of {self.max_inline_images}")
        channels = meta[model]["image_size"][0]
        try:  # off the event loop: other requests go on meanwhile
            images = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [decode_png(d, channels) for d in inline.images])
        except ValueError as e:
            raise _error(400, "inline.images", str(e)) from None
        if len({tuple(im.shape) for im in images}) != 1:
            raise _error(400, "inline.images", "images must all have the same size")
        if max(inline.labels) >= meta[model]["num_classes"]:
            raise _error(400, "inline.labels", f"labels must be in [0, {meta[model]['num_classes'] - 1}]")
        images = torch.stack(images)
        labels = torch.tensor(inline.labels, dtype=torch.int64)
        job = {"dataset": "inline", "model": model, "images": images, "labels": labels, "images_key": images_id(images)}
        return job, labels.numpy()

    def _injection(self, req: InjectRequest, dataset_settings: dict) -> InjectionConfig:
        """The job's injection settings: the request's fields, then the dataset's settings, then core's defaults;
        checked by core's ranges and this deployment's maxima, each error naming its field."""
        overrides = {f: getattr(req, f) for f in ("gamma", "t_edit", "skip_levels", "steps")
                     if getattr(req, f) is not None}
        cfg = replace(InjectionConfig(**dataset_settings), **overrides, num_samples=req.num_samples)
        try:
            cfg.validate()
        except SettingError as e:
            raise _error(400, e.field, str(e)) from None
        if req.num_samples > self.max_samples:
            raise _error(400, "num_samples", f"num_samples {req.num_samples} must be between 1 and {self.max_samples}")
        if cfg.steps > self.max_steps:
            raise _error(400, "steps", f"steps {cfg.steps} must be between 2 and {self.max_steps}")
        return cfg

    async def _content_pool(self, req: InjectRequest, job: dict, meta: dict, n_images: int) -> np.ndarray:
        if req.conflict_indices is not None:
            return _check_indices(req.conflict_indices, "conflict_indices", n_images)
        if job["dataset"] == "inline":
            raise _error(400, "conflict_indices", "inline datasets need conflict_indices (there is no biased "
                                                  "classifier to mine them with)")
        k = req.k if req.k is not None else meta[job["dataset"]]["k"]
        counts = np.bincount(np.asarray(meta[job["dataset"]]["labels"]))
        if not 1 <= k <= counts.min():
            raise _error(400, "k", f"k {k} must be between 1 and {counts.min()} (the smallest class)")
        return np.asarray(await self._call(self.injector.mine, job["dataset"], k))


def build_app(args: dict):
    """Serve application builder (``import_path: diffinject.service.app:build_app``): ``args`` come from the Serve config.

    ``datasets``: name -> run settings (a preset plus ``RunConfig`` overrides; file settings relative, without
    ``..``); ``root``: where their run folders live; ``data_root``: the folder dataset paths resolve into;
    ``bucket``: the fixed U-Net batch size; the rest go to :class:`Ingress` (keys, docs, limits).
    """
    args = dict(args)
    if "api_key" in args:
        raise ValueError("api_key in the Serve config would be printed by `serve run` and kept in Ray's logs: put the "
                         "key in an environment variable (api_key_env, default DIFFINJECT_API_KEY) or a file "
                         "(api_key_file)")
    injector_keys = ("datasets", "root", "data_root", "threads", "cache_size", "bucket", "max_models_per_replica")
    injector = InjectorDeployment.bind(**{k: args.pop(k) for k in injector_keys if k in args})
    return Ingress.bind(injector, **args)
