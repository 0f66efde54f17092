#!/usr/bin/env bash
# Every GPU check of issue 4 in one go (docs/kernels.md, "To verify on a GPU"), on a machine
# with a CUDA GPU, torch, triton and transformers. Results go to OUTDIR (default: $OUT, else
# ./gpu-results): the test log, bench.kernels and bench.model_step as JSON, nvidia-smi.
#
#   bash bench/gpu_check.sh [OUTDIR]
#
# The engine also needs msgspec and pyzmq; where they are missing and there is no package
# index (the lent GPU machines), `make gpu-wheels` downloads them into .whl/ here, and the
# script installs whatever .whl/ holds into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
# The kernel tests compiled on the GPU (small shapes and the gpu-marked Llama-3-8B shapes),
# the native runner's CUDA graphs against eager, and greedy output against transformers.
$py -m pytest -q -p no:cacheprovider tests/kernels tests/worker/test_native_runner.py \
    2>&1 | tee "$out/tests.log" || status=1
$py -m bench.kernels --json > "$out/kernels.json" 2> "$out/kernels.err" || status=1
$py -m bench.model_step --batch 1 8 64 --context 2048 --json > "$out/model_step.json" \
    2> "$out/model_step.err" || status=1
cat "$out/kernels.json" "$out/model_step.json"
exit $status
