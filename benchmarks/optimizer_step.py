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

``--extended`` adds M-SSD-VA with both factors (erf, √γ) to the variants and prints, under each
row, their default step over best Adam.

``--device cuda`` times the same table on a GPU (synchronised around each step;
"transient" is the peak of torch.cuda.max_memory_allocated above the memory allocated
before the step), with three more kinds of variant: torch's fused SGD-momentum (part of
"best SGD-m" there), and the fused Triton kernel of the family ("triton", see
lightning_msvag/_triton_kernel.py): through the optimizers with ``fused=True`` where their
dispatch routes CUDA tensors to it, else called directly with the same state (a
``DirectTriton`` stepper: the kernel plus its launch tables, without the optimizer's own
per-step Python work). On the 100M set it also reports the achieved bandwidth of the
Triton step (bytes the update must move / time) against a device-to-device copy of the
parameters measured in the same rounds.

Each layout's row is printed (flushed) as soon as it is measured.

Columns of the summary table (one row per layout):
  M-SVAG, SVAG / best Adam; M-SSD, M-SGD / best SGD-m: the default path of each;
  M-SVAG / its foreach: M-SVAG default / M-SVAG foreach=True;
  default / other (worst): max over the four optimizers and their other paths of
    default time / that path's time (> 1 would be a cliff of the default path);
  triton M-SVAG, SVAG / best Adam; M-SSD, M-SGD / best SGD-m (CUDA): the fused Triton
    kernel of each; triton transient: its largest extra device memory;
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
    "tiny": ("tiny (3 × 1,000; smoke runs)", lambda: [(1_000,)] * 3),
}

OURS = {"M-SVAG": lm.MSVAG, "SVAG": lm.SVAG, "M-SSD": lm.MSSD, "M-SGD": lm.MSGD}


class MSSDVASqrt(lm.MSSDVA):
    """M-SSD-VA with Adam's factor √γ (registry ``m-ssd-va-sqrt``), as a class for the table."""

    rule = lm.MSSDVA.rule_for(factor="sqrt")

    def __init__(self, params, lr=1e-3, **kwargs):
        super().__init__(params, lr, factor="sqrt", **kwargs)


#: ``--extended``: the fourth corner (docs/algorithm.md §1.2), compared with best Adam
EXTENDED = {"M-SSD-VA": lm.MSSDVA, "M-SSD-VA sqrt": MSSDVASqrt}

#: bytes the update must move per element, in units of the element size (Adam's traffic)
TRAFFIC = {"M-SVAG": 7, "SVAG": 7, "M-SSD": 5, "M-SGD": 5,  # read g, θ, m~(, v~); write θ, m~(, v~)
           "M-SSD-VA": 7, "M-SSD-VA sqrt": 7}


