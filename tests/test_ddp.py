"""Multi-process training: data sharding, DDP ≡ one process, γ logs written once.

Real DDP on CPU: 2 processes with the gloo backend, launched the way users launch them
(``strategy="ddp"`` from a script, which Lightning re-executes for rank 1; and the
``lightning-msvag`` CLI with ``--trainer.strategy ddp --trainer.devices 2``). The
subprocesses run while the single-process reference runs here, to keep the wall time low.

This file is also the DDP worker script: ``python tests/test_ddp.py fmnist DATA OUT DEVICES``.
"""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as the worker script
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from lightning_msvag.datamodules import FashionMNISTDataModule, TolstoiDataModule  # noqa: E402
from lightning_msvag.resumable import ShardedRandomSampler  # noqa: E402
from tests.helpers.boring import PARAMETER_NAMES, BoringModule  # noqa: E402
from lightning_msvag.callbacks import VarianceAdaptationMonitor  # noqa: E402
from lightning_msvag.functional import fused_path_available  # noqa: E402

STATS = ("mean", "median", "q10", "q90", "frac_below_0.5")
TIMEOUT = 300


# ====================================================================== helpers
def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two processes share the cores
    return env


def _launch(args, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(args, cwd=ROOT, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log_path: Path) -> None:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, f"DDP run failed (rc {proc.returncode}):\n{output[-6000:]}"


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0]) if files else str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return files, acc


def _check_gamma_logs(log_dir: Path, one_process_dir: Path, names, steps) -> None:
    """One event file (rank zero's): per-layer γ scalars and histograms at ``steps``, equal to the one-process run's.

    Tolerances: DDP averages the gradients in a different order than one process sums them,
    so γ differs in round-off, and a γ that close to a bin edge may fall in the neighbouring
    bin: quantiles within one fine bin (1e-3), the η̂² median within one log bin (2.3 %),
    bucket counts within 1e-4 of the elements moved; the mean to float32 round-off.
    """
    files, acc = _events(log_dir)
    assert len(files) == 1, files
    _, ref = _events(one_process_dir)
    tags = sorted(t for t in acc.Tags()["scalars"] if t.startswith(("gamma/", "eta2/")))
    assert tags == sorted(t for t in ref.Tags()["scalars"] if t.startswith(("gamma/", "eta2/")))
    assert tags == sorted([f"gamma/{n}/{s}" for n in list(names) + ["all"] for s in STATS] +
                          [f"eta2/{n}/median" for n in list(names) + ["all"]])
    for tag in tags:
        got, want = acc.Scalars(tag), ref.Scalars(tag)
        assert [e.step for e in got] == [e.step for e in want] == steps, tag
        got, want = [e.value for e in got], [e.value for e in want]
        if tag.startswith("eta2/"):
            assert got == pytest.approx(want, rel=0.025), tag
        elif tag.endswith("/mean"):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), tag
        else:
            assert got == pytest.approx(want, abs=1e-3 + 1e-6), tag
    assert sorted(acc.Tags()["histograms"]) == sorted(ref.Tags()["histograms"]) == sorted(
        f"gamma_hist/{n}" for n in list(names) + ["all"])
    for tag in acc.Tags()["histograms"]:
        got, want = acc.Histograms(tag), ref.Histograms(tag)
        assert [h.step for h in got] == [h.step for h in want] == steps, tag
        for g, w in zip(got, want):
            g, w = g.histogram_value, w.histogram_value
            assert g.num == w.num and (g.min, g.max) == pytest.approx((w.min, w.max), abs=1e-5), tag
            assert (g.sum, g.sum_squares) == pytest.approx((w.sum, w.sum_squares), rel=1e-5), tag
            counts = lambda h: dict(zip(h.bucket_limit, h.bucket))  # noqa: E731
            diff = sum(abs(counts(g).get(k, 0) - counts(w).get(k, 0)) for k in set(counts(g)) | set(counts(w)))
            assert diff <= max(2, 1e-4 * w.num), (tag, list(g.bucket), list(w.bucket))  # seen: 8 of 284,499


