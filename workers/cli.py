"""The ``diffinject`` command: core's commands (``run``, ``train-diffusion``) plus the Ray ones.

``run --workers N`` fans the generation stage out over N injection actors; ``tune`` sweeps K and gamma with
Ray Tune. Ray is imported only by the commands that use it.
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
    return p


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
