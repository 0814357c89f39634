"""Time one ``step()`` of each optimizer against torch.optim.Adam and SGD, side by side.

Two parameter sets: a WRN-40-4-sized one (the shapes of P3's network, 8.97M parameters in
~120 tensors) and a 100M-parameter one. Every variant steps on the same tensors with fresh
random gradients; each round times every variant once (interleaved, so a busy machine
affects all alike) and the median over rounds is reported. Ratios are against torch's
Adam on the same tensors from the same run.

    python benchmarks/optimizer_step.py [--rounds 7] [--sets wrn,100m] [--threads N]

Memory: "state" is the optimizer's persistent buffers per parameter; "transient" is the
process's peak resident memory during a step above the resident memory before it, as a
fraction of the parameters' size (Linux only; VmHWM reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import statistics
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


def variants():
    adam = torch.optim.Adam
    sgd = torch.optim.SGD
    return {
        "torch Adam (default)": lambda p: adam(p, lr=1e-3),
        "torch Adam (foreach)": lambda p: adam(p, lr=1e-3, foreach=True),
        "torch Adam (fused)": lambda p: adam(p, lr=1e-3, fused=True),
        "torch SGD-momentum (default)": lambda p: sgd(p, lr=1e-3, momentum=0.9),
        "torch SGD-momentum (foreach)": lambda p: sgd(p, lr=1e-3, momentum=0.9, foreach=True),
        "M-SGD (default)": lambda p: lm.MSGD(p, lr=1e-3),
        "M-SSD (default)": lambda p: lm.MSSD(p, lr=1e-3),
        "M-SSD (fused)": lambda p: lm.MSSD(p, lr=1e-3, fused=True),
        "M-SVAG (default)": lambda p: lm.MSVAG(p, lr=1e-3),
        "M-SVAG (single-tensor)": lambda p: lm.MSVAG(p, lr=1e-3, foreach=False),
        "M-SVAG (multi-tensor)": lambda p: lm.MSVAG(p, lr=1e-3, foreach=True),
        "M-SVAG (fused)": lambda p: lm.MSVAG(p, lr=1e-3, fused=True),
        "SVAG (default)": lambda p: lm.SVAG(p, lr=1e-3),
    }


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


def bench(shapes, rounds: int):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    print(f"  {n_params:,} parameters in {len(params)} tensors")

    optimizers = {}
    state_buffers, transient = {}, {}
    for name, make in variants().items():
        opt = make(params)
        start = time.perf_counter()
        opt.step()  # create state (and, for fused, compile) outside the timed region
        opt.step()
        if "fused" in name and "torch" not in name:
            print(f"  {name}: first two steps (compile included) {time.perf_counter() - start:.1f} s")
        optimizers[name] = opt
        state_bytes = sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for k, v in s.items()
            if torch.is_tensor(v) and k != "step"
        )
        state_buffers[name] = state_bytes / param_bytes
    times = {name: [] for name in optimizers}
    for r in range(rounds):
        for name, opt in optimizers.items():
            gc.collect()
            rss_before = _rss_kib("VmRSS")
            can_peak = _reset_peak_rss()
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
            if can_peak:
                peak = _rss_kib("VmHWM") - rss_before
                transient[name] = max(transient.get(name, 0), peak * 1024 / param_bytes)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}, state_buffers, transient


def report(title, medians, state_buffers, transient):
    adam_default = medians["torch Adam (default)"]
    adam_fused = medians["torch Adam (fused)"]
    sgd_foreach = medians["torch SGD-momentum (foreach)"]
    print(f"\n{title}")
    header = f"{'optimizer':32s} {'ms/step':>9s} {'/Adam default':>14s} {'/Adam fused':>12s} {'/SGD-mom foreach':>17s} {'state bufs':>11s} {'transient':>10s}"
    print(header)
    print("-" * len(header))
    for name, t in medians.items():
        print(
            f"{name:32s} {t * 1e3:9.2f} {t / adam_default:14.2f} {t / adam_fused:12.2f} "
            f"{t / sgd_foreach:17.2f} {state_buffers[name]:11.2f} {transient.get(name, float('nan')):10.3f}"
        )
    print(
        f"targets: M-SVAG default / Adam default = {medians['M-SVAG (default)'] / adam_default:.2f} (<= 1.0), "
        f"M-SVAG default / Adam fused = {medians['M-SVAG (default)'] / adam_fused:.2f} (<= 2.0), "
        f"M-SSD default / SGD-momentum foreach = {medians['M-SSD (default)'] / sgd_foreach:.2f} (<= 1.2)\n"
        f"fused:   M-SVAG fused / Adam fused = {medians['M-SVAG (fused)'] / adam_fused:.2f} (<= 2.0), "
        f"M-SSD fused / SGD-momentum foreach = {medians['M-SSD (fused)'] / sgd_foreach:.2f} (<= 1.2)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sets", default="wrn,100m", help="comma-separated: wrn, 100m")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    sets = {"wrn": ("WRN-40-4-sized parameter set", wrn_40_4_shapes), "100m": ("100M-parameter set", large_shapes)}
    for key in args.sets.split(","):
        title, shapes = sets[key]
        print(f"{title}:")
        report(title, *bench(shapes(), args.rounds))
        gc.collect()


if __name__ == "__main__":
    main()
