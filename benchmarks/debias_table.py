"""Every method's row on a benchmark (Colored MNIST, Corrupted MNIST, Colored Fashion-MNIST): ratios x seeds.

    python benchmarks/debias_table.py                       # cmnist, 0.5/1/2/5 %, seeds 0 1 2, default preset
    python benchmarks/debias_table.py --ratios 1 --seeds 0  # one cell
    python benchmarks/debias_table.py --methods vanilla,lff,diffinject,diffinject-corpus,oracle --unet per-ratio
    python benchmarks/debias_table.py --dataset corrupted_mnist --unet per-ratio --jobs 2

``--unet per-ratio`` trains the label-free row's U-Net once per ratio, on that ratio's training split, in the
seed-0 run; the other seeds reuse it (one U-Net per benchmark and ratio). ``--unet DIR`` may hold ``{pct}``.
Each (ratio, seed) is an ordinary run folder under --runs (resumable: rerunning skips finished runs). Writes
``benchmarks/results/debias_table.{md,json}`` (``debias_table_<dataset>`` for another benchmark) with mean and
standard deviation of unbiased, aligned, conflicting and worst-group test accuracy, and of the validation accuracy
that chose each checkpoint, per method (``table[pct][method][metric] = {mean, std}``); the injection report and
biased-model disagreement per synthetic row, mining precision, and in ``meta`` the command, the machine, the wall
time and the U-Net behind each synthetic row (``unet_sources[method][pct]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


from diffinject.core.data import pct_name
from diffinject.core.diagnostics import REPORT_KEYS
from diffinject.core.config import METHODS, make_config, merge, read_settings, synthetic_source
from diffinject.core.run import TRAINED_HERE, trained_by
from diffinject.core.report import METRIC_COLUMNS, NAMES, bias_knowledge_phrase
from diffinject.workers.table import run_cell, run_cells

RESULTS = Path(__file__).parent / "results"


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def command_line() -> str:
    """This process's command as results files record it: ``python`` and its arguments, with ``~`` for the home
    folder, so that a results file names no one machine's paths."""
    return ("python " + " ".join(sys.argv)).replace(str(Path.home()), "~")


def add_job_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--threads``, ``--jobs`` and ``--gpus``: the settings of every run, and the options of
    :func:`run_jobs`."""
    p.add_argument("--config", default=None, help="YAML file of settings for every run (as `diffinject run --config`)")
    p.add_argument("--threads", type=int, default=None, help="CPUs (torch threads) per cell (default: the cores "
                                                             "shared among --jobs)")
    p.add_argument("--jobs", type=int, default=1, help="cells side by side on a local Ray session (on a cluster, "
                                                       "under `ray job submit`, its resources decide)")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per cell (where the cluster has them)")


def run_jobs(fn, jobs: list[tuple], n_jobs: int = 1, threads: int | None = None, gpus: float = 0,
             describe=str) -> list:
    """``fn(*job)`` for every job, each a Ray task (:func:`diffinject.workers.table.run_cells`): ``n_jobs`` side
    by side, each with ``threads`` CPUs (default: its share of the cores) and ``gpus`` GPUs."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    return run_cells(fn, jobs, cpus=threads, gpus=gpus, cells=n_jobs, describe=describe)


PER_RATIO = "per-ratio"  # --unet value: train once per ratio in the seed-0 run, reuse it for the other seeds


def cell_folder(runs: str, preset: str, ratio: float, seed: int) -> Path:
    return Path(runs).resolve() / f"{preset}-{pct_name(ratio)}-seed{seed}"  # absolute: Ray workers read it


def cell_job(preset: str, ratio: float, seed: int, unet: str | None, runs: str, settings: dict) -> tuple:
    """The (folder, preset, overrides) of one cell, for :func:`diffinject.workers.table.run_cell`."""
    over = {"ratio": ratio, "seed": seed}
    if unet == PER_RATIO:
        over["unet"] = None if seed == 0 else str(cell_folder(runs, preset, ratio, 0) / "unet")
    elif unet:
        over["unet"] = unet.format(pct=pct_name(ratio))
    return str(cell_folder(runs, preset, ratio, seed)), preset, merge(settings or {}, over)


