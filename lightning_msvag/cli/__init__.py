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

The package, one module per concern; imports run one way, down this list:

============================  ==============================================================
``parser``                    ``MSVAGCLI`` (LightningCLI with the project's hooks) and
                              ``build_cli``: what runs ``fit``/``validate``/``test``/``predict``
``defaults``                  the callbacks the command adds (checkpoint every few minutes, ...)
``usage_errors``              parser errors in one line with the closest valid choices
``checkpoints``               a checkpoint of another problem or optimizer, refused before
                              anything is built
``resume``                    ``--ckpt_path last``: which ``last.ckpt``, one run folder
``output_folders``            ``--trainer.default_root_dir``, the logger's folder, unwritable paths
``argv``                      the command line before jsonargparse: ``--optimizer <name>``,
                              its step size, ``nan``, integer batch limits
``configs_command``           ``lightning-msvag configs [--write DIR]``, the shipped configs
``config_files``              ``--config FILE``: present, UTF-8, YAML, keys
``namespace``                 reading the parsed config and class paths
``reporting``                 one-line errors, exit statuses, ``run_guarded``
============================  ==============================================================
"""

from __future__ import annotations

import sys
from typing import List, Optional

from .. import __version__, available_optimizers
from .configs_command import configs_command
from .parser import MSVAGCLI, build_cli
from .reporting import run_guarded
from .argv import prepare_argv, with_registry_names_resolved
from .defaults import CHECKPOINT_EVERY_MINUTES, default_callbacks, run_checkpoint
from .reporting import TRACEBACK_ENV, UsageError


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


__all__ = [
    "CHECKPOINT_EVERY_MINUTES",
    "MSVAGCLI",
    "TRACEBACK_ENV",
    "UsageError",
    "build_cli",
    "configs_command",
    "default_callbacks",
    "main",
    "prepare_argv",
    "run_checkpoint",
    "run_guarded",
    "with_registry_names_resolved",
]
