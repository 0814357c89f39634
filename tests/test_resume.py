"""Long runs (docs/long_runs.md): exact resume, pre-emption, checkpoint checks.

The central check: ``N`` steps + checkpoint + resume + ``M`` steps equals ``N + M`` steps
straight, *bitwise* on CPU (parameters, buffers, optimizer state, the char-LSTM's carried
state, the RNG states after the run), and the resumed run is fed exactly the batches the
uninterrupted run sees after step ``N`` (asserted on the inputs of every batch).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.helpers.fakes import patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_fashion_mnist
from lightning_msvag.datamodules import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, TolstoiDataModule
from lightning_msvag import MSVAG
from lightning_msvag.fault_tolerance import (
    CheckpointError,
    CheckpointGuard,
    ExactResume,
    NonFiniteTrainingError,
    PreemptionCheckpoint,
    nonfinite_entries,
    verify_checkpoint_archive,
)
from lightning_msvag.models import CharLSTM, ThreeC3D, TwoC2D, WideResNet404

#: end-to-end runs (Lightning fits, subprocesses): part of the full suite, not of -m "not slow"
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ helpers
_TOLSTOI = {}


@pytest.fixture(scope="module", autouse=True)
def _tolstoi_dir(tmp_path_factory):
    """One Tolstoi data folder for the module: the id cache is built once, not per test."""
    root = tmp_path_factory.mktemp("tolstoi")
    TolstoiDataModule(str(root)).prepare_data()
    _TOLSTOI["dir"] = root
    yield root
    _TOLSTOI.clear()


class _BatchRecorder(pl.Callback):
    """Records (epoch, batch_idx, inputs) of every training batch and the RNG state it starts from."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx, batch[0].clone(), torch.get_rng_state()))


def _with_msvag(model, lr=0.05):
    model.configure_optimizers = lambda: MSVAG(model.parameters(), lr=lr, beta=0.9)
    return model


def _fit(model, datamodule, root, max_steps, *, epoch_batches, ckpt_path=None, save_every=None, callbacks=(),
         logger=False):
    recorder = _BatchRecorder()
    cbs = [ExactResume(), CheckpointGuard(), recorder, *callbacks]
    if save_every:
        cbs.append(ModelCheckpoint(dirpath=root, every_n_train_steps=save_every, save_top_k=-1,
                                   filename="step{step}", auto_insert_metric_name=False))
    trainer = pl.Trainer(
        max_steps=max_steps, limit_train_batches=epoch_batches, limit_val_batches=1, num_sanity_val_steps=1,
        logger=logger, enable_checkpointing=bool(save_every), accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, callbacks=cbs, default_root_dir=root,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, recorder.batches


def _final_state(model, trainer):
    state = {f"param/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    opt = trainer.optimizers[0].state_dict()["state"]
    for idx, entry in opt.items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                state[f"opt/{idx}/{key}"] = value.clone()
    carried = getattr(model, "stream_state", lambda _: None)("train")
    if carried is not None:
        state["carried/h"], state["carried/c"] = carried[0].clone(), carried[1].clone()
    state["rng/torch"] = torch.get_rng_state()
    return state


def _max_abs_difference(a, b):
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if a[key].dtype == torch.uint8 or not a[key].is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a[key], b[key]) else float("inf"))
        else:
            worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    return worst


def _assert_bitwise(a, b):
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal: {different[:6]} (max |diff| {_max_abs_difference(a, b):.3g})"


def _tolstoi(root, monkeypatch, n_train):
    return TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8), (lambda: CharLSTM(hidden_size=32, embedding_dim=16))


def _fmnist(root, monkeypatch, n_train):
    write_fake_fashion_mnist(root, n_train=n_train, n_test=16)
    return FashionMNISTDataModule(str(root), batch_size=8, download=False, seed=3), TwoC2D


def _cifar10(root, monkeypatch, n_train):
    write_fake_cifar10(root, n_train=n_train, n_test=16)
    patch_cifar_md5(monkeypatch, CIFAR10DataModule, root)
    return CIFAR10DataModule(str(root), batch_size=8, download=False, seed=5), ThreeC3D


def _cifar100(root, monkeypatch, n_train):
    write_fake_cifar100(root, n_train=n_train, n_test=16)
    patch_cifar_md5(monkeypatch, CIFAR100DataModule, root)
    return CIFAR100DataModule(str(root), batch_size=8, download=False, seed=7), (lambda: WideResNet404(depth=10, width=1))


PROBLEMS = {"tolstoi": _tolstoi, "fmnist": _fmnist, "cifar10": _cifar10, "cifar100": _cifar100}


