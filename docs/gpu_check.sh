#!/usr/bin/env bash
# Issue 18's device checks in one run, for a session lent a GPU machine: the noise benchmark on the device,
# `analyze.py --speed` at every paper setup's own batch size in fp32 and bf16, and the test suite on CUDA
# (the scripts pick CUDA when present; the CUDA-only test counts a training step's synchronisations). Each
# part has its own timeout, so the whole ends within the device tool's 10-minute limit; five files come back.
# Usage, from the repository root: bash docs/gpu_check.sh OUTDIR (through the device tool: OUTDIR = $OUT).
# Dry run on CPU: PY=.venv/bin/python GPU_CHECK_TESTS="-k speed"
#   GPU_CHECK_SPEED="--speed-setups train_cls_cnn.py:mnist --speed-bs 2 --speed-steps 1" bash docs/gpu_check.sh /tmp/g
set -u -o pipefail
out=${1:?usage: bash docs/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PY:-python3}  # the interpreter that holds torch
log="$out/log.txt"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$log"
timeout 30 "$py" docs/bench_noise.py 2>&1 | tee -a "$log" || status=1
for amp in "" "--amp"; do
  # shellcheck disable=SC2086
  timeout 150 "$py" analyze.py --speed $amp ${GPU_CHECK_SPEED:-} --outdir "$out/speed${amp:+_amp}" 2>&1 | tee -a "$log" || status=1
done
# shellcheck disable=SC2086
timeout 240 "$py" -m pytest -q -x -rs test_core.py ${GPU_CHECK_TESTS:-} 2>&1 | tee -a "$log" || status=1
echo "gpu_check exit $status" | tee -a "$log"
exit $status
