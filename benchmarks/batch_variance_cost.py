"""Cost of the mini-batch variance estimate: one training step with vs without it, side by side.

For P1 (2c2d, batch 128), P2 (3c3d, batch 128), P4 (char-LSTM, batch 50 × 50) at their real
sizes and the character transformer (lightning_msvag.models.CharTransformer, batch 50 × 50), times forward + backward of the training loss (cross-entropy + L2) with

* ``plain``     — no estimate (the moving-average optimizers' cost);
* ``hooks``     — :class:`lightning_msvag.batch_variance.BatchVarianceEstimator` (forward +
  backward + ``compute``);
* ``torch.func``— ``vmap(grad(ℓ_k))`` per-example gradients (chunks of 16), squared and summed;
* ``backpack``  — BackPACK's ``SumGradSquared`` (only if ``backpack-for-pytorch`` imports;
  not a project dependency: ``pip install --target DIR backpack-for-pytorch einops unfoldNd``
  and put DIR on ``PYTHONPATH``).

Methods are interleaved round by round and the median per method is reported, with the ratio
to ``plain``. Run from the repository root::

    python benchmarks/batch_variance_cost.py [--rounds 5] [--threads N]

``--whole-step`` times one whole training step instead (zero_grad, forward, backward, the
estimate where used, optimizer step) of M-SVAG with the moving-average estimate
(``MSVAG(...)``, its default fused CPU path) against M-SVAG with the mini-batch estimate
(``MSVAG(..., variance="minibatch")`` + :class:`BatchVarianceEstimator`), side by side; also the
mini-batch estimate without its guards (no search for uses of a parameter outside its layers,
no reference copy of the gradient for the step's rescale check: their cost), and both
estimators with ``clip_grad_norm_`` after the backward pass (every step clips at ``--clip``)::

    python benchmarks/batch_variance_cost.py --whole-step [--rounds 5] [--threads N] [--problems p1,p4]

``--layers`` times the estimate of one layer at a time on a reference shape (batch 64), the
hand-written rule against the general one (``torch.func`` over the module's own forward) where
both apply, each as a multiple of the layer's own forward + backward::

    python benchmarks/batch_variance_cost.py --layers [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from lightning_msvag import MSVAG, batch_estimate  # noqa: E402
from lightning_msvag.batch_variance import BatchVarianceEstimator  # noqa: E402
from lightning_msvag.models import CharLSTM, CharTransformer, ThreeC3D, TwoC2D  # noqa: E402


def _problems(which: str = "p1,p2,p4"):
    torch.manual_seed(0)
    wanted = set(which.split(","))
    if "p1" in wanted:
        yield "P1 2c2d B=128", TwoC2D(), torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    if "p2" in wanted:
        yield "P2 3c3d B=128", ThreeC3D(), torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    if "p4" in wanted:
        yield "P4 char-LSTM 50x50", CharLSTM(), torch.randint(0, 83, (50, 50)), torch.randint(0, 83, (50, 50))
    if "transformer" in wanted:
        yield "char-transformer 50x50", CharTransformer(), torch.randint(0, 83, (50, 50)), torch.randint(0, 83, (50, 50))


def _loss(model, x, y):
    logits = model(x)
    if isinstance(logits, tuple):  # the character model returns (logits, state)
        logits = logits[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + model.regularizer()


def _plain(model, x, y):
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()


def _make_hooks(model):
    est = BatchVarianceEstimator(model)

    def step(model, x, y):
        model.zero_grad(set_to_none=True)
        with est.record():
            _loss(model, x, y).backward()
        est.compute()

    return step


def _make_func(model):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        if isinstance(out, tuple):
            out = out[0]
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    per_example = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=16, randomness="different")

    def step(model, x, y):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()  # the gradient itself, as every step needs
        g = per_example(params, x, y)
        {n: (t.sum(0), t.square().sum(0)) for n, t in g.items()}

    return step


def _make_backpack(model):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    own = extend(copy.deepcopy(model))  # extend() hooks every module for good: keep them off the others' model

    def step(model, x, y):
        own.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            _loss(own, x, y).backward()

    return step


class _Unguarded(BatchVarianceEstimator):
    """The estimator without what guards its hand-over (the state before issue 24): no search for
    uses of a parameter outside its layers, no reference copy of the gradient for the step's check."""

    def _check_uses(self, *calls):
        pass

    def _attach(self, p, variance):
        batch_estimate.attach(p, variance, None, "")


