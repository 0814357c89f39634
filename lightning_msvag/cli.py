"""The ``lightning-msvag`` command: a LightningCLI for the paper's four test problems.

    lightning-msvag fit --config configs/tolstoi_char_rnn.yaml --optimizer MSVAG --optimizer.lr 1.0
    lightning-msvag fit --config configs/cifar10_3c3d.yaml --config configs/optimizers/adam.yaml
    lightning-msvag validate|test|predict --config ... --ckpt_path ...
    lightning-msvag reproduce <experiment> --out DIR [options]   (see lightning_msvag.experiments)
    lightning-msvag configs [--write DIR]                        (the shipped problem configs)
    lightning-msvag --list-optimizers

``--model`` and ``--data`` take any LightningModule / LightningDataModule (the configs use
``lightning_msvag.models.*`` and ``lightning_msvag.datamodules.*``). ``--optimizer`` takes this project's optimizers by class
name (``MSGD``, ``MSSD``, ``MSVAG``, ``SVAG``, ``SSD``) or registry name (``m-svag``, any name
``--list-optimizers`` prints) as well as torch's (``Adam``, ``SGD``, ...), and
``--lr_scheduler`` any ``torch.optim.lr_scheduler`` class.

Callbacks the project adds by default (so that the configs stay free of them and Lightning's
own flags keep working): a ``ModelCheckpoint`` that keeps one file, ``last.ckpt``, saved every
``--checkpoint_every`` minutes (default 5) and at every epoch end, overwritten in place by a
resumed run (:func:`run_checkpoint`), unless ``--trainer.enable_checkpointing false`` or
another ``ModelCheckpoint`` is configured,
``LearningRateMonitor`` unless ``--trainer.logger false``, a progress bar that also shows the
epoch's length in a fit resumed mid-epoch unless ``--trainer.enable_progress_bar false`` or
another is configured, and the fault-tolerance callbacks
of :mod:`lightning_msvag.fault_tolerance` (exact mid-epoch resume, checked checkpoints,
a checkpoint and a non-zero exit on SIGTERM / SIGUSR1; docs/long_runs.md).

``--ckpt_path last`` resumes the newest ``last.ckpt`` of the run (the logger's
``<save_dir>/<name>/version_*/checkpoints``, or a configured ``ModelCheckpoint``'s ``dirpath``)
and continues its version folder, so the TensorBoard run goes on; with none yet, ``fit`` says
so in one line and starts from scratch (docs/long_runs.md). A resume with another optimizer
than the checkpoint's is refused before anything is built. ``--optimizer X`` replacing the
config's method without ``--optimizer.lr`` starts from X's step size in the method table.

Mistakes on the command line (an unknown option, optimizer name or config file, a value of the
wrong type) end in one line naming the closest valid choices and exit status 2, as argparse's
usage errors. Errors a user can fix in values or files (bad hyperparameters, missing or
damaged data or checkpoints, impossible batch sizes) end the run with one line on stderr and
exit status 1. Both are printed by global rank zero only; ``LIGHTNING_MSVAG_TRACEBACK=1``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from . import __version__, available_optimizers
from . import callbacks as _callbacks  # noqa: F401  (imported so short class names resolve:
from . import optimizers as _optimizers  # noqa: F401   --optimizer MSVAG, --trainer.callbacks+=VarianceAdaptationMonitor)
from .batch_variance_callback import BatchVarianceCallback
from .errors import UserError
from .fault_tolerance import (
    RULE_SETTINGS,
    CheckpointError,
    ResumedEpochProgressBar,
    checkpoint_hyperparameters,
    checkpoint_optimizer_classes,
    checkpoint_optimizer_settings,
    fault_tolerance_callbacks,
    verify_checkpoint_archive,
)

#: Set to 1 to see the traceback of an error that the command otherwise reports in one line.
TRACEBACK_ENV = "LIGHTNING_MSVAG_TRACEBACK"
#: The problem configs and per-method optimizer configs that ship with the package.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _configs_root() -> Path:
    """The shipped configs: inside the installed package, or the checkout's ``configs/``."""
    if PACKAGED_CONFIGS.is_dir():
        return PACKAGED_CONFIGS
    return Path(__file__).resolve().parents[1] / "configs"


