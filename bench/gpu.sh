#!/usr/bin/env bash
# All GPU checks in one call (the device lease is short). Run from the repo root on the GPU machine:
#   bash bench/gpu.sh            # writes logs to $OUT (or ./bench-out)
# Uses the machine's python3 (torch, timm, lightning preinstalled); our packages from the work tree.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

run() { echo "== $*" | tee -a "$OUT/bench.log"; timeout "${T:-240}" "$@" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"; }

# 1. SSL recipe step, ViT-L/16 batch 64, 2x224 + 8x96, 65,536 prototypes, bf16 (issue 2 target > 250 img/s)
T=200 run python3 bench/ssl_step.py --device cuda --preset vitl16 --steps 15 --warmup 5
T=240 run python3 bench/ssl_step.py --device cuda --preset vitl16 --steps 15 --warmup 8 --compile --variants recipe
# 2. feature extraction end to end vs forward alone (issue 5), if present
#    first the input side alone on this host's 16 cores (a stand-in device at the target rate), then
#    the real thing on 2,000 copies of the fixture slide (94,000 tiles, ~35 s at the target) so the fixed
#    start-up (forking 14 workers, the first batch) weighs ~1 %, as in a real cohort; the BENCH line
#    gives the steady rate apart
SLIDE=()  # the fixture slide, carried in the ignored .gpudata/ (the machine has no ../shared)
[ -f .gpudata/cmu-1-small-region.svs ] && SLIDE=(--slide .gpudata/cmu-1-small-region.svs)
if [ -f bench/extract.py ]; then
  T=90 run python3 bench/extract.py --simulate-forward 3000 --workers 14 --batch-size 256 --copies 1000 "${SLIDE[@]}"
  T=240 run python3 bench/extract.py --device cuda --arch vitl14 --bf16 --compile --workers 14 --copies 2000 "${SLIDE[@]}"
  T=200 run python3 bench/extract.py --device cuda --arch vitl16 --bf16 --compile --workers 14 --copies 1000 "${SLIDE[@]}"
fi
# (bench/mil.py was run on the H200 separately: 25 models, 1,000 x 5,000 x 1,024, 39.9 s)
