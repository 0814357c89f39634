"""The ``lightning-msvag`` command: a LightningCLI for the paper's four test problems.

    lightning-msvag fit --config configs/tolstoi_char_rnn.yaml --optimizer MSVAG --optimizer.lr 1.0
    lightning-msvag fit --config configs/cifar10_3c3d.yaml --config configs/optimizers/adam.yaml
    lightning-msvag validate|test|predict --config ... --ckpt_path ...
    lightning-msvag reproduce <experiment> --out DIR [options]   (see lightning_msvag.experiments)
    lightning-msvag --list-optimizers

``--model`` and ``--data`` take any LightningModule / LightningDataModule (the configs use
``models.*`` and ``datamodules.*``). ``--optimizer`` takes this project's optimizers by class
name (``MSGD``, ``MSSD``, ``MSVAG``, ``SVAG``) as well as torch's (``Adam``, ``SGD``, ...), and
``--lr_scheduler`` any ``torch.optim.lr_scheduler`` class.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from . import __version__, available_optimizers
from . import callbacks as _callbacks  # noqa: F401  (imported so short class names resolve:
from . import optimizers as _optimizers  # noqa: F401   --optimizer MSVAG, --trainer.callbacks+=VarianceAdaptationMonitor)


def build_cli(argv: Optional[List[str]] = None, run: bool = True):
    """The project's LightningCLI on ``argv`` (``None``: the command line); ``run=False``
    builds model, data and trainer from ``argv`` (no subcommand then) without running
    anything, for scripting and tests."""
    from pytorch_lightning import LightningDataModule, LightningModule
    from pytorch_lightning.cli import LightningCLI

    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=True,
    )


def main(argv: Optional[List[str]] = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"lightning-msvag {__version__}")
        return 0
    if argv[:1] == ["--list-optimizers"]:
        print("\n".join(available_optimizers()))
        return 0
    if argv[:1] == ["reproduce"]:
        from .experiments import main as reproduce

        return reproduce(argv[1:])
    # from the shell, let LightningCLI read sys.argv itself (passing it too makes it warn)
    build_cli(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
