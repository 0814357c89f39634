"""Mini-batch variance (lightning_msvag.batch_variance) against brute-force per-example backward passes.

Oracle: for each example k its own ``torch.autograd.grad`` of ℓ_k on a separate forward pass
with the same dropout mask (same seed), in float64; then Σ∇ℓ_k, Σ∇ℓ_k² and
σ̂² = [(1/B)Σ∇ℓ_k² − ḡ²]/(B−1) written out directly. The estimator sees one backward of
``mean_k ℓ_k + L2`` and must match the data term only.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_msvag import batch_variance, per_example
from lightning_msvag.batch_variance import BatchVarianceError, BatchVarianceEstimator, batch_variance_from_moments
from lightning_msvag.models import CharLSTM, CharTransformer, ThreeC3D, TwoC2D
from lightning_msvag.models import WideResNet404

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
        monkeypatch.setattr(per_example, "_CHUNK_ELEMENTS", 1)
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
        torch.testing.assert_close(result[p], var, rtol=1e-9, atol=1e-15)
        assert p.grad_batch_variance is result[p] and p.grad_batch_variance.dtype == p.dtype
    if problem == "2c2d":
        # p.grad includes the L2 gradient, σ̂² only the data term's variance: with ḡ taken from
        # p.grad instead of the data term the estimate would be off (σ̂² is shift-invariant only as a whole)
        w = model.fc1.weight
        s1, s2, var = expected[w]
        wrong = (s2 / x.shape[0] - w.grad.square()) / (x.shape[0] - 1)
        assert not torch.allclose(wrong, var)


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
        # the optimizer receives Σ_k ∇ℓ_k: its variance is B · (one example's variance), B² var[ḡ]
        torch.testing.assert_close(result[p], 5 * g.var(0, unbiased=True), rtol=1e-10, atol=1e-14)


def test_variance_formula_closed_form():
    # Two examples with gradients 1 and 3: mean 2, var of one example 2, of the mean 1.
    var = batch_variance_from_moments(torch.tensor([4.0]), torch.tensor([10.0]), 2)
    assert var.item() == pytest.approx(1.0)
    with pytest.raises(BatchVarianceError, match="at least 2 examples"):
        batch_variance_from_moments(torch.tensor([1.0]), torch.tensor([1.0]), 1)


def test_refusals():
    # BatchNorm in training mode is the reason a WRN is refused, named first
    wrn = WideResNet404(depth=10, width=1, num_classes=10)
    with pytest.raises(BatchVarianceError, match=r"^BatchNorm2d 'group1.0.bn1' in training mode normalises over the batch.*"
                                                 r"Use the moving-average estimate \(m-svag"):
        BatchVarianceEstimator(wrn)
    wrn.eval()
    est = BatchVarianceEstimator(wrn)  # eval mode: BatchNorm (and its affine parameters) is per example
    wrn.train()  # checked again when a step is recorded
    with pytest.raises(BatchVarianceError, match=r"^BatchNorm2d '.*' in training mode normalises over the batch"):
        est.start()
    est.close()
    # random numbers inside a layer's forward: the general rule cannot draw the same ones again
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
    est = BatchVarianceEstimator(lstm)
    with est.record():
        lstm(torch.randn(4, 5, 3))[0].sum().backward()
    with pytest.raises(BatchVarianceError, match=r"^LSTM \(the model\): its forward draws random numbers \(dropout inside the layer\)"):
        est.compute()
    with pytest.raises(BatchVarianceError, match="Embedding with max_norm, scale_grad_by_freq or sparse is not supported"):
        BatchVarianceEstimator(nn.Embedding(5, 3, max_norm=1.0))
    # Gradient accumulation: a second forward after the backward of one recorded step.
    model = nn.Linear(3, 2)
    est = BatchVarianceEstimator(model)
    with pytest.raises(BatchVarianceError, match="ran forward after the backward pass of the recorded step"):
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
    monkeypatch.setattr(per_example, "_CHUNK_ELEMENTS", chunk_elements)
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
        from lightning_msvag.models.char_rnn import TFLSTMLayer

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


# ----------------------------------------------- no silent wrong numbers (issue 24)
def _brute_force_of(losses_fn, params, reduction="mean"):
    """σ̂² of the gradient of mean_k ℓ_k (or Σ_k ℓ_k), written out from each example's own
    gradient through one batched forward pass (float64)."""
    losses = losses_fn()
    grads = [torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True) for k in range(losses.numel())]
    out = {}
    for i, p in enumerate(params):
        g = torch.stack([torch.zeros_like(p) if pe[i] is None else pe[i] for pe in grads])
        b = g.shape[0]
        out[p] = g.var(0, unbiased=True) / b if reduction == "mean" else g.var(0, unbiased=True) * b
    return out


class _TwoLayersOneWeight(nn.Module):
    """``b.weight = a.weight``: one weight used by two layers (and a after b: a is called twice)."""

    def __init__(self, twice: bool):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight
        self.twice = twice

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        if self.twice:
            h = torch.tanh(self.a(h))
        return self.out(h)


class _TiedHead(nn.Module):
    """A character model whose output layer is the embedding (GPT-style tying through a module)."""

    def __init__(self, vocab=9, dim=5):
        super().__init__()
        self.embedding, self.mix = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embedding(idx))))


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _shared_case(case):
    torch.manual_seed(2)
    if case in ("two-layers", "called-twice"):
        model = _TwoLayersOneWeight(twice=case == "called-twice").double()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        return model, lambda: F.cross_entropy(model(x), y, reduction="none")
    if case == "tied-head":
        model = _TiedHead().double()
        idx, y = torch.randint(0, 9, (5, 7)), torch.randint(0, 9, (5, 7))
        return model, lambda: F.cross_entropy(model(idx).transpose(1, 2), y, reduction="none").mean(1)
    if case == "tied-char-lstm":  # the P4 model with its output layer tied to the embedding
        model, x, y = _small_lstm()
        model.embedding = nn.Embedding(11, 5).double()
        model.lstm_layers[0] = type(model.lstm_layers[0])(5, 5).double()
        model.dense.weight = model.embedding.weight
        return model, lambda: F.cross_entropy(model(x, model._test_state)[0].transpose(1, 2), y, reduction="none").mean(1)
    model = _SharedConv().double()
    x, y = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    return model, lambda: F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("chunk_elements", [1 << 20, 1])
@pytest.mark.parametrize("case", ["two-layers", "called-twice", "tied-head", "tied-char-lstm", "shared-conv"])
def test_shared_parameters_get_the_exact_sum_over_their_uses(case, chunk_elements, monkeypatch):
    """A parameter used by several layers or calls: the per-example gradients of its uses are
    summed before squaring (exact against per-example backward passes in float64)."""
    monkeypatch.setattr(per_example, "_CHUNK_ELEMENTS", chunk_elements)
    model, losses_fn = _shared_case(case)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(9)
    expected = _brute_force_of(losses_fn, params)
    est = BatchVarianceEstimator(model)
    model.zero_grad()
    torch.manual_seed(9)  # the same dropout masks
    with est.record():
        (losses_fn().mean() + 0.01 * sum(p.square().sum() for p in params)).backward()
    result = est.compute()
    for p in params:
        assert expected[p].abs().max() > 0
        torch.testing.assert_close(result[p], expected[p], rtol=1e-9, atol=1e-15)


class _FunctionalHead(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.embedding, self.mix = nn.Embedding(9, 5), nn.Linear(5, 5)
        self.how = how

    def forward(self, idx):
        h = torch.tanh(self.mix(self.embedding(idx)))
        if self.how == "F.linear":
            return F.linear(h, self.embedding.weight)[..., :5]
        if self.how == "matmul":
            return h @ self.mix.weight.t()  # mix's weight used again, outside mix
        return h


@pytest.mark.parametrize("how", ["F.linear", "matmul"])
def test_a_parameter_used_outside_its_layers_is_refused(how):
    """A functional use inside the model (a tied head written as F.linear(h, emb.weight)) has no
    per-example rule: refused in one line naming the parameter; an L2 term of the same weight in
    the loss, outside the model, is deterministic and fine."""
    model = _FunctionalHead(how)
    idx, y = torch.randint(0, 9, (4, 6)), torch.randint(0, 5, (4, 6))
    est = BatchVarianceEstimator(model)
    with est.record():
        F.cross_entropy(model(idx).transpose(1, 2), y).backward()
    name = "embedding.weight" if how == "F.linear" else "mix.weight"
    with pytest.raises(BatchVarianceError, match=rf"^parameter '{name}' is used outside the layers that own it"):
        est.compute()
    model.how = "none"
    with est.record():
        (F.cross_entropy(model(idx).transpose(1, 2), y) + model.mix.weight.square().sum()).backward()
    est.compute()  # the regulariser outside the model is fine


@pytest.mark.parametrize("method", ["m-svag-mb", "svag-mb", "m-ssd-va-mb"])
def test_a_sum_loss_steps_as_the_mean_loss(method):
    """loss_reduction='sum': σ̂² is the variance of the summed gradient (B² the mean's), so a sum
    loss at α/B steps as the mean loss at α (sign methods: at α), over several steps."""
    import lightning_msvag as lm

    cls, args = {"m-svag-mb": (lm.MSVAG, {}), "svag-mb": (lm.SVAG, {}), "m-ssd-va-mb": (lm.MSSDVA, {})}[method]
    torch.manual_seed(4)
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(5)]
    runs = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        lr = 0.1 if reduction == "mean" or cls is lm.MSSDVA else 0.1 / 8
        opt = cls(model.parameters(), lr=lr, variance="minibatch", **args)
        est = BatchVarianceEstimator(model, loss_reduction=reduction)
        for x, y in data:
            opt.zero_grad()
            with est.record():
                F.cross_entropy(model(x), y, reduction=reduction).backward()
            est.compute()
            opt.step()
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _estimated_step(model, x, y, est):
    model.zero_grad()
    with est.record():
        F.cross_entropy(model(x), y).backward()
    return est.compute()


def test_clipping_by_norm_rescales_the_estimate():
    """A uniform rescale of the gradients after the estimate (clip_grad_norm_) scales σ̂² by c²:
    the step equals one given c²·σ̂² by hand (a second path), and M-SVAG's γ is unchanged by the clip."""
    import lightning_msvag as lm

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = lm.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    opt_twin = lm.MSVAG(twin.parameters(), lr=0.1, variance="minibatch")
    est = BatchVarianceEstimator(model)
    for _ in range(3):
        variances = _estimated_step(model, x, y, est)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3))
        c = min(1.0, 1e-3 / (norm + 1e-6))
        assert c < 0.01
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
            q.grad_batch_variance = variances[p] * c * c  # set by hand: taken as it is
        opt.step()
        opt_twin.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
            assert p.grad_batch_variance is None  # used up
    # γ of a uniformly rescaled gradient and variance is the unclipped γ (Lemma 1 is scale-free)
    fresh = copy.deepcopy(twin)
    plain = lm.MSVAG(fresh.parameters(), lr=0.1, variance="minibatch")
    clipped_model = copy.deepcopy(twin)
    clipped = lm.MSVAG(clipped_model.parameters(), lr=0.1, variance="minibatch")
    _estimated_step(fresh, x, y, BatchVarianceEstimator(fresh))
    plain.step()
    _estimated_step(clipped_model, x, y, BatchVarianceEstimator(clipped_model))
    torch.nn.utils.clip_grad_norm_(clipped_model.parameters(), 1e-3)
    clipped.step()
    for a, b in zip(plain.variance_adaptation_factors(), clipped.variance_adaptation_factors()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", ["clip-by-value", "edited-gradient", "new-backward"])
def test_a_gradient_changed_otherwise_is_refused_at_step(change):
    """After the estimate, anything but a uniform rescale of a gradient (clip by value, a hook
    or a hand edit, a second backward pass without a new estimate) is refused by step(),
    naming the parameter, before anything changes."""
    import lightning_msvag as lm

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = lm.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    est = BatchVarianceEstimator(model)
    _estimated_step(model, x, y, est)
    if change == "clip-by-value":
        top = float(model[0].weight.grad.abs().max())
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.999 * top)  # one entry or a few
    elif change == "edited-gradient":
        model[2].bias.grad.add_(1e-3)
    else:
        model.zero_grad()
        F.cross_entropy(model(x + 1), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"changed between the mini-batch variance estimate and step\(\) by something other "
                                           r"than a uniform rescale"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and len(opt.state) == 0


def test_one_estimate_one_step():
    """step() uses the estimate up: a second step without a new one raises; compute() before the
    backward pass raises instead of returning zeros (γ = 1, no adaptation)."""
    import lightning_msvag as lm

    torch.manual_seed(8)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = lm.MSVAG(model.parameters(), lr=0.1, variance="minibatch")
    est = BatchVarianceEstimator(model)
    _estimated_step(model, x, y, est)
    opt.step()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # no estimate recorded for this gradient
    with pytest.raises(RuntimeError, match="needs the mini-batch variance estimate for this step.*one estimate, one step"):
        opt.step()
    assert int(opt.state[model.weight]["step"]) == 1
    with est.record():
        loss = F.cross_entropy(model(x), y)
        with pytest.raises(BatchVarianceError, match=r"compute\(\) found no recorded gradients: call it after loss.backward\(\)"):
            est.compute()


def test_lightning_clipping_by_norm_keeps_gamma_and_clipping_by_value_is_refused():
    """Trainer(gradient_clip_val=1e-3): the first step's γ equals the unclipped run's (σ̂² is
    rescaled with the gradient; before, γ fell to 0); gradient_clip_algorithm='value' that
    changes a gradient is refused."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_msvag as lm
    from lightning_msvag.batch_variance_callback import BatchVarianceCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return lm.MSVAG(self.parameters(), lr=0.1, variance="minibatch")

    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    gammas, moved = {}, {}
    for clip in (None, 1e-3):
        model = Net()
        start = [p.detach().clone() for p in model.parameters()]
        trainer = pl.Trainer(max_steps=1, callbacks=[BatchVarianceCallback()], gradient_clip_val=clip, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu")
        trainer.fit(model, data)
        gammas[clip] = torch.cat([g.flatten() for g in trainer.optimizers[0].variance_adaptation_factors()])
        moved[clip] = sum(float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start))
    assert moved[1e-3] < 0.1 * moved[None]  # the clip acted
    assert float(gammas[None].mean()) > 0.1
    torch.testing.assert_close(gammas[1e-3], gammas[None], rtol=1e-4, atol=1e-6)
    trainer = pl.Trainer(max_steps=1, callbacks=[BatchVarianceCallback()], gradient_clip_val=1e-4,
                         gradient_clip_algorithm="value", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(RuntimeError, match="other than a uniform rescale"):
        trainer.fit(Net(), data)


# ------------------------------------------------------- the self-check (issue 24)
def _shipped(problem):
    torch.manual_seed(3)
    if problem == "2c2d":
        model = TwoC2D(weight_decay=0.01).double()
        x, y = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
        return model, lambda: F.cross_entropy(model(x), y, reduction="none")
    if problem == "3c3d":
        model = ThreeC3D().double()
        x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
        return model, lambda: F.cross_entropy(model(x), y, reduction="none")
    model, x, y = _small_lstm()
    return model, lambda: _per_example_losses(model, x, y)


@pytest.mark.parametrize("problem", ["2c2d", "3c3d", "char_lstm"])
def test_check_batch_variance_passes_on_the_shipped_models(problem):
    """The self-check on every problem model the estimate serves (float64, dropout on): within
    round-off; the model, its gradients and the RNG are left as they were."""
    from lightning_msvag.batch_variance_check import check_batch_variance

    model, losses_fn = _shipped(problem)
    model.train()
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker):
        p.grad = m
    rng = torch.get_rng_state()
    errors = check_batch_variance(model, losses_fn)
    assert set(errors) == {n for n, p in model.named_parameters()} and max(errors.values()) < 1e-9
    assert all(p.grad is m and getattr(p, "grad_batch_variance", None) is None for p, m in zip(model.parameters(), marker))
    assert torch.equal(torch.get_rng_state(), rng)


def test_check_batch_variance_on_the_wrn_names_batchnorm():
    from lightning_msvag.batch_variance_check import check_batch_variance

    model = WideResNet404(depth=10, width=1, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(BatchVarianceError, match="BatchNorm2d .* in training mode normalises over the batch"):
        check_batch_variance(model, lambda: F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long), reduction="none"))


class _Breaks(nn.Module):
    """Models the rules cannot see through: time-major input, layers that mix a batch's rows."""

    def __init__(self, kind):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 4)
        self.kind = kind

    def forward(self, x):
        h = self.a(x)
        if self.kind == "batch_norm":
            h = F.batch_norm(h, None, None, training=True)  # no parameters, statistics of the batch
        elif self.kind == "centre":
            h = h - h.mean(0)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("kind", ["time-major", "time-major-square", "batch_norm", "centre"])
