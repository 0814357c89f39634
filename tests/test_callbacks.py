"""VarianceAdaptationMonitor (lightning_msvag.callbacks): statistics, optimizers, logging, no side effects.

In-process and CPU only; the multi-process (DDP) runs are in test_ddp.py.
"""

from __future__ import annotations

import math
import pickle
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from tests.helpers.boring import PARAMETER_NAMES, BoringModule, random_loader
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_msvag as lm
from lightning_msvag.callbacks import VarianceAdaptationMonitor, histogram_quantiles
from lightning_msvag.factors import adam_factors
from lightning_msvag.functional import bias_correction, variance_adaptation_factor, variance_ratio
from lightning_msvag.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
PROBLEM_CONFIGS = ["fmnist_2c2d", "cifar10_3c3d", "cifar100_wrn404", "tolstoi_char_rnn"]
STATS = ("mean", "median", "q10", "q90", "frac_below_0.5")


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _train(model, optimizer, steps, seed=0, hook=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if hook is not None:
            hook(optimizer)
        optimizer.step()


def _named(model):
    return [(name, p) for name, p in model.named_parameters()]


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize(
    "sample",
    [
        lambda rng: rng.uniform(0, 1, 20000),
        lambda rng: rng.beta(0.3, 0.3, 20000),
        lambda rng: rng.beta(5, 1, 5000),
        lambda rng: np.concatenate([np.zeros(300), np.ones(700), rng.uniform(0, 1, 500)]),
        lambda rng: np.full(1000, 1.0),
        lambda rng: rng.uniform(0.4, 0.41, 37),
    ],
)
def test_histogram_quantiles_within_one_bin_of_numpy(sample):
    rng = np.random.default_rng(0)
    x = sample(rng).astype(np.float32)
    bins = 1000
    counts = torch.histc(torch.from_numpy(x), bins=bins, min=0, max=1).numpy()
    qs = (0.1, 0.5, 0.9)
    got = histogram_quantiles(counts, 0.0, 1.0, qs, float(x.min()), float(x.max()))
    np.testing.assert_allclose(got, np.quantile(x, qs), atol=1.0 / bins + 1e-6)


@pytest.mark.parametrize("cls,direction", [(m.cls, m.rule.direction) for m in METHODS if m.rule and m.rule.variance_adaptation])
def test_statistics_match_the_optimizer_and_numpy(cls, direction):
    torch.manual_seed(0)
    model = _mlp()
    opt = cls(model.parameters(), lr=0.05, beta=0.9, fused=False)
    _train(model, opt, steps=7)
    monitor = VarianceAdaptationMonitor()
    scalars, hists = monitor.compute(model, [opt])

    factors = opt.variance_adaptation_factors()  # the optimizer's own γ, param_groups order
    assert len(factors) == 4
    everything = []
    for (name, p), gamma in zip(_named(model), factors):
        g = gamma.flatten().numpy().astype(np.float64)
        everything.append(g)
        assert scalars[f"gamma/{name}/mean"] == pytest.approx(g.mean(), abs=1e-6)
        assert scalars[f"gamma/{name}/frac_below_0.5"] == pytest.approx((g < 0.5).mean(), abs=1e-12)
        for stat, q in (("q10", 0.1), ("median", 0.5), ("q90", 0.9)):
            # exact quantile up to one fine bin (1e-3) and one order statistic (small tensors)
            lo, hi = np.quantile(g, [max(q - 1.0 / g.size, 0), min(q + 1.0 / g.size, 1)])
            assert lo - 1e-3 - 1e-6 <= scalars[f"gamma/{name}/{stat}"] <= hi + 1e-3 + 1e-6
        # η̂² = s/m² from the state, and γ is the monotone image of η̂² (docs/algorithm.md §1)
        st = opt.state[p]
        k = int(st["step"])
        bc, rho = bias_correction(0.9, k), variance_ratio(0.9, k)
        m = st["exp_avg"].double().numpy().ravel() / bc
        v = st["exp_avg_sq"].double().numpy().ravel() / bc
        with np.errstate(divide="ignore", invalid="ignore"):
            eta2 = np.where(m == 0, np.inf, np.maximum(v - m * m, 0) / (1 - rho) / (m * m))
        lam = rho if direction == "momentum" else 1.0
        np.testing.assert_allclose(1.0 / (1.0 + lam * eta2[np.isfinite(eta2)]), g[np.isfinite(eta2)], atol=1e-5)
        # exact median up to one log bin (10^0.01: 2.3 %) and one order statistic
        lo, hi = np.quantile(np.clip(eta2, 1e-10, 1e10), [0.5 - 1.0 / g.size, 0.5 + 1.0 / g.size])
        assert lo / 1.024 <= scalars[f"eta2/{name}/median"] <= hi * 1.024
        h = hists[f"gamma_hist/{name}"]
        assert h.num == g.size and sum(h.bucket_counts) == g.size
        assert h.min == pytest.approx(g.min()) and h.max == pytest.approx(g.max())
        assert h.sum == pytest.approx(g.sum(), rel=1e-6) and h.sum_squares == pytest.approx((g * g).sum(), rel=1e-6)
        assert len(h.bucket_limits) == len(h.bucket_counts) and all(0 < b <= 1 for b in h.bucket_limits)
    allg = np.concatenate(everything)
    assert scalars["gamma/all/mean"] == pytest.approx(allg.mean(), abs=1e-6)
    assert scalars["gamma/all/median"] == pytest.approx(np.median(allg), abs=2e-3)
    assert scalars["gamma/all/frac_below_0.5"] == pytest.approx((allg < 0.5).mean())
    assert hists["gamma_hist/all"].num == allg.size
    assert all(0.0 <= scalars[f"gamma/all/{s}"] <= 1.0 for s in STATS)


def test_first_step_gamma_is_one_and_zero_where_m_is_zero():
    model = nn.Linear(4, 2)
    opt = lm.MSVAG(model.parameters(), lr=0.1, fused=False)
    model.weight.grad = torch.tensor([[1.0, 0.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    model.bias.grad = torch.ones(2)
    opt.step()
    scalars, _ = VarianceAdaptationMonitor().compute(model, [opt])
    assert scalars["gamma/weight/mean"] == pytest.approx(5 / 8)
    assert scalars["gamma/weight/frac_below_0.5"] == pytest.approx(3 / 8)
    assert scalars["gamma/bias/median"] == 1.0 and scalars["eta2/bias/median"] == pytest.approx(1e-10, rel=0.03)
    # quantiles within one fine bin (1e-3), clipped to the data's [min, max]
    assert scalars["gamma/weight/q90"] == pytest.approx(1.0, abs=1e-3) and scalars["gamma/weight/q10"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("chunk", [999, 1000, 5000])
def test_large_tensor_uses_chunked_histograms(monkeypatch, chunk):
    import lightning_msvag.statistics as st

    monkeypatch.setattr(st, "HISTC_CHUNK", chunk)  # 999: five full chunks and a partial one of 5
    torch.manual_seed(1)
    model = nn.Linear(100, 50)
    opt = lm.MSVAG(model.parameters(), lr=0.05, fused=False)
    for _ in range(4):
        model.weight.grad = torch.randn(50, 100) + 0.5
        model.bias.grad = torch.randn(50)
        opt.step()
    g = opt.variance_adaptation_factors()[0]
    for bins, low, high in ((1000, 0.0, 1.0), (7, 0.2, 0.9)):
        unchunked = torch.histc(g.flatten(), bins=bins, min=low, max=high).double()
        assert torch.equal(st.histc_exact(g, bins, low, high), unchunked)
    scalars, hists = VarianceAdaptationMonitor().compute(model, [opt])
    h = hists["gamma_hist/weight"]
    assert h.num == 5000
    coarse = torch.histc(g.flatten(), bins=50, min=0, max=1)
    nonzero = coarse.nonzero().flatten()
    assert h.bucket_counts == coarse[nonzero[0] : nonzero[-1] + 1].tolist()
    assert scalars["gamma/weight/median"] == pytest.approx(np.median(g.numpy()), abs=1.5e-3)


def test_adam_implicit_factor():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, steps=6)
    monitor = VarianceAdaptationMonitor()
    factors = list(adam_factors(opt))
    assert len(factors) == 4
    scalars, _ = monitor.compute(model, [opt])
    for (name, p), (q, factor, lam, power) in zip(_named(model), factors):
        assert p is q and (lam, power) == (1.0, 2)
        st = opt.state[p]
        k = int(st["step"])
        m = st["exp_avg"].double() / (1 - 0.9**k)
        v = st["exp_avg_sq"].double() / (1 - 0.999**k)
        expected = (m.abs() / v.sqrt()).clamp(max=1.0).nan_to_num(0.0)  # (1+η̂²)^(-1/2) = |m|/√v
        torch.testing.assert_close(factor.double(), expected, atol=1e-5, rtol=1e-5)
        eta2 = ((v - m * m).clamp(min=0) / (m * m)).nan_to_num(math.inf, posinf=math.inf).flatten().numpy()
        lo, hi = np.quantile(np.clip(eta2, 1e-10, 1e10), [0.5 - 1.0 / eta2.size, 0.5 + 1.0 / eta2.size])
        assert lo / 1.03 <= scalars[f"eta2/{name}/median"] <= hi * 1.03
    scalars, _ = monitor.compute(model, [opt])
    assert all(0.0 <= scalars[f"gamma/all/{s}"] <= 1.0 for s in STATS)


@pytest.mark.parametrize("cls", [m.cls for m in METHODS if m.rule and m.rule.direction == "momentum" and not m.rule.variance_adaptation])
def test_tracked_moments_give_msvag_gamma(cls):
    torch.manual_seed(0)
    model = _mlp()
    opt = cls(model.parameters(), lr=0.01, beta=0.9, fused=False)
    monitor = VarianceAdaptationMonitor(track_moments=True)
    stub = SimpleNamespace(is_global_zero=True)
    grads = {p: [] for p in model.parameters()}

    def hook(optimizer):
        for p in model.parameters():
            grads[p].append(p.grad.detach().clone())
        monitor.on_before_optimizer_step(stub, model, optimizer)

    _train(model, opt, steps=5, hook=hook)
    scalars, hists = monitor.compute(model, [opt])
    for name, p in _named(model):
        v = torch.zeros_like(p)
        for g in grads[p]:
            v = 0.9 * v + 0.1 * g * g
        gamma = variance_adaptation_factor(opt.state[p]["exp_avg"], v, beta=0.9, step=5)
        assert scalars[f"gamma/{name}/mean"] == pytest.approx(gamma.mean().item(), abs=1e-6)
        assert f"gamma_hist/{name}" in hists
    # one extra buffer per parameter, nothing else
    assert set(monitor._tracker.buffers) == set(model.parameters())


def test_unreadable_optimizers_warn_once():
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    msgd = lm.MSGD(model.parameters(), lr=0.1, fused=False)
    _train(model, sgd, steps=1)
    _train(model, msgd, steps=1)
    monitor = VarianceAdaptationMonitor()
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            assert monitor.compute(model, [sgd, msgd]) == ({}, {})
    messages = [str(w.message) for w in record]
    assert sum("cannot read" in m and "SGD" in m for m in messages) == 1
    assert sum("keeps no second moment" in m for m in messages) == 1


def test_argument_validation():
    with pytest.raises(ValueError, match="logging_interval"):
        VarianceAdaptationMonitor(logging_interval=0)
    with pytest.raises(ValueError, match="divisible"):
        VarianceAdaptationMonitor(num_bins=33)
    with pytest.raises(ValueError, match="even"):
        VarianceAdaptationMonitor(num_bins=5, quantile_bins=25)
    with pytest.raises(ValueError, match="unknown statistics.*gamma_q25"):
        VarianceAdaptationMonitor(statistics=["gamma_mean", "gamma_q25"])
    assert VarianceAdaptationMonitor(logging_interval=None).logging_interval is None


def test_statistics_picks_what_is_logged():
    model = _mlp()
    opt = lm.MSVAG(model.parameters(), lr=0.05, fused=False)
    _train(model, opt, steps=3)
    full, full_hists = VarianceAdaptationMonitor().compute(model, [opt])
    some, hists = VarianceAdaptationMonitor(statistics=["eta2_median", "gamma_mean"]).compute(model, [opt])
    assert hists == {} and some == {t: v for t, v in full.items() if t.endswith("/mean") or t.startswith("eta2/")}
    assert len(full) == 6 * 5 and len(full_hists) == 5  # 4 tensors + all


# The three ways rank zero would see only its shard; each must switch the monitor off.
def _zero_optimizer():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer.__new__(ZeroRedundancyOptimizer)  # the real class; no process group needed


@pytest.fixture
def dtensor_parameter():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        yield nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("branch", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "zero", "dtensor"])
def test_sharded_state_disables_with_a_clear_warning(branch, request):
    from pytorch_lightning import strategies

    strategy, optimizers, module = strategies.SingleDeviceStrategy.__new__(strategies.SingleDeviceStrategy), [], None
    if branch.endswith("Strategy"):
        cls = getattr(strategies, branch)
        strategy = cls.__new__(cls)  # Lightning's class (DeepSpeed itself need not be installed)
    elif branch == "zero":
        optimizers = [_zero_optimizer()]
    else:
        sharded = request.getfixturevalue("dtensor_parameter")
        module = SimpleNamespace(parameters=lambda: [nn.Parameter(torch.ones(2)), sharded])
    stub = SimpleNamespace(strategy=strategy, optimizers=optimizers, lightning_module=module, loggers=[object()])
    monitor = VarianceAdaptationMonitor()
    with pytest.warns(UserWarning, match="disabled: .*(shard|DTensor)"):
        monitor.on_train_start(stub, None)
    assert monitor._disabled
    stub.is_global_zero, stub.global_step = True, 50
    monitor.on_train_batch_end(stub, None, None, None, 0)  # returns without reading anything (stub has no more)

    # and the replicated case is not flagged
    stub = SimpleNamespace(strategy=strategies.SingleDeviceStrategy.__new__(strategies.SingleDeviceStrategy),
                           optimizers=[torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)],
                           lightning_module=_mlp(), loggers=[object()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.histograms = False
        monitor.on_train_start(stub, None)
    assert monitor._disabled is None


# ------------------------------------------------------------------ inside Lightning
def _fit(tmp_path, callbacks, logger="tb", max_steps=12, optimizer="msvag", ckpt_path=None, model=None,
         **trainer_kwargs):
    """BoringModule (dropout 0.25) on a shuffled loader: 6 batches per epoch, so 12 steps are 2 epochs."""
    pl.seed_everything(0)
    if model is None:
        model = BoringModule(optimizer=optimizer, lr=1e-2 if optimizer == "adam" else 0.1)
    if logger == "tb":
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=trainer_kwargs.pop("log_every_n_steps", 4),
        default_root_dir=str(tmp_path), **trainer_kwargs,
    )
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model, trainer


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return files, acc


def _rng_states():
    torch_state = torch.get_rng_state().numpy().tobytes()
    return torch_state, pickle.dumps(np.random.get_state()), pickle.dumps(random.getstate())


class RNGCheckedMonitor(VarianceAdaptationMonitor):
    """Asserts that no hook changes the torch, numpy or Python random state."""

    def _checked(hook):  # noqa: N805 - a decorator in the class body
        def wrapper(self, *args, **kwargs):
            before = _rng_states()
            hook(self, *args, **kwargs)
            after = _rng_states()
            for which, a, b in zip(("torch", "numpy", "python"), before, after):
                assert a == b, f"{hook.__name__} changed the {which} random state"
            self.checked_calls += 1

        return wrapper

    checked_calls = 0
    on_train_start = _checked(VarianceAdaptationMonitor.on_train_start)
    on_before_optimizer_step = _checked(VarianceAdaptationMonitor.on_before_optimizer_step)
    on_train_batch_end = _checked(VarianceAdaptationMonitor.on_train_batch_end)


class ComputeAtLoggingSteps(Callback):
    """Records ``monitor.compute()`` at the monitor's logging steps (runs after it), keyed by the logged step."""

    def __init__(self, monitor):
        self.monitor, self.expected = monitor, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if VarianceAdaptationMonitor._due(trainer.global_step, self.monitor.logging_interval):
            self.expected[trainer.global_step - 1] = self.monitor.compute(pl_module, trainer.optimizers)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitored")
    monitor = RNGCheckedMonitor(logging_interval=3)
    spy = ComputeAtLoggingSteps(monitor)
    model, trainer = _fit(tmp, [monitor, spy])
    assert monitor.checked_calls == 1 + 12 + 12
    return tmp, model, trainer, spy.expected


def test_monitor_never_changes_the_trajectory(monitored_run, tmp_path):
    _, with_monitor, _, _ = monitored_run
    without, _ = _fit(tmp_path, [])
    initial = BoringModule().state_dict()
    for (name, a), (_, b) in zip(with_monitor.named_parameters(), without.named_parameters()):
        assert not torch.equal(a, initial[name]), name  # it trained
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer", ["adam", "msgd"])
def test_monitor_never_changes_the_trajectory_adam_and_tracked_msgd(optimizer, tmp_path):
    monitor = RNGCheckedMonitor(logging_interval=2, track_moments=True)
    with_monitor, trainer = _fit(tmp_path / "with", [monitor], max_steps=8, optimizer=optimizer)
    without, _ = _fit(tmp_path / "without", [], max_steps=8, optimizer=optimizer)
    for (name, a), (_, b) in zip(with_monitor.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name
    assert monitor.checked_calls == 1 + 8 + 8
    _, acc = _events(trainer.logger.log_dir)
    # after steps 1 and 2 (powers of two below the interval), then every second step
    assert [e.step for e in acc.Scalars("gamma/out.weight/median")] == [0, 1, 3, 5, 7]
    assert len(monitor._tracker) == (4 if optimizer == "msgd" else 0)


def test_tensorboard_holds_scalars_and_histograms_per_layer(monitored_run):
    tmp, model, trainer, expected = monitored_run
    files, acc = _events(trainer.logger.log_dir)
    assert len(files) == 1
    tags = acc.Tags()
    names = [name for name, _ in model.named_parameters()]
    assert names == PARAMETER_NAMES
    # logged after optimizer steps 1, 2 (powers of two below the interval), 3, 6, 9, 12, at Lightning's step
    assert sorted(expected) == [0, 1, 2, 5, 8, 11]
    scalar_tags = [t for t in tags["scalars"] if t.startswith(("gamma/", "eta2/"))]
    assert sorted(scalar_tags) == sorted(expected[2][0]) and len(scalar_tags) == 5 * 6
    for tag in scalar_tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2, 5, 8, 11], tag
        # TensorBoard stores float32
        assert [e.value for e in events] == pytest.approx([expected[e.step][0][tag] for e in events], rel=1e-6), tag
    assert sorted(tags["histograms"]) == sorted(f"gamma_hist/{n}" for n in names + ["all"])
    for name in names + ["all"]:
        hist = acc.Histograms(f"gamma_hist/{name}")
        assert [h.step for h in hist] == [0, 1, 2, 5, 8, 11]
        for h in hist:
            value, want = h.histogram_value, expected[h.step][1][f"gamma_hist/{name}"]
            assert (value.min, value.max, value.num, value.sum, value.sum_squares) == pytest.approx(
                (want.min, want.max, want.num, want.sum, want.sum_squares), rel=1e-6)
            assert list(value.bucket) == want.bucket_counts
            assert list(value.bucket_limit) == pytest.approx(want.bucket_limits)
    assert "train/loss" in tags["scalars"]  # Lightning's own logging untouched


class _Grads(Callback):  # runs before the monitor: the gradients its v~ sees
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def test_tracked_moments_continue_after_a_resume(tmp_path):
    """track_moments: v~ and its count are the monitor's callback state; a resumed fit (a fresh monitor, as in
    a new process) continues them, so γ is M-SVAG's γ of all the steps' gradients (recomputed below)."""
    grads = _Grads()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = VarianceAdaptationMonitor(logging_interval=100, track_moments=True)
    _fit(tmp_path, [grads, first, ckpt], max_steps=4, optimizer="msgd", enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]["VarianceAdaptationMonitor"]
    assert sorted(saved["moment_tracker"]) == sorted(PARAMETER_NAMES)
    monitor = VarianceAdaptationMonitor(logging_interval=100, track_moments=True)
    model, trainer = _fit(tmp_path, [grads, monitor, ckpt], max_steps=7, optimizer="msgd", enable_checkpointing=True,
                          ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 7 and len(grads.grads) == 7  # 4 steps, then 3 after the resume
    assert all(count == 7 for _, count in monitor._tracker.buffers.values())
    scalars, _ = monitor.compute(model, trainer.optimizers)
    optimizer = trainer.optimizers[0]
    for name, p in model.named_parameters():
        v = torch.zeros_like(p)
        for g in grads.grads:
            v = 0.9 * v + 0.1 * g[name] ** 2  # v~ over all 7 steps, no re-weighting
        gamma = variance_adaptation_factor(optimizer.state[p]["exp_avg"], v, beta=0.9, step=7)
        assert scalars[f"gamma/{name}/mean"] == pytest.approx(gamma.mean().item(), abs=1e-6), name


def test_tracked_moments_restart_at_zero_after_a_resume_without_their_state(tmp_path):
    """A checkpoint written without the tracker's state (no tracking monitor then): v~ restarts at zero on the
    resume, bias-corrected with its own count."""
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=100), ckpt], max_steps=4, optimizer="msgd",
         enable_checkpointing=True)
    assert "VarianceAdaptationMonitor" not in torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    monitor = VarianceAdaptationMonitor(logging_interval=100, track_moments=True)
    grads = _Grads()
    model, trainer = _fit(tmp_path, [grads, monitor, ckpt], max_steps=7, optimizer="msgd", enable_checkpointing=True,
                          ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 7 and len(grads.grads) == 3  # resumed after 4 of 7 steps
    assert all(count == 3 for _, count in monitor._tracker.buffers.values())
    scalars, _ = monitor.compute(model, trainer.optimizers)
    optimizer = trainer.optimizers[0]
    for name, p in model.named_parameters():
        v = torch.zeros_like(p)
        for g in grads.grads:
            v = 0.9 * v + 0.1 * g[name] ** 2
        v = v * (bias_correction(0.9, 7) / bias_correction(0.9, 3))  # v~/(1-β^3), written at k = 7
        k = int(optimizer.state[p]["step"])
        assert k == 7
        gamma = variance_adaptation_factor(optimizer.state[p]["exp_avg"], v, beta=0.9, step=k)
        assert scalars[f"gamma/{name}/mean"] == pytest.approx(gamma.mean().item(), abs=1e-6), name


def test_interval_follows_trainer_when_none(tmp_path):
    _, trainer = _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=None)], max_steps=8, log_every_n_steps=4)
    _, acc = _events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("gamma/all/median")] == [0, 1, 3, 7]  # steps 1, 2, then 4, 8


