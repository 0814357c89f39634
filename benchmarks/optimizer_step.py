"""Time one ``step()`` of each optimizer and path against torch's Adam and SGD-momentum.

Five parameter layouts: the shapes of a WRN-40-4 (8.97M parameters in 116 tensors), the
same count as 100 × 89,723 and as 2,000 × 1,000 (2M) tensors, 4 × 2.5M, and the 100M set
of the README (52 tensors). Every variant steps on its own copy of the same tensors (the
100M set shares parameters and gradients between variants to save memory; each optimizer
has its own state), with fixed random gradients; each round times every variant once,
interleaved in one process (a busy machine affects all alike), and the median over rounds
is reported. "best Adam" is the fastest of torch Adam default / foreach / fused on the
same tensors, "best SGD-m" the fastest of torch SGD-momentum default / foreach.

    python benchmarks/optimizer_step.py [--rounds 7] [--sets wrn,100x89723,2000x1000,4x2.5m,100m]
                                        [--threads N] [--no-first-step] [--device cuda]

``--device cuda`` times the same table on a GPU (synchronised around each step; on CUDA
the default path of the family is multi-tensor, "transient" is the peak of
torch.cuda.max_memory_allocated above the memory allocated before the step).

Columns of the summary table (one row per layout):
  M-SVAG, SVAG / best Adam; M-SSD, M-SGD / best SGD-m: the default path of each;
  M-SVAG / its foreach: M-SVAG default / M-SVAG foreach=True;
  default / other (worst): max over the four optimizers and their other paths of
    default time / that path's time (> 1 would be a cliff of the default path);
  transient: the largest extra resident memory during one default step of the four
    optimizers, as a fraction of the parameters' size (Linux: VmHWM reset through
    /proc/self/clear_refs); 0.00 means no parameter-sized temporary.
Then the first-step cost: two fresh processes (subprocesses) each time their first
``step()`` on the WRN layout, M-SVAG default vs torch Adam default (any one-time kernel
build happens before, in a separate process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import lightning_msvag as lm


def wrn_40_4_shapes(num_classes: int = 100):
    """Parameter shapes of the pre-activation WRN-40-4 of docs/problems.md (P3)."""
    shapes = [(16, 3, 3, 3)]
    in_ch = 16
    for width in (64, 128, 256):
        for unit in range(6):
            shapes += [(in_ch,), (in_ch,), (width, in_ch, 3, 3), (width,), (width,), (width, width, 3, 3)]
            if unit == 0:
                shapes.append((width, in_ch, 1, 1))
            in_ch = width
    shapes += [(256,), (256,), (num_classes, 256), (num_classes,)]
    return shapes


def large_shapes():
    """100M parameters: 22 matrices of 2048×2048, 7 of 1024×1024, biases, and one vector."""
    shapes = [(2048, 2048)] * 22 + [(1024, 1024)] * 7 + [(2048,)] * 22
    missing = 100_000_000 - sum(torch.Size(s).numel() for s in shapes)
    return shapes + [(missing,)]


LAYOUTS = {
    "wrn": ("WRN-40-4 shapes (8.97M in 116 tensors)", wrn_40_4_shapes),
    "100x89723": ("100 × 89,723 (8.97M)", lambda: [(89_723,)] * 100),
    "2000x1000": ("2,000 × 1,000 (2M)", lambda: [(1_000,)] * 2_000),
    "4x2.5m": ("4 × 2.5M (10M)", lambda: [(2_500_000,)] * 4),
    "100m": ("100M set (52 tensors)", large_shapes),
}

OURS = {"M-SVAG": lm.MSVAG, "SVAG": lm.SVAG, "M-SSD": lm.MSSD, "M-SGD": lm.MSGD}


def variants():
    adam, sgd = torch.optim.Adam, torch.optim.SGD
    out = {
        "torch Adam (default)": lambda p: adam(p, lr=1e-3),
        "torch Adam (foreach)": lambda p: adam(p, lr=1e-3, foreach=True),
        "torch Adam (fused)": lambda p: adam(p, lr=1e-3, fused=True),
        "torch SGD-m (default)": lambda p: sgd(p, lr=1e-3, momentum=0.9),
        "torch SGD-m (foreach)": lambda p: sgd(p, lr=1e-3, momentum=0.9, foreach=True),
    }
    for name, cls in OURS.items():
        out[f"{name} (default)"] = lambda p, cls=cls: cls(p, lr=1e-3)
        out[f"{name} (single)"] = lambda p, cls=cls: cls(p, lr=1e-3, foreach=False, fused=False)
        out[f"{name} (foreach)"] = lambda p, cls=cls: cls(p, lr=1e-3, foreach=True)
    return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench(shapes, rounds: int, share: bool, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    param_bytes = sum(b.numel() * b.element_size() for b in base)

    def fresh_params():
        params = [torch.nn.Parameter(b if share else b.clone()) for b in base]
        for p, g in zip(params, grads):
            p.grad = g if share else g.clone()
        return params

    optimizers = {}
    for name, make in variants().items():
        opt = make(fresh_params())
        opt.step()  # create state (and load/build any kernel) outside the timed region
        opt.step()
        optimizers[name] = opt
    times = {name: [] for name in optimizers}
    transient = {}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            gc.collect()
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                allocated = torch.cuda.memory_allocated()
            rss_before = _rss_kib("VmRSS")
            can_peak = not cuda and _reset_peak_rss()
            start = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - start)
            if cuda:
                peak = torch.cuda.max_memory_allocated() - allocated
                transient[name] = max(transient.get(name, 0.0), peak / param_bytes)
            if can_peak:
                peak = _rss_kib("VmHWM") - rss_before
                transient[name] = max(transient.get(name, 0.0), peak * 1024 / param_bytes)
    return {name: statistics.median(t) for name, t in times.items()}, transient


def summary_row(medians, transient):
    best_adam = min(medians[f"torch Adam ({k})"] for k in ("default", "foreach", "fused"))
    best_sgd = min(medians[f"torch SGD-m ({k})"] for k in ("default", "foreach"))
    worst_name, worst = None, 0.0
    for name in OURS:
        for other in ("single", "foreach"):
            ratio = medians[f"{name} (default)"] / medians[f"{name} ({other})"]
            if ratio > worst:
                worst_name, worst = f"{name}/{other}", ratio
    return dict(
        msvag=medians["M-SVAG (default)"] / best_adam,
        svag=medians["SVAG (default)"] / best_adam,
        mssd=medians["M-SSD (default)"] / best_sgd,
        msgd=medians["M-SGD (default)"] / best_sgd,
        own_foreach=medians["M-SVAG (default)"] / medians["M-SVAG (foreach)"],
        worst=worst,
        worst_name=worst_name,
        transient=max(transient.get(f"{name} (default)", float("nan")) for name in OURS),
    )


_FIRST_STEP = r"""
import sys, time, json, torch
import lightning_msvag as lm
sys.path.insert(0, {bench_dir!r})
from optimizer_step import wrn_40_4_shapes
gen = torch.Generator().manual_seed(0)
out = {{}}
for name, make in [("adam", lambda p: torch.optim.Adam(p, lr=1e-3)), ("msvag", lambda p: lm.MSVAG(p, lr=1e-3))]:
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in wrn_40_4_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = make(params)
    start = time.perf_counter()
    opt.step()
    out[name] = time.perf_counter() - start
