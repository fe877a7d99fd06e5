#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (no network; its own CUDA build of torch and the
# packages dmrx needs are already in its python3). Run from the repository root, where the working tree was
# copied:
#
#     bash benchmarks/gpu_loan.sh
#
# It installs dmrx from the working tree without fetching anything, runs the CUDA tests (pytest -m gpu),
# then benchmarks/gpu_check.py. Everything it prints is also teed to $OUT/gpu_loan.log, and gpu_check
# rewrites $OUT/gpu_check.json after every stage, so a run stopped at its time limit still leaves the table
# so far. $OUT defaults to ./gpu-loan-out. Time limits keep the whole script under 9 minutes.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-loan-out}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{
    echo "== offline install"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 3
    "$PY" -c "import dmrx, dmrx.cli, torch; print('dmrx', dmrx.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

    echo "== pytest -m gpu"
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -x
    tests=$?

    echo "== gpu_check"
    timeout 330 "$PY" benchmarks/gpu_check.py --json-out "$OUT/gpu_check.json"
    check=$?

    echo "== exit codes: pytest -m gpu $tests, gpu_check $check (124: stopped at its time limit)"
    [ "$tests" -eq 0 ] && [ "$check" -eq 0 ]
} 2>&1 | tee "$OUT/gpu_loan.log"
