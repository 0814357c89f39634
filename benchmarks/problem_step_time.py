"""Time one training step (forward, backward, M-SVAG step) of each of the four problems.

Random inputs of each problem's shape at the configured batch size (docs/problems.md), the
model's own training loss (cross-entropy + L2), M-SVAG with its default paths. Prints
ms/step (median of the timed steps after warm-up) and, per problem, the ratio against
the same step with torch.optim.Adam (default) as anchor.

    python benchmarks/problem_step_time.py [--steps 10] [--warmup 3] [--problems p1,p2,p3,p4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lightning_msvag as lm
from models import CharLSTM, ThreeC3D, TwoC2D, WideResNet404

PROBLEMS = {
    "p1": ("fmnist_2c2d, batch 128", TwoC2D, lambda: (torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)))),
    "p2": ("cifar10_3c3d, batch 128", ThreeC3D, lambda: (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))),
    "p3": ("cifar100_wrn404, batch 128", WideResNet404, lambda: (torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,)))),
    "p4": ("tolstoi_char_rnn, batch 50x50", CharLSTM, lambda: (torch.randint(0, 83, (50, 50)), torch.randint(0, 83, (50, 50)))),
}


def time_steps(model, make_optimizer, batch, steps: int, warmup: int = 3):
    model.train()
    optimizer = make_optimizer(model.parameters())
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model.training_step(batch, i)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--problems", default="p1,p2,p3,p4")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'problem':34s} {'M-SVAG ms/step':>15s} {'Adam ms/step':>13s} {'ratio':>6s}")
    for key in args.problems.split(","):
        title, cls, make_batch = PROBLEMS[key]
        torch.manual_seed(0)
        batch = make_batch()
        model = cls()
        model.log = lambda *a, **k: None  # no trainer attached: logging is a no-op here
        msvag = time_steps(model, lambda p: lm.MSVAG(p, lr=1e-3), batch, args.steps, args.warmup)
        adam = time_steps(model, lambda p: torch.optim.Adam(p, lr=1e-4), batch, args.steps, args.warmup)
        print(f"{title:34s} {msvag * 1e3:15.1f} {adam * 1e3:13.1f} {msvag / adam:6.2f}", flush=True)


if __name__ == "__main__":
    main()
