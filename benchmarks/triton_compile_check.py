"""Compile every generated Triton kernel for a GPU architecture without a GPU, and count
its vector memory instructions (a check of the generated code with the real compiler,
where the tests can only run Triton's interpreter).

    python benchmarks/triton_compile_check.py [--arch 90] [--aligned 1]

For each (rule, maximize, dtype) it prints the number of 16-byte (v4) and 8-byte (v2)
global loads and v4 stores in the PTX; with ``--aligned 1`` (16-byte aligned buffers, the
usual case) the full chunks and the tails are vectorised. Uses Triton's compiler API
(``triton.compile(ASTSource(...), target=GPUTarget(...))``), which changes between Triton
versions: written against Triton 3.x.
"""

from __future__ import annotations

import argparse
import re

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_msvag import _triton_kernel as K

SIGNATURE = {
    "table": "*i64", "gtable": "*i64", "n": "i32", "lr": "*fp32", "lr_hi": "i32", "lr_lo": "i32",
    "beta_hi": "i32", "beta_lo": "i32", "grad_scale": "*fp32", "found_inf": "*fp32",
}
LD_V4, LD_V2, ST_V4 = r"ld\.global[^\n]*v4", r"ld\.global[^\n]*v2", r"st\.global[^\n]*v4"
CONSTEXPRS = ("DTYPE", "COMPUTE", "TINY", "LR_TENSOR", "HAS_SCALE", "HAS_INF", "ALIGNED", "BLOCK", "ITERS", "VEC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--aligned", type=int, default=1, help="1: all flags on (aligned, tensor lr, AMP); 0: all off")
    args = parser.parse_args()
    flag = bool(args.aligned)
    namespace = K._kernels(False)
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, sm_{args.arch}, flags {'on' if flag else 'off'}")
    for name in (n for n in namespace if n.startswith("step_")):
        for dtype, (storage, compute, tiny) in K.DTYPES.items():
            constants = {
                "DTYPE": getattr(tl, storage), "COMPUTE": getattr(tl, compute), "TINY": tiny, "LR_TENSOR": flag,
                "HAS_SCALE": flag, "HAS_INF": flag, "ALIGNED": flag, "BLOCK": K.BLOCK, "ITERS": K.ITERS,
                "VEC": 16 // torch.empty(0, dtype=dtype).element_size(),
            }
            signature = dict(SIGNATURE, **{c: "constexpr" for c in CONSTEXPRS})
            source = ASTSource(namespace[name], signature, constexprs=constants,
                               attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
            ptx = triton.compile(source, target=target, options={"num_warps": K.NUM_WARPS}).asm["ptx"]
            ld4, ld2, st4 = (len(re.findall(p, ptx)) for p in (LD_V4, LD_V2, ST_V4))
            print(f"{name:32s} {str(dtype):15s} ld.v4 {ld4:3d}  ld.v2 {ld2:3d}  st.v4 {st4:3d}", flush=True)


if __name__ == "__main__":
    main()
