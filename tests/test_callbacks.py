"""VarianceAdaptationMonitor (lightning_msvag.callbacks): statistics, optimizers, logging, no side effects.

In-process and CPU only; the multi-process (DDP) runs are in test_ddp.py.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_msvag as lm
from lightning_msvag.callbacks import VarianceAdaptationMonitor, histogram_quantiles
from lightning_msvag.functional import bias_correction, variance_adaptation_factor, variance_ratio

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


@pytest.mark.parametrize("cls,direction", [(lm.MSVAG, "momentum"), (lm.SVAG, "gradient")])
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


def test_large_tensor_uses_chunked_histograms(monkeypatch):
    import lightning_msvag.callbacks as cb

    monkeypatch.setattr(cb, "_HISTC_CHUNK", 1000)  # force several histc calls per tensor
    torch.manual_seed(1)
    model = nn.Linear(100, 50)
    opt = lm.MSVAG(model.parameters(), lr=0.05, fused=False)
    for _ in range(4):
        model.weight.grad = torch.randn(50, 100) + 0.5
        model.bias.grad = torch.randn(50)
        opt.step()
    scalars, hists = VarianceAdaptationMonitor().compute(model, [opt])
    g = opt.variance_adaptation_factors()[0].flatten().numpy()
    assert hists["gamma_hist/weight"].num == 5000
    assert scalars["gamma/weight/median"] == pytest.approx(np.median(g), abs=1.5e-3)


def test_adam_implicit_factor():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, steps=6)
    monitor = VarianceAdaptationMonitor()
    factors = list(monitor._adam_factors(opt))
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


@pytest.mark.parametrize("cls", [lm.MSGD, lm.MSSD])
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
    assert set(monitor._tracked) == set(model.parameters())


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
    assert VarianceAdaptationMonitor(logging_interval=None).logging_interval is None


def test_sharded_state_disables_with_a_clear_warning():
    class FSDPStrategy:  # stands in for Lightning's; only the name is inspected
        pass

    stub = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[], lightning_module=None, loggers=[object()])
    monitor = VarianceAdaptationMonitor()
    with pytest.warns(UserWarning, match="shard"):
        monitor.on_train_start(stub, None)
    assert monitor._disabled
    stub.is_global_zero, stub.global_step = True, 50
    monitor.on_train_batch_end(stub, None, None, None, 0)  # returns without touching anything


# ------------------------------------------------------------------ inside Lightning
class TinyModule(pl.LightningModule):
    def __init__(self, optimizer: str = "msvag"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.body(x)), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        if self.optimizer_name == "msgd":
            return lm.MSGD(self.parameters(), lr=0.1, fused=False)
        return lm.MSVAG(self.parameters(), lr=0.1, fused=False)


def _loader():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(tmp_path, callbacks, logger="tb", max_steps=12, optimizer="msvag", **trainer_kwargs):
    pl.seed_everything(0)
    model = TinyModule(optimizer)
    if logger == "tb":
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=trainer_kwargs.pop("log_every_n_steps", 4), default_root_dir=str(tmp_path),
        **trainer_kwargs,
    )
    trainer.fit(model, _loader())
    return model, trainer


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return files, acc


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitored")
    model, trainer = _fit(tmp, [VarianceAdaptationMonitor(logging_interval=3)])
    return tmp, model, trainer


def test_monitor_never_changes_the_trajectory(monitored_run, tmp_path):
    _, with_monitor, _ = monitored_run
    without, _ = _fit(tmp_path, [])
    for (name, a), (_, b) in zip(with_monitor.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer", ["adam", "msgd"])
def test_monitor_never_changes_the_trajectory_adam_and_tracked_msgd(optimizer, tmp_path):
    monitor = VarianceAdaptationMonitor(logging_interval=2, track_moments=True)
    with_monitor, trainer = _fit(tmp_path / "with", [monitor], max_steps=6, optimizer=optimizer)
    without, _ = _fit(tmp_path / "without", [], max_steps=6, optimizer=optimizer)
    for (name, a), (_, b) in zip(with_monitor.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name
    _, acc = _events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("gamma/head.weight/median")] == [1, 3, 5]
    assert len(monitor._tracked) == (4 if optimizer == "msgd" else 0)


def test_tensorboard_holds_scalars_and_histograms_per_layer(monitored_run):
    tmp, model, trainer = monitored_run
    files, acc = _events(trainer.logger.log_dir)
    assert len(files) == 1
    tags = acc.Tags()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    for name in names + ["all"]:
        for stat in STATS:
            events = acc.Scalars(f"gamma/{name}/{stat}")
            # logged after optimizer steps 3, 6, 9, 12, at Lightning's step for that batch
            assert [e.step for e in events] == [2, 5, 8, 11]
            assert all(0.0 <= e.value <= 1.0 for e in events)
        assert all(e.value >= 0 for e in acc.Scalars(f"eta2/{name}/median"))
        hist = acc.Histograms(f"gamma_hist/{name}")
        assert [h.step for h in hist] == [2, 5, 8, 11]
        for h in hist:
            value = h.histogram_value
            assert 0.0 <= value.min <= value.max <= 1.0
            assert sum(value.bucket) == value.num > 0
    assert "train/loss" in tags["scalars"]  # Lightning's own logging untouched


def test_interval_follows_trainer_when_none(tmp_path):
    _, trainer = _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=None)], max_steps=8, log_every_n_steps=4)
    _, acc = _events(trainer.logger.log_dir)
    assert [e.step for e in acc.Scalars("gamma/all/median")] == [3, 7]


def test_without_tensorboard_scalars_go_to_other_loggers(tmp_path):
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        _, trainer = _fit(tmp_path, [VarianceAdaptationMonitor(logging_interval=4)], logger="csv", max_steps=8,
                          optimizer="adam")
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    values = [float(r["gamma/head.weight/median"]) for r in rows if r.get("gamma/head.weight/median")]
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)


def test_monitor_in_the_problem_configs():
    for problem in PROBLEM_CONFIGS:
        config = yaml.safe_load((ROOT / "configs" / f"{problem}.yaml").read_text())
        paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert "lightning_msvag.callbacks.VarianceAdaptationMonitor" in paths, problem


def test_lightning_cli_appends_the_monitor_by_name():
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        TinyModule,
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