#: Minutes between the periodic ``last.ckpt`` saves the command's checkpoint makes by default
#: (``--checkpoint_every``): a killed run loses at most this much work (docs/long_runs.md).
CHECKPOINT_EVERY_MINUTES = 5.0


def run_checkpoint(every_minutes: float = CHECKPOINT_EVERY_MINUTES) -> ModelCheckpoint:
    """The command's checkpoint: one file, ``last.ckpt``, written every ``every_minutes`` of
    training (0: no periodic saves) and at the end of every epoch and validation, and
    overwritten in place, also by a resumed run (no ``last-v1.ckpt``, no second copy named
    after the epoch: a resume finds the state it continues, and a save is one file)."""
    if every_minutes < 0:
        raise ValueError(f"--checkpoint_every must be >= 0 minutes, got {every_minutes}")
    interval = timedelta(minutes=every_minutes) if every_minutes > 0 else None
    return ModelCheckpoint(save_top_k=0, save_last=True, enable_version_counter=False, train_time_interval=interval,
                           every_n_epochs=None if interval else 1)


def default_callbacks(trainer_config: dict, optimizer: Any = None,
                      checkpoint_every: float = CHECKPOINT_EVERY_MINUTES) -> list:
    """The callbacks the project adds to ``trainer_config`` (see the module docstring);
    ``optimizer``: the config's optimizer entry (class_path, init_args)."""
    configured = list(trainer_config.get("callbacks") or [])
    added: list = []
    if _needs_batch_variance(optimizer) and not any(isinstance(c, BatchVarianceCallback) for c in configured):
        # variance="minibatch" reads p.grad_batch_variance every step (docs/algorithm.md §1.1)
        added.append(BatchVarianceCallback())
    checkpointing = trainer_config.get("enable_checkpointing") is not False
    if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in configured):
        added.append(run_checkpoint(checkpoint_every))
    if trainer_config.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
        # per logged step (log_every_n_steps), so a run resumed mid-epoch logs it too
        added.append(LearningRateMonitor(logging_interval="step"))
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
        added.append(ResumedEpochProgressBar())  # the epoch's length also after a mid-epoch resume
    # exact mid-epoch resume (RNG states), checkpoint checks, pre-emption (docs/long_runs.md)
    added.extend(cb for cb in fault_tolerance_callbacks() if not any(type(c) is type(cb) for c in configured))
    return added


_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: What ``lightning-msvag --help`` says besides LightningCLI's subcommands.
MAIN_DESCRIPTION = """\
The paper's four test problems with LightningCLI: fit, validate, test, predict
(configs/*.yaml; 'lightning-msvag fit --help' shows the options). Also:

  lightning-msvag reproduce EXPERIMENT --out DIR   the paper's experiments (sqp, factors,
                                                   wilson, benchmark; 'reproduce --help')
  lightning-msvag configs [--write DIR]            list (or copy to DIR/configs) the shipped configs
  lightning-msvag --list-optimizers                the names --optimizer takes (m-svag, adam, ...)
  lightning-msvag --version                        the installed version
"""


def _optimizer_description(subcommand: str) -> str:
    from .registry import available_optimizers

    return (
        f"Runs Trainer.{subcommand} on a problem config. --optimizer takes a registry name "
        f"({', '.join(available_optimizers())}; 'lightning-msvag --list-optimizers'), a class name "
        "(MSVAG, Adam, ...) or an import path; '--optimizer.help NAME' lists its options. "
        "Without --optimizer.lr, a method other than the config's starts from its own step size "
        "(configs/optimizers/<method>.yaml). --ckpt_path last resumes the newest last.ckpt of the "
        "run (docs/long_runs.md)."
    )


