"""The ``lightning-msvag`` command: a LightningCLI for the paper's four test problems.

    lightning-msvag fit --config configs/tolstoi_char_rnn.yaml --optimizer MSVAG --optimizer.lr 1.0
    lightning-msvag fit --config configs/cifar10_3c3d.yaml --config configs/optimizers/adam.yaml
    lightning-msvag validate|test|predict --config ... --ckpt_path ...
    lightning-msvag reproduce <experiment> --out DIR [options]   (see lightning_msvag.experiments)
    lightning-msvag configs [--write DIR]                        (the shipped problem configs)
    lightning-msvag --list-optimizers

``--model`` and ``--data`` take any LightningModule / LightningDataModule (the configs use
``models.*`` and ``datamodules.*``). ``--optimizer`` takes this project's optimizers by class
name (``MSGD``, ``MSSD``, ``MSVAG``, ``SVAG``, ``SSD``) or registry name (``m-svag``, any name
``--list-optimizers`` prints) as well as torch's (``Adam``, ``SGD``, ...), and
``--lr_scheduler`` any ``torch.optim.lr_scheduler`` class.

Callbacks the project adds by default (so that the configs stay free of them and Lightning's
own flags keep working): ``ModelCheckpoint(save_last=True)`` unless
``--trainer.enable_checkpointing false`` or another ``ModelCheckpoint`` is configured,
``LearningRateMonitor`` unless ``--trainer.logger false``, and the fault-tolerance callbacks
of :mod:`lightning_msvag.fault_tolerance` (exact mid-epoch resume, checked checkpoints,
a checkpoint and a non-zero exit on SIGTERM / SIGUSR1; docs/long_runs.md).

Errors a user can fix (bad hyperparameters, missing or damaged data, impossible batch sizes)
end the run with one line on stderr and exit status 1, printed by global rank zero only;
``LIGHTNING_MSVAG_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from . import __version__, available_optimizers
from . import callbacks as _callbacks  # noqa: F401  (imported so short class names resolve:
from . import optimizers as _optimizers  # noqa: F401   --optimizer MSVAG, --trainer.callbacks+=VarianceAdaptationMonitor)
from .errors import UserError
from .fault_tolerance import fault_tolerance_callbacks, verify_checkpoint_archive

#: Set to 1 to see the traceback of an error that the command otherwise reports in one line.
TRACEBACK_ENV = "LIGHTNING_MSVAG_TRACEBACK"
#: The problem configs and per-method optimizer configs that ship with the package.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _configs_root() -> Path:
    """The shipped configs: inside the installed package, or the checkout's ``configs/``."""
    if PACKAGED_CONFIGS.is_dir():
        return PACKAGED_CONFIGS
    return Path(__file__).resolve().parents[1] / "configs"


def default_callbacks(trainer_config: dict) -> list:
    """The callbacks the project adds to ``trainer_config`` (see the module docstring)."""
    configured = list(trainer_config.get("callbacks") or [])
    added: list = []
    checkpointing = trainer_config.get("enable_checkpointing") is not False
    if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in configured):
        added.append(ModelCheckpoint(save_last=True))
    if trainer_config.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
        added.append(LearningRateMonitor(logging_interval="epoch"))
    # exact mid-epoch resume (RNG states), checkpoint checks, pre-emption (docs/long_runs.md)
    added.extend(cb for cb in fault_tolerance_callbacks() if not any(type(c) is type(cb) for c in configured))
    return added