def test_without_tensorboard_scalars_go_to_other_loggers(tmp_path):
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        _, trainer = _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=4)], logger="csv", max_steps=8,
                          optimizer="adam")
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    values = [float(r["gamma/out.weight/median"]) for r in rows if r.get("gamma/out.weight/median")]
    assert len(values) == 4 and all(0 <= v <= 1 for v in values)  # steps 1, 2, 4, 8


def test_first_logs_come_early_so_a_short_run_shows_gamma(tmp_path):
    """Issue 19 item 6: with the configs' interval 50, a 30-step look still shows γ (steps 1, 2, 4, 8, 16)."""
    _, trainer = _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=50)], max_steps=30)
    _, acc = _events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("gamma/all/median")] == [0, 1, 3, 7, 15]
    assert [s for s in range(1, 201) if VarianceAdaptationMonitor._due(s, 50)] == [1, 2, 4, 8, 16, 32, 50, 100, 150, 200]


def test_monitor_in_the_problem_configs():
    for problem in PROBLEM_CONFIGS:
        config = yaml.safe_load((ROOT / "configs" / f"{problem}.yaml").read_text())
        paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert "lightning_msvag.callbacks.VarianceAdaptationMonitor" in paths, problem


def test_lightning_cli_appends_the_monitor_by_name():
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        BoringModule,
        args=[
            "--trainer.callbacks+=VarianceAdaptationMonitor",
            "--trainer.callbacks.logging_interval=7",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
        ],
        run=False,
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, VarianceAdaptationMonitor)]
    assert len(monitors) == 1 and monitors[0].logging_interval == 7
