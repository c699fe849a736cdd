"""The Serve app: POST /inject, GET /datasets, /healthz, and every class of bad input."""

import base64
import io
import socket

import numpy as np
import pytest
import requests
from PIL import Image

KEY = "test-key"
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_cluster, quick_run):
    from ray import serve

    from service.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"datasets": {quick_run.dir.name: {"preset": "quick"}}, "root": str(quick_run.dir.parent),
                     "api_key": KEY, "max_samples": 32, "max_steps": 10, "max_body_bytes": 200_000})
    serve.run(app, name="diffinject", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _post(url, body, key=KEY, **kw):
    return requests.post(f"{url}/inject", json=body, headers={"x-api-key": key} if key else {}, timeout=120, **kw)


def _decode(b64: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG"
    return np.asarray(im)


def _png(image) -> str:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_health_datasets_and_docs(url, quick_run):
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}  # no key needed
    info = requests.get(f"{url}/datasets", headers={"x-api-key": KEY}, timeout=30).json()
    assert info == [{"name": quick_run.dir.name, "images": 3000, "num_classes": 10, "image_size": [3, 28, 28],
                     "k": 5, "model": info[0]["model"]}]
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/inject"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/InjectRequest"
    assert {"InjectRequest", "InlineDataset", "InjectResponse"} <= set(spec["components"]["schemas"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_inject_returns_pngs_with_content_labels_and_is_reproducible(url, quick_run):
    labels = quick_run.ds.train.labels.numpy()
    pool = [int(i) for i in quick_run.mined()[:6]]
    body = {"dataset": quick_run.dir.name, "conflict_indices": pool, "num_samples": 8, "gamma": 0.5, "steps": STEPS,
            "seed": 3}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["samples"]) == 8 and out["unet_evaluations_per_sample"] > 0
    for s in out["samples"]:
        assert _decode(s["image"]).shape == (28, 28, 3)
        assert s["content"] in pool and s["label"] == labels[s["content"]] and labels[s["style"]] != s["label"]
    again = _post(url, body).json()
    assert [s["image"] for s in again["samples"]] == [s["image"] for s in out["samples"]]
    other_seed = _post(url, body | {"seed": 4}).json()
    assert [s["image"] for s in other_seed["samples"]] != [s["image"] for s in out["samples"]]


def test_inject_mines_when_no_conflict_indices_and_honours_style_pool(url, quick_run):
    from core.mining import mine

    tr = quick_run.ds.train
    mined = set(mine(quick_run.biased(), tr.images, tr.labels, 2,
                     misclassified_only=quick_run.cfg.mining.misclassified_only).indices.tolist())
    styles = [int(i) for i in np.flatnonzero(tr.labels.numpy() < 5)[:40]]
    r = _post(url, {"dataset": quick_run.dir.name, "k": 2, "num_samples": 6, "steps": STEPS, "style_indices": styles})
    assert r.status_code == 200, r.text
    assert all(s["content"] in mined and s["style"] in styles for s in r.json()["samples"])


def test_inline_dataset(url, quick_run):
    tr = quick_run.ds.train
    idx = np.flatnonzero(np.isin(tr.labels.numpy(), [0, 1]))[:10]
    body = {"inline": {"images": [_png(tr.images[i]) for i in idx], "labels": tr.labels[idx].tolist()},
            "conflict_indices": [0, 1, 2], "num_samples": 4, "steps": STEPS}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["dataset"] == "inline" and len(out["samples"]) == 4
    for s in out["samples"]:
        assert s["label"] == int(tr.labels[idx[s["content"]]]) and 0 <= s["style"] < 10
    no_pool = _post(url, {k: v for k, v in body.items() if k != "conflict_indices"})
    assert no_pool.status_code == 400 and no_pool.json()["detail"]["field"] == "conflict_indices"
    bad_png = _post(url, body | {"inline": {"images": ["bm90IGEgcG5n"], "labels": [0]}, "conflict_indices": [0]})
    assert bad_png.status_code == 400 and "PNG" in bad_png.json()["detail"]["message"]


@pytest.mark.parametrize("change,status,field", [
    ({"dataset": "nope"}, 404, "dataset"),
    ({"dataset": "../../etc"}, 404, "dataset"),
    ({"conflict_indices": []}, 400, "conflict_indices"),
    ({"conflict_indices": [1, 1]}, 400, "conflict_indices"),
    ({"conflict_indices": [5000]}, 400, "conflict_indices"),
    ({"conflict_indices": [-1]}, 400, "conflict_indices"),
    ({"style_indices": [3000]}, 400, "style_indices"),
    ({"gamma": 1.5}, 400, "gamma"),
    ({"num_samples": 1000}, 400, "num_samples"),
    ({"num_samples": 0}, 400, "num_samples"),
    ({"steps": 500}, 400, "steps"),
    ({"k": 10_000, "conflict_indices": None}, 400, "k"),
    ({"num_samples": "many"}, 422, "num_samples"),
    ({"surprise": 1}, 422, "surprise"),
])
def test_bad_input_gets_its_status_and_names_the_field(url, quick_run, change, status, field):
    body = {"dataset": quick_run.dir.name, "conflict_indices": [1, 2, 3], "num_samples": 2, "steps": STEPS} | change
    r = _post(url, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    named = detail["field"] if isinstance(detail, dict) else [e["loc"][-1] for e in detail]
    assert field in named


def test_body_limit_and_api_key(url, quick_run):
    huge = {"dataset": quick_run.dir.name, "conflict_indices": list(range(50_000))}
    r = _post(url, huge)
    assert r.status_code == 413 and r.json()["detail"]["field"] == "body"
    body = {"dataset": quick_run.dir.name, "conflict_indices": [1], "num_samples": 1, "steps": STEPS}
    for key in (None, "wrong"):
        r = _post(url, body, key=key)
        assert r.status_code == 401 and r.json()["detail"]["field"] == "x-api-key"
    assert requests.get(f"{url}/datasets", timeout=30).status_code == 401
