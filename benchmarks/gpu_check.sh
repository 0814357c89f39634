#!/usr/bin/env bash
# GPU check for the optimizer family: one command, under 6 minutes on one GPU, printing as it goes.
#   1. tests/test_optimizers.py -k cuda: every CUDA path of the optimizers against the NumPy
#      oracle over 1000 steps (float32, float64, minimize and maximize), CUDA against CPU;
#   2. tests/test_triton_kernel.py -k cuda: the fused Triton kernel compiled for this GPU
#      against the NumPy oracle over 1000 steps (every rule, float32/float64, maximize,
#      per-tensor step counters, odd sizes), 16-bit rounding, tensor lr, grad_scale,
#      found_inf, table caching, and the one-line cold-build announcement;
#   3. benchmarks/optimizer_step.py --device cuda: one optimizer step on the five layouts
#      against torch's Adam and SGD-momentum (fused included), with the Triton columns and,
#      on the 100M set, the achieved bandwidth against a device-to-device copy; each row is
#      printed as soon as it is measured;
#   4. benchmarks/problem_step_time.py --device cuda: a whole training step of P2, P3, P4
#      (M-SVAG, M-SSD, their Triton path, fused Adam, fused SGD-momentum) in float32 and
#      under bf16 autocast;
#   5. benchmarks/batch_variance_cost.py --whole-step --device cuda: a whole M-SVAG step with
#      the mini-batch variance estimate over one with the moving average, P1, P2, P4 and the
#      character transformer, each ratio within an (anchor, variant) pair;
#   6. benchmarks/compiled_step.py --device cuda: the step inside torch.compile(fullgraph=True)
#      on the WRN layout against torch's compiled Adam and its own eager step, and the graphs built.
# Each part has its own time limit and runs even if an earlier one failed; the exit status
# says whether all passed. Needs torch with CUDA, Triton, pytest, numpy, pytorch-lightning
# (not jsonargparse). Wheels of missing packages can be put in .whl/ (git-ignored): they
# are installed into a temporary folder first.
#
#   bash benchmarks/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')" || exit 1
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

failed=()
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    echo "--- $name: exit $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed+=("$name")
}

part "1. CUDA paths vs NumPy oracle" 70 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_optimizers.py -k cuda
part "2. fused Triton kernel vs NumPy oracle on CUDA" 80 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k cuda
part "3. optimizer step, five layouts" 60 \
    "$PYTHON" benchmarks/optimizer_step.py --device cuda --rounds 7 --no-first-step
part "4. whole training step, P2 P3 P4" 50 \
    "$PYTHON" benchmarks/problem_step_time.py --device cuda --problems p2,p3,p4 --precision 32,bf16 \
        --steps 10 --warmup 3 --rounds 3
part "5. mini-batch variance estimate, whole step" 45 \
    "$PYTHON" benchmarks/batch_variance_cost.py --whole-step --device cuda --rounds 5 --problems p1,p2,p4,transformer
part "6. the step inside torch.compile (fullgraph) vs compiled Adam" 50 \
    "$PYTHON" benchmarks/compiled_step.py --device cuda --sets wrn --methods m-sgd,m-svag,m-ssd-va,m-svag-mb --rounds 5

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all parts passed"
else
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
