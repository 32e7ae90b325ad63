#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, most wanted first, each logged to OUT (default
# results/gpu-checks) as it runs, so that a run cut short keeps what it did:
#   1. the tests marked `cuda`;
#   2. bench_train.py at the paper's shapes, one preset per process (a failure in one, or the
#      memory it held, cannot take the other with it): MFU against a same-run 8192^3 bf16 matmul
#      and against the GPU's nominal peak;
#   3. the rest of the suite without the end-to-end runs, which must pass with the GPU present
#      (tests/conftest.py hides it from every test not marked `cuda`).
# Usage: bash benchmarks/gpu_checks.sh [OUT]   (PYTHON: the interpreter, default python)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu-checks}
python=${PYTHON:-python}
export PYTHONUNBUFFERED=1
# Without a GPU the benchmark would train the 1.3B model on the CPU for hours.
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks.sh: $python sees no CUDA GPU" >&2
    exit 2
fi
mkdir -p "$out"

nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$out/gpu.txt"

status=0
"$python" -m pytest -q -ra -m cuda -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.log" || status=1
for preset in expert-335m expert-1.3b; do
    "$python" benchmarks/bench_train.py --presets "$preset" --no-levers --repeats 0 \
        2>"$out/bench-$preset.err" | tee "$out/bench-$preset.log" || status=1
done
"$python" -m pytest -q -ra -m "not slow and not cuda" -p no:cacheprovider 2>&1 |
    tee "$out/pytest.log" || status=1
exit "$status"