def named_sources(metrics: dict, folder: str) -> dict:
    """The seed-0 run's own U-Net read as the other seeds name it: by runs folder and run."""
    for src in metrics["unet_sources"].values():
        if src["origin"] == TRAINED_HERE:
            src["origin"] = trained_by(Path(folder))
    return metrics


def summarise(per_run: dict, ratios: list[float], seeds: list[int]) -> tuple[dict, dict]:
    """``per_run[(ratio, seed)]`` metrics -> the table (``table[pct][method][metric] = {mean, std}`` plus the
    per-ratio extras) and ``unet_sources[method][pct]`` (the seeds' U-Net, or the list of them where they differ)."""
    table, sources = {}, {}
    for ratio in ratios:
        pct = pct_name(ratio)
        runs = [per_run[(ratio, s)] for s in seeds]
        cell = {m: {c: mean_std([r["methods"][m][c] for r in runs]) for c in METRIC_COLUMNS}
                for m in runs[0]["methods"]}
        if runs[0].get("injection"):  # the mined set feeds the synthetic rows: its precision is theirs
            cell["mining_precision"] = mean_std([r["mining"]["precision"] for r in runs])
        for m in runs[0]["methods"]:  # JTT's error set, scored like mining
            if "error_set" in runs[0]["methods"][m]:
                cell.setdefault("error_set", {})[m] = {k: mean_std([r["methods"][m]["error_set"][k] for r in runs])
                                                       for k in ("mined", "precision", "recall")}
        for m in runs[0].get("injection", {}):
            reports = [r["injection"][m]["report"] for r in runs if r["injection"][m].get("report")]
            if reports:
                cell.setdefault("injection_report", {})[m] = {k: mean_std([rep[k] for rep in reports])
                                                              for k in REPORT_KEYS}
            cell.setdefault("biased_model_wrong", {})[m] = mean_std([r["injection"][m]["biased_model_wrong"]
                                                                     for r in runs])
        for m in [m for m in runs[0]["methods"] if synthetic_source(m) in runs[0].get("unet_sources", {})]:
            seen = [r["unet_sources"][synthetic_source(m)] for r in runs]
            sources.setdefault(m, {})[pct] = seen[0] if all(x == seen[0] for x in seen) else seen
        table[pct] = cell
    return table, sources


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cmnist", help="benchmark: cmnist, corrupted_mnist or colored_fmnist")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)} (default: the dataset's)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="default")
    p.add_argument("--unet", default=None, help="the label-free row's U-Net for every run: a folder (may hold {pct}), "
                                                "'per-ratio' (train once per ratio, see above), or the preset's")
    p.add_argument("--runs", default=None, help="parent folder of the run folders (default: runs/bench[-<dataset>])")
    p.add_argument("--name", default=None, help="results file stem (default: debias_table[_<dataset>])")
    p.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                   help="earlier results files whose rows (methods) this run does not make are copied in, each "
                        "named in meta.reused with the command that measured it (the runs are deterministic)")
    add_job_options(p)
    args = p.parse_args()
    suffix = "" if args.dataset == "cmnist" else f"_{args.dataset}"
    args.name = args.name or f"debias_table{suffix}"
    args.runs = args.runs or f"runs/bench{suffix.replace('_', '-', 1)}"

    t0 = time.time()
    settings = read_settings(args.config) if args.config else {}
    settings = merge(settings, {"dataset": args.dataset} | ({"methods": args.methods.split(",")} if args.methods else {}))
    job = lambda ratio, seed: cell_job(args.preset, ratio, seed, args.unet, args.runs, settings)  # noqa: E731
    first = [(ratio, seed) for ratio in args.ratios for seed in args.seeds if seed == 0 or args.unet != PER_RATIO]
    rest = [(ratio, seed) for ratio in args.ratios for seed in args.seeds if (ratio, seed) not in first]
    per_run = {}
    for cells in (first, rest):  # with per-ratio U-Nets, the seed-0 runs train them before the other seeds start
        jobs = [job(*c) for c in cells]
        metrics = run_jobs(run_cell, jobs, args.jobs, args.threads, args.gpus, describe=lambda j: Path(j[0]).name)
        per_run.update(zip(cells, (named_sources(m, j[0]) for m, j in zip(metrics, jobs))))
    wall = time.time() - t0
    table, unet_sources = summarise(per_run, args.ratios, args.seeds)

    meta = {
        "command": command_line(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} job(s)",
        "torch": torch.__version__,
        "wall_seconds": round(wall, 1),
        # what the runs' stages took when they ran (a table re-rendered from finished runs has a wall time of ~0)
        "stage_seconds": round(sum(v for r in per_run.values() for v in r.get("stage_seconds", {}).values() if v), 1),
        "untimed_stages": sum(v is None for r in per_run.values() for v in r.get("stage_seconds", {}).values()),
        "seeds": args.seeds,
        "config": make_config(args.preset, settings).to_dict(),
        "unet_sources": unet_sources,
    }
    for path in args.reuse:
        reuse_rows(table, meta, json.loads(Path(path).read_text()), Path(path).name)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "table": table}, indent=1))
    md = render(table, args, meta)
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


