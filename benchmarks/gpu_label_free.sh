#!/usr/bin/env bash
# Label-free U-Nets on a lent GPU, side by side: for each DATASET:PCT in UNETS, the U-Net stage (the GCE biased
# classifier first, for the hard-share weights) of the seed-0 run folder that a per-ratio debias table makes,
#
#   UNETS="cmnist:1 cmnist:5 corrupted_mnist:1" CONFIG=benchmarks/configs/unet-gpu-b128.yaml \
#       bash benchmarks/gpu_label_free.sh OUTDIR       # from the repo root there
#
# into OUTDIR/<dataset>/default-<pct>pct-seed0 (log beside it). Copy OUTDIR/<dataset> to a runs folder here and run
# `benchmarks/debias_table.py --unet per-ratio --config CONFIG --dataset <dataset> --runs <that folder> ...`: the
# seed-0 runs resume after the U-Net stage, the other seeds use that U-Net. Needs diffusers (carried in .whl/,
# see gpu_bench.sh) and the datasets' cache files (DIFFINJECT_CACHE). Environment: CONFIG (a settings YAML, as
# debias_table's --config), METHODS (default diffinject), MAX_SECONDS (time budget of each U-Net: it stops there
# and saves, resumable), DEVICE (default cuda).
set -u
OUTDIR="${1:-/tmp/lf}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers*.whl \
    .whl/importlib_metadata*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -z "${DIFFINJECT_CACHE:-}" ] && [ -d .whl/cache ] && export DIFFINJECT_CACHE="$PWD/.whl/cache"
for job in ${UNETS:-cmnist:1 corrupted_mnist:1}; do
  dataset=${job%%:*} pct=${job#*:}
  mkdir -p "$OUTDIR/$dataset"
  python3 - "$dataset" "$pct" "$OUTDIR/$dataset" > "$OUTDIR/$dataset-${pct}pct.log" 2>&1 <<'PY' &
import os
import sys

sys.path.insert(0, "benchmarks")
from debias_table import cell_folder  # noqa: E402

from diffinject.core.pipeline import Run, make_config, merge, read_settings  # noqa: E402

dataset, ratio, runs = sys.argv[1], float(sys.argv[2]), sys.argv[3]
settings = read_settings(os.environ["CONFIG"]) if os.environ.get("CONFIG") else {}
settings = merge(settings, {"dataset": dataset, "methods": os.environ.get("METHODS", "diffinject").split(",")})
cfg = make_config("default", merge(settings, {"ratio": ratio, "seed": 0, "unet": None}))  # as run_cell's seed 0
seconds = float(os.environ.get("MAX_SECONDS", 0)) or None
run = Run(cell_folder(runs, "default", ratio, 0), cfg, device=os.environ.get("DEVICE", "cuda"), progress=False,
          max_diffusion_seconds=seconds)
run.mined()
print(run.unet_dir(), flush=True)
PY
done
wait
