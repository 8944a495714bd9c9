#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one go (under 8 minutes on one H200-class GPU is the goal): installs histoclip
# into a fresh virtual environment if it is not importable, then runs benchmarks/gpu.py on DLPFC and on a 100k-spot
# tiled slide and prints its JSON (also written to benchmarks/results/gpu.json, or $OUT/gpu.json when $OUT is set);
# then a 1M-spot slide at Visium HD depth (gpu_1m.json; not yet run on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import histoclip" 2>/dev/null; then
  # keep the machine's own CUDA build of torch (system site packages); the other dependencies come from PyPI or, on a
  # machine without a network, from wheels carried in .whl/ (pip install --no-index --find-links .whl)
  python3 -m venv --system-site-packages /tmp/histoclip-gpu-venv
  . /tmp/histoclip-gpu-venv/bin/activate
  if [ -d .whl ]; then
    python -m pip install -q --no-index --find-links .whl -e .
  else
    python -m pip install -q -e .
  fi
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --accelerator cuda --sizes 100000 --out "$out/gpu.json"
# Visium HD scale (issue 23): 1M spots at HD depth (counts thinned to ~200 UMIs per spot), every stage
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --accelerator cuda --sizes 1000000 --hd-depth 200 --skip-dlpfc \
  --out "$out/gpu_1m.json"
