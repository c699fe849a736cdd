"""The whole pipeline as a Ray job: ``diffinject run`` on a cluster, same arguments.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m diffinject.workers.job --preset default --workers 2 --out /shared/runs/cmnist-1pct

(against a local ``ray start --head``, set ``RAY_AUTH_MODE=disabled`` for both the head and ``ray job submit``;
on Kubernetes see ``deploy/rayjob.yaml``). Inside a submitted job ``RAY_ADDRESS`` is set, so with ``--workers N``
(N > 0) the driver joins the cluster and the injection actors run on its nodes; ``--workers 0`` keeps the
whole run in the driver process. The driver runs on the head node: give ``--out`` as an absolute path on storage
the nodes share (actors load the run's U-Net from it). A relative ``--out``, or none, lands in the job's working
directory, which Ray deletes with the job. Exits with the pipeline's exit code.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from . import cli
from .injector import ray_address


def main(argv: list[str] | None = None) -> int:
    argv = ["run", *(sys.argv[1:] if argv is None else argv)]
    args = cli.build_parser().parse_args(argv)  # usage errors exit 2 here, before any Ray work
    where = Path(args.out).resolve() if args.out else Path.cwd() / "runs"
    print(f"diffinject job: run folder {where}{'' if args.out else '/<default name>'} on {socket.gethostname()}",
          flush=True)
    if args.workers > 0 and ray_address():
        import ray

        ray.init()  # RAY_ADDRESS: the job's cluster (without it, the injector starts a local one)
        res, nodes = ray.cluster_resources(), sum(n["Alive"] for n in ray.nodes())
        print(f"diffinject job: cluster of {nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; "
              f"{args.workers} injection worker(s)", flush=True)
    rc = cli.main(argv)
    print(f"diffinject job: exit {rc}; run folder {where}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