def _raw_description_formatter() -> type:
    """jsonargparse's help formatter that keeps the main description's line breaks."""
    from jsonargparse import DefaultHelpFormatter

    class RawDescription(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # argparse's RawDescriptionHelpFormatter
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return RawDescription


class MSVAGCLI(LightningCLI):
    """LightningCLI plus the project's default callbacks, ``--ckpt_path last`` and one-line errors.

    Built on LightningCLI's public hooks only: ``init_parser`` (parser errors raise instead of
    printing the usage, so that :func:`run_guarded` reports them in one line), ``parse_arguments``
    (resolve ``--ckpt_path last`` to the run's newest ``last.ckpt`` and continue its logger
    folder, refuse a resume with another optimizer, check the checkpoint archive) and
    ``instantiate_trainer(**kwargs)`` (the callbacks and integer batch limits go in as trainer
    arguments).
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # argparse would print ~60 lines of usage and exit 2; run_guarded prints one line instead
        kwargs.setdefault("exit_on_error", False)
        parser = super().init_parser(**kwargs)
        self.__dict__.setdefault("made_parsers", []).append(parser)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint_every", type=float, default=CHECKPOINT_EVERY_MINUTES,
            help="minutes of training between the periodic saves of last.ckpt (besides every epoch end); "
                 "0: only at epoch ends. Ignored when the config has a ModelCheckpoint of its own.",
        )

    def subcommand_parser(self, subcommand: Optional[str]) -> Optional[LightningArgumentParser]:
        """The parser of ``subcommand`` (the main one for ``None``), for error messages."""
        made = self.__dict__.get("made_parsers", [])
        if subcommand in _SUBCOMMANDS and len(made) > len(_SUBCOMMANDS):
            return made[1 + list(self.subcommands()).index(subcommand)]
        return made[0] if made else None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        files = _existing_config_files(self.argv)
        for path in files:
            _check_config_file(path)
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            subcommand = next((a for a in self.argv if a in _SUBCOMMANDS), None)
            raise UsageError(usage_error_message(str(error), self.subcommand_parser(subcommand), subcommand,
                                                 files)) from None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        _follow_default_root_dir(config, self.argv)
        _check_output_folders(config)
        ckpt_path = last = config.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = _resolve_last(config, subcommand)
            config.ckpt_path = ckpt_path
        if ckpt_path and not Path(ckpt_path).is_file():
            # refused here, before the trainer makes a run folder for a resume that cannot happen
            raise CheckpointError(f"--ckpt_path {ckpt_path}: no such file" + (" (a folder?)" if Path(ckpt_path).exists() else ""))
        if ckpt_path and Path(ckpt_path).is_file():
            # LightningCLI unpickles the checkpoint's hyperparameters right after parsing, before
            # any callback runs: refuse a damaged archive here, in one line (docs/long_runs.md)
            verify_checkpoint_archive(ckpt_path)
            _refuse_another_model(config, Path(ckpt_path))
            if subcommand == "fit":
                _refuse_another_optimizer(config, Path(ckpt_path))
            _continue_logger_folder(config, Path(ckpt_path))
            if last == "last":
                _say(f"--ckpt_path last: resuming {ckpt_path}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        configured = list(trainer_config.get("callbacks") or [])
        optimizer = _get(self.config[self.subcommand] if self.subcommand else self.config, "optimizer")
        every = _get(self.config[self.subcommand] if self.subcommand else self.config, "checkpoint_every",
                     CHECKPOINT_EVERY_MINUTES)
        callbacks = configured + default_callbacks(trainer_config, optimizer, float(every))
        if self.model is not None and any(isinstance(c, BatchVarianceCallback) for c in callbacks):
            # refuse a model the estimate cannot serve before the trainer (and its run folder) exists
            BatchVarianceCallback.check(self.model, trainer_config.get("accumulate_grad_batches") or 1,
                                        trainer_config.get("precision") or "32")
        kwargs = {**_integer_batch_limits(self.argv), **kwargs, "callbacks": callbacks}
        return super().instantiate_trainer(**kwargs)


def _needs_batch_variance(optimizer: Any) -> bool:
    """The configured optimizer runs a ``variance="minibatch"`` rule (it needs the estimate)."""
    return str(_get(_get(optimizer, "init_args"), "variance", "")) == "minibatch"


# ------------------------------------------------------------------ --ckpt_path last, one run folder
def _say(message: str) -> None:
    """One line on stderr from global rank zero (every DDP rank parses the command line)."""
    if _global_rank() == 0:
        print(f"lightning-msvag: {message}", file=sys.stderr, flush=True)


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    try:
        value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _logger_run_root(config: Any) -> Tuple[Optional[Any], Optional[Path]]:
    """(the logger's init_args, ``<save_dir>/<name>``) for a TensorBoard/CSV logger of the
    config; ``(None, None)`` for other or no loggers. The run folders are the version folders
    below the root: ``<save_dir>/<name>/version_N``."""
    logger = _get(_get(config, "trainer"), "logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if len(logger) == 1 else None
    class_path = str(_get(logger, "class_path", ""))
    if not class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return None, None
    init = _get(logger, "init_args")
    if init is None:
        return None, None
    save_dir = Path(str(_get(init, "save_dir", ".")))
    name = _get(init, "name", "lightning_logs")
    return init, (save_dir / str(name)) if name else save_dir


def _checkpoint_folders(config: Any) -> Tuple[List[Path], Optional[str]]:
    """Where this run's checkpoints live: a configured ModelCheckpoint's ``dirpath``, else the
    logger's version folders (``<save_dir>/<name>/*/checkpoints``), else
    ``<default_root_dir>/checkpoints`` (Lightning's own choices, docs/long_runs.md)."""
    trainer = _get(config, "trainer")
    for callback in _get(trainer, "callbacks", []) or []:
        if str(_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _get(_get(callback, "init_args"), "dirpath")
            if dirpath:
                return [Path(str(dirpath))], str(dirpath)
    init, root = _logger_run_root(config)
    if root is not None:
        version = _get(init, "version")
        if version is not None:  # the user fixed the run's folder (e.g. to the SLURM job id)
            folder = root / (f"version_{version}" if isinstance(version, int) else str(version)) / "checkpoints"
            return [folder], str(folder)
        return sorted(root.glob("*/checkpoints")), str(root / "version_*" / "checkpoints")
    folder = Path(str(_get(trainer, "default_root_dir", "."))) / "checkpoints"
    if _get(trainer, "logger") is False:
        return [folder], str(folder)
    return [], None


def _follow_default_root_dir(config: Any, argv: Sequence[str]) -> None:
    """``--trainer.default_root_dir DIR``: the config's logger writes below DIR too (its relative
    ``save_dir`` is taken inside DIR), unless the command line gives the logger's ``save_dir``."""
    root = _get(_get(config, "trainer"), "default_root_dir")
    if not root or any(a.startswith(("--trainer.logger.init_args.save_dir", "--trainer.logger.save_dir")) for a in argv):
        return
    init, _ = _logger_run_root(config)
    if init is None:
        return
    save_dir = Path(str(_get(init, "save_dir", ".")))
    if not save_dir.is_absolute():
        init.save_dir = str(Path(str(root)) / save_dir)


def _check_output_folders(config: Any) -> None:
    """The folders the run will write (the logger's, ``default_root_dir``): one line naming the path
    if one cannot be made or written — a file in the way, no permission — before anything starts."""
    _, run_root = _logger_run_root(config)
    folders = [Path(str(_get(_get(config, "trainer"), "default_root_dir", ".")))] + ([run_root] if run_root else [])
    for folder in folders:
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"output folder {folder}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"output folder {folder}: {existing} is not writable")


def _resolve_last(config: Any, subcommand: str) -> Optional[str]:
    """``--ckpt_path last``: the newest ``last*.ckpt`` of this run's checkpoint folders.

    None there: ``fit`` says so in one line and starts from scratch (the same command line
    starts a job and resumes it when a scheduler requeues it); ``validate``/``test``/``predict``
    refuse, as there is nothing to evaluate.
    """
    folders, pattern = _checkpoint_folders(config)
    if pattern is None:
        return "last"  # a logger or checkpoint layout of the user's: Lightning's own search
    found = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()]
    if found:
        return str(max(found, key=lambda p: (p.stat().st_mtime, str(p))))
    if subcommand != "fit":
        raise UsageError(f"--ckpt_path last: no last.ckpt in {pattern}; nothing to {subcommand} "
                         "(give the checkpoint's path with --ckpt_path)")
    _say(f"--ckpt_path last: no last.ckpt in {pattern} yet; training starts from scratch")
    return None


def _continue_logger_folder(config: Any, ckpt_path: Path) -> None:
    """A checkpoint in ``<save_dir>/<name>/<version>/checkpoints`` continues that version folder:
    the resumed run (or its validate/test) writes into the same TensorBoard run instead of
    opening ``version_<N+1>``, and its checkpoints go beside the one it resumed."""
    init, root = _logger_run_root(config)
    if init is None or _get(init, "version") is not None:
        return  # no such logger, or the user chose the version
    folder = ckpt_path.resolve().parent
    if folder.name != "checkpoints" or folder.parent.parent != root.resolve():
        return
    version = folder.parent.name
    match = re.fullmatch(r"version_(\d+)", version)
    init.version = int(match.group(1)) if match else version
    # continuing the folder is the point: Lightning's "exists and is not empty" says nothing here
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .*" + re.escape(os.path.join(version, "checkpoints"))
                            + " exists and is not empty")


def _class_label(cls: type) -> str:
    """``m-svag (lightning_msvag.MSVAG)`` for the table's classes, else the import path."""
    from .registry import METHODS

    for method in METHODS:
        try:
            if method.cls is cls:
                return f"{method.name} ({method.class_path})"
        except (ImportError, AttributeError):  # pragma: no cover
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> Optional[type]:
    module, _, name = str(path).rpartition(".")
    if not module:
        return None
    try:
        import importlib

        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """A config or hyperparameter value in comparable form (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _refuse_another_model(config: Any, ckpt_path: Path) -> None:
    """The checkpoint continues its own model: LightningCLI would take the model's class and
    arguments from the checkpoint over the command line and the config, silently. Another problem's
    checkpoint, or one trained with other model arguments than this command line asks for, is
    refused in one line naming them, before anything is built (docs/long_runs.md)."""
    saved = checkpoint_hyperparameters(ckpt_path)
    model = _get(config, "model")
    wanted_class = str(_get(model, "class_path", ""))
    saved_class = str(saved.pop("_class_path", "") or "")
    if saved_class and wanted_class and saved_class != wanted_class:
        raise CheckpointError(
            f"checkpoint {ckpt_path} is another problem's: it holds a {saved_class.rpartition('.')[2]} ({saved_class}), "
            f"this config trains {wanted_class}; use the config it was trained with, or no --ckpt_path"
        )
    init = _get(model, "init_args")
    differing = []
    for key, value in sorted(saved.items()):
        wanted = _get(init, key)
        if wanted is not None and _plain(wanted) != _plain(value):
            differing.append(f"{key}={value!r} (this run: {wanted!r})")
    if differing:
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained with {', '.join(differing)}; a resume continues the checkpoint's "
            "model: drop those --model options, or start a new run without --ckpt_path"
        )


def _refuse_another_optimizer(config: Any, ckpt_path: Path) -> None:
    """A resumed fit must continue the checkpoint's optimizer (its state holds that method's
    buffers, docs/long_runs.md); another one is refused in one line, before anything is built."""
    requested = _import_class(str(_get(_get(config, "optimizer"), "class_path", "")))
    saved_paths = checkpoint_optimizer_classes(ckpt_path)
    if requested is None or not saved_paths:
        return
    saved = _import_class(saved_paths[0])
    if saved is requested:
        settings = checkpoint_optimizer_settings(ckpt_path)
        init_args = _get(_get(config, "optimizer"), "init_args")
        for key, saved_value in (settings[0] if settings else {}).items():
            wanted = _get(init_args, key) or RULE_SETTINGS[key]
            if saved_value != wanted:
                raise CheckpointError(
                    f"checkpoint {ckpt_path} was trained with {_class_label(saved)}({key}={saved_value!r}), this run "
                    f"asks for {key}={wanted!r}: the state's exp_avg_sq holds the other setting's numbers. Resume with "
                    f"--optimizer.init_args.{key}={saved_value}, or start a new run without --ckpt_path"
                )
        return
    if saved is None:
        return
    raise CheckpointError(
        f"checkpoint {ckpt_path} was trained with {_class_label(saved)}, this run asks for "
        f"{_class_label(requested)}: a resume continues the checkpoint's optimizer state. Resume with "
        f"--optimizer {_class_label(saved).split(' ')[0]}, or start a new run without --ckpt_path"
    )


# ------------------------------------------------------------------ --optimizer on the command line
def _optimizer_classes_by_name() -> Dict[str, type]:
    """Short class names LightningCLI resolves for ``--optimizer``: every imported ``Optimizer`` subclass."""
    from torch.optim import Optimizer

    found: Dict[str, type] = {}
    pending = [Optimizer]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if not sub.__name__.startswith("_"):
                found.setdefault(sub.__name__, sub)
            pending.append(sub)
    return found


def _optimizer_class(value: str) -> Optional[type]:
    """The class ``--optimizer VALUE`` names (registry name, class name, import path), or None."""
    from .registry import get_method

    try:
        return get_method(value).cls
    except ValueError:
        pass
    if "." in value:
        return _import_class(value)
    return _optimizer_classes_by_name().get(value)


def _unknown_optimizer(value: str) -> "UsageError":
    from .registry import available_optimizers

    names = available_optimizers()
    classes = sorted(_optimizer_classes_by_name())
    close = difflib.get_close_matches(value.lower(), names, n=3, cutoff=0.5)
    if not close:  # registry names first; class names only where none is close
        by_lower = {n.lower(): n for n in classes}
        close = [by_lower[c] for c in difflib.get_close_matches(value.lower(), list(by_lower), n=3, cutoff=0.5)]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UsageError(f"unknown optimizer {value!r}; {hint}known: {', '.join(names)} "
                      "(or a torch.optim class name such as Adam, or an import path)")


def _config_files(argv: Sequence[str]) -> List[Tuple[int, str]]:
    files = []
    for i, token in enumerate(argv):
        if token in ("--config", "-c") and i + 1 < len(argv):
            files.append((i, argv[i + 1]))
        elif token.startswith("--config="):
            files.append((i, token.split("=", 1)[1]))
    return files


def _configured_optimizer(argv: Sequence[str], before: int) -> Tuple[Optional[str], Any]:
    """(class_path, lr) of the optimizer the ``--config`` files before position ``before`` set."""
    import yaml

    class_path, lr = None, None
    for _, name in _config_files(argv[:before]):
        try:
            data = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # the parser reports it
        optimizer = data.get("optimizer") if isinstance(data, dict) else None
        if isinstance(optimizer, str):
            class_path, lr = optimizer, None
        elif isinstance(optimizer, dict) and optimizer.get("class_path"):
            class_path, lr = optimizer["class_path"], (optimizer.get("init_args") or {}).get("lr")
    return class_path, lr


_LR_OPTIONS = ("--optimizer.lr", "--optimizer.init_args.lr")


def prepare_argv(argv: List[str]) -> List[str]:
    """The command line LightningCLI parses, made from the user's:

    * registry names (``--optimizer m-svag``, ``--optimizer.help m-svag``; any name
      ``--list-optimizers`` prints) become class paths; an unknown name is refused in one line
      with the closest names;
    * ``--optimizer X`` that replaces the config's method without an ``--optimizer.lr`` gets
      X's own starting step size from the method table (``configs/optimizers/<method>.yaml``,
      said in one line), not the config's step size of another method; a class outside the
      table is refused until a step size is given.
    """
    from .registry import get_method

    out = list(argv)
    for i, token in enumerate(list(out)):
        if token in ("--optimizer", "--optimizer.help") and i + 1 < len(out):
            index, value = i + 1, out[i + 1]
        elif token.startswith(("--optimizer=", "--optimizer.help=")):
            index, value = i, token.split("=", 1)[1]
        else:
            continue
        if value.lstrip().startswith("{") or value in ("null", "None"):
            continue  # a dict / none: jsonargparse's to parse
        cls = _optimizer_class(value)
        if cls is None:
            raise _unknown_optimizer(value)
        try:
            row = get_method(value)
        except ValueError:
            row = None
        resolved = row.class_path if row is not None else value
        out[index] = resolved if index != i else f"{token.split('=', 1)[0]}={resolved}"
        if token.startswith("--optimizer.help"):
            continue
        if row is not None:  # the row's own arguments (m-svag-mb: variance=minibatch), before the user's
            given = {t.split("=", 1)[0] for t in out[index + 1:]}
            extra = [f"--optimizer.{key}={_cli_value(v)}" for key, v in row.init_args.items()
                     if f"--optimizer.{key}" not in given and f"--optimizer.init_args.{key}" not in given]
            out[index + 1:index + 1] = extra
        later = out[i + 1:]
        if any(t.split("=", 1)[0] in _LR_OPTIONS for t in later) or _configured_optimizer(later, len(later))[0]:
            continue  # a step size (or a whole optimizer config) follows
        config_path, config_lr = _configured_optimizer(out, i)
        config_cls = _optimizer_class(config_path) if config_path else None
        if config_cls is None or config_cls is cls:
            continue
        # the row named (svag-mb, not the first row of its class), else the class's row
        method = row if row is not None else next((m for m in _table() if m.cls is cls), None)
        if method is None:
            raise UsageError(
                f"--optimizer {value} replaces the config's {_class_label(config_cls)} whose lr {config_lr} "
                f"is not a step size for it; give one with --optimizer.lr")
        resume = any(t.split("=", 1)[0] == "--ckpt_path" for t in out)  # a resume: the checkpoint's check speaks
        if not resume and _as_float(config_lr) != float(method.default_lr):
            _say(f"--optimizer {value}: lr {method.default_lr} ({method.name}'s starting step size, "
                 f"configs/optimizers/{method.config}.yaml), not the config's {config_lr} for "
                 f"{_class_label(config_cls).split(' ')[0]}; --optimizer.lr sets another")
        out.insert(i + 2 if index != i else i + 1, f"--optimizer.lr={method.default_lr!r}")
    return out


def _as_float(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _cli_value(value: Any) -> str:
    """A method-table argument as jsonargparse reads it from the command line."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cli_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _table():
    from .registry import METHODS

    return METHODS


