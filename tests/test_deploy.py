"""The deploy/ files, checked without a cluster: Ray's own Serve schema, importable code, pinned versions.

``rayservice.yaml``'s ``serveConfigV2`` must be ``serve.yaml`` plus exactly the Kubernetes-only changes of the
manifest's header: each application's ``runtime_env``, and the settings of ``K8S_ONLY`` with their reasons.
"""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAY_VERSION = "2.60.0"
# Where serveConfigV2 differs from serve.yaml: path -> (serve.yaml's value, the RayService's); None: absent.
# A path's ("Injector") step picks the deployment of that name.
K8S_ONLY = {
    # the Injector runs on the GPU worker group
    ("applications", 0, "deployments", "Injector", "ray_actor_options", "num_gpus"): (None, 1),
    # local: this machine only; pods: reached through the Service, so every interface ...
    ("http_options", "host"): ("127.0.0.1", "0.0.0.0"),
    # ... and therefore never without a key (from the Secret, in every pod's environment)
    ("applications", 0, "args", "require_api_key"): (False, True),
    # a GPU pays per U-Net call, a CPU per image: the GPU's fixed U-Net batch is a full Injector batch
    ("applications", 0, "args", "bucket"): (8, 64),
}


def _serve_schema(config: dict):
    from ray.serve.schema import ServeDeploySchema

    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    return validate(config)


def _load(name: str):
    path = DEPLOY / name
    assert path.is_file(), f"{path} is missing"
    return yaml.safe_load(path.read_text())


def _manifest(name: str, kind: str) -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    assert found[0]["apiVersion"] == "ray.io/v1"
    return found[0]


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return _load("serve.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return _manifest("rayservice.yaml", "RayService")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _manifest("rayjob.yaml", "RayJob")


def _project_deps() -> set[str]:
    """pyproject's dependencies by name, without Ray (which the rayproject/ray images bring)."""
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # 3.10: the installed package's metadata
        from importlib.metadata import requires

        deps = [r for r in requires("diffinject") or [] if "extra ==" not in r]
    else:
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    return names - {"ray"}


def _check_runtime_env(env: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields
    wd = env.get("working_dir", "")
    assert re.match(r"^(https?|s3|gs)://.+\.zip$", wd), f"{where}: working_dir must be a remote zip, got {wd!r}"
    pip = env.get("pip")
    pip = pip.get("packages", []) if isinstance(pip, dict) else pip or []
    names = {re.match(r"[A-Za-z0-9_.-]+", p).group(0).lower() for p in pip}
    missing = _project_deps() - names
    assert not missing, f"{where}: runtime_env pip lacks project dependencies {sorted(missing)}"


# --- serve.yaml ------------------------------------------------------------------------------------------


def test_serve_config_validates_with_ray_schema(serve_config):
    schema = _serve_schema(serve_config)
    assert [app.name for app in schema.applications] == [a["name"] for a in serve_config["applications"]]


def _import_path(path: str) -> tuple[str, str]:
    """Serve's ``module:attr`` or ``module.attr``."""
    module_name, sep, attr = path.partition(":")
    return (module_name, attr) if sep else tuple(path.rsplit(".", 1))


def test_serve_import_paths_and_deployments_exist(serve_config):
    for app in serve_config["applications"]:
        module_name, attr = _import_path(app["import_path"])
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attr, None)), f"{app['import_path']}: no such attribute"
        from ray.serve import Deployment

        names = {getattr(v, "name", None) for v in vars(module).values() if isinstance(v, Deployment)}
        for dep in app.get("deployments", []):
            assert dep["name"] in names, f"deployment {dep['name']!r} is not defined in {module_name} ({sorted(names)})"


def test_prepare_reads_the_datasets_each_config_serves(serve_config, rayservice, tmp_path):
    """``diffinject prepare`` (workers/prepare.py) finds the service's datasets in both configs without building
    anything, and says what a fresh run folder lacks."""
    from diffinject.workers.prepare import SERVICE_APP, missing, registered_in, served_datasets

    for config in (serve_config, yaml.safe_load(rayservice["spec"]["serveConfigV2"])):
        [app] = config["applications"]
        assert app["import_path"] == SERVICE_APP
        records = registered_in(config)
        assert [(r.name, r.folder) for r in records] == [(n, Path(app["args"]["root"]) / n) for n in app["args"]["datasets"]]
    with pytest.raises(ValueError, match=f"no application with import_path {SERVICE_APP}"):
        registered_in({"applications": [{"import_path": "service.app:build_app", "args": {}}]})
    [record] = served_datasets({"fresh": {"preset": "quick"}}, root=str(tmp_path)).values()
    assert missing(record) == [f"a trained U-Net in {tmp_path / 'fresh' / 'unet'}",
                               f"the biased classifier {tmp_path / 'fresh' / 'biased' / 'model.pt'}"]
    assert not any(tmp_path.iterdir())  # records and checks write nothing


# --- rayservice.yaml -------------------------------------------------------------------------------------