def test_check_batch_variance_catches_what_no_rule_sees(kind):
    """The estimator cannot see these; the self-check must: a wrong σ̂² is an error naming the
    parameter and the size of the error (or the row count that differs from the loss's)."""
    from lightning_msvag.batch_variance_check import check_batch_variance

    torch.manual_seed(11)
    model = _Breaks(kind).double()
    if kind.startswith("time-major"):
        steps = 6 if kind == "time-major-square" else 9  # [T, B, in] with T = B: only the numbers tell
        x, y = torch.randn(steps, 6, 3, dtype=torch.float64), torch.randint(0, 4, (steps, 6))
        losses = lambda: F.cross_entropy(model(x).permute(1, 2, 0), y.t(), reduction="none").mean(1)  # noqa: E731
    else:
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 4, (16,))
        losses = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    message = r"the layers see 9 rows in dim 0, the loss has 6 examples" if kind == "time-major" else (
        r"differs from brute-force per-example gradients by \d+\.\d% \(relative, parameter '[ab]\.")
    with pytest.raises(BatchVarianceError, match=message):
        check_batch_variance(model, losses)
    model.kind = "none"
    if not kind.startswith("time-major"):
        check_batch_variance(model, losses)  # the same model without the mixing layer passes


# ------------------------------------------ coverage: every layer whose examples do not mix (issue 27)
class _Head(nn.Module):
    """``layer`` on batch-first input, then a Linear head: per-example losses of a sequence model."""

    def __init__(self, layer, width, classes=3, time_major=False, state=None):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(width, classes)
        self.time_major, self.state = time_major, state

    def forward(self, x):
        h = x.transpose(0, 1) if self.time_major else x
        if isinstance(self.layer, nn.MultiheadAttention):
            steps = h.shape[0] if self.time_major else h.shape[1]
            causal = torch.triu(torch.ones(steps, steps, dtype=torch.bool), 1)
            padding = torch.zeros(x.shape[0], steps, dtype=torch.bool)
            padding[0, -2:] = True  # the first example's last two positions are padding
            h = self.layer(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
        elif isinstance(self.layer, nn.RNNBase):
            h = self.layer(h, self.state)[0] if self.state is not None else self.layer(h)[0]
        else:
            h = self.layer(h)
        h = h.transpose(0, 1) if self.time_major else h
        return self.head(torch.tanh(h))


def _coverage_case(case):
    torch.manual_seed(12)
    b, t, d = 5, 6, 4
    seq = torch.randn(b, t, d, dtype=torch.float64)
    y_seq = torch.randint(0, 3, (b, t))
    if case in ("layernorm", "layernorm-2d", "rmsnorm", "mha-batch-first", "mha-time-major", "lstm-1", "lstm-2-time-major",
                "gru-1-time-major", "gru-2", "lstm-2-state"):
        layer = {
            "layernorm": lambda: nn.LayerNorm(d), "layernorm-2d": lambda: nn.LayerNorm(d), "rmsnorm": lambda: nn.RMSNorm(d),
            "mha-batch-first": lambda: nn.MultiheadAttention(d, 2, batch_first=True),
            "mha-time-major": lambda: nn.MultiheadAttention(d, 2),
            "lstm-1": lambda: nn.LSTM(d, 3, batch_first=True), "lstm-2-time-major": lambda: nn.LSTM(d, 3, num_layers=2),
            "gru-1-time-major": lambda: nn.GRU(d, 3), "gru-2": lambda: nn.GRU(d, 3, num_layers=2, batch_first=True),
            "lstm-2-state": lambda: nn.LSTM(d, 3, num_layers=2, batch_first=True),
        }[case]()
        for p in layer.parameters():  # not the identity init of the norms: a nontrivial check
            nn.init.normal_(p, std=0.5)
        width = 3 if isinstance(layer, nn.RNNBase) else d
        state = None
        if case == "lstm-2-state":  # a carried (detached) state, as truncated BPTT
            state = tuple(0.5 * torch.randn(2, b, 3, dtype=torch.float64) for _ in range(2))
        model = _Head(layer, width, time_major=case.endswith("time-major"), state=state).double()
        if case == "layernorm-2d":
            x, y = seq[:, 0], y_seq[:, 0]
            return model, lambda: F.cross_entropy(model(x), y, reduction="none")
        return model, lambda: F.cross_entropy(model(seq).transpose(1, 2), y_seq, reduction="none").mean(1)
    if case == "pre-norm-block":
        block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0, norm_first=True, batch_first=True)
        model = nn.Sequential(block, nn.Linear(d, 3)).double()
        causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
        return model, lambda: F.cross_entropy(model[1](model[0](seq, src_mask=causal, is_causal=True)).transpose(1, 2),
                                              y_seq, reduction="none").mean(1)
    images = {"conv1d": (b, 2, 9), "conv3d": (b, 2, 4, 5, 5)}.get(case, (b, 4, 7, 7))
    x = torch.randn(*images, dtype=torch.float64)
    conv = {
        "conv1d": lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1),
        "conv3d": lambda: nn.Conv3d(2, 3, 3, padding=1),
        "conv2d-grouped": lambda: nn.Conv2d(4, 6, 3, groups=2),
        "conv2d-same": lambda: nn.Conv2d(4, 3, (3, 2), padding="same", dilation=2),
        "conv2d-reflect": lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
        "batchnorm-eval": lambda: nn.Sequential(nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3)),
    }[case]()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    model(x)  # materialise the lazy head
    if case == "batchnorm-eval":
        bn = conv[1]
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
        model.eval()  # BatchNorm with its running statistics: per example; its affine parameters train
    y = torch.randint(0, 3, (b,))
    return model, lambda: F.cross_entropy(model(x), y, reduction="none")


