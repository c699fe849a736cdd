"""The Serve app: POST /inject, GET /datasets, /healthz, every class of bad input, and faults (a poisoned batch,
a killed injector replica: last in the module, since it restarts the replica)."""

import base64
import io
import os
import shutil
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from dataclasses import asdict

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


PER_KEY = 6  # max_requests_per_key of the test service
COPIES = ("second", "third")  # two more registered datasets: copies of the quick run folder (multiplexing)
GAMMA_03 = "gamma-0.3"  # the quick run's U-Net registered with its own injection settings (gamma 0.3)


@pytest.fixture(scope="module")
def url(ray_cluster, quick_run, tmp_path_factory):
    from ray import serve

    from diffinject.service.app import Ingress, InjectorDeployment

    port = _free_port()
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"other-client-key\n{KEY}\n")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name in COPIES:  # prepared run folders: U-Net and biased classifier made beforehand
        shutil.copytree(quick_run.dir, quick_run.dir.parent / name, dirs_exist_ok=True)
    gamma_dir = quick_run.dir.parent / GAMMA_03
    (gamma_dir / "manifests").mkdir(parents=True, exist_ok=True)
    for part in ("unet", "biased"):  # its own run folder (another config), with the same models and their manifests
        shutil.copytree(quick_run.dir / part, gamma_dir / part, dirs_exist_ok=True)
        shutil.copy(quick_run.dir / "manifests" / f"{part}.json", gamma_dir / "manifests" / f"{part}.json")
    datasets = {n: {"preset": "quick"} for n in (quick_run.dir.name, *COPIES)}
    datasets[GAMMA_03] = {"preset": "quick", "injection": {"gamma": 0.3}}
    # as deploy/serve.yaml sets them: Serve's default max_ongoing_requests (5) would cap batches and the queue
    injector = InjectorDeployment.options(max_ongoing_requests=64).bind(
        datasets=datasets, root=str(quick_run.dir.parent), max_models_per_replica=2)
    app = Ingress.options(max_ongoing_requests=64).bind(
        injector, api_key_file=str(key_file), max_samples=32, max_steps=10, max_body_bytes=200_000,
        max_requests_per_key=PER_KEY, retry_after_s=2)
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
    quick = quick_run.cfg.injection
    assert info == [{"name": n, "images": 3000, "num_classes": 10, "image_size": [3, 28, 28], "k": 5,
                     "model": str(quick_run.dir.parent / n / "unet"), "max_samples": 32, "max_steps": 10,
                     "injection": asdict(quick) | ({"gamma": 0.3} if n == GAMMA_03 else {})}
                    for n in (quick_run.dir.name, *COPIES, GAMMA_03)]
    for page in ("openapi.json", "docs", "redoc"):  # behind the key like every route but /healthz
        assert requests.get(f"{url}/{page}", timeout=30).status_code == 401
        assert requests.get(f"{url}/{page}", headers={"x-api-key": KEY}, timeout=30).status_code == 200
    spec = requests.get(f"{url}/openapi.json", headers={"x-api-key": KEY}, timeout=30).json()
    route = spec["paths"]["/inject"]["post"]
    assert route["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/InjectRequest"
    assert {"InjectRequest", "InlineDataset", "InjectResponse"} <= set(spec["components"]["schemas"])
    # every range is stated, the deployment's maxima included, and every status the route answers is documented
    props = spec["components"]["schemas"]["InjectRequest"]["properties"]
    assert props["seed"]["minimum"] == 0 and props["seed"]["maximum"] == 2**63 - 1
    steps, gamma, t_edit = (props[f]["anyOf"][0] for f in ("steps", "gamma", "t_edit"))  # optional: [range, null]
    assert props["num_samples"]["maximum"] == 32 and steps["maximum"] == 10 and "num_samples <= 32" in route["description"]
    assert gamma["minimum"] == 0 and gamma["maximum"] == 1 and t_edit["maximum"] == 999
    assert {"minimum", "maximum"} <= set(props["k"]["anyOf"][0])
    assert {"200", "400", "401", "404", "413", "422", "429", "503"} <= set(route["responses"])
    assert {"200", "401", "503"} <= set(spec["paths"]["/datasets"]["get"]["responses"])


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
    with_skips = _post(url, body | {"skip_levels": 1}).json()
    assert [s["image"] for s in with_skips["samples"]] != [s["image"] for s in out["samples"]]


def test_inject_mines_when_no_conflict_indices_and_honours_style_pool(url, quick_run):
    from diffinject.core.mining import mine

    tr = quick_run.ds.train
    mined = set(mine(quick_run.biased(), tr.images, tr.labels, 2,
                     **quick_run.cfg.mining.filters).indices.tolist())
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
    ({"k": 0, "conflict_indices": None}, 400, "k"),
    ({"seed": -1}, 400, "seed"),
    ({"seed": 2**63}, 400, "seed"),
    ({"t_edit": 1000}, 400, "t_edit"),
    ({"skip_levels": 9}, 400, "skip_levels"),
    ({"skip_levels": 8}, 400, "skip_levels"),  # in the schema's range, beyond this U-Net's up blocks: the actor's 400
    ({"steps": 1}, 400, "steps"),
    ({"conflict_indices": [2**40]}, 400, "conflict_indices"),
    ({"inline": {"images": ["x"], "labels": [-1]}, "dataset": None}, 400, "inline.labels"),
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


@pytest.mark.parametrize("path", ["/etc/passwd", "../secrets", "data/../../x", "./.."])
def test_dataset_file_settings_refuse_absolute_paths_and_dotdot(path):
    from diffinject.workers.prepare import check_relative

    with pytest.raises(ValueError, match="relative path without '..'"):
        check_relative(path, "unet")
    check_relative("data/cmnist", "unet")  # a plain relative path is fine


@pytest.mark.parametrize("bound", [0, -1, 1.5, True])
def test_the_multiplexing_bound_must_be_a_positive_whole_number(bound):
    from diffinject.service.injector import multiplexed

    async def load(model_id: str) -> str:
        return model_id

    with pytest.raises(ValueError, match="max_models_per_replica"):
        multiplexed(load, bound)
    assert callable(multiplexed(load, 2))


def test_keys_never_come_from_the_serve_config():
    from diffinject.service.app import build_app

    with pytest.raises(ValueError, match="environment variable"):
        build_app({"datasets": {"x": {}}, "api_key": "in-clear-text"})


def test_body_limit_and_api_key(url, quick_run):
    huge = {"dataset": quick_run.dir.name, "conflict_indices": list(range(50_000))}
    r = _post(url, huge)
    assert r.status_code == 413 and r.json()["detail"]["field"] == "body"
    body = {"dataset": quick_run.dir.name, "conflict_indices": [1], "num_samples": 1, "steps": STEPS}
    for key in (None, "wrong"):
        r = _post(url, body, key=key)
        assert r.status_code == 401 and r.json()["detail"]["field"] == "x-api-key"
    assert requests.get(f"{url}/datasets", timeout=30).status_code == 401


def _body(quick_run, **over) -> dict:
    pool = [int(i) for i in quick_run.mined()[:6]]
    return {"dataset": quick_run.dir.name, "conflict_indices": pool, "num_samples": 4, "steps": STEPS} | over


def _together(url, bodies: list[dict]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: _post(url, b), bodies))