def _straight_and_resumed(problem, tmp_path, monkeypatch, total, split, epoch_batches, n_train=48, rewrite=None):
    """Run ``total`` steps straight (saving at ``split``) and ``split`` + resume + rest; return both.
    ``rewrite(checkpoint_dict)`` edits the saved checkpoint before the resume."""
    dm, make_model = PROBLEMS[problem](tmp_path / "data", monkeypatch, n_train)
    pl.seed_everything(11)
    straight_model = _with_msvag(make_model())
    trainer, straight_batches = _fit(straight_model, dm, tmp_path / "a", total, epoch_batches=epoch_batches,
                                     save_every=split)
    straight = _final_state(straight_model, trainer)
    ckpt = tmp_path / "a" / f"step{split}.ckpt"
    assert ckpt.is_file()
    if rewrite is not None:
        checkpoint = torch.load(ckpt, weights_only=True)
        rewrite(checkpoint)
        torch.save(checkpoint, ckpt)

    dm2, _ = PROBLEMS[problem](tmp_path / "data", monkeypatch, n_train)  # a fresh data module, as a new process
    pl.seed_everything(11)  # as a fresh `lightning-msvag fit` does; the checkpoint must override it
    resumed_model = _with_msvag(make_model())
    trainer2, resumed_batches = _fit(resumed_model, dm2, tmp_path / "b", total, epoch_batches=epoch_batches,
                                     ckpt_path=ckpt)
    return straight, straight_batches, _final_state(resumed_model, trainer2), resumed_batches


# ============================================================================ 1. exact resume
@pytest.mark.parametrize(
    "problem, total, split",
    [
        ("tolstoi", 10, 3),   # mid-epoch 0 (epochs of 4 batches)
        ("tolstoi", 10, 4),   # exactly at the end of epoch 0
        ("tolstoi", 10, 6),   # mid-epoch 1
        ("fmnist", 7, 5),     # mid-epoch 1
        ("cifar10", 6, 3),    # augmentation: random crops / flips / colour draws
        ("cifar100", 5, 2),
    ],
)
def test_resume_equals_uninterrupted_run_bitwise(problem, total, split, tmp_path, monkeypatch, recwarn):
    straight, straight_batches, resumed, resumed_batches = _straight_and_resumed(
        problem, tmp_path, monkeypatch, total, split, epoch_batches=4
    )
    # the resumed run is fed the batches the uninterrupted run saw after step `split`, in place
    expected = straight_batches[split:]
    assert [(e, i) for e, i, _, _ in resumed_batches] == [(e, i) for e, i, _, _ in expected]
    for (_, i, x, rng), (_, _, x_ref, rng_ref) in zip(resumed_batches, expected):
        assert torch.equal(x, x_ref), f"batch {i}: other data than the uninterrupted run"
    # ... starting from the same RNG state (dropout / augmentation draws)
    assert torch.equal(resumed_batches[0][3], expected[0][3])
    _assert_bitwise(resumed, straight)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_checkpoint_of_the_earlier_format_resumes_bitwise(tmp_path, monkeypatch):
    """Checkpoints of version 0.1.0 kept the RNG states under a top-level key instead of the
    callback state; they still resume exactly."""

    def to_earlier_format(checkpoint):
        checkpoint["lightning_msvag_rng_states"] = checkpoint["callbacks"].pop("ExactResume")

    straight, _, resumed, _ = _straight_and_resumed("tolstoi", tmp_path, monkeypatch, 8, 3, epoch_batches=4,
                                                    rewrite=to_earlier_format)
    _assert_bitwise(resumed, straight)


class _MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def gammas(self):
        """``{step: {tag: value}}`` of the monitor's scalars."""
        out = {}
        for step, metrics in self.logged:
            tags = {k: v for k, v in metrics.items() if k.startswith(("gamma/", "eta2/"))}
            if tags:
                out.setdefault(step, {}).update(tags)
        return out


