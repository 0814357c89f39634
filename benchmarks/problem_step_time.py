"""Time one whole training step (forward, backward, optimizer step) of the paper's problems.

Random inputs of each problem's shape at the configured batch size (docs/problems.md), the
model's own training loss (cross-entropy + L2). Optimizers: M-SVAG and M-SSD with their
default paths, against torch's Adam (``fused=True`` on CUDA) and SGD with momentum 0.9
(``fused=True`` on CUDA); on CUDA also M-SVAG and M-SSD through the fused Triton kernel
("triton": the optimizers with ``fused=True`` where they route CUDA tensors to it, else the
kernel called directly, see benchmarks/optimizer_step.py). Each optimizer trains its own copy
of the same initial model; rounds are interleaved (each round times ``--steps`` steps of every
optimizer in turn, CUDA-synchronised around them) and the median ms/step over rounds is
reported, for each precision: ``32`` (float32) and ``bf16`` (forward and loss under
``torch.autocast(dtype=torch.bfloat16)``, parameters and optimizer in float32, as
Lightning's bf16-mixed).

    python benchmarks/problem_step_time.py [--device cuda] [--problems p2,p3,p4] [--precision 32,bf16]
                                           [--steps 10] [--warmup 3] [--rounds 5] [--extended]

``--extended`` adds M-SSD-VA with both factors (erf and √γ).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

import lightning_msvag as lm
from lightning_msvag.models import CharLSTM, ThreeC3D, TwoC2D, WideResNet404

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optimizer_step import triton_factory  # noqa: E402

PROBLEMS = {
    "p1": ("fmnist_2c2d, batch 128", TwoC2D, lambda: (torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)))),
    "p2": ("cifar10_3c3d, batch 128", ThreeC3D, lambda: (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))),
    "p3": ("cifar100_wrn404, batch 128", WideResNet404, lambda: (torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,)))),
    "p4": ("tolstoi_char_rnn, batch 50x50", CharLSTM, lambda: (torch.randint(0, 83, (50, 50)), torch.randint(0, 83, (50, 50)))),
}


def optimizers(device: str, extended: bool = False):
    cuda = device == "cuda"
    out = {
        "M-SVAG": lambda p: lm.MSVAG(p, lr=1e-4),
        "M-SSD": lambda p: lm.MSSD(p, lr=1e-4),
        "Adam": lambda p: torch.optim.Adam(p, lr=1e-4, fused=True if cuda else None),
        "SGD-m": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, fused=True if cuda else None),
    }
    if extended:  # the fourth corner, both factors (docs/algorithm.md §1.2)
        out["M-SSD-VA"] = lambda p: lm.MSSDVA(p, lr=1e-4)
        out["M-SSD-VA sqrt"] = lambda p: lm.MSSDVA(p, lr=1e-4, factor="sqrt")
    if cuda:
        out["M-SVAG triton"] = triton_factory(lm.MSVAG, device)
        out["M-SSD triton"] = triton_factory(lm.MSSD, device)
    return out


def _steps(model, optimizer, batch, n: int, start: int, precision: str, device: str):
    autocast = (
        torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    for i in range(start, start + n):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model.training_step(batch, i)
            loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        optimizer.step()


def time_problem(cls, make_batch, device: str, precision: str, steps: int, warmup: int, rounds: int,
                 extended: bool = False):
    """{optimizer: median ms/step}, every optimizer on its own copy of one initial model."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    batch = tuple(t.to(device) for t in make_batch())
    initial = cls()
    initial.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
    runs = {}
    for name, make in optimizers(device, extended).items():
        model = copy.deepcopy(initial).to(device)
        model.log = lambda *a, **k: None
        model.train()
        optimizer = make(list(model.parameters()))
        _steps(model, optimizer, batch, warmup, 0, precision, device)  # state, kernels, allocator
        runs[name] = (model, optimizer)
    times = {name: [] for name in runs}
    for r in range(rounds):
        for name, (model, optimizer) in runs.items():
            sync()
            start = time.perf_counter()
            _steps(model, optimizer, batch, steps, warmup + r * steps, precision, device)
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--problems", default="p1,p2,p3,p4")
    parser.add_argument("--precision", default="32", help="comma-separated: 32, bf16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--extended", action="store_true", help="also M-SSD-VA with both factors (erf, sqrt)")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; ms per training step (median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps)", flush=True)
    names = list(optimizers(args.device, args.extended))
    header = f"| {'problem':32s} | prec | " + " | ".join(f"{n:>13s}" for n in names) + " | M-SVAG / Adam | M-SSD / SGD-m |"
    if args.device == "cuda":
        header += " triton M-SVAG / Adam | triton M-SSD / SGD-m |"
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|", flush=True)
    for precision in args.precision.split(","):
        for key in args.problems.split(","):
            title, cls, make_batch = PROBLEMS[key]
            ms = time_problem(cls, make_batch, args.device, precision, args.steps, args.warmup, args.rounds, args.extended)
            line = (f"| {title:32s} | {precision:>4s} | " + " | ".join(f"{ms[n]:13.2f}" for n in names)
                    + f" | {ms['M-SVAG'] / ms['Adam']:13.3f} | {ms['M-SSD'] / ms['SGD-m']:13.3f} |")
            if args.device == "cuda":
                line += (f" {ms['M-SVAG triton'] / ms['Adam']:20.3f} | {ms['M-SSD triton'] / ms['SGD-m']:20.3f} |")
            print(line, flush=True)


if __name__ == "__main__":
    main()