def reuse_rows(table: dict, meta: dict, old: dict, name: str) -> None:
    """Copy into ``table`` the rows of an earlier results file ``old`` that it lacks, ratio by ratio (a ratio this
    run did not make at all comes whole, with its mining precision), with their per-ratio extras and U-Net sources.
    ``meta.reused[method]`` lists, per command that measured some of the row's ratios, the file it was copied from,
    that command (carried over where ``old`` had reused it in turn) and the ratios."""
    extras = ("injection_report", "biased_model_wrong", "error_set")
    for pct, old_cell in old["table"].items():
        cell = table.setdefault(pct, {})
        if "mining_precision" in old_cell:
            cell.setdefault("mining_precision", old_cell["mining_precision"])
        for method, row in old_cell.items():
            if method not in NAMES or method in cell:
                continue
            cell[method] = row
            for key in extras:
                if method in old_cell.get(key, {}):
                    cell.setdefault(key, {})[method] = old_cell[key][method]
            was = measured_by(old, method, pct, name)
            entries = meta.setdefault("reused", {}).setdefault(method, [])
            entry = next((e for e in entries if (e["from"], e["command"]) == (was["from"], was["command"])), None)
            if entry is None:
                entry = {"from": was["from"], "command": was["command"], "ratios": []}
                entries.append(entry)
            entry["ratios"].append(pct)
            source = row_unet(old["meta"], method).get(pct)
            if source is not None:
                meta["unet_sources"].setdefault(method, {})[pct] = source
    for pct in sorted(table, key=lambda p: float(p.removesuffix("pct"))):  # ratios in order, copied ones included
        table[pct] = table.pop(pct)


def row_unet(meta: dict, method: str) -> dict:
    """``meta.unet_sources`` of one row, by ratio: keyed by the row's method, or in files from before rows of one
    synthetic source could use different U-Nets (the source's rows were then made together), by that source."""
    sources = meta.get("unet_sources", {})
    return sources.get(method) or sources.get(synthetic_source(method)) or {}


def measured_by(old: dict, method: str, pct: str, name: str) -> dict:
    """The file and command that measured ``old``'s row of ``method`` at ``pct``: what ``old`` had reused it from
    (a list per command, or in older files one entry), else ``old`` itself (``name``) and its own command."""
    reused = old["meta"].get("reused", {}).get(method, [])
    for entry in reused if isinstance(reused, list) else [reused]:
        if pct in entry.get("ratios", [pct]):
            return entry
    return {"from": name, "command": old["meta"]["command"]}