class DirectTriton:
    """The fused Triton kernel called directly, with the state the optimizers keep (m~, v~ of
    the parameter's dtype, a 0-dim float32 step counter per tensor on the device)."""

    def __init__(self, params, rule, lr=1e-3, beta=0.9):
        from lightning_msvag import _triton_kernel

        self.kernel = _triton_kernel
        self.params = list(params)
        self.rule, self.lr, self.beta = rule, lr, beta
        self.exp_avgs = [torch.zeros_like(p) for p in self.params] if rule.needs_first_moment else None
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params] if rule.needs_second_moment else None
        self.steps = [torch.zeros((), device=p.device) for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        torch._foreach_add_(self.steps, 1)
        self.kernel.fused_update(self.rule, self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                                 lr=self.lr, beta=self.beta, maximize=False)


def _optimizer_dispatch_has_triton() -> bool:
    """Whether ``cls(..., fused=True)`` on CUDA tensors runs (the optimizers route it to Triton)."""
    p = torch.nn.Parameter(torch.zeros(8, device="cuda"))
    p.grad = torch.ones(8, device="cuda")
    try:
        lm.MSVAG([p], lr=0.1, fused=True).step()
    except (ValueError, RuntimeError):
        return False
    return True


def triton_factory(cls, device: str = "cuda"):
    """``make(params)`` for the fused Triton path of ``cls`` (see the module docstring).
    On CPU (``TRITON_INTERPRET=1`` smoke runs) always :class:`DirectTriton`."""
    global _WIRED
    if device != "cuda":
        return lambda p: DirectTriton(p, cls.rule, lr=1e-3)
    if _WIRED is None:
        _WIRED = _optimizer_dispatch_has_triton()
        how = "the optimizers (fused=True)" if _WIRED else "DirectTriton (the optimizers do not route CUDA to it yet)"
        print(f"triton path: through {how}", flush=True)
    if _WIRED:
        return lambda p: cls(p, lr=1e-3, fused=True)
    return lambda p: DirectTriton(p, cls.rule, lr=1e-3)


_WIRED = None


def variants(device: str = "cpu", triton: bool = False):
    adam, sgd = torch.optim.Adam, torch.optim.SGD
    out = {
        "torch Adam (default)": lambda p: adam(p, lr=1e-3),
        "torch Adam (foreach)": lambda p: adam(p, lr=1e-3, foreach=True),
        "torch Adam (fused)": lambda p: adam(p, lr=1e-3, fused=True),
        "torch SGD-m (default)": lambda p: sgd(p, lr=1e-3, momentum=0.9),
        "torch SGD-m (foreach)": lambda p: sgd(p, lr=1e-3, momentum=0.9, foreach=True),
    }
    if device == "cuda":
        out["torch SGD-m (fused)"] = lambda p: sgd(p, lr=1e-3, momentum=0.9, fused=True)
    for name, cls in OURS.items():
        out[f"{name} (default)"] = lambda p, cls=cls: cls(p, lr=1e-3)
        out[f"{name} (single)"] = lambda p, cls=cls: cls(p, lr=1e-3, foreach=False, fused=False)
        out[f"{name} (foreach)"] = lambda p, cls=cls: cls(p, lr=1e-3, foreach=True)
        if triton:
            out[f"{name} (triton)"] = triton_factory(cls, device)
    return out


class _Copy:
    """A device-to-device copy of the parameters (the bandwidth yardstick), as a "step"."""

    def __init__(self, params):
        self.src = [p.detach() for p in params]
        self.dst = [torch.empty_like(p) for p in self.src]

    def step(self):
        torch._foreach_copy_(self.dst, self.src)


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


def bench(shapes, rounds: int, share: bool, device: str = "cpu", copy: bool = False, triton: bool = False):
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
    for name, make in variants(device, triton).items():
        opt = make(fresh_params())
        opt.step()  # create state (and load/build any kernel) outside the timed region
        opt.step()
        optimizers[name] = opt
    if copy:
        optimizers["D2D copy"] = _Copy(base)
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
    best_sgd = min(medians[k] for k in ("torch SGD-m (default)", "torch SGD-m (foreach)", "torch SGD-m (fused)")
                   if k in medians)
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
        triton={
            name: medians[f"{name} (triton)"] / (best_adam if name in ("M-SVAG", "SVAG") else best_sgd)
            for name in OURS if f"{name} (triton)" in medians
        },
        triton_transient=max((transient.get(f"{name} (triton)", float("nan")) for name in OURS), default=float("nan")),
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
    parser.add_argument("--triton", action="store_true",
                        help="the fused Triton columns (always on CUDA; on CPU only under TRITON_INTERPRET=1, "
                        "a smoke run: use --sets tiny)")
    parser.add_argument("--bandwidth-set", default="100m", help="the layout whose bandwidth is reported (triton)")
    parser.add_argument("--extended", action="store_true",
                        help="also M-SSD-VA (erf and √γ factors): a line per layout with their default step / best Adam")
    args = parser.parse_args()
    if args.extended:
        OURS.update(EXTENDED)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, float32, {args.rounds} rounds (medians)", flush=True)
    cuda = args.device == "cuda"
    triton = cuda or args.triton
    header = (f"| {'layout':40s} | M-SVAG / best Adam | SVAG / best Adam | M-SSD / best SGD-m | M-SGD / best SGD-m "
              f"| M-SVAG / its foreach | default / other (worst) | transient |")
    if triton:
        header += " triton M-SVAG | triton SVAG | triton M-SSD | triton M-SGD | triton transient |"
    rule_line = "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"
    print("\n" + header + "\n" + rule_line, flush=True)
    bandwidth = []
    default_sets = args.sets == ",".join(LAYOUTS)
    for key in (k for k in args.sets.split(",") if not (default_sets and k == "tiny")):
        title, shapes = LAYOUTS[key]
        shapes = shapes()
        big = key == args.bandwidth_set and triton
        medians, transient = bench(shapes, args.rounds, share=key == "100m", device=args.device, copy=big,
                                   triton=triton)
        r = summary_row(medians, transient)
        line = (
            f"| {title:40s} | {r['msvag']:18.2f} | {r['svag']:16.2f} | {r['mssd']:18.2f} | {r['msgd']:18.2f} "
            f"| {r['own_foreach']:20.2f} | {r['worst']:10.2f} ({r['worst_name']:>12s}) | {r['transient']:9.2f} |"
        )
        if triton:
            t = r["triton"]
            line += (f" {t.get('M-SVAG', float('nan')):13.2f} | {t.get('SVAG', float('nan')):11.2f} "
                     f"| {t.get('M-SSD', float('nan')):12.2f} | {t.get('M-SGD', float('nan')):12.2f} "
                     f"| {r['triton_transient']:16.2f} |")
        print(line, flush=True)
        if args.extended:
            best_adam = min(medians[f"torch Adam ({k})"] for k in ("default", "foreach", "fused"))
            print("    " + ", ".join(f"{name} / best Adam {medians[f'{name} (default)'] / best_adam:.2f}"
                                     + (f" (triton {medians[f'{name} (triton)'] / best_adam:.2f})" if triton else "")
                                     for name in EXTENDED), flush=True)
        if args.details:
            for name, seconds in medians.items():
                print(f"    {name:28s} {seconds * 1e3:9.3f} ms   transient {transient.get(name, float('nan')):.2f}", flush=True)
        if big:
            numel = sum(torch.Size(s).numel() for s in shapes)
            copy_rate = 2 * 4 * numel / medians["D2D copy"]  # read + write, float32
            bandwidth.append(f"{title}: device-to-device copy {copy_rate / 1e9:7.0f} GB/s "
                             f"({medians['D2D copy'] * 1e3:.3f} ms)")
            for name in OURS:
                seconds = medians[f"{name} (triton)"]
                rate = TRAFFIC[name] * 4 * numel / seconds
                adam = medians["torch Adam (fused)"]
                bandwidth.append(f"{title}: triton {name:6s} {rate / 1e9:7.0f} GB/s = {rate / copy_rate:5.2f} × copy "
                                 f"({seconds * 1e3:.3f} ms; torch fused Adam {adam * 1e3:.3f} ms)")
            print("\n".join(bandwidth), flush=True)
        del medians, transient
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if not args.no_first_step and args.device == "cpu":
        costs = first_step_costs()
        print(
            f"\nfirst step() of a fresh process (WRN layout, kernel already built): M-SVAG "
            f"{costs['msvag']:.3f} s, torch Adam {costs['adam']:.3f} s, difference "
            f"{costs['msvag'] - costs['adam']:+.3f} s"
        )


if __name__ == "__main__":
    main()