def with_registry_names_resolved(argv: List[str]) -> List[str]:
    """Kept for callers of 0.x: :func:`prepare_argv`."""
    return prepare_argv(argv)


# ------------------------------------------------------------------ parser errors in one line
def _close(value: str, choices: Sequence[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)


def _options_of(parser: Optional[LightningArgumentParser]) -> List[str]:
    """The option strings ``--help`` shows (the parser's public help text)."""
    if parser is None:
        return []
    return sorted(set(re.findall(r"(--[A-Za-z_][\w.\-]*)", parser.format_help())))


def _init_parameters(class_path: str) -> List[str]:
    cls = _import_class(class_path)
    if cls is None:
        return []
    try:
        return [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _existing_config_files(argv: List[str]) -> List[Path]:
    """The files of ``--config FILE`` on the command line that exist."""
    return [Path(name) for _, name in _config_files(argv) if Path(name).is_file()]


def _check_config_file(path: Path) -> None:
    """A config file that is not UTF-8 or not YAML: one line with the file and where (exit 2),
    before jsonargparse reads it without its name."""
    import yaml

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UsageError(f"config {path}, line {line}: not UTF-8 text ({error.reason}, byte {raw[error.start]:#04x}); "
                         "save it as UTF-8") from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"config {path}{where}: not valid YAML ({problem})") from None


def _key_in_files(key: str, files: Sequence[Path]) -> Optional[Path]:
    """The config file (the last, as for values) that holds the dotted ``key``."""
    import yaml

    parts = key.split(".")
    for path in reversed(list(files)):
        try:
            node = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            return path
    return None


def usage_error_message(text: str, parser: Optional[LightningArgumentParser], subcommand: Optional[str],
                        files: Sequence[Path] = ()) -> str:
    """jsonargparse's multi-line parser error as one line naming the bad value and the valid
    choices, the closest first (and, for a key of a config file, the file)."""
    help_hint = f"'lightning-msvag {subcommand} --help'" if subcommand else "'lightning-msvag --help'"
    m = re.search(r"does not accept option '([\w.]+)'", text)
    if m:
        key = m.group(1)
        options = _options_of(parser)
        group = "--" + key.rsplit(".", 1)[0] + "." if "." in key else "--"
        close = [c[2:] for c in _close("--" + key, [o for o in options if o.startswith(group)] or options)]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        source = _key_in_files(key, files)
        where = f"config {source}: " if source is not None else ""
        return f"{where}unknown key {key}; {hint}{help_hint} lists the options"
    m = re.match(r"unrecognized arguments: (\S+)", text)
    if m:
        option = m.group(1).split("=", 1)[0]
        options = _options_of(parser)
        group = option.rsplit(".", 1)[0] + "." if "." in option else "--"
        close = _close(option, [o for o in options if o.startswith(group)] or options)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unknown option {option}; {hint}{help_hint} lists the options"
    m = re.search(r'Parser key "config":\s*File does not exist: \'?([^\']+)\'?', text)
    if m:
        given = Path(m.group(1))
        root = _configs_root()
        shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
        close = difflib.get_close_matches(given.name, shipped, n=3, cutoff=0.7)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"config file {given} does not exist; {hint}shipped configs: {', '.join(shipped)} (in {root})"
    m = re.search(r'Parser key "(\w+)".*?Problem with given class_path \'([^\']+)\':\s*(.*)', text, re.S)
    if m:
        group, class_path, reason = m.groups()
        reason = reason.split("\n    - Expected a <class 'NoneType'>")[0]
        key = re.search(r'Parser key "([\w.]+)":\s*(.*)', reason, re.S)
        if key:
            detail = " ".join(key.group(2).split())
            number = re.search(r"Expected a <class '(float|int)'>\. Got value: ([-+]?(?:nan|inf|infinity))\b", detail, re.I)
            if number:  # jsonargparse refuses the non-finite float; say why it could not be taken either
                return f"--{group}.{key.group(1)}: must be a finite number, got {number.group(2)} ({class_path})"
            detail = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected \1, got '\2'", detail)
            return f"--{group}.{key.group(1)}: {detail} ({class_path})"
        bad = re.search(r"Option '([\w.]+)' is not accepted", reason)
        if bad:
            params = _init_parameters(class_path)
            close = _close(bad.group(1), params)
            hint = f"did you mean --{group}.{close[0]}? " if close else ""
            return (f"--{group}.{bad.group(1)}: {class_path} has no option {bad.group(1)!r}; {hint}"
                    f"its options: {', '.join(close + [p for p in params if p not in close])}")
        return f"--{group}: {' '.join(reason.split())}"
    m = re.search(r'Parser key "(\w+)".*Expected a dot import path string: (\S+)', text, re.S)
    if m:
        return f"--{m.group(1)}: no class {m.group(2)!r} (a class name or import path); {help_hint}"
    return _innermost_message(ValueError(text))


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
    argv = prepare_argv(list(sys.argv[1:] if argv is None else argv))
    subcommand = next((a for a in argv if a in _SUBCOMMANDS), None) if run else None
    parser_kwargs: Dict[str, Any] = {}
    if run:
        parser_kwargs = {"prog": "lightning-msvag", "description": MAIN_DESCRIPTION,
                         "formatter_class": _raw_description_formatter(),
                         **{name: {"description": _optimizer_description(name)} for name in _SUBCOMMANDS}}
    return MSVAGCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        parser_kwargs=parser_kwargs,
        # a validate/test/predict that continues a fit's folder keeps the fit's config.yaml
        save_config_kwargs={"overwrite": True,
                            "config_filename": "config.yaml" if subcommand in (None, "fit") else f"config_{subcommand}.yaml"},
        auto_configure_optimizers=True,
    )