def test_tracked_gamma_of_msgd_resumes_exactly(tmp_path):
    """M-SGD with track_moments: the γ logged after 20 steps + checkpoint file + ``ckpt_path`` + 20 steps
    equals the straight 40-step run's, bitwise (the monitor's v~ travels in its callback state)."""
    from lightning_msvag import MSGD
    from lightning_msvag.callbacks import VarianceAdaptationMonitor

    def run(root, ckpt_path=None, save_every=None):
        dm = TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8)
        pl.seed_everything(11)
        model = CharLSTM(hidden_size=32, embedding_dim=16)
        model.configure_optimizers = lambda: MSGD(model.parameters(), lr=0.5, beta=0.9)
        monitor = VarianceAdaptationMonitor(logging_interval=10, track_moments=True, histograms=False)
        logger = _MemoryLogger()
        _fit(model, dm, root, 40, epoch_batches=6, ckpt_path=ckpt_path, save_every=save_every,
             callbacks=[monitor], logger=logger)  # 6-batch epochs: step 20 is mid-epoch
        return logger.gammas(), monitor

    straight, _ = run(tmp_path / "a", save_every=20)
    ckpt = tmp_path / "a" / "step20.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["VarianceAdaptationMonitor"]["moment_tracker"]
    names = {name for name, _ in CharLSTM(hidden_size=32, embedding_dim=16).named_parameters()}
    assert saved.keys() == names and {entry["steps"] for entry in saved.values()} == {20}
    resumed, monitor = run(tmp_path / "b", ckpt_path=ckpt)
    # logged after steps 1, 2, 4, 8 (the early logs below the interval), then 10 ... 40
    assert sorted(straight) == [0, 1, 3, 7, 9, 19, 29, 39] and sorted(resumed) == [29, 39]
    assert {count for _, count in monitor._tracker.buffers.values()} == {40}
    for step in (29, 39):
        assert resumed[step].keys() == straight[step].keys() and "gamma/all/mean" in resumed[step]
        different = [tag for tag, value in straight[step].items() if resumed[step][tag] != value]
        assert not different, f"step {step}: γ differs from the uninterrupted run in {different[:4]}"


def test_image_epoch_order_reproducible_across_a_resume(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch + resume + 1 epoch (a shuffled module: the 2nd epoch's permutation)."""
    straight, straight_batches, resumed, resumed_batches = _straight_and_resumed(
        "cifar10", tmp_path, monkeypatch, total=8, split=4, epoch_batches=None, n_train=32
    )
    assert [(e, i) for e, i, _, _ in resumed_batches] == [(1, i) for i in range(4)]
    for (_, _, x, _), (_, _, x_ref, _) in zip(resumed_batches, straight_batches[4:]):
        assert torch.equal(x, x_ref)
    _assert_bitwise(resumed, straight)


def test_loader_state_resumes_the_permutation_mid_epoch(tmp_path):
    """Without Lightning: state_dict after k batches + load_state_dict into a fresh loader -> batches k, k+1, ..."""
    write_fake_fashion_mnist(tmp_path, n_train=40, n_test=8)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=8, download=False, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it)[1] for _ in range(2)]
    state = loader.state_dict()
    rest = [b[1] for b in it]
    fresh = FashionMNISTDataModule(str(tmp_path), batch_size=8, download=False, seed=1)
    fresh.setup("fit")
    again = fresh.train_dataloader()
    again.load_state_dict(state)
    assert [b[1].tolist() for b in again] == [b.tolist() for b in rest]
    assert len(seen) + len(rest) == len(loader)
    # the next epoch's permutation continues as in the uninterrupted loader
    assert [b[1].tolist() for b in again] == [b[1].tolist() for b in loader]


def _fmnist_loaders(folder, n_train):
    """A maker of fresh Fashion-MNIST training loaders (batches of 8, seed 1) and the labels of
    two uninterrupted passes of one of them."""
    write_fake_fashion_mnist(folder, n_train=n_train, n_test=8)

    def loader():
        dm = FashionMNISTDataModule(str(folder), batch_size=8, download=False, seed=1)
        dm.setup("fit")
        return dm.train_dataloader()

    reference = loader()
    return loader, [b[1].tolist() for b in reference] + [b[1].tolist() for b in reference]


def test_loader_state_resumes_twice_in_one_pass(tmp_path):
    """Two interruptions in one pass: the second state counts the batches before the first
    resume too (the resumed loader once counted only its own, and replayed trained batches); a
    state taken between a load and the resumed pass is the loaded one (it was the next pass's)."""
    loader, expected = _fmnist_loaders(tmp_path, n_train=48)
    seen, state = [], None
    for take in (2, 1, 2):  # 6 batches per pass: stop after batch 2, after batch 3, after batch 5
        current = loader()
        if state is not None:
            current.load_state_dict(state)
        it = iter(current)
        seen += [next(it)[1].tolist() for _ in range(take)]
        state = current.state_dict()
    last = loader()
    last.load_state_dict(state)
    # a checkpoint written after the load, before the resumed pass starts, keeps the position
    again = loader()
    again.load_state_dict(last.state_dict())
    seen += [b[1].tolist() for b in again] + [b[1].tolist() for b in again]
    assert seen == expected