COVERAGE = ["layernorm", "layernorm-2d", "rmsnorm", "mha-batch-first", "mha-time-major", "pre-norm-block", "conv1d",
            "conv3d", "conv2d-grouped", "conv2d-same", "conv2d-reflect", "lstm-1", "lstm-2-time-major", "lstm-2-state",
            "gru-1-time-major", "gru-2", "batchnorm-eval"]


@pytest.mark.parametrize("chunk", ["default", "one-example"])
@pytest.mark.parametrize("case", COVERAGE)
def test_every_layer_whose_examples_do_not_mix_matches_per_example_backward_passes(case, chunk, monkeypatch):
    """LayerNorm, RMSNorm (hand-written rules), MultiheadAttention (batch-first and not, with
    masks), a pre-norm transformer block, Conv1d/Conv3d, grouped, 'same'- and reflect-padded
    convolutions, nn.LSTM/nn.GRU (1 and 2 layers, batch-first and not, a carried state) and
    BatchNorm in eval mode with trainable affine parameters (the general rule): exact against
    per-example backward passes in float64, also one example per chunk."""
    if chunk == "one-example":
        monkeypatch.setattr(per_example, "_CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(per_example, "_FUNCTIONAL_CHUNK_ELEMENTS", 1)
    model, losses_fn = _coverage_case(case)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _brute_force_of(losses_fn, params)
    est = BatchVarianceEstimator(model)
    model.zero_grad()
    with est.record():
        losses_fn().mean().backward()
    result = est.compute()
    est.close()
    for name, p in model.named_parameters():
        assert expected[p].abs().max() > 0, name
        torch.testing.assert_close(result[p], expected[p], rtol=1e-9, atol=1e-15, msg=name)
    rules = {type(r).__name__ for r in est._rules.values()}
    if case.startswith(("layernorm", "rmsnorm")):
        assert rules == {"LayerNormRule" if case.startswith("layernorm") else "RMSNormRule", "LinearRule"}
    else:
        assert "FunctionalRule" in rules


def test_the_wrn_with_frozen_batch_statistics_matches_per_example_backward_passes():
    """The WRN's padded convolution (a Conv2d subclass with its own forward) and BatchNorm in eval
    mode with its affine parameters training: the whole WRN-10-1, exact (float64)."""
    torch.manual_seed(13)
    model = WideResNet404(depth=10, width=1, num_classes=10).double().eval()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (3,))
    losses_fn = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    params = [p for p in model.parameters()]
    expected = _brute_force_of(losses_fn, params)
    est = BatchVarianceEstimator(model)
    with est.record():
        (losses_fn().mean() + model.regularizer()).backward()
    result = est.compute()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result[p], expected[p], rtol=1e-9, atol=1e-15, msg=name)