class MSVAGCLI(LightningCLI):
    """LightningCLI plus the project's default callbacks and a checked ``--ckpt_path``.

    Built on LightningCLI's public hooks only: ``parse_arguments`` (check the checkpoint
    archive right after parsing) and ``instantiate_trainer(**kwargs)`` (the callbacks and
    integer batch limits go in as trainer arguments).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().parse_arguments(parser, args)
        # LightningCLI unpickles the checkpoint's hyperparameters right after parsing, before
        # any callback runs: refuse a damaged archive here, in one line (docs/long_runs.md)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            verify_checkpoint_archive(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        configured = list(trainer_config.get("callbacks") or [])
        kwargs = {**_integer_batch_limits(self.argv), **kwargs, "callbacks": configured + default_callbacks(trainer_config)}
        return super().instantiate_trainer(**kwargs)


def with_registry_names_resolved(argv: List[str]) -> List[str]:
    """``--optimizer m-svag`` (any name ``--list-optimizers`` prints) becomes the class path
    LightningCLI parses (``--optimizer lightning_msvag.MSVAG``); class names and paths pass."""
    from .registry import get_method

    def resolved(value: str) -> str:
        try:
            return get_method(value).class_path
        except ValueError:
            return value  # a class name or path: LightningCLI's to resolve

    out = list(argv)
    for i, token in enumerate(out):
        if token == "--optimizer" and i + 1 < len(out):
            out[i + 1] = resolved(out[i + 1])
        elif token.startswith("--optimizer="):
            out[i] = "--optimizer=" + resolved(token.split("=", 1)[1])
    return out


_BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _integer_batch_limits(argv: List[str]) -> dict:
    """``--trainer.limit_val_batches 1`` means one batch in Lightning (an int), but
    jsonargparse hands ``Union[int, float]`` options over as floats, and ``1.0`` means all
    batches. Integer literals on the command line are given back as ints."""
    limits = {}
    for i, token in enumerate(argv):
        name, _, value = token.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        key = name[len("--trainer."):] if name.startswith("--trainer.") else ""
        if key in _BATCH_LIMITS and value.strip().isdigit():
            limits[key] = int(value)
    return limits


def build_cli(argv: Optional[List[str]] = None, run: bool = True):
    """The project's LightningCLI on ``argv`` (``None``: the command line); ``run=False``
    builds model, data and trainer from ``argv`` (no subcommand then) without running
    anything, for scripting and tests."""
    return MSVAGCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=with_registry_names_resolved(sys.argv[1:] if argv is None else argv),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=True,
    )


def configs_command(argv: List[str]) -> int:
    """``lightning-msvag configs``: list the shipped configs; ``--write DIR`` copies them to DIR/configs."""
    root = _configs_root()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
    if not argv:
        print("\n".join(names))
        print(f"(in {root}; 'lightning-msvag configs --write .' copies them to ./configs)", file=sys.stderr)
        return 0
    if argv[0] != "--write" or len(argv) != 2:
        raise UsageError("usage: lightning-msvag configs [--write DIR]")
    target = Path(argv[1]) / "configs"
    existing = [n for n in names if (target / n).exists()]
    if existing:
        raise UsageError(f"{target} already holds {', '.join(existing)}; not overwriting (remove them first)")
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target / name)
    print(f"wrote {len(names)} configs to {target}")
    return 0


class UsageError(ValueError):
    """A command-line mistake; reported in one line."""


#: Exceptions that describe a mistake in the user's input or data, not a bug. Data modules
#: (the project's ``datamodules`` or a user's) raise :class:`~lightning_msvag.errors.UserError`.
USER_ERRORS = (ValueError, FileNotFoundError, UserError, MisconfigurationException)


def _global_rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _innermost_message(error: BaseException) -> str:
    """The error's message; for jsonargparse's "does not validate against any of the Union
    subtypes" wrapper, the error of the class that was meant (not the ``None`` alternative)."""
    text = str(error)
    if "Union subtypes" in text and "Errors:" in text:
        reasons = [
            line.strip()[2:]
            for line in text.split("Errors:", 1)[1].splitlines()
            if line.strip().startswith("- ") and "NoneType" not in line
        ]
        if reasons:
            text = "; ".join(reasons)
    return " ".join(text.split()) or type(error).__name__


def _report(error: BaseException) -> int:
    """One line on stderr (rank zero only) naming the error; exit status 1."""
    if _global_rank() == 0:
        message = _innermost_message(error)
        print(f"lightning-msvag: error: {message}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
    return 1


class _DropAdvertisements(logging.Filter):
    """Lightning's "💡 Tip: try installing ..." lines advertise services; they tell a user
    of this command nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def _quiet_library_noise() -> None:
    """Silence messages a user of this command cannot act on (none concerns their run)."""
    # pytorch-lightning 2.6 on torch >= 2.10 calls a deprecated torch pytree API
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # LightningCLI 2.6 uses jsonargparse APIs that jsonargparse >= 4.49 deprecates
    warnings.filterwarnings(
        "ignore", message=r"\s*(skip_none parameter|``ArgumentParser.add_instantiator``|``instantiate_classes``) was deprecated"
    )
    # the command hands LightningCLI its own command line (registry names resolved)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisements())


def run_guarded(command: Callable[[], Optional[int]]) -> int:
    """Run ``command`` the way every subcommand runs: library noise silenced, a user error
    (:data:`USER_ERRORS`) reported in one line with exit status 1, Ctrl-C as 130;
    ``LIGHTNING_MSVAG_TRACEBACK=1`` re-raises instead."""
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    _quiet_library_noise()
    try:
        return command() or 0
    except KeyboardInterrupt:
        if show_traceback:
            raise
        return 130
    except Exception as error:
        if show_traceback or not isinstance(error, USER_ERRORS):
            raise
        return _report(error)


def main(argv: Optional[List[str]] = None) -> int:
    """``lightning-msvag`` without ``reproduce`` (see :mod:`lightning_msvag.command`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"lightning-msvag {__version__}")
        return 0
    if argv[:1] == ["--list-optimizers"]:
        print("\n".join(available_optimizers()))
        return 0
    if argv[:1] == ["configs"]:
        return run_guarded(lambda: configs_command(argv[1:]))

    def fit_or_evaluate() -> None:
        build_cli(argv)

    return run_guarded(fit_or_evaluate)


if __name__ == "__main__":
    sys.exit(main())
