"""End-to-end: the ``lightning-msvag`` LightningCLI with the four problem configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_msvag
from datamodules import CIFAR10DataModule, CIFAR100DataModule
from datamodule_fakes import patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_fashion_mnist
from lightning_msvag.cli import build_cli, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
WAR_AND_PEACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "war_and_peace.txt"


def _quick_fit_args(tmp_path: Path, config: str, *extra: str) -> list:
    """fit for two training batches, one validation batch per loader, logs under tmp_path."""
    return [
        "fit",
        "--config", str(CONFIGS / config),
        "--data.data_dir", str(tmp_path / "data"),
        "--data.download", "false",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        *extra,
    ]


def _scalar_tags(log_root: Path) -> dict:
    """{tag: [values]} over every TensorBoard event file under ``log_root``."""
    tags: dict = {}
    for event_file in log_root.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return tags


def _copy_war_and_peace(data_dir: Path) -> None:
    target = data_dir / "tolstoi" / "war-and-peace.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WAR_AND_PEACE, target)


def test_version_and_registry_listing(capsys):
    assert main(["--version"]) == 0
    assert lightning_msvag.__version__ in capsys.readouterr().out
    assert main(["--list-optimizers"]) == 0
    assert capsys.readouterr().out.split() == lightning_msvag.available_optimizers()


def test_tolstoi_config_trains_on_real_text_logs_and_resumes(tmp_path):
    _copy_war_and_peace(tmp_path / "data")
    main(_quick_fit_args(tmp_path, "tolstoi_char_rnn.yaml", "--trainer.limit_train_batches", "3",
                         "--trainer.limit_val_batches", "2"))
    tags = _scalar_tags(tmp_path / "logs")
    for tag in ("train/loss", "train/accuracy", "train_eval/loss", "train_eval/accuracy", "test/loss", "test/accuracy"):
        assert tag in tags, (tag, sorted(tags))
        assert all(torch.isfinite(torch.tensor(tags[tag])))
    # a fresh model predicts 83 symbols about uniformly: cross-entropy near ln 83
    assert abs(tags["train/loss"][0] - torch.log(torch.tensor(83.0)).item()) < 0.5

    checkpoints = list((tmp_path / "logs").rglob("last.ckpt"))
    assert len(checkpoints) == 1
    ckpt = torch.load(checkpoints[0], weights_only=False)
    assert ckpt["global_step"] == 3
    assert type(ckpt["optimizer_states"][0]["state"][0]["step"]) is torch.Tensor
    # resume: one more epoch of 3 batches continues from step 3 with the optimizer state
    main(_quick_fit_args(tmp_path, "tolstoi_char_rnn.yaml", "--trainer.limit_train_batches", "3",
                         "--trainer.limit_val_batches", "2", "--trainer.max_epochs", "2",
                         "--ckpt_path", str(checkpoints[0])))
    resumed = [c for c in (tmp_path / "logs").rglob("last.ckpt") if c != checkpoints[0]]
    assert resumed, "the resumed run saved no checkpoint"
    state = torch.load(resumed[0], weights_only=False)
    assert state["global_step"] == 6
    assert int(state["optimizer_states"][0]["state"][0]["step"]) == 6


def test_fmnist_config_runs_two_steps(tmp_path):
    write_fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=8)
    main(_quick_fit_args(tmp_path, "fmnist_2c2d.yaml", "--data.batch_size", "4"))
    tags = _scalar_tags(tmp_path / "logs")
    assert len(tags["train/loss"]) == 2 and "test/accuracy" in tags


@pytest.mark.parametrize(
    "config,module,writer",
    [
        ("cifar10_3c3d.yaml", CIFAR10DataModule, write_fake_cifar10),
        ("cifar100_wrn404.yaml", CIFAR100DataModule, write_fake_cifar100),
    ],
)
def test_cifar_configs_run_two_steps(tmp_path, monkeypatch, config, module, writer):
    writer(tmp_path / "data", n_train=16, n_test=8)
    patch_cifar_md5(monkeypatch, module, tmp_path / "data")
    main(_quick_fit_args(tmp_path, config, "--data.batch_size", "4"))
    tags = _scalar_tags(tmp_path / "logs")
    assert len(tags["train/loss"]) == 2 and "train_eval/loss" in tags and "test/accuracy" in tags


def test_wrn_config_has_the_paper_schedule(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "cifar100_wrn404.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "torch.optim.lr_scheduler.MultiStepLR" in printed
    assert "- 60\n    - 120\n    - 160" in printed and "gamma: 0.2" in printed


@pytest.mark.parametrize(
    "optimizer_args,expected",
    [
        (["--optimizer", "MSVAG", "--optimizer.lr", "0.05"], lightning_msvag.MSVAG),
        (["--optimizer", "MSSD", "--optimizer.lr", "0.001"], lightning_msvag.MSSD),
        (["--optimizer", "MSGD", "--optimizer.lr", "0.05"], lightning_msvag.MSGD),
        (["--optimizer", "SVAG", "--optimizer.lr", "0.05"], lightning_msvag.SVAG),
        (["--optimizer", "Adam", "--optimizer.lr", "0.001"], torch.optim.Adam),
        (["--config", str(CONFIGS / "optimizers" / "adam.yaml")], torch.optim.Adam),
        (["--config", str(CONFIGS / "optimizers" / "mssd.yaml")], lightning_msvag.MSSD),
    ],
)
def test_optimizer_selected_by_name_or_config(tmp_path, optimizer_args, expected):
    _copy_war_and_peace(tmp_path / "data")
    args = _quick_fit_args(tmp_path, "tolstoi_char_rnn.yaml", "--trainer.limit_val_batches", "0",
                           "--trainer.num_sanity_val_steps", "0", *optimizer_args)
    cli = build_cli(args[1:], run=False)  # without the subcommand: build, don't run
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is expected
    if expected is torch.optim.Adam:
        assert optimizer.defaults["betas"] == (0.9, 0.999)
    else:
        assert optimizer.defaults["beta"] == 0.9
        assert all(int(s["step"]) == 2 for s in optimizer.state.values())
