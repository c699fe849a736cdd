"""The ``diffinject`` command: core's commands (``run``, ``train-diffusion``) plus the Ray ones.

``run --workers N`` fans the generation stage out over N injection actors; ``tune`` sweeps K and gamma with
Ray Tune; ``prepare`` trains what a Serve config's datasets need before ``serve run``; ``export`` writes a run's
synthetic samples as an image folder. Ray is imported only by
the commands that use it.
"""

from __future__ import annotations

import sys

from core import cli as core_cli


def build_parser():
    p = core_cli.build_parser()
    run = p.commands.choices["run"]
    run.add_argument("--workers", type=int, default=0,
                     help="fan the generation stage out over N Ray injection actors (0: in this process)")
    run.add_argument("--worker-threads", type=int, default=1, help="torch CPU threads per injection actor")
    run.set_defaults(make_generator=_generator)
    from . import tune  # light: Ray is imported only when a sweep runs

    tune.add_parser(p.commands)
    prep = p.commands.add_parser("prepare", help="train what the datasets registered in a Serve config need (U-Net, "
                                                 "biased classifier) into their run folders, before `serve run`")
    prep.add_argument("config", help="the Serve config, e.g. deploy/serve.yaml (run from the folder `serve run` uses)")
    prep.set_defaults(func=cmd_prepare)
    exp = p.commands.add_parser("export", help="write a run's synthetic samples as an image folder "
                                               "(DIR/{label}/{name}.png) with manifest.csv, for your own training code")
    exp.add_argument("run_dir", help="a finished run folder (diffinject run --out)")
    exp.add_argument("--to", required=True, help="a new (or empty) folder")
    exp.add_argument("--with-real", action="store_true", help="add the training images: DIR is the debiased training set")
    exp.add_argument("--corpus", action="store_true", help="the diffinject-corpus row's samples instead of the label-free ones")
    exp.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from core.export import export_run

    done = export_run(args.run_dir, args.to, args.with_real, "synthetic-corpus" if args.corpus else "synthetic")
    print(f"{done.synthetic} synthetic and {done.real} real images in {done.folder} (manifest.csv lists them)")
    return 0


def cmd_prepare(args) -> int:
    """Every registered dataset of the config's diffinject applications: its U-Net (trained, resumable, or copied
    from a shipped or given folder) and its biased classifier, in the run folder the service will read."""
    from core.pipeline import read_settings
    from service.app import registered_runs

    apps = [a for a in read_settings(args.config, "Serve config").get("applications", [])
            if str(a.get("import_path", "")).startswith("service.app")]
    if not apps:
        raise ValueError(f"{args.config} has no application with import_path service.app:build_app")
    for app in apps:
        settings = app.get("args", {})
        runs = registered_runs(settings.get("datasets", {}), settings.get("root", "runs/serve"),
                               settings.get("data_root", "."))
        for name, run in runs.items():
            run.progress = True
            unet = run.unet_dir()
            run.biased()
            print(f"{name}: U-Net {unet}, biased classifier {run.dir / 'biased' / 'model.pt'}", flush=True)
    return 0


def _generator(args):
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers} must be 0 or more")
    if args.workers == 0:
        return None
    from .injector import ray_generator

    return ray_generator(args.workers, args.worker_threads)


def main(argv: list[str] | None = None) -> int:
    return core_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
