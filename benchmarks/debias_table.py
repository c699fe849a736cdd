"""Vanilla, LfF, DiffInject (and the oracle ceiling) on the embedded Colored MNIST: ratios x seeds.

    python benchmarks/debias_table.py                       # 0.5/1/2/5 %, seeds 0 1 2, default preset
    python benchmarks/debias_table.py --ratios 1 --seeds 0  # one cell
    python benchmarks/debias_table.py --jobs 2 --unet core/pretrained/cmnist-1pct \
        --config benchmarks/configs/former-defaults.yaml --runs runs/bench-v1 --name debias_table_v1

Each (ratio, seed) is an ordinary run folder under --runs (resumable: rerunning skips finished runs). Writes
``benchmarks/results/debias_table.{md,json}`` with mean and standard deviation of unbiased, aligned,
conflicting and worst-group accuracy, the injection report, the command, the machine and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import pct_name  # noqa: E402
from core.diagnostics import REPORT_KEYS  # noqa: E402
from core.pipeline import NAMES, Run, make_config, merge, read_settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("unbiased", "aligned", "conflicting", "worst_group")


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def add_job_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--threads`` and ``--jobs``: the settings of every run, and the options of :func:`run_jobs`."""
    p.add_argument("--config", default=None, help="YAML file of settings for every run (as `diffinject run --config`)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (per job)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side in worker processes")


def run_jobs(fn, jobs: list[tuple], n_jobs: int = 1, threads: int | None = None) -> list:
    """``fn(*job)`` for every job, in order; with ``n_jobs`` > 1 side by side in worker processes, each with its
    share of the cores (or ``threads``) as torch threads, else here with ``threads`` if given."""
    if n_jobs <= 1:
        if threads:
            torch.set_num_threads(threads)
        return [fn(*job) for job in jobs]
    threads = threads or max(1, (os.cpu_count() or 1) // n_jobs)
    with ProcessPoolExecutor(n_jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return list(pool.map(fn, *zip(*jobs)))


def run_cell(preset: str, ratio: float, seed: int, unet: str | None, runs: str, settings: dict | None = None) -> dict:
    over = merge(settings or {}, {"ratio": ratio, "seed": seed} | ({"unet": unet} if unet else {}))
    folder = Path(runs) / f"{preset}-{pct_name(ratio)}-seed{seed}"
    print(f"== {folder}", flush=True)
    return Run(folder, make_config(preset, over), progress=False).all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="default")
    p.add_argument("--unet", default=None, help="U-Net folder for every run (default: the preset's)")
    p.add_argument("--runs", default="runs/bench", help="parent folder of the run folders")
    p.add_argument("--name", default="debias_table", help="results file stem")
    add_job_options(p)
    args = p.parse_args()

    t0 = time.time()
    cells = [(ratio, seed) for ratio in args.ratios for seed in args.seeds]
    settings = read_settings(args.config) if args.config else {}
    jobs = [(args.preset, ratio, seed, args.unet, args.runs, settings) for ratio, seed in cells]
    results = run_jobs(run_cell, jobs, args.jobs, args.threads)
    per_run = dict(zip(cells, results))
    wall = time.time() - t0

    table = {}
    for ratio in args.ratios:
        runs = [per_run[(ratio, s)] for s in args.seeds]
        cell = {m: {c: mean_std([r["methods"][m][c] for r in runs]) for c in COLUMNS} for m in runs[0]["methods"]}
        cell["mining_precision"] = mean_std([r["mining"]["precision"] for r in runs])
        reports = [r["injection"]["report"] for r in runs if r.get("injection") and r["injection"].get("report")]
        if reports:
            cell["injection_report"] = {k: mean_std([rep[k] for rep in reports]) for k in REPORT_KEYS}
            cell["biased_model_wrong"] = mean_std([r["injection"]["biased_model_wrong"] for r in runs])
        table[pct_name(ratio)] = cell

    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} job(s)",
        "torch": torch.__version__,
        "wall_seconds": round(wall, 1),
        "seeds": args.seeds,
        "config": make_config(args.preset, merge(settings, {"unet": args.unet} if args.unet else {})).to_dict(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "table": table}, indent=1))
    md = render(table, args, meta)
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


def render(table: dict, args, meta: dict) -> str:
    pcts = list(table)
    methods = [m for m in NAMES if m in table[pcts[0]]]
    lines = [f"Unbiased / bias-conflicting test accuracy (%), mean ± std over seeds {', '.join(map(str, args.seeds))}.", "",
             "| method | " + " | ".join(pcts) + " |", "|---" * (len(pcts) + 1) + "|"]
    for m in methods:
        cells = [f"{table[p][m]['unbiased']['mean']:.1f} ± {table[p][m]['unbiased']['std']:.1f} / "
                 f"{table[p][m]['conflicting']['mean']:.1f}" for p in pcts]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Aligned and worst-group accuracy (%):", "", "| method | " + " | ".join(pcts) + " |",
              "|---" * (len(pcts) + 1) + "|"]
    for m in methods:
        cells = [f"{table[p][m]['aligned']['mean']:.1f} / {table[p][m]['worst_group']['mean']:.1f}" for p in pcts]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    if "injection_report" in table[pcts[0]]:
        lines += ["", "Injection report (% of synthetic samples, mean over seeds) and mining precision:", "",
                  "| ratio | " + " | ".join(REPORT_KEYS) + " | biased model wrong | mining precision |",
                  "|---" * (len(REPORT_KEYS) + 3) + "|"]
        for p in pcts:
            rep = table[p]["injection_report"]
            lines.append(f"| {p} | " + " | ".join(f"{rep[k]['mean']:.1f}" for k in REPORT_KEYS)
                         + f" | {table[p]['biased_model_wrong']['mean']:.1f} | {table[p]['mining_precision']['mean']:.1f} |")
    lines += ["", f"Command: `{meta['command']}`; {meta['machine']}; torch {meta['torch']}; "
                  f"wall time {meta['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
