#!/usr/bin/env bash
# GPU check for the optimizer family, one command, under 5 minutes on one GPU:
#   1. the CUDA tests of tests/test_optimizers.py: every CUDA path (single- and
#      multi-tensor, float32 and float64, minimize and maximize) against the NumPy oracle
#      over 1000 steps, CUDA against CPU, and fused=True on CUDA raising ValueError;
#   2. one step of M-SVAG, SVAG, M-SSD, M-SGD timed against torch's Adam (default /
#      foreach / fused) and SGD-momentum on the five layouts of benchmarks/optimizer_step.py.
#
#   bash benchmarks/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')"
"$PYTHON" - <<'PY'
import torch
p = torch.zeros(4, device="cuda", requires_grad=True)
p.grad = torch.ones(4, device="cuda")
import lightning_msvag as lm
try:
    lm.MSVAG([p], lr=0.1, fused=True).step()
except ValueError as error:
    print(f"fused=True on CUDA raises as documented: {error}")
else:
    raise SystemExit("fused=True on CUDA did not raise")
PY
timeout 170 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_optimizers.py -k "cuda or fused_true"
timeout 100 "$PYTHON" benchmarks/optimizer_step.py --device cuda --rounds 15
