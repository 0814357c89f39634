"""The family's step inside ``torch.compile``: against torch's compiled Adam and against its own eager step.

For each layout of ``benchmarks/optimizer_step.py`` and each method of the table, times one
``step()`` three ways on the same tensors (each on its own copy, fixed random gradients):

* ``eager``: the method's default step (the fused CPU kernel; on CUDA the Triton kernel);
* ``compiled``: ``torch.compile(step, fullgraph=True)`` — fullgraph, so no graph break is possible
  (on CPU the step is then one custom operator running the eager kernel; ``--traced`` times the
  update traced for inductor instead, the CUDA path);
* ``Adam compiled``: ``torch.compile`` of ``torch.optim.Adam``'s default step (Adam graph-breaks
  by design around its step; fullgraph would refuse it).

Each round runs the three in rotating order and the ratios are taken within the round; medians
over the rounds. After the timed rounds it reports how many graphs each compiled function built
(1: no recompilation after the first step). The mini-batch rows step with a σ̂² set by hand.
``--whole-step`` times a whole training step of P1 and P4 (forward, backward, M-SVAG step):
eager against ``torch.compile(model)`` + the compiled step::

    python benchmarks/compiled_step.py [--sets wrn,100x89723,2000x1000,4x2.5m] [--rounds 7] [--device cuda] [--traced]
    python benchmarks/compiled_step.py --whole-step [--rounds 7]
    python benchmarks/compiled_step.py --fixed-cost [--rounds 31]   (the step without its update)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for entry in (str(ROOT), str(ROOT / "benchmarks")):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_msvag as lm  # noqa: E402
from lightning_msvag.registry import METHODS  # noqa: E402
from optimizer_step import LAYOUTS  # noqa: E402


def _compiled(fn, fullgraph: bool):
    """``torch.compile(fn)`` with inductor, and a function counting the graphs it built."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    return torch.compile(fn, fullgraph=fullgraph, backend=counter), (lambda: counter.frame_count)


def _params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return params


def _timed(run, sync):
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t0


def layouts(args) -> None:
    # every optimizer instance is its own graph of the one step() code object: Dynamo's default of 8
    # per code object is not enough for all the methods of a layout in one process
    torch._dynamo.config.recompile_limit = 64
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = [m for m in METHODS if issubclass(m.cls, lm.DissectedOptimizer)
            and (not args.methods or m.name in args.methods.split(","))]
    print(f"one step on {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads, median over "
          f"{args.rounds} rounds of ratios within a round (order rotating)")
    for key in args.sets.split(","):
        label, make_shapes = LAYOUTS[key]
        shapes = make_shapes()
        adam_params = _params(shapes, device)
        adam = torch.optim.Adam(adam_params, lr=1e-3)
        adam_step, adam_graphs = _compiled(adam.step, fullgraph=False)
        adam_step(), adam_step()
        print(f"{label}:", flush=True)
        for method in rows:
            eager_params, compiled_params = _params(shapes, device), _params(shapes, device)
            eager = method.cls(eager_params, lr=1e-3, **method.init_args)
            traced = method.cls(compiled_params, lr=1e-3, **method.init_args)
            variances = [torch.rand_like(p) for p in eager_params] if method.needs_batch_variance else None

            def with_estimate(opt, params, run):
                def step():
                    if variances is not None:
                        for p, s in zip(params, variances):
                            p.grad_batch_variance = s
                    run()
                return step

            start = time.perf_counter()
            compiled_step, graphs = _compiled(traced.step, fullgraph=True)
            runs = {"eager": with_estimate(eager, eager_params, eager.step),
                    "compiled": with_estimate(traced, compiled_params, compiled_step),
                    "Adam compiled": adam_step}
            runs["compiled"]()
            compile_s = time.perf_counter() - start
            runs["eager"](), runs["compiled"]()
            times = {name: [] for name in runs}
            order = list(runs)
            for r in range(args.rounds):
                for name in order[r % 3:] + order[: r % 3]:
                    times[name].append(_timed(runs[name], sync))
            vs_adam = statistics.median(c / a for c, a in zip(times["compiled"], times["Adam compiled"]))
            vs_eager = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
            ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(f"  {method.name:14s} eager {ms['eager']:8.2f} ms  compiled {ms['compiled']:8.2f} ms  "
                  f"Adam compiled {ms['Adam compiled']:8.2f} ms  compiled/Adam compiled {vs_adam:.2f}  "
                  f"compiled/eager {vs_eager:.2f}  graphs {graphs()} (first call {compile_s:.1f} s)", flush=True)


