"""The two variance estimates of M-SVAG along one training run, side by side (paper §4.1).

Trains a problem with M-SVAG and its moving-average estimate (what drives the steps) and, on
the same trajectory, also forms the mini-batch estimate of docs/algorithm.md §1.1 from each
step's per-example gradients. Per step and per parameter coordinate it compares

* moving average: var̂_MA[m] = ρ(β, k) s_k, s_k = (v − m²)/(1 − ρ) (docs/algorithm.md §1);
* mini-batch:     var̂_MB[m] = u_k / (1 − β^k)², u_k = β² u_{k−1} + (1 − β)² σ̂²_k (§1.1),

and the factors γ = m² / (m² + var̂[m]) each would give (m = m~/(1 − β^k), the same for both).
It reports, every ``--every`` steps, the median over coordinates of var̂_MA/var̂_MB, the ratio of
their sums over all coordinates, and the mean of each γ over coordinates. The moving average sees the change of the true gradient over its
~1/(1 − β) steps as noise; the mini-batch estimate sees only the sampling noise of this step.

Run from the repository root (real data: Fashion-MNIST as in docs/fashion_mnist_offline.md;
War and Peace is embedded)::

    python benchmarks/variance_estimates.py --problem p4 --lr 10 --steps 400 --out /tmp/est
    python benchmarks/variance_estimates.py --problem p1 --lr 0.3 --steps 468 --data-dir DATA --out /tmp/est

Writes ``<out>/variance_estimates_<problem>.json`` and, with ``--plot`` after both problems
ran, ``<out>/variance_estimates.png`` from the JSON files there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_msvag import MSVAG  # noqa: E402
from lightning_msvag.batch_variance import BatchVarianceEstimator  # noqa: E402
from lightning_msvag.rule import bias_correction, variance_ratio  # noqa: E402

PROBLEMS = {"p1": "P1 2c2d, Fashion-MNIST", "p4": "P4 char-LSTM, War and Peace"}


def _problem(name: str, data_dir: str, seed: int):
    torch.manual_seed(seed)
    if name == "p4":
        from lightning_msvag.datamodules import TolstoiDataModule
        from lightning_msvag.models import CharLSTM

        model, data = CharLSTM(), TolstoiDataModule(data_dir=data_dir, seed=seed)
    else:
        from lightning_msvag.datamodules import FashionMNISTDataModule
        from lightning_msvag.models import TwoC2D

        model, data = TwoC2D(), FashionMNISTDataModule(data_dir=data_dir, seed=seed, download=False)
    data.prepare_data()
    data.setup("fit")
    return model, data.train_dataloader()


def run(args) -> dict:
    model, loader = _problem(args.problem, args.data_dir, args.seed)
    model.train()
    beta = 0.9
    opt = MSVAG(model.parameters(), lr=args.lr, beta=beta)
    est = BatchVarianceEstimator(model)
    params = [p for p in model.parameters() if p.requires_grad]
    u = [torch.zeros_like(p) for p in params]
    rows = []
    batches = iter(loader)
    for k in range(1, args.steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        with est.record():
            logits = model.step_logits(x, "train", k - 1)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + model.regularizer()
            loss.backward()
        est.compute()
        opt.step()
        with torch.no_grad():
            for ui, p in zip(u, params):
                ui.mul_(beta**2).add_(p.grad_batch_variance, alpha=(1 - beta) ** 2)
            if k < 2 or k % args.every:
                continue  # at k = 1, ρ = 1: no moving-average estimate yet (the first step is SGD's)
            bc, rho = bias_correction(beta, k), variance_ratio(beta, k)
            ratios, g_ma, g_mb, total_ma, total_mb = [], [], [], 0.0, 0.0
            for ui, p in zip(u, params):
                state = opt.state[p]
                m, v = state["exp_avg"] / bc, state["exp_avg_sq"] / bc
                var_ma = (rho / (1 - rho)) * (v - m.square()).clamp_min(0)
                var_mb = ui / bc**2
                m2 = m.square()
                g_ma.append((m2 / (m2 + var_ma)).nan_to_num(0.0).flatten())
                g_mb.append((m2 / (m2 + var_mb)).nan_to_num(0.0).flatten())
                ok = (var_mb > 0) & (var_ma > 0)
                ratios.append((var_ma[ok] / var_mb[ok]).flatten())
                total_ma += float(var_ma.sum())
                total_mb += float(var_mb.sum())
            ratio = torch.cat(ratios)
            # The median, not quantiles: coordinates whose data gradient has died (a ReLU that no
            # longer fires) keep a decaying u of ~β^(2k) against a round-off-sized v − m², whose
            # quotient means nothing. The ratio of the sums weighs coordinates by their variance.
            row = {"step": k, "loss": float(loss), "median_ratio": float(ratio.median()),
                   "sum_ratio": total_ma / total_mb if total_mb > 0 else None,
                   "mean_gamma_ma": float(torch.cat(g_ma).mean()), "mean_gamma_mb": float(torch.cat(g_mb).mean())}
            rows.append(row)
            if not args.quiet:
                print(f"step {k:4d}  loss {row['loss']:.3f}  var_MA/var_MB median {row['median_ratio']:.2f}, "
                      f"of the sums {row['sum_ratio']:.2f}  "
                      f"mean γ: MA {row['mean_gamma_ma']:.3f}, MB {row['mean_gamma_mb']:.3f}", flush=True)
    est.close()
    return {"problem": args.problem, "label": PROBLEMS[args.problem], "lr": args.lr, "beta": beta,
            "seed": args.seed, "steps": args.steps, "rows": rows}


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(out.glob("variance_estimates_*.json"))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for res, color in zip(results, ("tab:blue", "tab:orange", "tab:green")):
        steps = [r["step"] for r in res["rows"]]
        label = f"{res['label']} (M-SVAG, α={res['lr']:g})"
        left.plot(steps, [r["median_ratio"] for r in res["rows"]], color=color, label=f"{label}: median over coordinates")
        left.plot(steps, [r["sum_ratio"] for r in res["rows"]], color=color, ls=":", label=f"{res['label']}: ratio of the sums")
        right.plot(steps, [r["mean_gamma_ma"] for r in res["rows"]], color=color, label=f"{res['label']}: moving average")
        right.plot(steps, [r["mean_gamma_mb"] for r in res["rows"]], color=color, ls="--", label=f"{res['label']}: mini-batch")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_yscale("log")
    left.set(xlabel="training step", ylabel="Var_MA[m] / Var_MB[m]",
             title="Moving-average over mini-batch variance estimate")
    right.set(xlabel="training step", ylabel="mean γ over coordinates", title="The factor γ each estimate gives")
    left.legend(fontsize=7, loc="upper right")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("Two variance estimates on one M-SVAG trajectory (same m, same steps)")
    fig.tight_layout()
    path = out / "variance_estimates.png"
    fig.savefig(path, dpi=130)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="p4")
    parser.add_argument("--data-dir", default="./data", help="data folder (P4: the embedded text needs nothing)")
    parser.add_argument("--lr", type=float, default=10.0, help="M-SVAG's step size (the trajectory)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10, help="compare every N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", action="store_true", help="only draw variance_estimates.png from the JSON files in --out")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        print(plot(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    path = args.out / f"variance_estimates_{args.problem}.json"
    path.write_text(json.dumps(result, indent=1))
    print(path)


if __name__ == "__main__":
    main()