def _pop(config: dict, path: tuple):
    """Remove and return the value at ``path`` (None when absent); a string step into a list picks by ``name``."""
    node = config
    for step in path[:-1]:
        if isinstance(node, list) and isinstance(step, str):
            node = next((d for d in node if d.get("name") == step), {})
        else:
            node = node[step] if isinstance(node, list) else node.get(step, {})
    return node.pop(path[-1], None) if isinstance(node, dict) else None


def _without_k8s_only(config: dict, side: int) -> dict:
    """A config less what differs by design (runtime_env, K8S_ONLY), after checking each such value: ``side`` 0 is
    serve.yaml, 1 the RayService."""
    config = copy.deepcopy(config)
    for app in config.get("applications", []):
        app.pop("runtime_env", None)
    for path, values in K8S_ONLY.items():
        assert _pop(config, path) == values[side], f"{'.'.join(map(str, path))} should be {values[side]!r}"
    return config


def test_rayservice_serve_config_is_serve_yaml(rayservice, serve_config):
    v2 = rayservice["spec"]["serveConfigV2"]
    assert isinstance(v2, str), "serveConfigV2 must be a YAML string (a `|` block)"
    config = yaml.safe_load(v2)
    _serve_schema(config)
    base = _without_k8s_only(serve_config, 0)
    assert _without_k8s_only(config, 1) == base, (
        "serveConfigV2 differs from deploy/serve.yaml beyond runtime_env and K8S_ONLY: copy serve.yaml's change over")
    for app in config["applications"]:
        assert "runtime_env" in app, f"application {app['name']}: the RayService needs a runtime_env for the code"
        _check_runtime_env(app["runtime_env"], f"serveConfigV2 application {app['name']}")


def test_keys_never_in_the_configs_and_from_a_secret_on_every_pod(rayservice, serve_config):
    """No key in either config (Serve prints its config); the pods read it from a Secret; file settings relative."""
    from diffinject.workers.prepare import check_relative

    v2 = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    for config in (serve_config, v2):
        for app in config["applications"]:
            assert "api_key" not in app["args"], "a key in the Serve config is printed and logged"
            env_name = app["args"]["api_key_env"]
            for name, spec in app["args"]["datasets"].items():
                for key in ("data_root", "unet"):
                    if key in (spec or {}):
                        check_relative(spec[key], f"{name}.{key}")
    for c in _containers(rayservice["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env_name in env and "secretKeyRef" in env[env_name]["valueFrom"], f"{c['name']}: no key from a Secret"


def test_every_pod_runs_the_measured_request_path(rayservice):
    """Every pod starts Ray in the serve mode that benchmarks/ingress_load.py and fault_load.py measured as
    ``haproxy`` (Serve reads it when Ray starts, so it must be on every node, not in serveConfigV2)."""
    from benchmarks.service_load import SERVE_MODES

    for c in _containers(rayservice["spec"]["rayClusterConfig"]):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: env.get(k) for k in SERVE_MODES["haproxy"]} == SERVE_MODES["haproxy"], c["name"]
    assert "RAY_SERVE" not in rayservice["spec"]["serveConfigV2"]


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _check_cluster(cluster: dict, name: str) -> None:
    assert cluster["rayVersion"] == RAY_VERSION, f"{name}: rayVersion {cluster['rayVersion']!r}"
    for c in _containers(cluster):
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), f"{name}: image {c['image']}"


def test_rayservice_cluster_pins_ray(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    _check_cluster(cluster, "rayservice.yaml")
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    gpu = [c for c in workers if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")]
    assert gpu, "rayservice.yaml: no GPU worker group"
    for c in gpu:
        assert c["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert any(c["image"] == f"rayproject/ray:{RAY_VERSION}-py311" for c in _containers(cluster))


# --- rayjob.yaml -----------------------------------------------------------------------------------------


def test_rayjob_pins_ray_and_shuts_down(rayjob):
    spec = rayjob["spec"]
    _check_cluster(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    _check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), "rayjob.yaml runtimeEnvYAML")


def test_rayjob_entrypoint_is_accepted(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "diffinject.workers.job"], argv
    importlib.import_module(argv[2])
    from diffinject.workers.cli import build_parser

    args = build_parser().parse_args(["run", *argv[3:]])
    assert args.workers > 0 and args.out and Path(args.out).is_absolute()


def test_rayjob_run_folder_is_on_the_shared_volume(rayjob):
    """--out lies on a volume mounted at the same path on the head and every worker (actors read the U-Net)."""
    from diffinject.workers.cli import build_parser

    out = Path(build_parser().parse_args(["run", *shlex.split(rayjob["spec"]["entrypoint"])[3:]]).out)
    cluster = rayjob["spec"]["rayClusterSpec"]
    for c in _containers(cluster):
        mounts = [Path(m["mountPath"]) for m in c.get("volumeMounts", [])]
        assert any(out.is_relative_to(m) for m in mounts), f"{c['name']}: {out} is not on a mounted volume"
