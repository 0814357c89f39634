"""End-to-end: the ``lightning-msvag`` LightningCLI with the four problem configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_msvag
from lightning_msvag.datamodules import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule
from tests.helpers.fakes import patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_fashion_mnist
from lightning_msvag.cli import build_cli, main
from lightning_msvag.registry import METHODS, optimizer_config_text
from lightning_msvag.models import ThreeC3D, TwoC2D, WideResNet404

#: end-to-end runs (Lightning fits, subprocesses): part of the full suite, not of -m "not slow"
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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


def test_version_and_registry_listing(capsys):
    assert main(["--version"]) == 0
    assert lightning_msvag.__version__ in capsys.readouterr().out
    assert main(["--list-optimizers"]) == 0
    assert capsys.readouterr().out.split() == lightning_msvag.available_optimizers()


def test_tolstoi_config_trains_on_real_text_logs_and_resumes(tmp_path):
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
    # the resume continues the checkpoint's run folder (one TensorBoard run, issue 19)
    assert list((tmp_path / "logs").rglob("last.ckpt")) == checkpoints
    state = torch.load(checkpoints[0], weights_only=False)
    assert state["global_step"] == 6
    assert int(state["optimizer_states"][0]["state"][0]["step"]) == 6


def _config_logging_gamma_every_step(tmp_path: Path, config: str) -> str:
    """The shipped config with the γ monitor logging every step (so two steps show γ)."""
    text = (CONFIGS / config).read_text()
    assert text.count("logging_interval: 50") == 1
    path = tmp_path / config
    path.write_text(text.replace("logging_interval: 50", "logging_interval: 1"))
    return str(path)


def _check_two_step_run(tmp_path: Path, config: str, model_cls, data_cls, lr: float, extra: list) -> None:
    """The config builds the intended classes with M-SVAG (β 0.9, the config's α), trains two
    steps, and TensorBoard holds the losses, the evaluations and γ from the monitor."""
    args = _quick_fit_args(tmp_path, config, *extra)
    args[args.index("--config") + 1] = _config_logging_gamma_every_step(tmp_path, config)
    cli = build_cli(args[1:], run=False)
    assert type(cli.model) is model_cls and type(cli.datamodule) is data_cls
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, lightning_msvag.VarianceAdaptationMonitor)]
    assert len(monitors) == 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is lightning_msvag.MSVAG
    assert optimizer.defaults["lr"] == lr and optimizer.defaults["beta"] == 0.9
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())
    tags = _scalar_tags(tmp_path / "logs")
    assert len(tags["train/loss"]) == 2 and "train_eval/loss" in tags and "test/accuracy" in tags
    assert len(tags["gamma/all/mean"]) == 2 and all(0 <= g <= 1 for g in tags["gamma/all/mean"])


def test_fmnist_config_runs_two_steps(tmp_path):
    write_fake_fashion_mnist(tmp_path / "data", n_train=16, n_test=8)
    _check_two_step_run(tmp_path, "fmnist_2c2d.yaml", TwoC2D, FashionMNISTDataModule, 0.1, ["--data.batch_size", "4"])


@pytest.mark.parametrize(
    "config,model_cls,module,writer,lr",
    [
        ("cifar10_3c3d.yaml", ThreeC3D, CIFAR10DataModule, write_fake_cifar10, 0.1),
        ("cifar100_wrn404.yaml", WideResNet404, CIFAR100DataModule, write_fake_cifar100, 0.1),
    ],
)
def test_cifar_configs_run_two_steps(tmp_path, monkeypatch, config, model_cls, module, writer, lr):
    writer(tmp_path / "data", n_train=16, n_test=8)
    patch_cifar_md5(monkeypatch, module, tmp_path / "data")
    _check_two_step_run(tmp_path, config, model_cls, module, lr, ["--data.batch_size", "4"])


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


# ------------------------------------------------------------ the command as a user runs it
def _run_command(args: list, cwd: Path, env_extra: dict | None = None, timeout: float = 300):
    """``python -m lightning_msvag ARGS`` in ``cwd`` as a separate process (as from a shell)."""
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MSVAG_TRACEBACK"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "lightning_msvag", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


_FIT_TWO_STEPS = ["fit", "--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--trainer.max_steps", "2",
                  "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize(
    "bad_args,message",
    [
        (["--optimizer.lr=-1"], "invalid learning rate -1.0"),
        (["--optimizer.beta", "1.0"], "invalid beta 1.0"),
        (["--data.batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--data.batch_size", "7", "--trainer.strategy", "ddp", "--trainer.devices", "3"],
         "must be divisible by the number of processes (3)"),
    ],
)
def test_bad_input_ends_in_one_line_and_nonzero_exit(tmp_path, bad_args, message):
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"), *bad_args], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightning-msvag: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]  # one message, also under 3 ranks
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained or written


def test_traceback_on_request(tmp_path):
    shown = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"), "--optimizer.lr=-1"],
                         tmp_path, {"LIGHTNING_MSVAG_TRACEBACK": "1"})
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "invalid learning rate" in shown.stderr


def test_damaged_data_is_one_line(tmp_path):
    target = tmp_path / "data" / "tolstoi" / "war-and-peace.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the book")
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data")], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("lightning-msvag: error:")]
    assert str(target) in line and "sha256" in line
    assert target.read_bytes() == b"not the book"  # never replaced


def test_first_run_trains_on_packaged_text_quietly(tmp_path):
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"),
                           "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("LeafSpec", "💡 Tip", "No CUDA runtime is found", "deprecated", "Warning"):
        assert noise not in output, (noise, output[-3000:])
    assert list((tmp_path / "logs" / "tolstoi_char_rnn").rglob("events.out.tfevents.*"))
    assert list((tmp_path / "logs").rglob("last.ckpt"))


@pytest.mark.parametrize("config", ["fmnist_2c2d.yaml", "cifar10_3c3d.yaml", "cifar100_wrn404.yaml", "tolstoi_char_rnn.yaml",
                                    "tolstoi_transformer.yaml"])
def test_configs_take_lightnings_checkpointing_and_logger_flags(tmp_path, config):
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    def built(*extra):
        args = ["--config", str(CONFIGS / config), "--data.data_dir", str(tmp_path / "data"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra]
        return build_cli(args, run=False).trainer

    default = built()
    assert sum(isinstance(c, ModelCheckpoint) for c in default.callbacks) == 1
    assert default.checkpoint_callback.save_last is True
    assert sum(isinstance(c, LearningRateMonitor) for c in default.callbacks) == 1
    no_ckpt = built("--trainer.enable_checkpointing", "false")
    assert not any(isinstance(c, ModelCheckpoint) for c in no_ckpt.callbacks)
    no_logger = built("--trainer.logger", "false")
    assert no_logger.logger is None and not any(isinstance(c, LearningRateMonitor) for c in no_logger.callbacks)
    assert built("--trainer.precision", "bf16-mixed").precision == "bf16-mixed"
    two = built("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert two.num_devices == 2


def test_fit_without_checkpointing_or_logger_writes_nothing(tmp_path):
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"),
                           "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_configs_command_lists_and_writes_the_shipped_configs(tmp_path, capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(listed) == sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
    assert main(["configs", "--write", str(tmp_path)]) == 0
    for name in listed:
        assert (tmp_path / "configs" / name).read_bytes() == (CONFIGS / name).read_bytes()
    assert main(["configs", "--write", str(tmp_path)]) == 1  # never overwrites
    assert "not overwriting" in capsys.readouterr().err


@pytest.mark.slow
def test_non_editable_install_works_from_an_empty_folder(tmp_path):
    """`pip install .` (not editable): configs come from the package, the text too."""
    source, site = tmp_path / "source", tmp_path / "site"  # built from a copy: no build/ left in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "data", "lightning_logs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=600)
    empty = tmp_path / "empty"
    empty.mkdir()
    # the user's own project has a `models` and a `datamodules` package (the most common names)
    for own in ("models", "datamodules"):
        (empty / own).mkdir()
        (empty / own / "__init__.py").write_text("OWNER = 'the user'\n")
    env = {"PYTHONPATH": f"{site}{os.pathsep}{empty}"}
    listed = subprocess.run([sys.executable, "-c", "import lightning_msvag, lightning_msvag.models, lightning_msvag.datamodules, "
                             "models, datamodules; print(lightning_msvag.__file__); print(lightning_msvag.datamodules.__file__); "
                             "print(lightning_msvag.models.CharLSTM.__module__, models.OWNER, datamodules.OWNER)"],
                            cwd=empty, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    files, owners = listed.stdout.splitlines()[:2], listed.stdout.splitlines()[2]
    assert all(line.startswith(str(site)) for line in files), listed.stdout
    assert owners == "lightning_msvag.models.char_rnn the user the user"  # both in one process
    assert "m-svag" in _run_command(["--list-optimizers"], empty, env).stdout.split()
    assert "--optimizer" in _run_command(["fit", "--help"], empty, env).stdout
    assert _run_command(["configs", "--write", "."], empty, env).returncode == 0
    result = _run_command(["fit", "--config", "configs/tolstoi_char_rnn.yaml", "--trainer.max_steps", "2",
                           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"], empty, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((empty / "lightning_logs" / "tolstoi_char_rnn").rglob("events.out.tfevents.*"))
    assert not (empty / "data" / "tolstoi" / "war-and-peace.txt").exists()  # the packaged text was used


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_listed_name_is_accepted_by_optimizer(tmp_path, method):
    for spelling in (method.name, method.name.upper(), f"--optimizer={method.name}"):
        option = [spelling] if spelling.startswith("--") else ["--optimizer", spelling]
        cli = build_cli(["--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tmp_path),
                         "--trainer.logger", "false", *option], run=False)
        assert cli.config["optimizer"]["class_path"] == method.class_path
        for key, value in method.init_args.items():  # the row's own arguments travel with its name
            got = cli.config["optimizer"]["init_args"][key]
            assert (list(got) if isinstance(value, list) else got) == value, (method.name, key)


def test_minibatch_method_by_name_trains_with_the_estimate_added(tmp_path, tolstoi_dir):
    """--optimizer m-svag-mb: variance='minibatch' comes with the name and the command adds the
    BatchVarianceCallback that leaves p.grad_batch_variance for each step (docs/algorithm.md §1.1)."""
    from lightning_msvag.batch_variance_callback import BatchVarianceCallback

    cli = build_cli(_tiny_fit(tmp_path, tolstoi_dir, 3, "--optimizer", "m-svag-mb")[1:], run=False)
    assert cli.config["optimizer"]["init_args"]["variance"] == "minibatch"
    assert sum(isinstance(c, BatchVarianceCallback) for c in cli.trainer.callbacks) == 1
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.rule.needs_batch_variance
    assert all(float(s["step"]) == 3 for s in optimizer.state.values())


def test_optimizer_configs_are_the_method_tables():
    for method in METHODS:
        path = CONFIGS / "optimizers" / f"{method.config}.yaml"
        assert path.read_text(encoding="utf-8") == optimizer_config_text(method), (
            f"{path} differs from the method table; regenerate: python -c \"import lightning_msvag.registry as r; "
            "r.write_optimizer_configs('configs/optimizers')\"")
    assert sorted(p.stem for p in (CONFIGS / "optimizers").glob("*.yaml")) == sorted(m.config for m in METHODS)


@pytest.mark.parametrize("value,expected", [("1", 1), ("2", 2), ("0.5", 0.5), ("1.0", 1.0)])
def test_batch_limits_from_the_command_line_keep_lightnings_int_vs_fraction_meaning(tmp_path, value, expected):
    """`--trainer.limit_val_batches 1` is one batch (an int); jsonargparse would pass 1.0 = all."""
    cli = build_cli(["--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tmp_path),
                     "--trainer.logger", "false", "--trainer.limit_val_batches", value,
                     f"--trainer.limit_train_batches={value}"], run=False)
    for limit in (cli.trainer.limit_val_batches, cli.trainer.limit_train_batches):
        assert limit == expected and type(limit) is type(expected)



# ------------------------------------------------------------ issue 19: a researcher's first day
def _tiny_fit(tmp_path: Path, data_dir: Path, steps: int, *extra: str, subcommand: str = "fit") -> list:
    return [subcommand, "--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(data_dir),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra]


def _error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("lightning-msvag: error:")]


def test_ckpt_path_last_resumes_the_newest_last_ckpt_into_the_same_tensorboard_run(tmp_path, tolstoi_dir, capsys):
    """Item 1: with the shipped config as it is, --ckpt_path last finds version_0's last.ckpt and
    continues it there; the first start (nothing to resume) says so and trains from scratch."""
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2, "--ckpt_path", "last")) == 0
    assert "no last.ckpt in" in capsys.readouterr().err
    run = tmp_path / "logs" / "tolstoi_char_rnn"
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--ckpt_path", "last")) == 0
    assert f"resuming {run / 'version_0' / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]
    assert torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # one TensorBoard run: losses of steps 0..3, the learning rate also after the resume, no hp_metric
    events = sorted((run / "version_0").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2
    assert sorted(s for s in _scalar_steps(run / "version_0", "train/loss")) == [0, 1, 2, 3]
    resumed = EventAccumulator(str(events[1]))
    resumed.Reload()
    assert "lr-MSVAG" in resumed.Tags()["scalars"]
    assert "hp_metric" not in _scalar_tags(run)
    # validate on the run's checkpoint writes into the same folder, keeping the fit's config.yaml
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--ckpt_path", "last", subcommand="validate")) == 0
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]
    assert "class_path: lightning_msvag.MSVAG" in (run / "version_0" / "config.yaml").read_text()
    # nothing to evaluate: refused in one line
    assert main(_tiny_fit(tmp_path / "other", tolstoi_dir, 4, "--ckpt_path", "last", subcommand="test")) == 2
    assert "no last.ckpt" in _error_lines(capsys.readouterr().err)[0]


def _scalar_steps(folder: Path, tag: str) -> list:
    steps = []
    for event_file in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps.extend(e.step for e in acc.Scalars(tag))
    return steps


@pytest.mark.parametrize("switch,requested", [(["--optimizer", "Adam"], "adam (torch.optim.Adam)"),
                                              (["--optimizer", "m-sgd"], "m-sgd (lightning_msvag.MSGD)")])
def test_resume_with_another_optimizer_is_refused_in_one_line(tmp_path, tolstoi_dir, capsys, switch, requested):
    """Item 2: before, Adam crashed with KeyError 'betas' and m-sgd resumed silently."""
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2)) == 0
    last = tmp_path / "logs" / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, *switch, "--ckpt_path", "last")) == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "m-svag (lightning_msvag.MSVAG)" in line and requested in line and "Traceback" not in err
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained


def test_resume_with_the_other_variance_estimator_is_refused_in_one_line(tmp_path, tolstoi_dir, capsys):
    """M-SVAG's exp_avg_sq holds v~ (moving average) or u (mini-batch): a checkpoint of one does
    not resume into the other (the optimizer state records the estimator)."""
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2)) == 0
    last = tmp_path / "logs" / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt"
    # recorded where torch keeps hyperparameters: in the param groups
    assert torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"][0]["variance"] == "moving_average"
    capsys.readouterr()
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--optimizer", "m-svag-mb", "--ckpt_path", "last")) == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "variance='moving_average'" in line and "variance='minibatch'" in line and "Traceback" not in err
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained


@pytest.mark.parametrize("option,lr", [
    (["--optimizer", "Adam"], 0.001), (["--optimizer", "mssd"], 0.001), (["--optimizer", "m-ssd"], 0.001),
    (["--optimizer=m-sgd"], 0.1), (["--optimizer", "m-ssd", "--optimizer.lr", "0.01"], 0.01),
    (["--optimizer", "MSVAG"], 1.0), (["--config", str(CONFIGS / "optimizers" / "adam.yaml")], 0.001),
])
def test_switching_method_starts_from_its_own_step_size(tmp_path, capsys, option, lr):
    """Item 3: a method other than the config's, without --optimizer.lr, gets the method table's
    step size (configs/optimizers/<method>.yaml) and one line saying so; never the config's 1.0."""
    cli = build_cli(["--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tmp_path),
                     "--trainer.logger", "false", *option], run=False)
    assert cli.config["optimizer"]["init_args"]["lr"] == lr
    err = capsys.readouterr().err
    switched = lr == 0.001 and "--optimizer" in option or option == ["--optimizer=m-sgd"]
    assert ("not the config's 1.0 for m-svag" in err) == switched, err


@pytest.mark.parametrize("config,optimizer,notice", [
    ("tolstoi_char_rnn.yaml", "svag-mb", "lr 0.1 (svag-mb's starting step size, configs/optimizers/svag_mb.yaml), "
                                         "not the config's 1.0 for m-svag"),
    ("fmnist_2c2d.yaml", "m-sgd", None),  # the config's 0.1 is m-sgd's own: nothing to say
    ("fmnist_2c2d.yaml", "svag-mb", None),
])
def test_step_size_notice_names_the_row_and_is_silent_when_nothing_changes(tmp_path, capsys, config, optimizer,
                                                                          notice):
    """The notice cites the row named (svag-mb's file, not svag's) and says nothing when the method's
    starting step size equals the config's."""
    cli = build_cli(["--config", str(CONFIGS / config), "--data.data_dir", str(tmp_path), "--trainer.logger", "false",
                     "--optimizer", optimizer], run=False)
    assert cli.config["optimizer"]["init_args"]["lr"] == 0.1
    err = capsys.readouterr().err
    if notice is None:
        assert "starting step size" not in err, err
    else:
        assert notice in err, err


@pytest.mark.parametrize("args,expected", [
    (["--optimizer", "m-svga"], ["unknown optimizer 'm-svga'; did you mean m-svag", "known: m-sgd, m-ssd, m-svag"]),
    (["--optimizer.lr", "abc"], ["--optimizer.lr: expected float, got 'abc'"]),
    (["--trainer.max_stepz", "3"], ["unknown option --trainer.max_stepz; did you mean --trainer.max_steps"]),
    (["--model.hidden", "3"], ["--model.hidden", "did you mean --model.hidden_size"]),
    (["--optimizer", "RMSprop"], ["--optimizer RMSprop", "--optimizer.lr"]),
    (["--config", "configs/tolstoi_char_rn.yaml"], ["config file", "tolstoi_char_rn.yaml does not exist",
                                                    "did you mean tolstoi_char_rnn.yaml"]),
])
def test_command_line_mistakes_are_one_line_naming_the_choices_exit_2(tmp_path, capsys, args, expected):
    """Item 4: before, 50-60 lines of usage; now one line, the closest valid choice first, exit 2."""
    assert main(["fit", "--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def _help(argv: list, capsys) -> str:
    from lightning_msvag import command

    with pytest.raises(SystemExit) as stop:
        command.main(argv)
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


def test_help_finds_every_feature(capsys):
    """Item 5."""
    from lightning_msvag import command

    top = _help(["--help"], capsys)
    for feature in ("fit", "validate", "test", "predict", "reproduce", "configs", "--list-optimizers", "--version"):
        assert feature in top, feature
    assert command.main(["configs", "--help"]) == 0 and "--write DIR" in capsys.readouterr().out
    assert "beta" in _help(["fit", "--optimizer.help", "m-svag"], capsys)
    assert "m-svag" in _help(["fit", "--help"], capsys)
    sqp = _help(["reproduce", "sqp", "--help"], capsys)
    assert sqp.index("options:") < 1500 and sqp.index("options:") < sqp.index("**Problem**"), sqp[:2000]


def test_a_30_step_quick_look_shows_gamma(tmp_path, tolstoi_dir):
    """Item 6: README's `--trainer.max_steps 30` with the shipped config writes γ to TensorBoard."""
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 30, "--trainer.log_every_n_steps", "10")) == 0
    tags = _scalar_tags(tmp_path / "logs")
    assert tags.get("gamma/all/mean") and all(0 <= g <= 1 for g in tags["gamma/all/mean"])


@pytest.mark.parametrize("method", ["m-svag", "m-svag-mb", "m-ssd-va", "svag"])
def test_base_class_options_reach_the_command_line(tmp_path, method):
    """The variance-adapted classes take ``variance``/``factor`` and pass the rest to the base
    class; LightningCLI must still offer the base options (``fused``, ``foreach``)."""
    cli = build_cli(["--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tmp_path),
                     "--trainer.logger", "false", "--optimizer", method, "--optimizer.fused", "false",
                     "--optimizer.foreach", "true"], run=False)
    assert cli.config["optimizer"]["init_args"]["fused"] is False
    assert cli.config["optimizer"]["init_args"]["foreach"] is True


def test_minibatch_method_on_a_batchnorm_model_names_batchnorm_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """--optimizer m-svag-mb on the WRN-40-4 config: one line naming BatchNorm (the real reason)
    and what to use instead, exit 1, and no run folder (the check runs before the trainer exists)."""
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "cifar100_wrn404.yaml"), "--optimizer", "m-svag-mb",
                 "--data.data_dir", str(tmp_path / "data"), "--data.download", "false", "--trainer.max_steps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert "BatchNorm2d" in line and "in training mode" in line and "m-svag" in line and "TFSameConv2d" not in line
    assert not (tmp_path / "lightning_logs").exists() and not any(tmp_path.rglob("version_*"))