def _training_steps(model, clip: float):
    """One whole step of each M-SVAG variant, on its own copy of the model (same start)."""
    def variant(minibatch: bool, estimator=BatchVarianceEstimator, clip_norm=None):
        own = copy.deepcopy(model)
        opt = MSVAG(own.parameters(), lr=1e-3, variance="minibatch" if minibatch else "moving_average")
        est = estimator(own) if minibatch else None

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            if est is None:
                _loss(own, x, y).backward()
            else:
                with est.record():
                    _loss(own, x, y).backward()
                est.compute()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(own.parameters(), clip_norm)
            opt.step()

        return step

    return {
        "M-SVAG moving average": variant(False),
        "mini-batch, unguarded": variant(True, _Unguarded),
        "M-SVAG mini-batch": variant(True),
        "moving average + clip": variant(False, clip_norm=clip),
        "mini-batch + clip": variant(True, clip_norm=clip),
    }


def whole_step(args) -> None:
    """Each variant against the anchor (M-SVAG, moving average) pair by pair: in every round the
    anchor and the variant run back to back, in alternating order, and the ratio is taken within
    the pair. (On this shared CPU a step's time moves by up to 2× over minutes, and a step run
    right after another mini-batch step pays for the caches the other one emptied: ratios of
    separate medians, or of variants in a fixed order, mislead.)"""
    print(f"whole training step on {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median over {args.rounds} rounds of the ratio within an (anchor, variant) pair, order alternating")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, model, x, y in _problems(args.problems):
        model.train().to(device)
        x, y = x.to(device), y.to(device)
        methods = _training_steps(model, args.clip)
        anchor_label = "M-SVAG moving average"
        anchor = methods.pop(anchor_label)
        for step in [anchor, *methods.values()]:
            step(x, y)
            step(x, y)  # the fused kernel's first load, the estimator's first hooks
        ratios = {label: [] for label in methods}
        times = {label: [] for label in [anchor_label, *methods]}
        for r in range(args.rounds):
            for label, step in methods.items():
                pair = ((anchor_label, anchor), (label, step)) if r % 2 == 0 else ((label, step), (anchor_label, anchor))
                took = {}
                for which, run in pair:
                    sync()
                    t0 = time.perf_counter()
                    run(x, y)
                    sync()
                    took[which] = time.perf_counter() - t0
                ratios[label].append(took[label] / took[anchor_label])
                times[label].append(took[label])
                times[anchor_label].append(took[anchor_label])
        cells = [f"{anchor_label} {statistics.median(times[anchor_label]) * 1e3:.0f} ms"]
        cells += [f"{label} {statistics.median(times[label]) * 1e3:.0f} ms ({statistics.median(ratios[label]):.2f}x, "
                  f"quartiles {_quartiles(ratios[label])})" for label in methods]
        print(f"{name}: " + ", ".join(cells))


def _quartiles(values) -> str:
    if len(values) < 2:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.2f}–{q3:.2f}"


def _general(layer: torch.nn.Module) -> torch.nn.Module:
    """The same layer behind an overridden ``forward``: the estimator gives it the general rule."""
    base = type(layer)
    generic = type(f"General{base.__name__}", (base,), {"forward": lambda self, *a, **k: base.forward(self, *a, **k)})
    layer.__class__ = generic
    return layer


def _layer_cases():
    """(label, make_layer, input): one layer type on a reference shape, batch 64."""
    torch.manual_seed(0)
    seq = torch.randn(64, 50, 128)
    img = torch.randn(64, 32, 16, 16)
    nn = torch.nn
    return [
        ("Linear 512→512 on [64, 512]", lambda: nn.Linear(512, 512), torch.randn(64, 512)),
        ("Linear 128→128 on [64, 50, 128]", lambda: nn.Linear(128, 128), seq),
        ("Conv2d 32→64 3×3 on [64, 32, 16, 16]", lambda: nn.Conv2d(32, 64, 3, padding=1), img),
        ("Embedding 83×128 on [64, 50]", lambda: nn.Embedding(83, 128), torch.randint(0, 83, (64, 50))),
        ("LayerNorm(128) on [64, 50, 128]", lambda: nn.LayerNorm(128), seq),
        ("RMSNorm(128) on [64, 50, 128]", lambda: nn.RMSNorm(128), seq),
        ("LSTM layer 128→128 on [64, 50, 128]", lambda: _LSTMLayer(128, 128), seq),
        ("MultiheadAttention(128, 4) on [64, 50, 128]", lambda: nn.MultiheadAttention(128, 4, batch_first=True), seq),
        ("nn.LSTM 128→128 on [64, 50, 128]", lambda: nn.LSTM(128, 128, batch_first=True), seq),
        ("nn.GRU 128→128 on [64, 50, 128]", lambda: nn.GRU(128, 128, batch_first=True), seq),
        ("Conv1d 32→64 k5 on [64, 32, 100]", lambda: nn.Conv1d(32, 64, 5, padding=2), torch.randn(64, 32, 100)),
        ("Conv2d grouped (4) 32→64 3×3", lambda: nn.Conv2d(32, 64, 3, padding=1, groups=4), img),
        ("Conv3d 8→16 3×3×3 on [64, 8, 8, 8, 8]", lambda: nn.Conv3d(8, 16, 3, padding=1), torch.randn(64, 8, 8, 8, 8)),
        ("BatchNorm2d(32), eval", lambda: nn.BatchNorm2d(32).eval(), img),
    ]


