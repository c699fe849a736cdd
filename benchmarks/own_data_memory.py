"""Peak memory of a run on your own images against their number and size: every stage at its full batch sizes, for
as few steps as it takes (one epoch per classifier, two U-Net steps, 16 synthetic samples), so that the peak is the
one a full run reaches and the time is short.

    python benchmarks/own_data_memory.py --tag avx2                       # 2,000 and 20,000 images at 32, 64, 128 px
    python benchmarks/own_data_memory.py --tag avx2 --counts 20000 --sizes 128

The folders are own_data.py's (Fashion-MNIST with a corner tag, scaled to the size). Each cell runs
`diffinject run --data` in a fresh process and reads that process's peak RSS (wait4). Writes
benchmarks/results/own_data_memory_<tag>.{md,json}; a cell already in the JSON is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from generation import device_name  # this folder is on sys.path when run as a script
from own_data import ROOT, run_measured, write_folder

# every stage, at its full batch size, as briefly as it goes
BRIEF = {"methods": ["vanilla", "diffinject"], "mining": {"classifier": {"epochs": 1}}, "classifier": {"epochs": 1},
         "diffusion": {"steps": 2, "checkpoint_every": 2}, "injection": {"num_samples": 16}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cache = Path(os.environ.get("DIFFINJECT_CACHE", Path.home() / ".cache" / "diffinject")) / "own-data"
    results = ROOT / "benchmarks" / "results" / f"own_data_memory_{args.tag}.json"
    cells = json.loads(results.read_text())["cells"] if results.exists() else {}
    config = cache / "brief.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(BRIEF))
    for count in args.counts:
        for size in args.sizes:
            key = f"{count}x{size}"
            if key in cells:
                continue
            folder = write_folder(cache / f"fashion-tag-{count}-{size}px-1pct", count, max(100, count // 6), size, 1.0)
            out = cache / "runs" / f"memory-{key}"
            code, _, rss = run_measured([sys.executable, "-m", "diffinject.workers.cli", "run", "--data",
                                         str(folder), "--image-size", str(size), "--config", str(config),
                                         "--out", str(out), "--threads", str(args.threads), "--no-progress"])
            if code != 0:
                sys.exit(f"own_data_memory.py: {key} exited {code}")
            data_mb = count * 3 * size * size / 2**20 * 7 / 6  # the uint8 images, test split included
            cells[key] = {"images": count, "size": size, "peak_rss_mb": round(rss), "images_mb": round(data_mb)}
            results.write_text(json.dumps({"command": "python benchmarks/own_data_memory.py --tag " + args.tag,
                                           "cpu": device_name("cpu").removeprefix("CPU "), "settings": BRIEF,
                                           "cells": cells}, indent=1) + "\n")
            print(key, cells[key], flush=True)
    lines = ["# Your own data: peak memory against image count and size", "",
             f"`python benchmarks/own_data_memory.py --tag {args.tag}` on {device_name('cpu').removeprefix('CPU ')}: "
             "every stage at its full batch size (one epoch per classifier, two U-Net steps, 16 synthetic "
             "samples), the peak RSS of the run's process.", "",
             "| training images | size | the images (uint8) | peak RSS |", "|---|---|---|---|"]
    lines += [f"| {c['images']:,} | {c['size']} px | {c['images_mb']:,} MB | {c['peak_rss_mb']:,} MB |"
              for c in sorted(cells.values(), key=lambda c: (c["size"], c["images"]))]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
