"""A registered method's hyperparameters over a grid, chosen by validation accuracy (task labels only).

    python benchmarks/hparam_sweep.py --method jtt --grid first_epochs=1,2,5,10 lambda_up=5,20,50,100
    python benchmarks/hparam_sweep.py --method disent --grid lambda_dis_align=1,10 --dataset corrupted_mnist

Each grid point is an ordinary run folder with only that method (``hparams`` set), so reruns resume. Prints, and
writes to ``benchmarks/results/hparams_<method>.{md,json}``, the validation accuracy (what the choice reads) and
the test metrics (reported, never read by the choice) per point, mean over the seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path


from debias_table import RESULTS, add_job_options, command_line, run_jobs  # sibling script (its folder is on sys.path)
from diffinject.core.data import pct_name
from diffinject.core.methods import get
from diffinject.core.config import make_config, merge, read_settings
from diffinject.core.run import Run


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["a=1,2", "b=0.5"]`` -> ``{"a": [1, 2], "b": [0.5]}`` (numbers as int where they are whole)."""
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if not values:
            raise ValueError(f"--grid item {item!r} must be name=v1,v2,...")
        grid[name] = [int(v) if v.lstrip("-").isdigit() else float(v) for v in values.split(",")]
    return grid


def run_point(method: str, params: dict, ratio: float, seed: int, runs: str, settings: dict) -> dict:
    tag = "-".join(f"{k}{v:g}" for k, v in params.items()) or "defaults"
    folder = Path(runs) / f"{method}-{tag}-{pct_name(ratio)}-seed{seed}"
    cfg = make_config("default", merge(settings, {"ratio": ratio, "seed": seed, "methods": [method],
                                                  "hparams": {method: params}}))
    return Run(folder, cfg, progress=False).all()["methods"][method]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--grid", nargs="+", default=[], help="name=v1,v2,... per hyperparameter")
    p.add_argument("--dataset", default="cmnist")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", default="runs/hparams")
    p.add_argument("--name", default=None, help="results file stem (default: hparams_<method>[_<dataset>])")
    add_job_options(p)
    args = p.parse_args()
    grid = parse_grid(args.grid)
    get(args.method, {k: v[0] for k, v in grid.items()})  # unknown names: one-line error before any training
    settings = merge(read_settings(args.config) if args.config else {}, {"dataset": args.dataset})
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    runs = str(Path(args.runs).resolve())  # Ray workers read it
    jobs = [(args.method, pt, r, s, runs, settings) for pt in points for r in args.ratios for s in args.seeds]
    results = run_jobs(run_point, jobs, args.jobs, args.threads, args.gpus,
                       describe=lambda j: f"{j[1] or 'defaults'} {j[2]:g} % seed {j[3]}")
    n = len(args.ratios) * len(args.seeds)
    per_point = [results[i * n:(i + 1) * n] for i in range(len(points))]  # each point's runs, ratios x seeds
    rows = [{"params": pt, **{c: round(statistics.fmean(r[c] for r in got), 2)
                              for c in ("valid", "unbiased", "conflicting")}} for pt, got in zip(points, per_point)]
    best = max(rows, key=lambda r: r["valid"])
    lines = [f"{args.method} on {args.dataset}, ratios {args.ratios}, seeds {args.seeds}: chosen by validation "
             "accuracy (task labels); test shown, never read by the choice.", "",
             "| " + " | ".join(grid or ["settings"]) + " | valid | test unbiased | test conflicting |",
             "|---" * (max(1, len(grid)) + 3) + "|"]
    for r in rows:
        mark = " (chosen)" if r is best else ""
        lines.append("| " + (" | ".join(f"{v:g}" for v in r["params"].values()) or "defaults")
                     + f" | {r['valid']:.1f}{mark} | {r['unbiased']:.1f} | {r['conflicting']:.1f} |")
    lines.append(f"\nCommand: `{command_line()}`")
    lines.append("Per run: " + "; ".join(f"{'-'.join(f'{k}={v:g}' for k, v in pt.items()) or 'defaults'}: "
                                           + ", ".join(f"{r['unbiased']:.1f}" for r in got)
                                           for pt, got in zip(points, per_point)) + " (test unbiased, ratios x seeds).")
    md = "\n".join(lines) + "\n"
    name = args.name or f"hparams_{args.method}" + ("" if args.dataset == "cmnist" else f"_{args.dataset}")
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command_line(), "rows": rows,
                                                      "chosen": best["params"]}, indent=1))
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