def fixed_cost(args) -> None:
    """The cost of a step without its update (``functional._run_step`` a no-op): eager against
    compiled, per layout, for M-SVAG: what the compiled call adds whatever the tensors' sizes."""
    from lightning_msvag import functional

    torch._dynamo.config.recompile_limit = 64
    update = functional._run_step
    print(f"M-SVAG step without its update; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median over {args.rounds} rounds")
    for key in args.sets.split(","):
        label, make_shapes = LAYOUTS[key]
        shapes = make_shapes()
        eager = lm.MSVAG(_params(shapes, "cpu"), lr=1e-3)
        traced = lm.MSVAG(_params(shapes, "cpu"), lr=1e-3)
        compiled_step, _ = _compiled(traced.step, fullgraph=True)
        functional._run_step = lambda *a, **k: None
        try:
            runs = {"eager": eager.step, "compiled": compiled_step}
            for run in runs.values():
                run(), run()
            times = {name: [] for name in runs}
            for r in range(args.rounds):
                for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    times[name].append(_timed(runs[name], lambda: None))
        finally:
            functional._run_step = update
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{label}: eager {ms['eager']:.3f} ms, compiled {ms['compiled']:.3f} ms "
              f"(+{ms['compiled'] - ms['eager']:.3f} ms)", flush=True)


def whole_step(args) -> None:
    from lightning_msvag.models import CharLSTM, TwoC2D

    print(f"whole training step, M-SVAG; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median over {args.rounds} rounds of ratios within a pair")
    torch.manual_seed(0)
    problems = [("P1 2c2d B=128", TwoC2D(), torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))),
                ("P4 char-LSTM 50x50", CharLSTM(), torch.randint(0, 83, (50, 50)), torch.randint(0, 83, (50, 50)))]
    for name, model, x, y in problems:
        def loss_of(m):
            out = m(x)
            out = out[0] if isinstance(out, tuple) else out
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        eager_model, compiled_model = copy.deepcopy(model).train(), copy.deepcopy(model).train()
        eager_opt = lm.MSVAG(eager_model.parameters(), lr=1e-3)
        traced_opt = lm.MSVAG(compiled_model.parameters(), lr=1e-3)
        forward = torch.compile(compiled_model)
        opt_step, graphs = _compiled(traced_opt.step, fullgraph=True)

        def eager():
            eager_opt.zero_grad(set_to_none=True)
            loss_of(eager_model).backward()
            eager_opt.step()

        def compiled():
            traced_opt.zero_grad(set_to_none=True)
            loss_of(forward).backward()
            opt_step()

        for _ in range(3):
            eager(), compiled()
        ratios, times = [], {"eager": [], "compiled": []}
        for r in range(args.rounds):
            pair = (("eager", eager), ("compiled", compiled)) if r % 2 == 0 else (("compiled", compiled), ("eager", eager))
            took = {n: _timed(f, lambda: None) for n, f in pair}
            ratios.append(took["compiled"] / took["eager"])
            for n in took:
                times[n].append(took[n])
        print(f"{name}: eager {statistics.median(times['eager']) * 1e3:.0f} ms, compiled "
              f"{statistics.median(times['compiled']) * 1e3:.0f} ms ({statistics.median(ratios):.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="wrn,100x89723,4x2.5m", help=f"comma-separated layouts of {list(LAYOUTS)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--methods", default="", help="comma-separated registry names (default: every method of the table)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--whole-step", action="store_true", help="whole training steps of P1 and P4, eager vs compiled")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="M-SVAG's step with its update switched off: what the compiled call itself costs")
    parser.add_argument("--traced", action="store_true",
                        help="on CPU, trace the update for inductor instead of calling the eager step as one operator")
    args = parser.parse_args()
    if args.traced:
        from lightning_msvag import functional

        functional.COMPILED_CPU_STEP_AS_OPERATOR = False
    if args.threads:
        torch.set_num_threads(args.threads)
    (whole_step if args.whole_step else fixed_cost if args.fixed_cost else layouts)(args)


if __name__ == "__main__":
    main()
