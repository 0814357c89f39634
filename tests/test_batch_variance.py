"""Mini-batch variance (lightning_msvag.batch_variance) against brute-force per-example backward passes.

Oracle: for each example k its own ``torch.autograd.grad`` of ℓ_k on a separate forward pass
with the same dropout mask (same seed), in float64; then Σ∇ℓ_k, Σ∇ℓ_k² and
σ̂² = [(1/B)Σ∇ℓ_k² − ḡ²]/(B−1) written out directly. The estimator sees one backward of
``mean_k ℓ_k + L2`` and must match the data term only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_msvag import batch_variance
from lightning_msvag.batch_variance import BatchVarianceError, BatchVarianceEstimator, batch_variance_from_moments
from models import CharLSTM, ThreeC3D, TwoC2D
from models import WideResNet404

ROOT = Path(__file__).resolve().parents[1]


def _per_example_losses(model, x, y):
    """ℓ_k per example (per-row mean over time for the character model)."""
    if isinstance(model, CharLSTM):
        logits, _ = model(x, model._test_state)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    return F.cross_entropy(model(x), y, reduction="none")


def _brute_force(model, x, y, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for k in range(x.shape[0]):
        torch.manual_seed(seed)  # the same dropout mask as the batched pass
        losses = _per_example_losses(model, x, y)
        grads.append(torch.autograd.grad(losses[k], params))
    per_param = [torch.stack([g[i] for g in grads]) for i in range(len(params))]
    batch = x.shape[0]
    out = {}
    for p, g in zip(params, per_param):
        mean = g.mean(0)
        out[p] = (g.sum(0), g.square().sum(0), (g.square().mean(0) - mean.square()) / (batch - 1))
    return out


def _estimate(model, x, y, seed):
    est = BatchVarianceEstimator(model)
    model.zero_grad()
    with est.record():
        torch.manual_seed(seed)
        loss = _per_example_losses(model, x, y).mean() + model.regularizer()
        loss.backward()
    result = est.compute()
    est.close()
    return est, result


def _small_lstm():
    torch.manual_seed(0)
    model = CharLSTM(vocab_size=11, embedding_dim=6, hidden_size=5, num_layers=2, dropout=0.2).double()
    # A carried, nonzero state, as in truncated BPTT (detached: no gradient into it).
    model._test_state = tuple(0.5 * torch.randn(2, 4, 5, dtype=torch.float64) for _ in range(2))
    x = torch.randint(0, 11, (4, 7))
    y = torch.randint(0, 11, (4, 7))
    return model, x, y


@pytest.mark.parametrize("problem", ["2c2d", "3c3d", "char_lstm", "char_lstm_chunked"])
def test_matches_per_example_backward_passes(problem, monkeypatch):
    if problem.endswith("_chunked"):  # one example per chunk in the per-example products
        monkeypatch.setattr(batch_variance, "_CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    if problem == "2c2d":
        model, x, y = TwoC2D(weight_decay=0.01).double(), torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.tensor([1, 4, 1])
    elif problem == "3c3d":
        model, x, y = ThreeC3D().double(), torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 9, 3])
    else:
        model, x, y = _small_lstm()
    model.train()
    # Weight decay on (2c2d: 0.01, 3c3d: the default 0.002) — its gradient must not enter σ̂².
    expected = _brute_force(model, x, y, seed=5)
    est, result = _estimate(model, x, y, seed=5)
    assert est.batch_size == x.shape[0]
    assert set(result) == set(expected)
    for p, (s1, s2, var) in expected.items():
        assert var.abs().max() > 0  # a nontrivial check
        torch.testing.assert_close(p.grad_batch_mean, s1 / x.shape[0], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(result[p], var, rtol=1e-9, atol=1e-15)
        assert p.grad_batch_variance is result[p] and p.grad_batch_variance.dtype == p.dtype
    if problem == "2c2d":
        # p.grad includes the L2 gradient; the estimator's mean is the data term's only.
        w = model.fc1.weight
        torch.testing.assert_close(w.grad - 0.01 * w.detach(), w.grad_batch_mean, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(w.grad, w.grad_batch_mean)


def test_sum_reduction_and_linear_on_sequences():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)  # weight shared over 6 positions
    per_example = [torch.autograd.grad(model(x[k : k + 1]).square().sum(), list(model.parameters())) for k in range(5)]
    est = BatchVarianceEstimator(model, loss_reduction="sum")
    with est.record():
        model(x).square().sum().backward()
    result = est.compute()
    for i, p in enumerate(model.parameters()):
        g = torch.stack([pe[i] for pe in per_example])
        torch.testing.assert_close(result[p], (g.square().mean(0) - g.mean(0).square()) / 4, rtol=1e-10, atol=1e-14)


def test_variance_formula_closed_form():
    # Two examples with gradients 1 and 3: mean 2, var of one example 2, of the mean 1.
    var = batch_variance_from_moments(torch.tensor([4.0]), torch.tensor([10.0]), 2)
    assert var.item() == pytest.approx(1.0)
    with pytest.raises(BatchVarianceError, match="at least 2 examples"):
        batch_variance_from_moments(torch.tensor([1.0]), torch.tensor([1.0]), 1)


def test_refusals():
    wrn = WideResNet404(depth=10, width=1, num_classes=10)
    for conv in [m for m in wrn.modules() if type(m).__name__ == "TFSameConv2d"]:
        conv.weight.requires_grad_(False)  # its own forward pads: refused separately below
    est = BatchVarianceEstimator(wrn)
    with pytest.raises(BatchVarianceError, match=r"^BatchNorm2d in training mode mixes the examples of a batch"):
        est.start()
    est.close()
    with pytest.raises(BatchVarianceError, match="fused multi-step RNN modules are not supported"):
        BatchVarianceEstimator(nn.Sequential(nn.LSTM(3, 4, num_layers=2)))
    with pytest.raises(BatchVarianceError, match=r"has trainable parameters but no per-example gradient rule"):
        BatchVarianceEstimator(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(BatchVarianceError, match=r"overrides Conv2d.forward"):
        BatchVarianceEstimator(WideResNet404(depth=10, width=1, num_classes=10))
    with pytest.raises(BatchVarianceError, match="groups=1"):
        BatchVarianceEstimator(nn.Conv2d(4, 4, 3, groups=2))
    # Gradient accumulation / weight sharing: a second forward in one recorded step.
    model = nn.Linear(3, 2)
    est = BatchVarianceEstimator(model)
    with pytest.raises(BatchVarianceError, match="called 2 times in one recorded step"):
        with est.record():
            model(torch.randn(4, 3)).sum().backward()
            model(torch.randn(4, 3)).sum().backward()
    # float16 gradients come with a loss scaler: refused.
    half = nn.Linear(3, 2).half()
    est = BatchVarianceEstimator(half)
    with pytest.raises(BatchVarianceError, match="float16 gradients"):
        with est.record():
            half(torch.randn(4, 3).half()).float().sum().backward()


def test_stale_estimate_is_cleared_and_eval_is_not_recorded():
    model = nn.Linear(3, 2)
    est = BatchVarianceEstimator(model)
    with est.record():
        model(torch.randn(4, 3)).sum().backward()
    est.compute()
    assert model.weight.grad_batch_variance is not None
    with torch.no_grad():
        model(torch.randn(4, 3))  # outside record(): ignored
    est.start()
    assert model.weight.grad_batch_variance is None


# ------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ThreeC3D(weight_decay=0.002).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    rows = slice(rank * 6 // world, (rank + 1) * 6 // world)
    est = BatchVarianceEstimator(model)
    with est.record():
        (F.cross_entropy(model(x[rows]), y[rows]) + model.regularizer()).backward()
    result = est.compute()
    if rank == 0:
        torch.save({"B": est.batch_size, "var": [result[p] for p in model.parameters()]}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_gloo_equals_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = "import sys; from tests.test_batch_variance import _ddp_worker as w; w(int(sys.argv[1]), 2, int(sys.argv[2]), sys.argv[3])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(port), str(tmp_path / "ddp.pt")], cwd=ROOT, env=env)
        for r in range(2)
    ]
    # One process, whole batch, here (no process group): the reference.
    torch.manual_seed(0)
    model = ThreeC3D(weight_decay=0.002).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    est = BatchVarianceEstimator(model)
    with est.record():
        (F.cross_entropy(model(x), y) + model.regularizer()).backward()
    reference = est.compute()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["B"] == 6
    for p, var in zip(model.parameters(), ddp["var"]):
        torch.testing.assert_close(var, reference[p], rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------ Lightning
class _Tiny:
    """A LightningModule with one Linear layer whose optimizer snapshots σ̂² at each step."""

    @staticmethod
    def make():
        import pytorch_lightning as pl

        class Tiny(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(4, 3)
                self.seen = []

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.layer(x), y) + 0.1 * self.layer.weight.square().sum()

            def configure_optimizers(self):
                module = self

                class Snap(torch.optim.SGD):
                    def step(self, closure=None):
                        loss = closure() if closure is not None else None
                        lay = module.layer
                        module.seen.append((lay.weight.detach().clone(), lay.bias.detach().clone(), lay.weight.grad_batch_variance.clone()))
                        super().step()
                        return loss

                return Snap(self.parameters(), lr=0.1)

        return Tiny()


def test_lightning_callback_sets_the_estimate_before_each_step():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_msvag.batch_variance_callback import BatchVarianceCallback

    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    model = _Tiny.make()
    trainer = pl.Trainer(
        max_steps=2, callbacks=[BatchVarianceCallback()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=6))
    assert len(model.seen) == 2
    layer = nn.Linear(4, 3)
    for step, (weight, bias, var) in enumerate(model.seen):
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        g = torch.stack([
            torch.autograd.grad(F.cross_entropy(layer(x[k : k + 1]), y[k : k + 1]), layer.weight)[0] for k in range(6 * step, 6 * step + 6)
        ])
        assert var.abs().max() > 0
        # The L2 term (0.1·‖W‖²) is excluded: data-term per-example gradients only.
        torch.testing.assert_close(var, (g.square().mean(0) - g.mean(0).square()) / 5, rtol=1e-5, atol=1e-8)


def test_lightning_callback_refuses_gradient_accumulation():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_msvag.batch_variance_callback import BatchVarianceCallback

    trainer = pl.Trainer(
        max_steps=1, accumulate_grad_batches=2, callbacks=[BatchVarianceCallback()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(BatchVarianceError, match="accumulate_grad_batches=2: the mini-batch variance needs one backward per step"):
        trainer.fit(_Tiny.make(), data)


class _StridedConvNet(nn.Module):
    """Strided, dilated and rectangular convolutions with asymmetric padding (the problems' are all stride 1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=(2, 1), padding=1)
        self.b = nn.Conv2d(3, 4, 3, dilation=2, padding=(2, 1))
        self.c = nn.Conv2d(4, 2, (3, 2), padding=(1, 0))
        self.fc = nn.Linear(2 * 5 * 6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))).flatten(1))

    def regularizer(self):
        return 0.01 * sum((p**2).sum() for p in self.parameters())