class _LoopRecorder(pl.Callback):
    """What a run shows of its loops: epoch starts, every batch (epoch, index, step size, logging
    step, inputs), every validation; each with the global step at which it happened."""

    def __init__(self):
        self.rows = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.rows.append((trainer.global_step, "epoch start", trainer.current_epoch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, "batch", trainer.current_epoch, batch_idx,
                          trainer.optimizers[0].param_groups[0]["lr"],
                          trainer.fit_loop.epoch_loop._batches_that_stepped, batch[0].tolist()))

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append((trainer.global_step, "validation", trainer.current_epoch))


def _fit_with_schedule(model_dir, ckpt_path, max_steps):
    """A char-LSTM fit with an epoch-wise step-size schedule, last.ckpt and a checkpoint every step."""
    pl.seed_everything(11)
    model = CharLSTM(hidden_size=32, embedding_dim=16)

    def configure_optimizers():
        opt = MSVAG(model.parameters(), lr=0.05, beta=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}

    model.configure_optimizers = configure_optimizers
    recorder = _LoopRecorder()
    trainer = pl.Trainer(
        max_steps=max_steps, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=model_dir,
        callbacks=[ExactResume(), recorder, ModelCheckpoint(dirpath=model_dir, save_last=True, save_top_k=0),
                   ModelCheckpoint(dirpath=model_dir / "every", every_n_train_steps=1, save_top_k=-1,
                                   filename="step{step}", auto_insert_metric_name=False)],
    )
    trainer.fit(model, datamodule=TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8),
                ckpt_path=ckpt_path)
    return trainer, model, recorder.rows


@pytest.mark.parametrize("stops", ["stop3 stop8", "stop4 stop10", "stop1 stop2 stop3 stop5 stop6 stop9",
                                   "saved2 saved3", "saved4 saved8", "stop4 saved8 stop12", "saved3 stop4 saved9"])
def test_chain_of_interruptions_equals_the_uninterrupted_run(stops, tmp_path):
    """A run cut several times (epochs of 4 batches, an epoch-wise schedule) equals one straight
    run: the same epochs, batches, step sizes, logging steps, epoch-start hooks and validations,
    the same loop counts at the end, bitwise the same weights. ``stopK``: the fit stops at
    ``max_steps=K`` and the next resumes from its last.ckpt (written as the fit ends: Lightning
    had counted the epoch finished); ``savedK``: the next resumes from the checkpoint Lightning
    wrote after step K (at an epoch's last batch Lightning skipped the next epoch's start)."""
    total = 14
    straight_trainer, straight_model, straight_rows = _fit_with_schedule(tmp_path / "straight", None, total)
    rows, ckpt = [], None
    cuts = [(s.rstrip("0123456789"), int(s.lstrip("stopsaved"))) for s in stops.split()] + [("stop", total)]
    for segment, (kind, step) in enumerate(cuts):
        folder = tmp_path / f"segment{segment}"
        trainer, model, segment_rows = _fit_with_schedule(folder, ckpt, step if kind == "stop" else step + 1)
        if kind == "saved":  # what ran after the checkpoint is run again by the resumed fit
            segment_rows = [row for row in segment_rows if row[0] < step]
            ckpt = folder / "every" / f"step{step}.ckpt"
        else:
            ckpt = folder / "last.ckpt"
        rows += segment_rows
    # Lightning (2.5) does not run again the end-of-epoch validation that followed a checkpoint
    # of an epoch's last batch (docs/long_runs.md): the one thing such a resume leaves out
    skipped = {("validation", step) for kind, step in cuts if kind == "saved" and step % 4 == 0}
    assert rows == [row for row in straight_rows if (row[1], row[0]) not in skipped]
    assert trainer.current_epoch == straight_trainer.current_epoch
    assert trainer.global_step == straight_trainer.global_step == total
    assert (trainer.fit_loop.epoch_loop._batches_that_stepped
            == straight_trainer.fit_loop.epoch_loop._batches_that_stepped)
    _assert_bitwise(_final_state(model, trainer), _final_state(straight_model, straight_trainer))


class _BarProbe(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.desc, bar.n, bar.total))