print(json.dumps(out))
"""


def first_step_costs(repeats: int = 2):
    """First step() of M-SVAG and torch Adam, each in fresh processes (medians)."""
    code = _FIRST_STEP.format(bench_dir=os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", "import lightning_msvag._cpu_kernel as k; k.kernel()"], check=True)
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in ("adam", "msvag")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sets", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-first-step", action="store_true", help="skip the fresh-process measurement")
    parser.add_argument("--details", action="store_true", help="also print ms/step of every variant")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, float32, {args.rounds} rounds (medians)")
    rows = {}
    for key in args.sets.split(","):
        title, shapes = LAYOUTS[key]
        shapes = shapes()
        medians, transient = bench(shapes, args.rounds, share=key == "100m", device=args.device)
        rows[title] = summary_row(medians, transient)
        if args.details:
            print(f"\n{title}")
            for name, t in medians.items():
                print(f"  {name:28s} {t * 1e3:9.2f} ms   transient {transient.get(name, float('nan')):.2f}")
        gc.collect()
    header = (f"| {'layout':40s} | M-SVAG / best Adam | SVAG / best Adam | M-SSD / best SGD-m | M-SGD / best SGD-m "
              f"| M-SVAG / its foreach | default / other (worst) | transient |")
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for title, r in rows.items():
        print(
            f"| {title:40s} | {r['msvag']:18.2f} | {r['svag']:16.2f} | {r['mssd']:18.2f} | {r['msgd']:18.2f} "
            f"| {r['own_foreach']:20.2f} | {r['worst']:10.2f} ({r['worst_name']:>12s}) | {r['transient']:9.2f} |"
        )
    if not args.no_first_step and args.device == "cpu":
        costs = first_step_costs()
        print(
            f"\nfirst step() of a fresh process (WRN layout, kernel already built): M-SVAG "
            f"{costs['msvag']:.3f} s, torch Adam {costs['adam']:.3f} s, difference "
            f"{costs['msvag'] - costs['adam']:+.3f} s"
        )


if __name__ == "__main__":
    main()
