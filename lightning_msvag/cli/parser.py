"""``MSVAGCLI``: LightningCLI with the project's defaults, extended through its public hooks;
``build_cli`` runs a command line through it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from .. import callbacks as _callbacks  # noqa: F401  (imported so that short class names resolve:
from .. import optimizers as _optimizers  # noqa: F401   --optimizer MSVAG, --trainer.callbacks+=VarianceAdaptationMonitor)
from ..batch_variance_callback import BatchVarianceCallback
from ..fault_tolerance import CheckpointError, verify_checkpoint_archive
from .reporting import UsageError, _say
from .namespace import _get
from .config_files import _check_config_file, _existing_config_files
from .argv import _integer_batch_limits, prepare_argv
from .output_folders import _check_output_folders, _follow_default_root_dir
from .resume import _continue_logger_folder, _resolve_last
from .checkpoints import _refuse_another_model, _refuse_another_optimizer
from .usage_errors import usage_error_message
from .defaults import CHECKPOINT_EVERY_MINUTES, default_callbacks


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
    from ..registry import available_optimizers

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
