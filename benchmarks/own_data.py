"""A run on your own images, timed stage by stage: an ImageFolder of real Fashion-MNIST photographs with a shortcut
whose colour follows the class, run with `diffinject run --data` and the default preset, as a user would. The
shortcut is a coloured tag in the top-left corner (`--shortcut tag`, a kind the project's benchmarks never had) or
the garment's own colour (`--shortcut colour`, as Colored MNIST colours its digits).

    python benchmarks/own_data.py --tag avx2                     # 6,000 training images at 32 px, 1 % conflicts
    python benchmarks/own_data.py --tag avx2 --shortcut colour

The folder (`--folder`, default under $DIFFINJECT_CACHE) holds train/<class>/*.jpg and test/<class>/*.jpg (no val/:
the run carves one) and attributes.csv (the tag colour of every image: the bias attribute, read for evaluation
only). The run folder resumes if the command is rerun. Writes benchmarks/results/own_data_<shortcut>_<tag>.{md,json}:
the time of each stage, the peak RSS of the run's process, and its results table. Needs Debian's
dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from generation import device_name  # this folder is on sys.path when run as a script
from PIL import Image

from diffinject.core.data import FASHION_CLASSES, DataError, read_fashion

ROOT = Path(__file__).resolve().parent.parent
TAG_COLOURS = ((220, 20, 60), (0, 128, 128), (250, 230, 15), (0, 150, 180), (240, 125, 50), (150, 50, 200),
               (50, 200, 50), (255, 105, 180), (140, 90, 45), (210, 210, 210))


def tagged(grey: np.ndarray, colour: int, size: int, shortcut: str = "tag") -> Image.Image:
    """A garment (grey on black) at ``size`` px with a tag of ``TAG_COLOURS[colour]`` in its top-left corner
    (``shortcut`` "tag"), or the garment itself in that colour ("colour")."""
    image = Image.fromarray(grey).convert("RGB").resize((size, size), Image.BILINEAR)
    if shortcut == "colour":
        tint = np.asarray(TAG_COLOURS[colour], np.float32) / 255
        return Image.fromarray((np.asarray(image, np.float32) * tint).round().astype(np.uint8))
    tag = max(3, size // 6)
    image.paste(TAG_COLOURS[colour], (1, 1, 1 + tag, 1 + tag))
    return image


def write_folder(folder: Path, n_train: int, n_test: int, size: int, conflict_pct: float, seed: int = 0,
                 shortcut: str = "tag") -> Path:
    """The ImageFolder with its shortcut (once: a folder already made is reused) with attributes.csv."""
    if (folder / "attributes.csv").exists():
        return folder
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        try:
            x, y = read_fashion(split)  # $FASHION_MNIST, else Debian's dataset-fashion-mnist
        except DataError as e:
            sys.exit(f"own_data.py: {e}")
        take = np.sort(rng.permutation(len(y))[:n])
        conflict = rng.random(len(take)) < conflict_pct / 100 if split == "train" else np.ones(len(take), bool)
        for i, j in enumerate(take):
            c = int(y[j])  # train: the class's own colour but for conflict_pct %; test: any colour (unbiased)
            colour = int((c + rng.integers(1, 10)) % 10) if conflict[i] else c
            if split == "test":
                colour = int(rng.integers(0, 10))
            path = folder / split / FASHION_CLASSES[c] / f"{j:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            tagged(x[j], colour, size, shortcut).save(path, quality=95)
            rows.append({"file": str(path.relative_to(folder)), "attribute": f"{shortcut}-{colour}"})
    with open(folder / "attributes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", "attribute"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def run_measured(argv: list[str]) -> tuple[int, float, float]:
    """``argv`` in a child process: its exit code, wall seconds and peak RSS in MB (its own, from wait4)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True, help="results file suffix, e.g. the CPU kind")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--conflict-pct", type=float, default=1.0)
    cache = Path(os.environ.get("DIFFINJECT_CACHE", Path.home() / ".cache" / "diffinject"))
    p.add_argument("--folder", type=Path, default=None, help="where the image folder goes")
    p.add_argument("--out", type=Path, default=None, help="the run folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shortcut", choices=("tag", "colour"), default="tag")
    args = p.parse_args()
    name = f"fashion-{args.shortcut}-{args.train}-{args.size}px-{args.conflict_pct:g}pct"
    folder = write_folder(args.folder or cache / "own-data" / name, args.train, args.test, args.size, args.conflict_pct,
                          shortcut=args.shortcut)
    out = args.out or ROOT / "runs" / f"own-data-{name}"
    argv = [sys.executable, "-m", "diffinject.workers.cli", "run", "--data", str(folder), "--attributes",
            str(folder / "attributes.csv"), "--image-size", str(args.size), "--out", str(out), "--threads",
            str(args.threads)]
    code, seconds, rss = run_measured(argv)
    if code != 0:
        sys.exit(f"own_data.py: the run exited {code}; rerun to resume it")
    metrics = json.loads((out / "metrics.json").read_text())
    command = f"python benchmarks/own_data.py --tag {args.tag}" + (f" --shortcut {args.shortcut}"
                                                                   if args.shortcut != "tag" else "")
    result = {"command": command, "shortcut": args.shortcut, "cpu": device_name("cpu").removeprefix("CPU "),
              "threads": args.threads,
              "images": {"train": metrics["dataset"]["train"], "valid": metrics["dataset"]["valid"],
                         "test": metrics["dataset"]["test"], "size": args.size, "conflict_pct": args.conflict_pct},
              "wall_seconds_this_invocation": round(seconds, 1), "peak_rss_mb": round(rss),
              "stage_seconds": metrics["stage_seconds"], "mining": metrics["mining"],
              "biased_classifier": metrics["biased_classifier"], "methods": metrics["methods"]}
    results = ROOT / "benchmarks" / "results"
    stem = f"own_data_{args.shortcut}_{args.tag}"
    (results / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    columns = ("accuracy", "worst_class", "group_balanced", "worst_group", "conflicting", "disagrees_with_biased")
    what = "a corner tag" if args.shortcut == "tag" else "the garment coloured"
    lines = [f"# Your own data: Fashion-MNIST with {what}, {args.train} training images at {args.size} px, "
             f"{args.conflict_pct:g} % conflicts", "", f"`{result['command']}` on {result['cpu']}, "
             f"{args.threads} threads: {seconds / 60:.1f} min wall in this invocation, peak RSS {rss:.0f} MB.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics["stage_seconds"].items()]
    rows = {"biased classifier (the miner)": metrics["biased_classifier"], **metrics["methods"]}
    lines += ["", "| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join("" if m.get(c) is None else f"{m[c]:.2f}" for c in columns) + " |"
              for n, m in rows.items()]
    q = metrics["mining"]
    lines += ["", f"Mining: {q['mined']} mined, precision {q.get('precision')} %, recall {q.get('recall')} % "
                  "(the attributes read for this line only)."]
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