@pytest.mark.parametrize("split", [2, 4], ids=["mid-epoch", "epoch end"])
def test_progress_bar_of_a_resumed_fit_shows_the_epoch_and_its_length(split, tmp_path):
    """Lightning's own bar shows "Training: 2/?" after a mid-epoch resume (it skips the
    resumed epoch's on_train_epoch_start); the command's bar shows "Epoch 0: 2/4"."""
    from lightning_msvag.fault_tolerance import ResumedEpochProgressBar

    def fit(folder, max_steps, ckpt_path=None):
        pl.seed_everything(11)
        probe = _BarProbe()
        trainer = pl.Trainer(
            max_steps=max_steps, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
            accelerator="cpu", devices=1, enable_model_summary=False, default_root_dir=tmp_path / folder,
            callbacks=[ExactResume(), ResumedEpochProgressBar(), probe,
                       ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)])
        trainer.fit(_with_msvag(CharLSTM(hidden_size=32, embedding_dim=16)),
                    datamodule=TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8), ckpt_path=ckpt_path)
        return probe.seen

    straight = fit("straight", 6)
    fit("cut", split)
    resumed = fit("resumed", 6, tmp_path / "cut" / "last.ckpt")
    assert straight[split][:2] == (f"Epoch {split // 4}: ", split % 4) and straight[split][2] is not None
    assert resumed == straight[split:]


# ---------------------------------------------------------------------------- DDP, through the command
def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _p4_config(tmp: Path, data_dir: Path, name: str, devices: int, max_steps: int, save_every: int,
               extra_callbacks=()) -> Path:
    """configs/tolstoi_char_rnn.yaml (M-SVAG, dropout 0.2), tiny and on CPU, checkpoints every `save_every` steps."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "tolstoi_char_rnn.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu", devices=devices, max_steps=max_steps, limit_train_batches=4, limit_val_batches=0,
        num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
        default_root_dir=str(tmp / f"{name}_root"),  # config.yaml goes there, not into the working folder
        callbacks=[{
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp / name), "every_n_train_steps": save_every, "save_top_k": -1,
                          "save_last": True, "filename": "step{step}", "auto_insert_metric_name": False},
        }, *extra_callbacks],
    )
    if devices > 1:
        trainer["strategy"] = "ddp"
    config["data"]["init_args"].update(data_dir=str(data_dir), batch_size=4, seq_len=8)
    config["model"]["init_args"] = {"hidden_size": 32, "embedding_dim": 16, "dropout": 0.2}
    config["optimizer"]["init_args"]["fused"] = False
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_cli(args, log: Path, timeout=300) -> int:
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "lightning_msvag.cli", *args], cwd=REPO, env=_subprocess_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode


def _checkpoint_tensors(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    out = {f"param/{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for idx, entry in opt["state"].items():
            out.update({f"opt{i}/{idx}/{k}": v for k, v in entry.items() if torch.is_tensor(v)})
    out.update({f"carried/{k}": v for k, v in (ckpt.get("char_lstm_train_state") or {}).items()})
    for r, state in enumerate(ckpt["callbacks"]["ExactResume"]["ranks"]):
        out[f"rng/rank{r}/torch"] = state["torch"]
    return out


def test_ddp_cli_p4_resume_mid_epoch_is_bitwise(tmp_path):
    """2-process DDP (gloo), the P4 config with dropout: 6 steps == 3 steps + --ckpt_path + 3 steps, bitwise."""
    data = _TOLSTOI["dir"]
    straight_cfg = _p4_config(tmp_path, data, "straight", 2, max_steps=6, save_every=3)
    assert _run_cli(["fit", "--config", str(straight_cfg)], tmp_path / "straight.log") == 0, (
        tmp_path / "straight.log").read_text()[-3000:]
    resumed_cfg = _p4_config(tmp_path, data, "resumed", 2, max_steps=6, save_every=100)
    code = _run_cli(["fit", "--config", str(resumed_cfg), "--ckpt_path", str(tmp_path / "straight" / "step3.ckpt")],
                    tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert code == 0, log[-3000:]
    assert "not resumable" not in log
    straight = _checkpoint_tensors(tmp_path / "straight" / "last.ckpt")
    resumed = _checkpoint_tensors(tmp_path / "resumed" / "last.ckpt")
    assert straight["carried/h"].shape[1] == 4 and "rng/rank1/torch" in straight  # both ranks' rows and RNGs
    _assert_bitwise(resumed, straight)


# ============================================================================ 2. pre-emption
def _newest_last(folder: Path) -> Path:
    """The checkpoint Lightning's ``ckpt_path="last"`` resolves to: the newest last*.ckpt."""
    return max(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def _launch_cli(args, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "lightning_msvag.cli", *args], cwd=REPO, env=_subprocess_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def test_sigterm_mid_epoch_writes_checkpoint_exits_143_and_resumes_exactly(tmp_path):
    """SIGTERM during step 3 (of a 4-batch epoch): the step finishes, last.ckpt holds step 4, exit status 143;
    ``--ckpt_path last`` then continues bitwise like an uninterrupted run of the same length."""
    data = _TOLSTOI["dir"]
    cfg = _p4_config(tmp_path, data, "run", 1, max_steps=100, save_every=100,
                     extra_callbacks=[{"class_path": "tests.helpers.resume.SignalAtStep", "init_args": {"step": 3}}])
    straight_cfg = _p4_config(tmp_path, data, "straight", 1, max_steps=7, save_every=100)
    preempted = _launch_cli(["fit", "--config", str(cfg)], tmp_path / "run.log")
    straight = _launch_cli(["fit", "--config", str(straight_cfg)], tmp_path / "straight.log")
    code, straight_code = preempted.wait(timeout=300), straight.wait(timeout=300)
    text = (tmp_path / "run.log").read_text()
    assert code == 143, text[-3000:]
    assert straight_code == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert "SIGTERM received: wrote" in text
    assert "weights_only" not in text  # no stray "`weights_only` was not set" line (issue 19 item 9)
    last = _newest_last(tmp_path / "run")
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4  # the step the signal arrived in was completed and saved
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_yielded"] == 4

    resume_cfg = _p4_config(tmp_path, data, "run", 1, max_steps=7, save_every=100)
    resumed_log = tmp_path / "resumed.log"
    assert _run_cli(["fit", "--config", str(resume_cfg), "--ckpt_path", "last"], resumed_log) == 0, (
        resumed_log.read_text()[-3000:])
    last = _newest_last(tmp_path / "run")  # what `--ckpt_path last` resolved to, then rewrote
    assert torch.load(last, weights_only=True)["global_step"] == 7
    _assert_bitwise(_checkpoint_tensors(last), _checkpoint_tensors(tmp_path / "straight" / "last.ckpt"))


def test_requeue_signal_from_outside_writes_checkpoint_and_exits_138(tmp_path):
    """SIGUSR1 (SLURM's requeue signal) sent by another process: checkpoint, exit status 128 + 10."""
    data = _TOLSTOI["dir"]
    cfg = _p4_config(tmp_path, data, "run", 1, max_steps=100_000, save_every=2)
    log = tmp_path / "run.log"
    proc = _launch_cli(["fit", "--config", str(cfg)], log)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "step2.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 128 + signal.SIGUSR1, text[-3000:]
    assert "SIGUSR1 received: wrote" in text
    step = torch.load(_newest_last(tmp_path / "run"), weights_only=True, map_location="cpu")["global_step"]
    assert step >= 2


# ============================================================================ 3. damaged checkpoints
def _p4_checkpoint(tmp_path, steps=2) -> Path:
    dm = TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8)
    pl.seed_everything(0)
    model = _with_msvag(CharLSTM(hidden_size=32, embedding_dim=16))
    _fit(model, dm, tmp_path / "ckpts", steps, epoch_batches=4, save_every=steps)
    return tmp_path / "ckpts" / f"step{steps}.ckpt"


