#!/usr/bin/env bash
# One call on a lent GPU machine (10 minutes at most): the label-free U-Nets of issue 13, trained on each embedded
# benchmark's own training split, plain and with hard_share 0.5, side by side; the EMA models come back under $OUT.
#
#   bash benchmarks/gpu_label_free.sh     # from the repo root there, with .whl/ carried (see gpu_bench.sh), and
#                                         # .whl/cache holding the embedded datasets' cache files (DIFFINJECT_CACHE)
#
# RATIOS (default "1") and STEPS (default 2000, batch 64, as on the CPU) may be set. Each U-Net is the U-Net stage of
# an ordinary run folder (biased classifier first, for the hard-share weights), so a run folder copied back resumes
# at the injection stage on the CPU: `diffinject run ... --out <that folder>` with the same flags.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site:$PWD DIFFINJECT_CACHE=$PWD/.whl/cache
mkdir -p /tmp/lf
for dataset in cmnist corrupted_mnist; do
  for ratio in ${RATIOS:-1}; do
    for share in 0 0.5; do
      out=/tmp/lf/$dataset-${ratio}pct-hard$share
      timeout 540 python3 - "$dataset" "$ratio" "$share" "$out" > "$out.log" 2>&1 <<'EOF' &
import sys
from core.pipeline import Run, make_config
dataset, ratio, share, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cfg = make_config("default", {"dataset": dataset, "ratio": ratio, "unet": None, "methods": ["diffinject"],
                              "diffusion": {"hard_share": share, "steps": int(__import__("os").environ.get("STEPS", 2000))}})
print(Run(out, cfg, device="cuda", progress=False).unet_dir())
EOF
    done
  done
done
wait
tail -n 2 /tmp/lf/*.log
find /tmp/lf -name checkpoint.pt -delete  # 72 MB each: over what a call brings back; the EMA model is what samples
tar cf - -C /tmp lf | split -b 15728640 - $OUT/lf.tar.part-
ls -la $OUT