def test_the_char_transformer_with_a_tied_head_matches_per_example_backward_passes():
    """The decoder-only transformer (causal attention over a row's positions, pre-norm LayerNorms,
    positions as a per-row embedding, the output layer tied to the embedding), dropout on: exact."""
    torch.manual_seed(14)
    model = CharTransformer(vocab_size=13, width=8, depth=2, heads=2, context=9, dropout=0.2).double().train()
    x, y = torch.randint(0, 13, (5, 9)), torch.randint(0, 13, (5, 9))
    losses_fn = lambda: F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)  # noqa: E731
    params = list(model.parameters())
    torch.manual_seed(15)
    expected = _brute_force_of(losses_fn, params)
    est = BatchVarianceEstimator(model)
    torch.manual_seed(15)
    with est.record():
        losses_fn().mean().backward()
    result = est.compute()
    assert {type(r).__name__ for r in est._rules.values()} == {"EmbeddingRule", "LinearRule", "LayerNormRule"}
    for name, p in model.named_parameters():
        torch.testing.assert_close(result[p], expected[p], rtol=1e-9, atol=1e-15, msg=name)


def test_a_tiny_char_transformer_learns_war_and_peace_with_the_minibatch_estimate():
    """A few hundred steps of M-SVAG with the mini-batch estimate on the embedded text: the loss falls
    well below the uniform guess (ln 83), every step with a fresh, finite estimate, γ in (0, 1)."""
    import math

    import lightning_msvag as lm
    from lightning_msvag.datamodules.tolstoi import build_vocabulary, embedded_war_and_peace, make_stream_batches, preprocess_war_and_peace

    _, ids = build_vocabulary(preprocess_war_and_peace(embedded_war_and_peace()))
    inputs, targets, _ = make_stream_batches(ids[:200_000], batch_size=16, seq_len=32)
    torch.manual_seed(0)
    model = CharTransformer(width=32, depth=1, heads=2, context=32, dropout=0.0)
    opt = lm.MSVAG(model.parameters(), lr=0.3, variance="minibatch")
    est = BatchVarianceEstimator(model)
    losses, gammas = [], []
    for step in range(300):
        x, y = inputs[:, 32 * step : 32 * (step + 1)], targets[:, 32 * step : 32 * (step + 1)]
        opt.zero_grad()
        with est.record():
            loss = F.cross_entropy(model(x).reshape(-1, 83), y.reshape(-1))
            loss.backward()
        est.compute()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 49:
            gammas.append(float(torch.cat([g.flatten() for g in opt.variance_adaptation_factors()]).mean()))
    assert abs(losses[0] - math.log(83)) < 0.1
    assert sum(losses[-20:]) / 20 < 2.9  # 2.74 here (ln 83 = 4.42)
    assert all(0.0 < g < 1.0 for g in gammas)