@pytest.mark.parametrize("chunk_elements", [1 << 20, 1])
def test_strided_dilated_and_rectangular_convolutions_match_per_example_passes(monkeypatch, chunk_elements):
    """The per-example conv rule (strided patches + bmm) with stride, dilation, rectangular
    kernels and asymmetric padding against the brute force; with ``chunk_elements=1`` every
    example is its own chunk (the chunked sums must add up to the one-chunk result)."""
    monkeypatch.setattr(batch_variance, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(2)
    model = _StridedConvNet().double()
    x, y = torch.randn(5, 2, 9, 9, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    expected = _brute_force(model, x, y, seed=1)
    _, result = _estimate(model, x, y, seed=1)
    for p, (_, _, var) in expected.items():
        assert var.abs().max() > 0
        torch.testing.assert_close(result[p], var, rtol=1e-9, atol=1e-15)


class _StateReadingLSTM(nn.Module):
    """One LSTM layer whose loss reads its outputs *and* its final (h, c): the hand-written
    backward through time must start from all three gradients."""

    def __init__(self):
        super().__init__()
        from models.char_rnn import TFLSTMLayer

        self.layer = TFLSTMLayer(3, 4)
        self.head = nn.Linear(4, 5)
        self.to_h = nn.Linear(4, 1, bias=False)
        self.to_c = nn.Linear(4, 1, bias=False)

    def per_example_losses(self, x, y, state):
        out, (h, c) = self.layer(x, state)
        ce = F.cross_entropy(self.head(out).transpose(1, 2), y, reduction="none").mean(1)
        return ce + self.to_h(torch.tanh(h[0])).squeeze(1) + self.to_c(torch.tanh(c[0])).squeeze(1)


def test_lstm_layer_with_loss_on_the_final_state_matches_per_example_passes():
    torch.manual_seed(3)
    model = _StateReadingLSTM().double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randint(0, 5, (4, 6))
    state = tuple(0.5 * torch.randn(1, 4, 4, dtype=torch.float64) for _ in range(2))  # carried, detached
    params = list(model.parameters())
    per_example = [torch.autograd.grad(model.per_example_losses(x, y, state)[k], params) for k in range(4)]
    est = BatchVarianceEstimator(model)
    with est.record():
        model.per_example_losses(x, y, state).mean().backward()
    result = est.compute()
    for i, p in enumerate(params):
        g = torch.stack([grads[i] for grads in per_example])
        expected = (g.square().mean(0) - g.mean(0).square()) / 3
        assert expected.abs().max() > 0
        torch.testing.assert_close(result[p], expected, rtol=1e-9, atol=1e-15)


def test_moving_average_and_minibatch_estimates_agree_at_a_fixed_point():
    """Two independent estimators of the same var[m]: at a fixed θ (α = 0) on i.i.d. mini-batches,
    M-SVAG's moving-average ρ s (docs/algorithm.md §1) and the mini-batch var̂[m] = u/(1−β^k)²
    built from the estimator's σ̂² (§1.1) agree on average over coordinates and steps. (During
    training they do not: the moving average also sees the drift of the true gradient.)"""
    from lightning_msvag import MSVAG
    from lightning_msvag.rule import bias_correction, variance_ratio

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = MSVAG(model.parameters(), lr=0.0, beta=0.9)
    est = BatchVarianceEstimator(model)
    params = list(model.parameters())
    u = [torch.zeros_like(p) for p in params]
    teacher = torch.randn(12, 3)
    sums = {"ma": 0.0, "mb": 0.0}
    for k in range(1, 301):
        x = torch.randn(32, 12) + 0.5
        y = x @ teacher + 0.3 * torch.randn(32, 3)
        opt.zero_grad()
        with est.record():
            F.mse_loss(model(x), y).backward()
        est.compute()
        opt.step()
        for ui, p in zip(u, params):
            ui.mul_(0.81).add_(p.grad_batch_variance, alpha=0.01)
        if k > 50:  # both past their start-up
            bc, rho = bias_correction(0.9, k), variance_ratio(0.9, k)
            for ui, p in zip(u, params):
                m, v = opt.state[p]["exp_avg"] / bc, opt.state[p]["exp_avg_sq"] / bc
                sums["ma"] += float((rho / (1 - rho) * (v - m.square())).sum())
                sums["mb"] += float((ui / bc**2).sum())
    assert sums["mb"] > 0
    assert sums["ma"] / sums["mb"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("problem", ["2c2d", "char_lstm"])
def test_bfloat16_autocast_estimate_is_close_to_the_float32_one(problem):
    """Under bf16 autocast (Lightning's bf16-mixed) the captured activations and output
    gradients are bfloat16 and are upcast: σ̂² is the float32 estimate to bfloat16's precision
    (each parameter's total within 5 %), not garbage."""
    torch.manual_seed(0)
    if problem == "2c2d":
        model = TwoC2D()
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

        def loss_of(m):
            return F.cross_entropy(m(x), y) + m.regularizer()
    else:
        model = CharLSTM(vocab_size=11, embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.0)
        x, y = torch.randint(0, 11, (8, 12)), torch.randint(0, 11, (8, 12))

        def loss_of(m):
            logits, _ = m(x)
            return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)) + m.regularizer()
    model.train()
    results = {}
    for precision in ("32", "bf16"):
        est = BatchVarianceEstimator(model)
        model.zero_grad()
        with est.record(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss_of(model).backward()
        variances = est.compute()
        est.close()
        names = {p: n for n, p in model.named_parameters()}
        results[precision] = {names[p]: v for p, v in variances.items()}
    assert any(not torch.equal(results["32"][n], results["bf16"][n]) for n in results["32"])  # bf16 did act
    for name, var32 in results["32"].items():
        var16 = results["bf16"][name]
        assert var16.dtype == torch.float32 and torch.isfinite(var16).all()
        assert var32.sum() > 0
        assert float(var16.sum() / var32.sum()) == pytest.approx(1.0, abs=0.05), name