def test_a_poisoned_request_fails_alone_and_pixels_do_not_depend_on_the_batch(url, quick_run):
    """Four valid requests beside one with an out-of-range seed: the four get their images, exactly as alone."""
    valid = [_body(quick_run, seed=s, num_samples=n) for s, n in ((1, 3), (2, 5), (3, 4), (4, 2))]
    alone = [_post(url, b).json()["samples"] for b in valid]
    for _ in range(2):
        out = _together(url, [*valid, _body(quick_run, seed=2**63)])
        assert out[-1].status_code == 400 and out[-1].json()["detail"]["field"] == "seed"
        assert [r.status_code for r in out[:-1]] == [200] * 4
        assert [r.json()["samples"] for r in out[:-1]] == alone  # base64 PNGs: every pixel equal


def test_inside_the_batch_a_failing_job_fails_alone(url, quick_run):
    """Behind the Ingress (any handle caller): jobs batched with poisoned ones still get their images; core's
    checks name the bad field, and a job that is not an ``InjectJob`` is refused alone too."""
    from dataclasses import replace

    from ray import serve

    from diffinject.core.injection import InjectionConfig
    from diffinject.service.job import InjectJob

    handle = serve.get_deployment_handle("Injector", app_name="diffinject")
    name = quick_run.dir.name
    labels = quick_run.ds.train.labels.numpy()
    job = InjectJob(model=name, dataset=name, content=np.array([1, 2]), style=np.flatnonzero(labels != labels[1])[:2],
                    seed=0, cfg=InjectionConfig(steps=STEPS, t_edit=300, gamma=0.5))
    good = [replace(job, seed=s) for s in range(4)]
    bad = [replace(job, seed=2**64), replace(job, style=np.array([0, 10**6])),
           replace(job, cfg=InjectionConfig(steps=STEPS, gamma=2.0)), {"dataset": name, "model": name}]
    responses = [handle.generate.remote(j) for j in [*good[:2], *bad, *good[2:]]]
    out = [r.result() for r in responses]
    assert [o["error"]["field"] for o in out[2:6]] == ["seed", "style", "cfg.gamma", None]
    assert all(o["error"]["status"] == 400 for o in out[2:6]) and "InjectJob" in out[5]["error"]["message"]
    assert all("error" not in o and len(o["png"]) == 2 for o in out[:2] + out[6:])
    assert max(o["batch_requests"] for o in out) > 1  # they did share a batch