@pytest.mark.parametrize("problem", ["transformer", "char_lstm", "2c2d", "mha"])
def test_no_step_keeps_its_graph_alive(problem):
    """The records, hooks and references of a step do not outlive it: after compute() and the step's
    own references are gone, its output (and with it the whole graph and its saved tensors) is freed.
    (A hook on an output that held the record would keep every step's graph: memory grows without bound.)"""
    import gc
    import weakref

    torch.manual_seed(0)
    if problem == "transformer":
        model, x, y = CharTransformer(width=16, depth=1, heads=2, context=8), torch.randint(0, 83, (4, 8)), None
    elif problem == "char_lstm":
        model, x, _ = _small_lstm()
        model = model.float()
        model._test_state = tuple(s.float() for s in model._test_state)
    elif problem == "2c2d":
        model, x = TwoC2D(), torch.randn(3, 1, 28, 28)
    else:
        model, x = _Head(nn.MultiheadAttention(4, 2, batch_first=True), 4), torch.randn(3, 5, 4)
    est = BatchVarianceEstimator(model)
    refs = []
    for _ in range(3):
        with est.record():
            out = model(x, model._test_state)[0] if problem == "char_lstm" else model(x)
            out.square().mean().backward()
        est.compute()
        refs.append(weakref.ref(out))
        del out
    gc.collect()
    assert all(ref() is None for ref in refs)


@pytest.mark.slow
def test_a_compiled_step_checks_the_estimate_too():
    """Inside torch.compile(fullgraph=True) the step still rescales σ̂² for clipping by norm (the
    numbers of the eager step) and refuses a gradient changed otherwise, when the step runs."""
    import lightning_msvag as lm
    from tests.test_optimizers import compiled_step

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opts = [lm.MSVAG(m.parameters(), lr=0.1, variance="minibatch") for m in (model, twin)]
    ests = [BatchVarianceEstimator(m) for m in (model, twin)]
    step = compiled_step(opts[0])
    for _ in range(4):
        for m, est in zip((model, twin), ests):
            _estimated_step(m, x, y, est)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
        step()
        opts[1].step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert step.graphs() == 1
    _estimated_step(model, x, y, ests[0])
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.999 * float(model[0].weight.grad.abs().max()))
    with pytest.raises(RuntimeError, match="changed between the mini-batch variance estimate and step"):
        step()