def _stub_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world)


# ====================================================================== sharding (no processes)
@pytest.mark.parametrize(
    "world,drop_last,workers",
    [(2, True, 0), (3, True, 0), (2, False, 0), (3, False, 0), (2, True, 1), (3, False, 1)],
)
def test_sharded_sampler_steps_cover_the_single_process_batches(world, drop_last, workers):
    """With workers the data modules use persistent workers (the DataLoader draws its base seed only once)."""
    n, batch, seed = 50, 12, 7
    dataset = TensorDataset(torch.arange(n))
    persistent = workers > 0  # as the data modules set it
    single = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed),
                        drop_last=drop_last, num_workers=workers, persistent_workers=persistent)
    samplers = [ShardedRandomSampler(dataset, world, r, seed, batch, drop_last, persistent_workers=persistent)
                for r in range(world)]
    ranks = [
        DataLoader(dataset, batch_size=batch // world, drop_last=drop_last, num_workers=workers,
                   persistent_workers=persistent, sampler=sampler)
        for sampler in samplers
    ]
    # epoch 0 stops after len(loader) batches (as Lightning does), epoch 1 runs the loaders
    # dry, epochs 2 and 3 check the generator kept step with the single-process loader's
    for epoch, dry in ((0, False), (1, True), (2, False), (3, False)):
        for r in ranks:
            r.sampler.set_epoch(epoch)  # what Lightning calls; ignored
        take = (lambda loader: list(loader)) if dry else (lambda loader: list(itertools.islice(loader, len(loader))))
        expected = [sorted(b[0].tolist()) for b in take(single)]
        per_rank = [[b[0].tolist() for b in take(r)] for r in ranks]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
        assert len(per_rank[0]) == len(expected)
        for i, want in enumerate(expected):
            got = sorted(sum((p[i] for p in per_rank), []))
            if drop_last or i < len(expected) - 1:
                assert got == want, (epoch, i)
            else:  # last partial batch: padded from the start of the order to a multiple of W
                assert set(want) <= set(got) and len(got) - len(want) < world


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    from tests.helpers.fakes import write_fake_fashion_mnist

    root = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(root, n_train=96, n_test=32)
    return root


