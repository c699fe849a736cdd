"""The Ingress deployment: the HTTP edge of the service (FastAPI under Ray Serve).

    client --HTTP--> Ingress (checks, pairing)  --DeploymentHandle, InjectJob-->  Injector (@serve.batch)

It checks every request (400/401/404/413/422/429 with a JSON body naming the field), picks the content and style
pairs, and hands the Injector a frozen :class:`~diffinject.service.job.InjectJob`. A request held by an Injector
replica that dies is retried once on another, and answers 503 with ``Retry-After`` if that fails too. Keys come
from the environment or a file, never the Serve config; the docs pages sit behind the key; one client's requests
in flight are bounded (deploy/README.md).
"""

import asyncio
import base64
import collections
import contextlib
import hmac
import io
import os
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from diffinject.core.export import made_by, synthetic_entries, zip_bytes
from diffinject.core.injection import InjectionConfig, SettingError, plan_pairs
from diffinject.workers.injector import images_id

from .job import InjectJob
from .schemas import DatasetInfo, ErrorResponse, InjectRequest, InjectResponse, SyntheticSample

# FastAPI's own docs routes are off: the Ingress serves /docs, /redoc and /openapi.json itself, behind the key.
api = FastAPI(title="diffinject", version=version("diffinject"), docs_url=None, redoc_url=None, openapi_url=None,
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
_REPLICA_GONE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError)


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
            source, labels = await self._resolve_dataset(req, meta)
            cfg = self._injection(req, meta[source["model"]]["injection"])
            n_images = len(labels)
            content = await self._content_pool(req, source.get("dataset"), meta, n_images)
            style_pool = _check_indices(req.style_indices, "style_indices", n_images)
            try:
                pairs = plan_pairs(labels, content, req.num_samples, req.seed, style_pool)
            except ValueError as e:  # every pool class has no other class to take a style from
                field = "style_indices" if style_pool is not None else "inline.labels" if req.inline else "dataset"
                raise _error(400, field, str(e)) from None
            job = InjectJob(content=pairs.content, style=pairs.style, seed=req.seed, cfg=cfg, **source)
            t1 = time.time()
            out = await self._call(self.injector.options(multiplexed_model_id=job.model).generate, job)
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
        return InjectResponse(dataset="inline" if job.inline else job.dataset, samples=samples,
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
        """Where the request's images come from (``InjectJob``'s dataset, model and inline fields) and their labels."""
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
        return {"model": model, "images": images, "labels": labels, "images_key": images_id(images)}, labels.numpy()

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

    async def _content_pool(self, req: InjectRequest, dataset: str | None, meta: dict, n_images: int) -> np.ndarray:
        if req.conflict_indices is not None:
            return _check_indices(req.conflict_indices, "conflict_indices", n_images)
        if dataset is None:
            raise _error(400, "conflict_indices", "inline datasets need conflict_indices (there is no biased "
                                                  "classifier to mine them with)")
        k = req.k if req.k is not None else meta[dataset]["k"]
        counts = np.bincount(np.asarray(meta[dataset]["labels"]))
        if not 1 <= k <= counts.min():
            raise _error(400, "k", f"k {k} must be between 1 and {counts.min()} (the smallest class)")
        return np.asarray(await self._call(self.injector.mine, dataset, k))