def test_one_key_cannot_fill_the_queue(url, quick_run):
    """Over ``max_requests_per_key`` in flight: 429 with Retry-After for that key; another key is unaffected."""
    out = _together(url, [_body(quick_run, seed=s, num_samples=8, steps=10) for s in range(PER_KEY + 4)])
    codes = sorted(r.status_code for r in out)
    assert set(codes) == {200, 429} and codes.count(200) >= PER_KEY, codes
    limited = next(r for r in out if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1" and limited.json()["detail"]["field"] == "x-api-key"
    assert _post(url, _body(quick_run), key="other-client-key").status_code == 200


def test_three_datasets_never_hold_more_than_the_bound_of_unets(url, quick_run):
    """Serve's model multiplexing: U-Nets load on demand, at most max_models_per_replica (2) per replica, least
    recently used out; each dataset answers as it would alone."""
    from ray import serve

    handle = serve.get_deployment_handle("Injector", app_name="diffinject")
    first = _post(url, _body(quick_run, seed=5)).json()["samples"]
    for name in (*COPIES, quick_run.dir.name):
        r = _post(url, _body(quick_run, seed=5) | {"dataset": name})
        assert r.status_code == 200 and r.json()["samples"] == first  # the same U-Net and images
        loaded = handle.info.remote().result()["loaded"]
        assert name in loaded and len(loaded) <= 2, loaded
    assert sorted(handle.info.remote().result()["loaded"]) == sorted([COPIES[1], quick_run.dir.name])


def test_a_datasets_own_injection_settings_reach_its_images(url, quick_run):
    """Registered with gamma 0.3 in the Serve config: a request that names no gamma gets exactly the images that
    in-process ``inject`` gives at gamma 0.3 (the request, then the dataset's settings, then core's defaults)."""
    from dataclasses import replace

    from diffinject.core.injection import plan_pairs
    from diffinject.workers.injector import Injector

    body = _body(quick_run, seed=9, dataset=GAMMA_03)
    served = _post(url, body)
    assert served.status_code == 200, served.text
    tr = quick_run.ds.train
    pairs = plan_pairs(tr.labels, np.asarray(body["conflict_indices"]), body["num_samples"], body["seed"])
    cfg = replace(quick_run.cfg.injection, gamma=0.3, steps=STEPS)
    local = Injector(quick_run.dir / "unet", threads=1, bucket=8).inject(
        tr.images, tr.labels, pairs.content, pairs.style, cfg, body["seed"]).synthetic.images
    images = [_decode(s["image"]) for s in served.json()["samples"]]
    assert all(np.array_equal(a, b.permute(1, 2, 0).numpy()) for a, b in zip(images, local))
    default = _post(url, body | {"dataset": quick_run.dir.name}).json()["samples"]
    assert [s["image"] for s in default] != [s["image"] for s in served.json()["samples"]]  # gamma 0.9 differs
    overridden = _post(url, body | {"gamma": quick_run.cfg.injection.gamma}).json()["samples"]
    assert [s["image"] for s in overridden] == [s["image"] for s in default]  # the request's field comes first


def test_inject_answers_a_zip_of_the_export_layout(url, quick_run):
    import csv
    import zipfile

    body = _body(quick_run, seed=11)
    as_json = _post(url, body).json()["samples"]
    r = _post(url, body | {"format": "zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    rows = list(csv.DictReader(io.StringIO(z.read("manifest.csv").decode())))
    assert len(rows) == len(as_json) and all(row["kind"] == "synthetic" and row["seed"] == "11" for row in rows)
    for row, sample in zip(rows, as_json):
        assert row["file"].startswith(f"{sample['label']}/") and int(row["content"]) == sample["content"]
        assert z.read(row["file"]) == base64.b64decode(sample["image"])  # the same PNG bytes


def test_an_unprepared_dataset_is_refused_at_start_saying_how_to_prepare_it(tmp_path):
    """A replica reads its run folders and writes nothing: whatever the biased classifier (seconds to train, or
    minutes), a folder without its U-Net and biased classifier is refused, naming both and the command that
    makes them."""
    from diffinject.service.app import InjectorDeployment

    for arch in ("mlp", "resnet18"):
        spec = {"preset": "quick", "mining": {"classifier": {"arch": arch}}}
        with pytest.raises(ValueError, match="diffinject prepare") as e:
            InjectorDeployment.func_or_class(datasets={"fresh": spec}, root=str(tmp_path))
        assert "fresh lacks a trained U-Net" in str(e.value) and "the biased classifier" in str(e.value)
    assert not any(tmp_path.iterdir())


def test_schemathesis_finds_no_server_error_and_no_undocumented_status(url, tmp_path):
    """A bounded property-based run over /openapi.json (a few hundred cases): no 5xx, every status and body as
    documented, invalid data refused with a 4xx."""
    import shutil
    import subprocess

    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "negative_data_rejection")
    cmd = [st, "run", f"{url}/openapi.json", "-H", f"x-api-key: {KEY}", "--checks", checks, "--max-examples", "40",
           "--seed", "1", "--workers", "2", "--generation-database", "none", "--request-timeout", "60", "--no-color",
           "--report", "junit", "--report-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its caches stay there
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_a_killed_injector_replica_answers_503_and_the_retry_succeeds(url, quick_run):
    """kill -9 of the injector replica while requests are in flight: 503 with Retry-After (or 200 from the new
    replica), never 500; every request succeeds on retry, with exactly the images it gets from the new replica
    afterwards. Last in the module: the replica restarts."""
    from ray import serve

    handle = serve.get_deployment_handle("Injector", app_name="diffinject")
    pid = handle.info.remote().result()["pid"]
    bodies = [_body(quick_run, seed=s, num_samples=8, steps=10) for s in range(4)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(_post, url, b) for b in bodies]
        time.sleep(1.5)  # requests reach the replica's batch
        os.kill(pid, signal.SIGKILL)
        out = [f.result() for f in futures]
    assert all(r.status_code in (200, 503) for r in out), [(r.status_code, r.text[:200]) for r in out]
    for r in out:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "2" and "injector is unavailable" in r.json()["detail"]["message"]
    deadline = time.time() + 120
    answered = []
    for b, r in zip(bodies, out):
        while r.status_code != 200 and time.time() < deadline:
            time.sleep(int(r.headers.get("Retry-After", 1)))
            r = _post(url, b)
        assert r.status_code == 200, r.text
        answered.append(r.json()["samples"])
    assert handle.info.remote().result()["pid"] != pid
    # nothing half-done survives the kill: each answer is exactly what the new replica gives the same request
    assert answered == [r.json()["samples"] for r in _together(url, bodies)]
