#!/usr/bin/env bash
# One call on a lent GPU machine (10 minutes at most): the GPU benchmark first, on an idle GPU, then three
# time-boxed U-Net trainings side by side (issue 3's experiments), everything packed under $OUT.
#
#   bash benchmarks/gpu_session.sh        # from the repo root there, with .whl/ carried (see gpu_bench.sh)
#
# This produced benchmarks/results/gpu_bench.json, generation_gpu.md, service_load_gpu.{md,json} and the
# models in benchmarks/results/experiments.md on an H200 (2026-11-28). Rerunning a training's command with the
# same --out resumes it from its checkpoint.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
RES=/tmp/res; mkdir -p $RES /tmp/m
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch,grpc,google.protobuf as p;print('torch',torch.__version__,'grpc',grpc.__version__,'protobuf',p.__version__)"
date +%s > $RES/t0
GEN_TIMEOUT=${GEN_TIMEOUT:-120} SERVE_TIMEOUT=${SERVE_TIMEOUT:-140} timeout ${BENCH_TIMEOUT:-330} \
  bash benchmarks/gpu_bench.sh $RES/gpu_bench.json 2>&1 | grep --line-buffered -v "^\s*$" > $RES/bench.log
# (--line-buffered: a pipe's block buffer is lost when a time limit kills the call; it cost one call's output)
cp $RES/gpu_bench.json $OUT/ 2>/dev/null; tail -c 6000 $RES/bench.log
echo "== bench took $(( $(date +%s) - $(cat $RES/t0) )) s"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers*.whl .whl/importlib_metadata*.whl
export PYTHONPATH=/tmp/site:$PWD DIFFINJECT_CACHE=$PWD/.whl/cache
T="--steps 100000 --batch-size 128 --device cuda --threads 4 --no-progress --max-minutes ${TRAIN_MINUTES:-3.2}"
# the small architecture was the default then; now the deep one is, so the first two name it
python3 -m workers.cli train-diffusion --split corpus --config benchmarks/configs/unet-small.yaml $T --out /tmp/m/corpus \
  > $RES/train-corpus.log 2>&1 &
python3 -m workers.cli train-diffusion --split train --config benchmarks/configs/unet-small.yaml $T --out /tmp/m/biased \
  > $RES/train-biased.log 2>&1 &
python3 -m workers.cli train-diffusion --split corpus --config benchmarks/configs/unet-deep.yaml $T --out /tmp/m/corpus-deep > $RES/train-deep.log 2>&1 &
wait
tail -n 3 $RES/train-*.log
echo "== all took $(( $(date +%s) - $(cat $RES/t0) )) s"
rm -f /tmp/m/corpus-deep/checkpoint.pt  # 72 MB: over what a call can bring back
cp -r /tmp/m $RES/models
tar cf - -C $RES . | split -b 15728640 - $OUT/res.tar.part-
cp $RES/bench.log $OUT/
ls -la $OUT