def test_the_transformer_config_trains_with_the_minibatch_estimate(tmp_path, tolstoi_dir):
    """configs/tolstoi_transformer.yaml with --optimizer m-svag-mb: the command adds the estimate,
    trains, and the γ monitor logs the factors."""
    args = ["fit", "--config", str(CONFIGS / "tolstoi_transformer.yaml"), "--optimizer", "m-svag-mb",
            "--data.data_dir", str(tolstoi_dir), "--trainer.max_steps", "8", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    assert main(args) == 0
    tags = _scalar_tags(tmp_path / "logs" / "tolstoi_transformer")
    assert "gamma/all/mean" in tags and all(0.0 < v <= 1.0 for v in tags["gamma/all/mean"])
    assert len(tags["train/loss"]) == 8


# ------------------------------------------------------------ issue 25: runs a researcher can leave alone
def test_a_killed_run_resumes_from_its_periodic_checkpoint(tmp_path, tolstoi_dir):
    """kill -9 (OOM killer, node failure) in the middle of an epoch: the periodic last.ckpt
    (--checkpoint_every minutes; here 0.005, 0.3 s) is there, one file, and --ckpt_path last
    continues from it in the same version folder."""
    import signal as _signal
    import time

    logs = tmp_path / "logs"
    args = ["fit", "--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tolstoi_dir),
            "--trainer.max_steps", "1000", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(logs), "--checkpoint_every", "0.005"]
    proc = subprocess.Popen([sys.executable, "-m", "lightning_msvag", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = logs / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt"
    step = 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if last.exists():
                try:
                    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
                except Exception:  # caught mid-write: try again
                    step = 0
                if step >= 5:
                    break
            time.sleep(0.5)
        assert proc.poll() is None and step >= 5, "no periodic checkpoint within the epoch"
        proc.send_signal(_signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 5 <= saved < 1000
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # one file per save
    result = _run_command([*args[:5], "--trainer.max_steps", str(saved + 2), *args[7:], "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {last}" in result.stderr
    assert torch.load(last, weights_only=True)["global_step"] == saved + 2  # the resumed run overwrote it
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_a_resume_keeps_the_checkpoints_model_or_says_why_not(tmp_path, tolstoi_dir, capsys):
    """A checkpoint trained with hidden_size 128 resumed with --model.hidden_size 64, or under another
    problem's config: one line each, exit 1, nothing trained, no run folder of the other problem
    (LightningCLI would take the checkpoint's model over the command line, silently)."""
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2)) == 0
    last = tmp_path / "logs" / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--model.hidden_size", "64", "--ckpt_path", str(last))) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "was trained with hidden_size=128 (this run: 64)" in line
    args = ["fit", "--config", str(CONFIGS / "cifar10_3c3d.yaml"), "--data.data_dir", str(tmp_path / "cifar"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--ckpt_path", str(last)]
    assert main(args) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "is another problem's: it holds a CharLSTM" in line and "ThreeC3D" in line
    assert not (tmp_path / "logs" / "cifar10_3c3d").exists()
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained


def test_a_checkpoint_of_version_0_1_0_names_the_upgrade_and_the_upgraded_copy_resumes(tmp_path, tolstoi_dir, capsys):
    """0.1.0 installed the problem packages as top-level `models`/`datamodules`: its checkpoints name
    `models.char_rnn.CharLSTM`. Before: "is another problem's" (wrong). Now one line naming the
    upgrade; the upgraded copy resumes, the module path of today's class counts as the same class."""
    from lightning_msvag.fault_tolerance import upgrade_checkpoint

    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2)) == 0
    last = tmp_path / "logs" / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "models.char_rnn.CharLSTM"
    checkpoint["datamodule_hyper_parameters"]["_class_path"] = "datamodules.tolstoi.TolstoiDataModule"
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    capsys.readouterr()
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--ckpt_path", str(old))) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "written by lightning-msvag 0.1.0" in line and "upgrade_checkpoint" in line
    upgraded = upgrade_checkpoint(old)
    assert upgraded == tmp_path / "old-upgraded.ckpt" and old.is_file()
    saved = torch.load(upgraded, weights_only=True)
    assert saved["hyper_parameters"]["_class_path"] == "lightning_msvag.models.char_rnn.CharLSTM"
    assert saved["datamodule_hyper_parameters"]["_class_path"] == "lightning_msvag.datamodules.tolstoi.TolstoiDataModule"
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 4, "--ckpt_path", str(upgraded))) == 0
    resumed = tmp_path / "logs" / "tolstoi_char_rnn" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 4


def test_a_checkpoint_that_is_not_there_is_refused_before_anything_is_written(tmp_path, tolstoi_dir, capsys):
    assert main(_tiny_fit(tmp_path, tolstoi_dir, 2, "--ckpt_path", str(tmp_path / "nothere.ckpt"))) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.endswith("nothere.ckpt: no such file")
    assert not (tmp_path / "logs").exists()


def test_a_non_finite_learning_rate_is_named_as_such(tmp_path):
    """--optimizer.lr nan: "must be a finite number", not jsonargparse's "expected float" (a usage
    error: exit status 2)."""
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"), "--optimizer.lr", "nan"], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightning-msvag: error:")]
    assert errors == ["lightning-msvag: error: --optimizer.lr: must be a finite number, got nan (lightning_msvag.MSVAG)"]


