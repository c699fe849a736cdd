"""Step-count study: DDIM steps for inversion and generation against cost and final debiased accuracy.

    python benchmarks/steps_study.py                                    # 1000/200/100/50/20/10 steps, seeds 0 1 2, 1 %
    python benchmarks/steps_study.py --steps 20 10 --seeds 0 --runs runs/steps   # one quick slice

Each (steps, seed) is an ordinary DiffInject-only run folder under --runs (resumable), on the default preset
and the settings of --config otherwise. Step counts of --big-steps or more (default 500) use --big-budget synthetic
samples instead of the default count, so the 1000-step point fits a CPU; the table says which rows did. Reports per
step count: U-Net evaluations per synthetic image, images/s of the generation stage, and DiffInject's unbiased and
conflicting test accuracy (mean and std over seeds). The recommended default is the cheapest step count whose
mean unbiased accuracy is within 1 point of the largest step count's. Writes benchmarks/results/steps_study.{md,json}.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


from debias_table import add_job_options, command_line, mean_std, run_jobs  # sibling script (its folder is on sys.path)
from diffinject.core.data import pct_name
from diffinject.core.config import make_config, merge, read_settings
from diffinject.core.run import Run

RESULTS = Path(__file__).parent / "results"
METHOD = "diffinject-corpus"  # the row the study was measured on (the corpus U-Net: benchmarks/results/steps_study.md)


def run_point(steps: int, seed: int, ratio: float, samples: int | None, runs: str, settings: dict) -> dict:
    over = merge(settings, {"ratio": ratio, "seed": seed, "methods": [METHOD],
                            "injection": {"steps": steps, "num_samples": samples}})
    folder = Path(runs) / (f"steps{steps}-{pct_name(ratio)}-seed{seed}" + (f"-n{samples}" if samples else ""))
    print(f"== {folder}", flush=True)
    m = Run(folder, make_config("default", over), progress=False).all()
    inj, acc = m["injection"][METHOD], m["methods"][METHOD]
    return {"evaluations": inj["unet_evaluations_per_sample"], "images_per_second": inj["images_per_second"],
            "samples": inj["samples"], "unbiased": acc["unbiased"], "conflicting": acc["conflicting"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 200, 100, 50, 20, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=None, help="synthetic samples (default: the preset's)")
    p.add_argument("--big-steps", type=int, default=500, help="step counts from here on use --big-budget samples")
    p.add_argument("--big-budget", type=int, default=60, help="synthetic samples for the big step counts")
    p.add_argument("--runs", default="runs/steps")
    add_job_options(p)
    args = p.parse_args()

    t0 = time.time()
    points = [(s, seed) for s in args.steps for seed in args.seeds]
    settings = read_settings(args.config) if args.config else {}
    runs = str(Path(args.runs).resolve())  # Ray workers read it
    jobs = [(s, seed, args.ratio, args.big_budget if s >= args.big_steps else args.samples, runs, settings)
            for s, seed in points]
    results = dict(zip(points, run_jobs(run_point, jobs, args.jobs, args.threads, args.gpus,
                                        describe=lambda j: f"{j[0]} steps seed {j[1]}")))

    rows = []
    for s in args.steps:
        rs = [results[(s, seed)] for seed in args.seeds]
        rows.append({"steps": s, "samples": rs[0]["samples"], "evaluations": rs[0]["evaluations"],
                     "images_per_second": mean_std([r["images_per_second"] for r in rs]),
                     "unbiased": mean_std([r["unbiased"] for r in rs]),
                     "conflicting": mean_std([r["conflicting"] for r in rs])})
    reference = max(rows, key=lambda r: r["steps"])
    close = [r for r in rows if r["unbiased"]["mean"] >= reference["unbiased"]["mean"] - 1.0]
    chosen = min(close, key=lambda r: r["evaluations"])

    cmd = command_line()
    lines = [f"# Step-count study ({pct_name(args.ratio)}, seeds {', '.join(map(str, args.seeds))})", "",
             "| DDIM steps | synthetic samples | U-Net evals / image | images/s | unbiased % | conflicting % |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['samples']} | {r['evaluations']} | {r['images_per_second']['mean']:.2f} | "
                     f"{r['unbiased']['mean']:.1f} ± {r['unbiased']['std']:.1f} | "
                     f"{r['conflicting']['mean']:.1f} ± {r['conflicting']['std']:.1f} |")
    lines += ["", f"Cheapest within 1 point of {reference['steps']} steps: **{chosen['steps']} steps** "
                  f"({chosen['evaluations']} U-Net evaluations per image, "
                  f"{3000 / chosen['evaluations']:.0f}x fewer than the reference's 3,000).",
              "", f"Command: `{cmd}`; {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
                  f"wall time {(time.time() - t0) / 60:.1f} min."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "steps_study.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "steps_study.json").write_text(json.dumps({"command": cmd, "rows": rows, "chosen": chosen["steps"]},
                                                         indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
