"""Helpers the resume tests load into ``lightning-msvag`` subprocesses (through ``--config``)."""

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this very process at the start of training step ``step`` (a pre-emption
    that arrives mid-step, at a known step)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)
