"""The injection stage of a default ``diffinject run``, timed under each speed setting, side by side.

    python benchmarks/injection_stage.py                       # cmnist 1 %, seed 0: every setting, one round
    python benchmarks/injection_stage.py --settings fp32 bf16 --rounds 2
    python benchmarks/injection_stage.py --from runs/bench/default-1pct-seed0

``benchmarks/generation.py`` times the fast path on 128 pairs; this times the stage a user waits for: every sample
of the default run (3,000 on the embedded benchmarks), with its content inversions, padding and compiles. Each
setting runs ``diffinject run --methods diffinject --epochs 1`` in a fresh process, on a fresh copy of a run folder
that holds only the biased model (``--from``, or one made first by the same command with 64 samples), so the stage
is the only work that differs, and reads its seconds from ``synthetic/injection.json``. Settings (``SETTINGS``):

- ``fp32`` and ``bf16``: ``--precision``; bf16 is emulated, and slow, on a CPU without AVX-512 BF16 or AMX;
- ``bf16-compiled-cold``: ``--compile`` with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``): a first run on
  a machine, which pays every compile;
- ``bf16-compiled-warm``: the same with the cache the cold run left: a later run on the same machine.

The machine's speed drifts (20 % within an hour on these shared cores), so each round runs every setting once and
the ratios to fp32 are taken within a round; ``--rounds`` repeats them. Writes ``{--out}.md`` and ``{--out}.json``
(default ``benchmarks/results/injection_stage``).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generation import device_name  # this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SETTINGS = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"],
            "bf16-compiled-cold": ["--precision", "bf16", "--compile"],
            "bf16-compiled-warm": ["--precision", "bf16", "--compile"]}


def run_stage(folder: Path, args, flags: list[str], env: dict) -> dict:
    """``diffinject run`` on ``folder`` in a fresh process; its ``injection.json`` and the wall seconds."""
    cmd = [sys.executable, "-m", "diffinject.workers.cli", "run", "--dataset", args.dataset, "--ratio", str(args.ratio),
           "--seed", str(args.seed), "--methods", "diffinject", "--epochs", "1", "--threads", str(args.threads),
           "--no-progress", "--out", str(folder), *flags]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"injection_stage: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return {**json.loads((folder / "synthetic" / "injection.json").read_text()), "wall": time.time() - start}


def fresh_copy(source: Path, work: Path, name: str) -> Path:
    """A run folder holding only ``source``'s biased model."""
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source / "biased", folder / "biased")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cmnist")
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--from", dest="source", type=Path, help="a run folder whose biased/ to start every setting from")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "injection_stage")
    args = p.parse_args()
    if "bf16-compiled-warm" in args.settings and "bf16-compiled-cold" not in args.settings:
        p.error("bf16-compiled-warm reuses the cache bf16-compiled-cold fills: name both")
    args.settings.sort(key=list(SETTINGS).index)  # cold before warm
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="injection-stage-") as tmp:
        work = Path(tmp)
        source = args.source
        if source is None:  # the biased model, made once by the same run with a token stage
            source = work / "source"
            print("training the biased model ...", flush=True)
            run_stage(source, args, ["--num-samples", "64"], env)
        rounds = []
        for r in range(args.rounds):
            cache = work / f"inductor-{r}"  # empty for the cold run, filled for the warm one
            row = {}
            for name in args.settings:
                folder = fresh_copy(source, work, name)
                got = run_stage(folder, args, SETTINGS[name], {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
                row[name] = {k: got[k] for k in ("seconds", "wall", "samples", "images_per_second",
                                                  "unet_evaluations_per_sample", "precision", "compile")}
                row[name]["report"] = got.get("report")
                print(f"round {r}: {name:20s} {got['seconds']:7.1f} s, {got['images_per_second']:6.2f} images/s",
                      flush=True)
            rounds.append(row)
    write(args, rounds)


def write(args, rounds: list[dict]) -> None:
    ratio = {name: [row["fp32"]["seconds"] / row[name]["seconds"] for row in rounds] if "fp32" in args.settings
             else None for name in args.settings}
    command = "python benchmarks/injection_stage.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "cpu": device_name("cpu"), "threads": args.threads, "dataset": args.dataset,
            "ratio": args.ratio, "seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rounds": rounds, "speedup_vs_fp32": ratio},
                                                        indent=1))
    lines = [f"# The default run's injection stage ({meta['cpu']}, {args.threads} thread(s))", "",
             f"`{meta['command']}`", "",
             f"`diffinject run --dataset {args.dataset} --ratio {args.ratio:g} --seed {args.seed}`'s injection stage "
             f"({rounds[0][args.settings[0]]['samples']} samples), each setting in a fresh process on a copy of one "
             "run folder holding only the biased model; seconds as `synthetic/injection.json` records them (the "
             "U-Net's calls, compiles included). Speed-up: fp32's seconds over the setting's, within a round.", "",
             "| setting | round | seconds | images/s | U-Net evals / sample | speed-up vs fp32 | content digit % "
             "| content digit, other bias value % |",
             "|---|---|---|---|---|---|---|---|"]
    for r, row in enumerate(rounds):
        for name in args.settings:
            got, rep = row[name], row[name]["report"] or {}
            speed = f"{ratio[name][r]:.2f}x" if ratio[name] else "-"
            lines.append(f"| {name} | {r} | {got['seconds']:.1f} | {got['images_per_second']:.2f} | "
                         f"{got['unet_evaluations_per_sample']} | {speed} | {rep.get('content_digit', '-')} | "
                         f"{rep.get('content_digit_other_colour', '-')} |")
    if args.rounds > 1 and "fp32" in args.settings:
        lines += ["", "Median speed-up over the rounds: " + ", ".join(
            f"{name} {statistics.median(ratio[name]):.2f}x" for name in args.settings if name != "fp32")]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
