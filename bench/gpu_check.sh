#!/usr/bin/env bash
# The GPU check of issue 10: the service's train loop (workers/train_loop.py train_stage) under
# torchrun against a bare loop of the same model and data with the data on the device, fp32
# and bf16 autocast, in samples/s. bench/gpu_loop.py does the work; this runs it with one
# process, and again with two where there are two or more GPUs. No Ray, no Redis server.
#
# Needs, in the Python it runs ($PYTHON, else .venv/bin/python, else python3):
#   torch (with CUDA for the real check), numpy, pydantic, scikit-learn, redis (the client
#   library: workers.train_loop imports it; no server is contacted)
# It stops before training, naming all that is missing, when one of them is.
#
# Usage, from anywhere:  bash bench/gpu_check.sh [--epochs N] [--batch-size B]
# Exits non-zero when a run fails (the service's loop included) or a package is missing.
# Without a GPU it runs on the CPU (gloo): that proves the script, not the GPU.
set -uo pipefail

cd "$(dirname "$0")/.."  # the repository root: gpu_loop.py imports shared/, workers/, tests/
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

echo "== aetrain GPU check (issue 10): the service's train loop vs a bare loop, samples/s =="
echo "repository: $(pwd) at $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
echo "python: $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(hostname)"

# gpu_loop.py names every missing package (and any other failed import) before torchrun
# starts anything; its list of requirements is the one place they are written down.
if ! "$python" bench/gpu_loop.py --check-imports; then
    echo "MISSING: install the packages named above into $python first" >&2
    exit 2
fi

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if command -v nvidia-smi >/dev/null && [[ "$gpus" -gt 0 ]]; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
fi
echo "GPUs visible to torch: $gpus"

status=0
run() {  # run NPROC [gpu_loop.py options...]
    local nproc=$1
    shift
    echo
    echo "-- torchrun --standalone --nproc_per_node=$nproc bench/gpu_loop.py $* --"
    # `python -m torch.distributed.run` is torchrun, run by the same Python that was checked.
    if ! "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
        bench/gpu_loop.py "$@"; then
        echo "FAILED: $nproc process(es)" >&2
        status=1
    fi
}

run 1 "$@"
if [[ "$gpus" -ge 2 ]]; then
    run 2 "$@"
fi

echo
if [[ "$gpus" -eq 0 ]]; then
    echo "NOTE: no GPU: these are CPU figures, not the GPU check."
fi
if [[ $status -eq 0 ]]; then echo "gpu_check: OK"; else echo "gpu_check: FAILED" >&2; fi
exit $status
