"""The Serve application: ``build_app`` wires the Ingress to the Injector from the Serve config's ``args``.

    Ingress (service/ingress.py)  --DeploymentHandle, InjectJob (service/job.py)-->  Injector (service/injector.py)
                                                                                      DatasetRegistry (service/datasets.py)

Start it with ``serve run deploy/serve.yaml`` after ``diffinject prepare deploy/serve.yaml``; the settings (datasets,
limits, batching, replicas, resources) live in that file, not in code.
"""

from .ingress import Ingress
from .injector import InjectorDeployment

# the Serve config's args that configure the Injector; the others configure the Ingress
INJECTOR_ARGS = ("datasets", "root", "data_root", "threads", "cache_size", "bucket", "max_models_per_replica")


def build_app(args: dict):
    """Serve application builder (``import_path: diffinject.service.app:build_app``): ``args`` come from the Serve config.

    ``datasets``: name -> run settings (a preset plus ``RunConfig`` overrides; file settings relative, without
    ``..``); ``root``: where their run folders live; ``data_root``: the folder dataset paths resolve into;
    ``bucket``: the fixed U-Net batch size; ``max_models_per_replica``: U-Nets one Injector replica holds; the rest
    go to :class:`~diffinject.service.ingress.Ingress` (keys, docs, limits).
    """
    args = dict(args)
    if "api_key" in args:
        raise ValueError("api_key in the Serve config would be printed by `serve run` and kept in Ray's logs: put the "
                         "key in an environment variable (api_key_env, default DIFFINJECT_API_KEY) or a file "
                         "(api_key_file)")
    injector = InjectorDeployment.bind(**{k: args.pop(k) for k in INJECTOR_ARGS if k in args})
    return Ingress.bind(injector, **args)