def render(table: dict, args, meta: dict) -> str:
    pcts = list(table)
    methods = [m for m in NAMES if any(m in table[p] for p in pcts)]  # a reused row may cover fewer ratios
    cell = lambda p, m, text: text(table[p][m]) if m in table[p] else "-"  # noqa: E731
    seeds = f"seeds {', '.join(map(str, args.seeds))}"
    if meta.get("reused"):  # copied rows keep the seeds of the runs that measured them
        seeds += " for the rows this command made; copied rows (named below) over the seeds of their own command"
    lines = [f"Unbiased / bias-conflicting test accuracy (%), mean ± std over {seeds}.", "",
             "| method | " + " | ".join(pcts) + " |", "|---" * (len(pcts) + 1) + "|"]
    for m in methods:
        cells = [cell(p, m, lambda r: f"{r['unbiased']['mean']:.1f} ± {r['unbiased']['std']:.1f} / "
                                      f"{r['conflicting']['mean']:.1f}") for p in pcts]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in [m for m in methods if row_unet(meta, m)]:
        by_pct = row_unet(meta, m)
        lines.append(f"{NAMES[m]}: U-Net {unet_line({p: v for p, v in by_pct.items() if m in table.get(p, {})})}.")
    lines += ["", "Aligned and worst-group accuracy (%):", "", "| method | " + " | ".join(pcts) + " |",
              "|---" * (len(pcts) + 1) + "|"]
    for m in methods:
        cells = [cell(p, m, lambda r: f"{r['aligned']['mean']:.1f} / {r['worst_group']['mean']:.1f}") for p in pcts]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    for m in [m for m in methods if any(m in table[p].get("injection_report", {}) for p in pcts)]:
        lines += ["", f"Injection report, {NAMES[m]} (% of synthetic samples, mean over seeds; \"colour\" names the "
                      "bias attribute, the corruption on Corrupted MNIST) and mining precision:", "",
                  "| ratio | " + " | ".join(REPORT_KEYS) + " | biased model wrong | mining precision |",
                  "|---" * (len(REPORT_KEYS) + 3) + "|"]
        for p in [p for p in pcts if m in table[p].get("injection_report", {})]:
            rep = table[p]["injection_report"][m]
            lines.append(f"| {p} | " + " | ".join(f"{rep[k]['mean']:.1f}" for k in REPORT_KEYS)
                         + f" | {table[p]['biased_model_wrong'][m]['mean']:.1f} | {table[p]['mining_precision']['mean']:.1f} |")
    for m in [m for m in methods if any(m in table[p].get("error_set", {}) for p in pcts)]:
        per_pct = [(p, table[p]["error_set"][m]) for p in pcts if m in table[p].get("error_set", {})]
        lines += ["", f"{NAMES[m]}'s error set (its identification model's mistakes, a mining signal) against the "
                      "hidden bias labels, size / precision / recall by ratio: "
                      + "; ".join(f"{p} {e['mined']['mean']:.0f} / {e['precision']['mean']:.1f} % / "
                                  f"{e['recall']['mean']:.1f} %" for p, e in per_pct) + "."]
    for m, entries in meta.get("reused", {}).items():
        for r in entries:
            at = f" at {', '.join(r['ratios'])}" if len(r["ratios"]) < len(pcts) else ""
            lines += ["", f"{NAMES[m]}: rows{at} copied from `{r['from']}`, measured by `{r['command']}`."]
    lines += ["", f"Command: `{meta['command']}`; {meta['machine']}; torch {meta['torch']}; "
                  f"wall time {meta['wall_seconds'] / 60:.1f} min" + stage_time(meta) + "."]
    return "\n".join(lines) + "\n"


def stage_time(meta: dict) -> str:
    """How long the runs' stages took when they ran, as their artifacts recorded it."""
    if "stage_seconds" not in meta:
        return ""
    untimed = f" ({meta['untimed_stages']} stages from before they recorded it not counted)" \
        if meta["untimed_stages"] else ""
    return f"; the runs' stages took {meta['stage_seconds'] / 60:.1f} min when they ran{untimed}"


def unet_line(per_pct: dict) -> str:
    """One phrase for a row's U-Nets over the ratios: their origins, and whether they used knowledge of the bias."""
    per_pct = {pct: v if isinstance(v, list) else [v]  # one source, or the seeds'; in ratio order
               for pct, v in sorted(per_pct.items(), key=lambda kv: float(kv[0].removesuffix("pct")))}
    said = sorted({bias_knowledge_phrase(s["bias_knowledge"]) for v in per_pct.values() for s in v})
    by_origin: dict[str, list[str]] = {}  # the seeds' origins -> the ratios that used them, in table order
    for pct, v in per_pct.items():
        by_origin.setdefault(" / ".join(dict.fromkeys(s["origin"] for s in v)), []).append(pct)
    origins = list(by_origin) if len(by_origin) == 1 else [f"{o} at {', '.join(p)}" for o, p in by_origin.items()]
    # a U-Net learnt from another ratio's training split (e.g. the shipped 1 % one used at 5 %): say so per ratio
    other = [f"at {pct} the {v[0]['data']['ratio']} split's" for pct, v in per_pct.items()
             if v[0].get("data", {}).get("ratio") not in (None, pct)]
    return "; ".join(origins + ([", ".join(other) + " U-Net"] if other else []) + said)


if __name__ == "__main__":
    main()
