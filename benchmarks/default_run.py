"""The default ``diffinject run``, timed stage by stage on this host: what a new user waits for.

    python benchmarks/default_run.py --tag avx2                 # one fresh run, the README's command
    python benchmarks/default_run.py --tag amx --rounds 2
    python benchmarks/default_run.py --tag avx2 -- --preset table   # any run flags after --

Each round runs ``diffinject run`` with nothing but ``--out`` (plus the flags after ``--``) in a fresh process on
an empty run folder, so every stage runs: the biased model, the synthetic samples, each method's classifier and
the report. It records the wall time, the process's peak resident memory, what each stage took (``stage_seconds``
in the run's ``metrics.json``) and the rows' unbiased test accuracy. The machine's name and whether it has bf16
arithmetic (AVX-512 BF16 or AMX, which the default ``precision: auto`` uses) head the results, since the time
depends on both. Writes ``benchmarks/results/default_run_{tag}.{md,json}``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from generation import device_name  # this folder is on sys.path when run as a script

from diffinject.core.hspace import has_bf16  # the check precision "auto" makes

RESULTS = Path(__file__).parent / "results"


def cpu() -> dict:
    """The CPU's name, its cores, and whether it has the bf16 arithmetic ``precision: auto`` uses."""
    return {"name": device_name("cpu").removeprefix("CPU "), "cores": os.cpu_count(), "bf16": has_bf16("cpu")}


def one_round(out: Path, run_flags: list[str]) -> dict:
    """One fresh ``diffinject run``: wall seconds, peak memory, and its metrics.json."""
    cmd = ["diffinject", "run", "--no-progress", "--out", str(out), *run_flags]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"default_run: {' '.join(cmd)} failed:\n{log[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "metrics": metrics}


def markdown(meta: dict, rounds: list[dict]) -> str:
    c = meta["cpu"]
    lines = [f"# The default run on {c['name']} ({c['cores']} cores, bf16 arithmetic: {'yes' if c['bf16'] else 'no'})",
             "", f"`{meta['command']}` runs `{meta['run_command']}` in a fresh process on an empty folder, "
             f"torch {meta['torch']}.", "",
             "| round | wall (min) | peak memory (MB) | stage | seconds |", "|---|---|---|---|---|"]
    for r, got in enumerate(rounds):
        stages = got["metrics"]["stage_seconds"]
        for i, (stage, seconds) in enumerate(stages.items()):
            head = (f"| {r} | {got['wall_seconds'] / 60:.1f} | {got['peak_rss_mb']} " if i == 0 else "| | | ")
            lines.append(f"{head}| {stage} | {'-' if seconds is None else f'{seconds:.1f}'} |")
    lines += ["", "Unbiased test accuracy (%) of each row, by round:", "", "| row | " + " | ".join(
        str(r) for r in range(len(rounds))) + " |", "|---" * (len(rounds) + 1) + "|"]
    for name in rounds[0]["metrics"]["methods"]:
        cells = [f"{got['metrics']['methods'][name].get('unbiased', float('nan')):.1f}" for got in rounds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", required=True, help="names the results files, e.g. the CPU kind: avx2, amx")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("run_flags", nargs=argparse.REMAINDER, help="flags for diffinject run, after --")
    args = p.parse_args()
    run_flags = [f for f in args.run_flags if f != "--"]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="default-run-") as tmp:
        for r in range(args.rounds):
            got = one_round(Path(tmp) / f"round{r}", run_flags)
            print(f"round {r}: {got['wall_seconds'] / 60:.1f} min, peak {got['peak_rss_mb']} MB", flush=True)
            rounds.append(got)
    meta = {"command": " ".join(["python benchmarks/default_run.py", *sys.argv[1:]]),
            "run_command": " ".join(["diffinject run", *run_flags]), "cpu": cpu(), "torch": torch.__version__}
    out = RESULTS / f"default_run_{args.tag}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, rounds))
    print(markdown(meta, rounds))


if __name__ == "__main__":
    main()