CONFIGS_USAGE = """usage: lightning-msvag configs [--write DIR]

List the shipped problem configs (configs/*.yaml) and per-method optimizer configs
(configs/optimizers/*.yaml). --write DIR copies them to DIR/configs (never over existing files)."""


def configs_command(argv: List[str]) -> int:
    """``lightning-msvag configs``: list the shipped configs; ``--write DIR`` copies them to DIR/configs."""
    root = _configs_root()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
    if not argv:
        print("\n".join(names))
        print(f"(in {root}; 'lightning-msvag configs --write .' copies them to ./configs)", file=sys.stderr)
        return 0
    if argv[0] in ("-h", "--help"):
        print(CONFIGS_USAGE)
        return 0
    if argv[0] != "--write" or len(argv) != 2:
        raise UsageError(f"configs takes --write DIR or nothing, got {' '.join(argv)!r}; "
                         "usage: lightning-msvag configs [--write DIR]")
    target = Path(argv[1]) / "configs"
    existing = [n for n in names if (target / n).exists()]
    if existing:
        raise UserError(f"{target} already holds {', '.join(existing)}; not overwriting (remove them first)")
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target / name)
    print(f"wrote {len(names)} configs to {target}")
    return 0


class UsageError(ValueError):
    """A command-line mistake (unknown option, name or file, a value of the wrong type);
    reported in one line with exit status 2, as argparse's usage errors."""


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
    """One line on stderr (rank zero only) naming the error; exit status 2 for a
    :class:`UsageError`, else 1."""
    usage = isinstance(error, UsageError)
    if _global_rank() == 0:
        message = _innermost_message(error)
        print(f"lightning-msvag: error: {message}", file=sys.stderr)
        if not usage:
            print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
    return 2 if usage else 1


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
    (:data:`USER_ERRORS`) reported in one line with exit status 1 (2 for a command-line
    :class:`UsageError`), Ctrl-C as 130;
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
