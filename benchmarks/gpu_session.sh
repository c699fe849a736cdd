#!/usr/bin/env bash
# One call on a lent GPU machine (10 minutes at most): the GPU benchmark first, on the idle GPU (benchmarks/gpu_bench.sh:
# generation with CUDA graphs and compiling on and off, training throughput, the Serve load where Ray is carried),
# then label-free U-Nets (benchmarks/gpu_label_free.sh, side by side, time-boxed). Everything comes back in $OUT as res.tar.part-*
# (cat them | tar x): the run folders under lf/, gpu_bench.json and the two tables, and the logs.
#
#   bash benchmarks/gpu_session.sh        # from the repo root there, with .whl/ carried
#
# .whl/ holds the wheels the machine lacks (gpu_bench.sh lists them; Ray stripped of jars, rllib, llm, data,
# train, tune and the dashboard's web build, 40 MB) and caches.tar.xz, the embedded datasets' cache files
# (the *.npz files of the dataset cache) the U-Nets learn from. Environment: UNETS and CONFIG (gpu_label_free.sh), TRAIN_SECONDS
# (each U-Net's time budget, default 200), TRAIN_TIMEOUT, GEN_ARGS, SERVE_ARGS, GEN_TIMEOUT, SERVE_TIMEOUT (gpu_bench.sh).
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
RES=/tmp/res; mkdir -p $RES
t0=$(date +%s)
since() { echo "$(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
if [ -f .whl/caches.tar.xz ]; then
  mkdir -p /tmp/cache && tar xJf .whl/caches.tar.xz -C /tmp/cache && export DIFFINJECT_CACHE=/tmp/cache
fi
echo "== set up in $(since)"

# 1. the benchmark on an idle GPU, with the shipped U-Net (core/pretrained/cmnist-1pct must travel: untrack the others)
WORK=$RES/work GEN_ARGS="${GEN_ARGS:---unet core/pretrained/cmnist-1pct --variants fast ddim fast-cudagraphs ddim-cudagraphs fast-compiled}" \
  SERVE_ARGS="${SERVE_ARGS:---serve-mode haproxy --ingress-replicas 2}" \
  GEN_TIMEOUT=${GEN_TIMEOUT:-170} SERVE_TIMEOUT=${SERVE_TIMEOUT:-140} timeout ${BENCH_TIMEOUT:-330} \
  bash benchmarks/gpu_bench.sh $RES/gpu_bench.json 2>&1 | grep --line-buffered -v "^\s*$" > $RES/bench.log
# (--line-buffered: a pipe's block buffer is lost when a time limit kills the call)
grep -v "^\[20\|^ *@\|logging.cc\|^PC:" $RES/bench.log | tail -c 5000
echo "== benchmark done at $(since)"

# 2. the U-Nets
MAX_SECONDS=${TRAIN_SECONDS:-200} UNETS="${UNETS:-cmnist:1 cmnist:5 corrupted_mnist:1}" \
  CONFIG="${CONFIG:-benchmarks/configs/unet-gpu-b128.yaml}" METHODS="${METHODS:-diffinject,lff+diffinject}" \
  timeout ${TRAIN_TIMEOUT:-400} bash benchmarks/gpu_label_free.sh $RES/lf
tail -n 2 $RES/lf/*.log
grep -h '"steps"\|"seconds"' $RES/lf/*/*/unet/train.json 2>/dev/null | head -6
echo "== all done at $(since)"
find $RES -name checkpoint.pt -delete  # 72 MB each, over what a call brings back; the EMA model is what samples
cp $RES/gpu_bench.json $OUT/ 2>/dev/null
tar cf - -C $RES . | split -b 15728640 - $OUT/res.tar.part-
ls -la $OUT