def test_image_module_splits_the_global_batch(fmnist_dir):
    single = FashionMNISTDataModule(str(fmnist_dir), batch_size=32, download=False, seed=3)
    single.setup("fit")
    shards = []
    for rank in range(2):
        dm = FashionMNISTDataModule(str(fmnist_dir), batch_size=32, download=False, seed=3)
        dm.trainer = _stub_trainer(rank, 2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning injects no other sampler
        shards.append(list(loader))
    reference = list(single.train_dataloader())
    assert len(shards[0]) == len(shards[1]) == len(reference) == 3
    for (x0, y0), (x1, y1), (x, y) in zip(shards[0], shards[1], reference):
        assert x0.shape[0] == x1.shape[0] == 16
        key = lambda images: sorted(map(tuple, images.flatten(1).mul(255).round().long().tolist()))  # noqa: E731
        assert key(torch.cat([x0, x1])) == key(x)
        assert sorted(torch.cat([y0, y1]).tolist()) == sorted(y.tolist())

    bad = FashionMNISTDataModule(str(fmnist_dir), batch_size=30, download=False)
    bad.trainer = _stub_trainer(0, 4)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        bad.setup("fit")


def test_tolstoi_rows_are_split_across_ranks(tolstoi_dir):
    single = TolstoiDataModule(str(tolstoi_dir), download=False)
    single.setup("fit")
    ranks = []
    for rank in range(2):
        dm = TolstoiDataModule(str(tolstoi_dir), download=False)
        dm.trainer = _stub_trainer(rank, 2)
        dm.setup("fit")
        assert len(dm.train_dataset) == len(single.train_dataset) == 1045
        assert len(dm.test_dataset) == 261 and len(dm.train_eval_dataset) == 261
        for loader in (dm.train_dataloader(), *dm.val_dataloader()):
            assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 1
            assert list(loader.sampler) == list(range(len(loader.dataset)))  # every batch, in order
        ranks.append(dm)
    for i in (0, 1, 500, 1044):
        x0, y0 = ranks[0].train_dataset[i]
        x1, y1 = ranks[1].train_dataset[i]
        x, y = single.train_dataset[i]
        assert x0.shape == (25, 50)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert torch.equal(torch.cat([ranks[0].test_dataset[3][0], ranks[1].test_dataset[3][0]]), single.test_dataset[3][0])
    # a module set up before being attached to a DDP trainer re-shards
    single.trainer = _stub_trainer(1, 2)
    single.setup("fit")
    assert torch.equal(single.train_dataset[0][0], ranks[1].train_dataset[0][0])

    bad = TolstoiDataModule(str(tolstoi_dir), download=False)
    bad.trainer = _stub_trainer(0, 3)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        bad.setup("fit")


def test_char_lstm_checkpoint_state_rows_follow_the_rank():
    from lightning_msvag.models import CharLSTM
    from lightning_msvag.models.char_rnn import CHECKPOINT_STATE_KEY

    h = torch.arange(2 * 50 * 4, dtype=torch.float32).reshape(2, 50, 4)
    checkpoint = {CHECKPOINT_STATE_KEY: {"h": h, "c": -h}}
    model = CharLSTM(hidden_size=4, embedding_dim=4)
    model.on_load_checkpoint(checkpoint)  # no trainer: all rows
    assert torch.equal(model.stream_state("train")[0], h)
    model._trainer = _stub_trainer(1, 2)
    try:
        model.on_load_checkpoint(checkpoint)
        hs, cs = model.stream_state("train")
        assert torch.equal(hs, h[:, 25:]) and torch.equal(cs, -h[:, 25:])
    finally:
        model._trainer = None


# ====================================================================== real DDP runs
def _mlp() -> BoringModule:
    """No batch norm, no dropout (its draws differ per process): 2 ranks x b must equal 1 process x 2b.

    M-SVAG on its default path (``fused=None``: the compiled CPU kernel where it can be built).
    """
    return BoringModule(in_features=28 * 28, hidden=16, classes=10, dropout=0.0, lr=0.05)


def fit_fmnist(data_dir: str, out_dir: str, devices: int, steps: int = 6) -> None:
    """6 M-SVAG steps (2 epochs) at global batch 32 on the fake Fashion-MNIST; rank 0 saves the parameters."""
    pl.seed_everything(0)
    model = _mlp()
    dm = FashionMNISTDataModule(data_dir, batch_size=32, download=False, seed=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        logger=pl.loggers.TensorBoardLogger(out_dir, name="run"),
        callbacks=[VarianceAdaptationMonitor(logging_interval=1)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    if trainer.is_global_zero:
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"params": params, "fused": trainer.optimizers[0].param_groups[0]["fused"],
                    "kernel": fused_path_available()}, Path(out_dir) / "params.pt")


def _tolstoi_config(tmp: Path, tolstoi_dir: Path, devices: int) -> Path:
    """configs/tolstoi_char_rnn.yaml, shortened to 3 steps on CPU, γ logged every step."""
    config = yaml.safe_load((ROOT / "configs" / "tolstoi_char_rnn.yaml").read_text())
    config = copy.deepcopy(config)
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu", devices=devices, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False,
    )
    if devices > 1:
        trainer["strategy"] = "ddp"
    trainer["logger"]["init_args"]["save_dir"] = str(tmp / f"logs{devices}")
    checkpoint = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    if not any(c["class_path"].endswith("ModelCheckpoint") for c in trainer["callbacks"]):
        trainer["callbacks"].append(checkpoint)  # instead of the one the CLI adds, to set its folder
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("VarianceAdaptationMonitor"):
            callback["init_args"]["logging_interval"] = 1
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp / f"ckpt{devices}")
    config["data"]["init_args"].update(data_dir=str(tolstoi_dir), download=False)
    config["model"]["init_args"] = {"dropout": 0.0}  # dropout draws differ between processes
    config["optimizer"]["init_args"]["fused"] = False  # the multi-tensor path; the fmnist test runs the default one
    path = tmp / f"tolstoi{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_fmnist_matches_one_process_and_logs_once(fmnist_dir, tmp_path):
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    ddp_out.mkdir(), one_out.mkdir()
    log = tmp_path / "ddp.log"
    proc = _launch([sys.executable, str(Path(__file__).resolve()), "fmnist", str(fmnist_dir), str(ddp_out), "2"], log)
    try:
        fit_fmnist(str(fmnist_dir), str(one_out), devices=1)  # the reference, while DDP runs
    finally:
        _wait(proc, log)
    ddp, one = torch.load(ddp_out / "params.pt"), torch.load(one_out / "params.pt")
    assert ddp["fused"] is None and ddp["kernel"] == one["kernel"] == fused_path_available()  # the default path
    ddp, one = ddp["params"], one["params"]
    assert ddp.keys() == one.keys()
    pl.seed_everything(0)
    initial = _mlp().state_dict()
    for key in one:
        assert not torch.equal(one[key], initial[key])  # it trained
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    _check_gamma_logs(ddp_out / "run", one_out / "run", PARAMETER_NAMES, list(range(6)))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_cli_tolstoi_matches_one_process_and_logs_once(tolstoi_dir, tmp_path):
    """The problem config through the CLI on 2 CPU processes: rows split, state carried, one TensorBoard run."""
    ddp_config, one_config = _tolstoi_config(tmp_path, tolstoi_dir, 2), _tolstoi_config(tmp_path, tolstoi_dir, 1)
    log_ddp, log_one = tmp_path / "ddp.log", tmp_path / "one.log"
    cli = [sys.executable, "-m", "lightning_msvag.cli", "fit", "--config"]
    procs = [(_launch(cli + [str(ddp_config)], log_ddp), log_ddp), (_launch(cli + [str(one_config)], log_one), log_one)]
    for proc, log in procs:
        _wait(proc, log)

    ddp = torch.load(tmp_path / "ckpt2" / "last.ckpt", weights_only=False)
    one = torch.load(tmp_path / "ckpt1" / "last.ckpt", weights_only=False)
    assert ddp["global_step"] == one["global_step"] == 3
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the carried LSTM state of all 50 rows: rank r's block at rows [25 r, 25 r + 25)
    for part in ("h", "c"):
        assert ddp["char_lstm_train_state"][part].shape == (2, 50, 128)
        torch.testing.assert_close(ddp["char_lstm_train_state"][part], one["char_lstm_train_state"][part],
                                   rtol=1e-4, atol=1e-5)

    runs = list((tmp_path / "logs2" / "tolstoi_char_rnn").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one TensorBoard run
    names = [k for k in one["state_dict"] if not k.endswith("forget_bias_hh")]
    assert "lstm_layers.0.weight_ih" in names and "dense.bias" in names
    _check_gamma_logs(runs[0], tmp_path / "logs1" / "tolstoi_char_rnn" / "version_0", names, [0, 1, 2])


if __name__ == "__main__":  # DDP worker (Lightning re-executes this script for rank 1)
    if sys.argv[1] == "fmnist":
        fit_fmnist(sys.argv[2], sys.argv[3], devices=int(sys.argv[4]), steps=int(sys.argv[5]) if len(sys.argv) > 5 else 6)
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