class _LSTMLayer(torch.nn.Module):
    """The fused LSTM-layer protocol of lightning_msvag.per_example.LSTMLayerRule (P4's layer)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        from lightning_msvag.models import TFLSTMLayer

        self.layer = TFLSTMLayer(width, hidden)

    def forward(self, x):
        zeros = x.new_zeros(1, x.shape[0], self.layer.hidden_size)
        return self.layer(x, (zeros, zeros))[0]


def layers(args) -> None:
    """One layer type at a time: the estimate's ``compute`` over the layer's own forward + backward."""
    print(f"per layer type; torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    for label, make, x in _layer_cases():
        variants = {"hand-written": make()}
        if not isinstance(variants["hand-written"], (torch.nn.MultiheadAttention, torch.nn.RNNBase, _LSTMLayer,
                                                       torch.nn.Conv1d, torch.nn.Conv3d, torch.nn.BatchNorm2d)) \
                and getattr(variants["hand-written"], "groups", 1) == 1:
            variants["general"] = _general(make())
        else:
            variants = {"general" if not isinstance(variants["hand-written"], _LSTMLayer) else "hand-written": variants["hand-written"]}
        cells = []
        for kind, layer in variants.items():
            est = BatchVarianceEstimator(layer)
            plain, estimate = [], []
            for r in range(args.rounds + 1):
                layer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                with est.record():
                    out = layer(x, x, x, need_weights=False)[0] if isinstance(layer, torch.nn.MultiheadAttention) else layer(x)
                    out = out[0] if isinstance(out, tuple) else out
                    out.square().mean().backward()
                t1 = time.perf_counter()
                est.compute()
                t2 = time.perf_counter()
                if r:
                    plain.append(t1 - t0)
                    estimate.append(t2 - t1)
            est.close()
            base, cost = statistics.median(plain), statistics.median(estimate)
            cells.append(f"{kind} {cost * 1e3:.1f} ms ({cost / base:.2f}× fwd+bwd {base * 1e3:.1f} ms)")
        print(f"{label}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--whole-step", action="store_true", help="time whole M-SVAG training steps, both estimators")
    parser.add_argument("--clip", type=float, default=1e-3,
                        help="--whole-step: max norm of the clipped variants (small: every step clips)")
    parser.add_argument("--layers", action="store_true", help="the estimate of each layer type on a reference shape, "
                        "hand-written rule against the general one")
    parser.add_argument("--device", default="cpu", help="--whole-step: where the models and data live (cpu, cuda)")
    parser.add_argument("--problems", default="p1,p2,p4,transformer",
                        help="comma-separated subset of p1,p2,p4,transformer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.whole_step:
        whole_step(args)
        return
    if args.layers:
        layers(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds (after 1 warm-up)")
    for name, model, x, y in _problems(args.problems):
        model.train()
        methods = {"plain": _plain}
        for label, factory in (("hooks", _make_hooks), ("torch.func", _make_func), ("backpack", _make_backpack)):
            try:
                step = factory(model)
                step(model, x, y)  # warm-up, and fail here rather than in the timed loop
                methods[label] = step
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
                print(f"  {name}: {label} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        times = {label: [] for label in methods}
        _plain(model, x, y)
        for _ in range(args.rounds):
            for label, step in methods.items():
                t0 = time.perf_counter()
                step(model, x, y)
                times[label].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        cells = ", ".join(f"{label} {statistics.median(t) * 1e3:.0f} ms ({statistics.median(t) / base:.2f}x)" for label, t in times.items())
        print(f"{name}: {cells}")


if __name__ == "__main__":
    main()
