"""A results table's cells as Ray tasks: each cell (a ratio and a seed of a benchmark, or any other run) is one
task with its resources, side by side as the cluster allows.

Locally (no ``RAY_ADDRESS``) a Ray session of ``cells x cpus`` CPUs starts and stops around the table; under
``ray job submit`` the same call uses the cluster, and its run folders must be on storage every node sees. A cell
is an ordinary run folder: one that finished is read back at once, and a cell whose worker dies midway is retried
(``MAX_RETRIES``) and resumes from that folder as a rerun does, so its results equal an uninterrupted run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

MAX_RETRIES = 2  # a cell whose worker died is run again this many times, resuming from its run folder


def run_cell(folder: str, preset: str, overrides: dict) -> dict:
    """One cell: the run folder ``folder`` of ``make_config(preset, overrides)``, run whole (or read back where it
    finished); its metrics."""
    from ..core.config import make_config
    from ..core.lock import release_folder
    from ..core.run import Run

    try:
        return Run(folder, make_config(preset, overrides), progress=False).all()
    finally:
        release_folder(folder)  # this worker may run other cells; the folder is free for any process again


def _cell(fn: Callable, job: tuple, threads: int):
    """One cell inside its Ray worker: ``fn(*job)`` with ``threads`` torch threads (a worker inherits no setting)."""
    import torch

    torch.set_num_threads(threads)
    return fn(*job)


def run_cells(fn: Callable, jobs: Sequence[tuple], cpus: int = 1, gpus: float = 0, cells: int = 1,
              describe: Callable[[tuple], str] = str, progress: bool = True) -> list:
    """``fn(*job)`` for every job as a Ray task of ``cpus`` CPUs (also its torch threads) and ``gpus`` GPUs; the
    results in the jobs' order. ``cells``: how many run side by side on a local session (a cluster decides by its
    own resources). Prints one line per cell as it finishes; the error of the first failed job (in the jobs' order) is
    raised once every other cell has finished, so none of their work is lost."""
    import ray

    from .tune import ray_session

    if not jobs:
        return []
    with ray_session(num_cpus=max(1, cells) * cpus):
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False)(_cell)
        t0 = time.time()
        pending = {task.remote(fn, job, cpus): i for i, job in enumerate(jobs)}
        results, errors = {}, {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            outcome = "done"
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayError as e:  # the cell's own error, or its worker lost past the retries
                own = isinstance(e, ray.exceptions.RayTaskError)
                errors[i], cause = (e.as_instanceof_cause(), e.cause) if own else (e, e)
                outcome = f"failed: {(str(cause).splitlines() or [type(cause).__name__])[0]}"
            if progress:
                print(f"cell {len(jobs) - len(pending)}/{len(jobs)} {describe(jobs[i])}: {outcome} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        if errors:
            raise errors[min(errors)]
    return [results[i] for i in range(len(jobs))]


__all__ = ["run_cells", "run_cell", "MAX_RETRIES"]