def _refused(tmp_path, ckpt: Path, match: str, model=None):
    """Resuming from ``ckpt`` raises CheckpointError(match) before a batch is trained or a file written."""
    dm = TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8)
    model = model or _with_msvag(CharLSTM(hidden_size=32, embedding_dim=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = _BatchRecorder()
    out = tmp_path / "resumed"
    with pytest.raises(CheckpointError, match=match):
        _fit(model, dm, out, 6, epoch_batches=4, ckpt_path=ckpt, save_every=1, callbacks=[recorder])
    assert recorder.batches == []  # nothing trained
    assert not out.exists() or not list(out.glob("*.ckpt"))  # nothing written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing restored


def test_checkpoint_with_flipped_bytes_is_refused_before_training(tmp_path):
    ckpt = _p4_checkpoint(tmp_path)
    raw = bytearray(ckpt.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = bytes(b ^ 0xFF for b in raw[middle:middle + 4096])  # 4 KiB flipped
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC-32"):
        verify_checkpoint_archive(ckpt)
    _refused(tmp_path, ckpt, "damaged")


def test_truncated_checkpoint_is_refused(tmp_path):
    ckpt = _p4_checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    _refused(tmp_path, ckpt, "damaged")


def test_checkpoint_with_nan_optimizer_state_or_wrong_shapes_is_refused(tmp_path):
    ckpt = _p4_checkpoint(tmp_path)
    good = torch.load(ckpt, weights_only=True)
    state = good["optimizer_states"][0]["state"]
    first = next(iter(state.values()))
    key = next(k for k, v in first.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1)
    first[key].view(-1)[0] = float("nan")
    torch.save(good, tmp_path / "nan.ckpt")  # a valid archive: only the content check can catch it
    _refused(tmp_path, tmp_path / "nan.ckpt", "non-finite")
    # another model size: refused with the shapes, not with a traceback from load_state_dict
    _refused(tmp_path, ckpt, "does not fit the model", model=_with_msvag(CharLSTM(hidden_size=16, embedding_dim=16)))


class _PoisonAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.dense.bias.fill_(float("nan"))  # what a diverging step does


def test_training_never_writes_a_nonfinite_checkpoint(tmp_path):
    dm = TolstoiDataModule(str(_TOLSTOI["dir"]), batch_size=4, seq_len=8)
    model = _with_msvag(CharLSTM(hidden_size=32, embedding_dim=16))
    with pytest.raises(NonFiniteTrainingError, match="non-finite"):
        _fit(model, dm, tmp_path / "ckpts", 6, epoch_batches=4, save_every=1, callbacks=[_PoisonAt(3)])
    written = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert written == ["step1.ckpt", "step2.ckpt"]
    for name in written:
        verify_checkpoint_archive(tmp_path / "ckpts" / name)
        assert nonfinite_entries(torch.load(tmp_path / "ckpts" / name, weights_only=True)) == []


@pytest.mark.parametrize("where", [0.5, 0.02, 0.995], ids=["tensor-data", "pickle", "zip-directory"])
def test_command_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys, where):
    """Wherever the damage is (a tensor, the hyperparameter pickle LightningCLI reads first,
    the archive's directory), the command refuses it in one line before training."""
    from lightning_msvag.cli import main

    first = _p4_config(tmp_path, _TOLSTOI["dir"], "first", 1, max_steps=2, save_every=2)
    assert main(["fit", "--config", str(first)]) == 0
    ckpt = tmp_path / "first" / "step2.ckpt"
    raw = bytearray(ckpt.read_bytes())
    for i in range(int(len(raw) * where), min(len(raw), int(len(raw) * where) + 64)):
        raw[i] ^= 0xFF  # 64 flipped bytes
    ckpt.write_bytes(bytes(raw))
    cfg = _p4_config(tmp_path, _TOLSTOI["dir"], "cli", 1, max_steps=4, save_every=1)
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("lightning-msvag: error:")]
    assert "checkpoint" in line and "damaged" in line and "Traceback" not in err
    assert not list((tmp_path / "cli").glob("*.ckpt"))


# ============================================================================ 5. optimizer API
@pytest.mark.parametrize("bad", [{"beta": 1.0}, {"beta": -0.1}, {"lr": float("nan")}, {"lr": -1.0}])
def test_rejected_param_group_leaves_the_optimizer_unchanged(bad):
    from lightning_msvag import MSGD, MSSD, SVAG

    for cls in (MSGD, MSSD, MSVAG, SVAG):
        a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        opt = cls([a], lr=0.1, beta=0.9, fused=False)
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [b], **bad})
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [a]
        a.grad = torch.ones(3)
        opt.step()  # still works: no half-added group to divide by (1 - beta) = 0
        assert torch.isfinite(a).all() and not torch.equal(a.detach(), torch.ones(3))
        opt.add_param_group({"params": [b], "lr": 0.2})  # a valid group still goes in
        assert opt.param_groups[1]["beta"] == 0.9