def test_default_root_dir_takes_the_logs_and_checkpoints(tmp_path, tolstoi_dir):
    """--trainer.default_root_dir DIR: the config's logger (save_dir lightning_logs) writes below DIR,
    not below the working folder; an explicit --trainer.logger.init_args.save_dir still wins."""
    args = ["fit", "--config", str(CONFIGS / "tolstoi_char_rnn.yaml"), "--data.data_dir", str(tolstoi_dir),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    result = _run_command([*args, "--trainer.default_root_dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "lightning_logs" / "tolstoi_char_rnn" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("where", ["default_root_dir", "save_dir"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, where):
    (tmp_path / "afile").write_text("in the way")
    option = "--trainer.default_root_dir" if where == "default_root_dir" else "--trainer.logger.init_args.save_dir"
    result = _run_command([*_FIT_TWO_STEPS, "--data.data_dir", str(tmp_path / "data"), option, "afile/sub"], tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightning-msvag: error:")]
    assert len(errors) == 1 and "output folder afile/" in errors[0] and "afile is a file, not a folder" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content,message", [
    (b"trainer:\n  max_stepz: 3\n", "config {}: unknown key trainer.max_stepz; did you mean trainer.max_steps"),
    (b"trainer:\n  max_steps: [3\n", "config {}, line 3, column 1: not valid YAML"),
    (b"trainer:\n  max_steps: 3 # \xff\xfe\n", "config {}, line 2: not UTF-8 text"),
], ids=["unknown-key", "broken-yaml", "not-utf8"])
def test_a_mistake_in_a_config_file_names_the_file_and_where(tmp_path, content, message):
    bad = tmp_path / "mine.yaml"
    bad.write_bytes(content)
    result = _run_command([*_FIT_TWO_STEPS, "--config", str(bad)], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightning-msvag: error:")]
    assert len(errors) == 1 and message.format(bad) in errors[0], result.stderr[-1500:]
