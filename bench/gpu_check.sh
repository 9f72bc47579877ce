#!/usr/bin/env bash
# One prepared GPU check: the sd15-full performance benchmark (full SD-1.5 architecture, random
# weights, 512², fp16 on CUDA). Run from anywhere on a machine with a CUDA GPU:
#
#   OUT=/some/dir bash bench/gpu_check.sh
#   MODES=instant,region,diffeditor OUT=/some/dir bash bench/gpu_check.sh   # a subset (issue 12's GPU targets)
#
# The machine has torch/peft/transformers/accelerate but not diffusers: wheels of the missing
# pure-python packages travel in .whl/ and are installed to /tmp/site. Writes
# $OUT/perf_sd15.json and $OUT/perf_sd15.log; prints nvidia-smi before and after.
# Budget: ~15-30 s model build + ~2-4 min of edits on an H100; the run is cut at 480 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, \
'| cuda available', torch.cuda.is_available())"

timeout 480 python3 -m bench.perf --config sd15-full ${MODES:+--modes "$MODES"} --json "$OUT/perf_sd15.json" 2>&1 | tee "$OUT/perf_sd15.log"
rc=${PIPESTATUS[0]}

nvidia-smi
echo "bench.perf exit status: $rc"
exit "$rc"