# ============================================================================ 4. mixed precision
def _fit_in_precision(problem, tmp_path, monkeypatch, precision, accelerator="cpu", steps=3):
    dm, make_model = PROBLEMS[problem](tmp_path / "data", monkeypatch, 32)
    pl.seed_everything(0)
    model = _with_msvag(make_model(), lr=0.01)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []

    class _Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        precision=precision, accelerator=accelerator, devices=1, max_steps=steps, limit_train_batches=4,
        limit_val_batches=1, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[_Losses()],
    )
    trainer.fit(model, datamodule=dm)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # mixed precision: float32 master weights
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), initial[name].to(p.device)), name
    opt = trainer.optimizers[0]
    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32, key  # state in the parameters' dtype
    gammas = opt.variance_adaptation_factors()
    assert gammas and all(bool(((g >= 0) & (g <= 1)).all()) for g in gammas)
    return model


@pytest.mark.parametrize("problem", ["tolstoi", "fmnist", "cifar10", "cifar100"])
def test_bf16_mixed_trains_every_problem_on_cpu(problem, tmp_path, monkeypatch):
    model = _fit_in_precision(problem, tmp_path, monkeypatch, "bf16-mixed")
    if problem == "tolstoi":
        assert model.stream_state("train")[0].dtype == torch.float32  # carried state kept in float32


def test_char_lstm_accepts_a_state_of_another_dtype():
    """oneDNN's LSTM rejects mixed dtypes ('could not create a primitive descriptor'): the layer unifies them."""
    model = CharLSTM(hidden_size=32, embedding_dim=16)
    x = torch.randint(0, 83, (4, 6))
    state = tuple(t.bfloat16() for t in model.zero_state(4))
    logits, _ = model(x, state)  # float32 weights, bf16 state, no autocast
    assert logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (h, _) = model(x, model.zero_state(4))  # float32 state under bf16 autocast
    assert h.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.cuda  # 16-mixed uses a gradient scaler on a GPU only
@pytest.mark.parametrize("problem", ["tolstoi", "fmnist", "cifar10", "cifar100"])
def test_16_mixed_trains_every_problem_on_gpu(problem, tmp_path, monkeypatch):
    _fit_in_precision(problem, tmp_path, monkeypatch, "16-mixed", accelerator="gpu")


@pytest.mark.parametrize("when", ["before any iterator", "iterator made, nothing fetched"])
def test_loader_state_before_the_first_batch_of_a_pass(when, tmp_path):
    loader, expected = _fmnist_loaders(tmp_path, n_train=40)
    original = loader()
    if when == "before any iterator":
        state = original.state_dict()
    else:
        it = iter(original)
        state = original.state_dict()
        assert [b[1].tolist() for b in it] == expected[:5]
    again = loader()
    again.load_state_dict(state)
    assert [b[1].tolist() for b in again] + [b[1].tolist() for b in again] == expected


# ============================================================================ issue 19
class _StubStrategy:
    root_device = torch.device("cpu")


class _StubTrainer:
    """What PreemptionCheckpoint reads of a DDP trainer: two processes, no Lightning SIGTERM."""

    world_size = 2
    received_sigterm = False
    strategy = _StubStrategy()


def test_ddp_preemption_flag_is_a_cpu_number_on_a_gloo_group(tmp_path, monkeypatch):
    """Issue 17 item 5: the flag is all-reduced as a CPU tensor on a gloo group (never on the
    GPU, whose `.item()` would synchronise the device every step), at the step of the signal."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real = dist.all_reduce

        def recording(tensor, *args, **kwargs):
            calls.append((tensor.device.type, dist.get_backend(kwargs.get("group"))))
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(dist, "all_reduce", recording)
        callback, trainer = PreemptionCheckpoint(), _StubTrainer()
        callback.on_train_start(trainer, None)
        try:
            _StubStrategy.root_device = torch.device("meta")  # a device flag would fail loudly
            assert callback._signal_seen(trainer) is None
            callback.received = int(signal.SIGTERM)  # arrives during step 2
            assert callback._signal_seen(trainer) == signal.SIGTERM  # every process stops after it
            assert calls == [("cpu", "gloo"), ("cpu", "gloo")], calls
        finally:
            _StubStrategy.root_device = torch.device("cpu")
            callback.teardown(trainer, None, "fit")
    finally:
        dist.destroy_process_group()


def test_ddp_sigterm_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path):
    """2-process DDP (gloo): SIGTERM during step 4; both ranks stop after it (exit 143, one
    checkpoint at step 4), and `--ckpt_path last` + 3 steps equals 7 steps straight, bitwise."""
    data = _TOLSTOI["dir"]
    cfg = _p4_config(tmp_path, data, "run", 2, max_steps=100, save_every=100,
                     extra_callbacks=[{"class_path": "tests.helpers.resume.SignalAtStep", "init_args": {"step": 3}}])
    straight_cfg = _p4_config(tmp_path, data, "straight", 2, max_steps=7, save_every=100)
    code = _run_cli(["fit", "--config", str(cfg)], tmp_path / "run.log")
    text = (tmp_path / "run.log").read_text()
    assert code == 143, text[-3000:]
    assert text.count("SIGTERM received: wrote") == 1 and "weights_only" not in text
    assert torch.load(_newest_last(tmp_path / "run"), weights_only=True)["global_step"] == 4
    assert _run_cli(["fit", "--config", str(straight_cfg)], tmp_path / "straight.log") == 0
    resume_cfg = _p4_config(tmp_path, data, "run", 2, max_steps=7, save_every=100)
    assert _run_cli(["fit", "--config", str(resume_cfg), "--ckpt_path", "last"], tmp_path / "resumed.log") == 0, (
        (tmp_path / "resumed.log").read_text()[-3000:])
    last = _newest_last(tmp_path / "run")
    assert torch.load(last, weights_only=True)["global_step"] == 7
    _assert_bitwise(_checkpoint_tensors(last), _checkpoint_tensors(tmp_path / "straight" / "last.ckpt"))
