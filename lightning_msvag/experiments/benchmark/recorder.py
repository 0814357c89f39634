"""``RunRecorder``: a Lightning callback that writes one benchmark run's record as a small JSON file.

The benchmark runner adds it to every run (``--trainer.callbacks+=...``), but it is an ordinary
callback: add it to any ``lightning-msvag fit`` run to get the same record::

    lightning-msvag fit --config configs/tolstoi_char_rnn.yaml \\
        --trainer.callbacks+='{"class_path": "lightning_msvag.experiments.benchmark.recorder.RunRecorder",
                               "init_args": {"path": "runs/x/record.json"}}'

The record (rewritten after every evaluation, so a killed run leaves its progress behind)::

    status          "running" | "done" | "diverged" | "failed"
    steps_done      optimizer steps taken (trainer.global_step)
    train           [[step, train/loss, train/accuracy], ...]  every ``train_every`` steps
    eval            [[step, train_eval/loss, train_eval/accuracy, test/loss, test/accuracy], ...]
    final           the last ``eval`` row as a dict (and the last train row)
    step_time_s     median / mean / count of the wall time of a training step (forward, backward,
                    optimizer step; data loading and evaluation excluded; the first
                    ``warmup_steps`` steps — compilation, caches — are left out)
    diverged_at     step and reason, when the run diverged
    error           the exception text, when the run failed

**Divergence**: a non-finite training or evaluation loss, or (``diverge_factor > 0``) a training
loss above ``diverge_factor`` × the first step's loss. The run is then stopped
(``trainer.should_stop``) and recorded as ``"diverged"``, never dropped.
Under DDP only global rank 0 writes (the metrics it sees are the synchronised ones for
evaluation, its own for training steps).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl

from .._common import read_json, write_json

__all__ = ["RunRecorder", "EVAL_KEYS"]

EVAL_KEYS = ("train_eval/loss", "train_eval/accuracy", "test/loss", "test/accuracy")


def _metric(metrics: Dict[str, Any], key: str) -> Optional[float]:
    value = metrics.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


class RunRecorder(pl.Callback):
    """Record a run's curves, step time and outcome into ``path`` (JSON); see the module doc.

    Args:
        path: where the record JSON goes (parent folders are created).
        diverge_factor: also call the run diverged when the training loss exceeds this multiple
            of the first step's loss (0 disables; non-finite losses always count).
        train_every: keep every ``train_every``-th training step's loss and accuracy.
        warmup_steps: steps left out of the step-time statistics.
    """

    def __init__(self, path: str, diverge_factor: float = 0.0, train_every: int = 1, warmup_steps: int = 5) -> None:
        super().__init__()
        if diverge_factor < 0 or train_every < 1 or warmup_steps < 0:
            raise ValueError("need diverge_factor >= 0, train_every >= 1, warmup_steps >= 0")
        self.path = Path(path)
        self.diverge_factor = float(diverge_factor)
        self.train_every = int(train_every)
        self.warmup_steps = int(warmup_steps)
        self.train: List[List[Optional[float]]] = []
        self.eval: List[List[Optional[float]]] = []
        self.step_times: List[float] = []
        self.status = "running"
        self.diverged_at: Optional[Dict[str, Any]] = None
        self.error: Optional[str] = None
        self.first_loss: Optional[float] = None
        self._t_batch = 0.0
        self._t_fit = 0.0
        self._steps_done = 0

    # ------------------------------------------------------------------ record
    def record(self) -> Dict[str, Any]:
        times = sorted(self.step_times[self.warmup_steps:] or self.step_times)
        final: Dict[str, Any] = {}
        if self.eval:
            final.update({"step": self.eval[-1][0], **dict(zip(EVAL_KEYS, self.eval[-1][1:]))})
        if self.train:
            final.update({"train_step": self.train[-1][0], "train/loss": self.train[-1][1],
                          "train/accuracy": self.train[-1][2]})
        return {
            "status": self.status,
            "steps_done": self._steps_done,
            "fit_wall_s": time.perf_counter() - self._t_fit if self._t_fit else None,
            "step_time_s": {
                "median": times[len(times) // 2] if times else None,
                "mean": sum(times) / len(times) if times else None,
                "count": len(times),
            },
            "final": final,
            "diverged_at": self.diverged_at,
            "error": self.error,
            "train_columns": ["step", "train/loss", "train/accuracy"],
            "train": self.train,
            "eval_columns": ["step", *EVAL_KEYS],
            "eval": self.eval,
        }

    def _write(self, trainer: "pl.Trainer") -> None:
        if trainer.is_global_zero:
            old = read_json(self.path) or {}
            data = self.record()
            for key in ("spec", "name"):  # keep what the runner put there
                if key in old:
                    data[key] = old[key]
            write_json(self.path, data)

    def _diverge(self, trainer: "pl.Trainer", step: int, reason: str) -> None:
        if self.status != "diverged":
            self.status = "diverged"
            self.diverged_at = {"step": step, "reason": reason}
        trainer.should_stop = True

    # ------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._t_fit = time.perf_counter()
        self._write(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_times.append(time.perf_counter() - self._t_batch)
        step = int(trainer.global_step)
        self._steps_done = step
        metrics = trainer.callback_metrics
        loss = _metric(metrics, "train/loss")
        if loss is None and outputs is not None:  # a module that does not log train/loss
            value = outputs.get("loss") if isinstance(outputs, dict) else outputs
            try:
                loss = float(value)
            except (TypeError, ValueError):
                loss = None
        acc = _metric(metrics, "train/accuracy")
        if self.first_loss is None and _finite(loss):
            self.first_loss = loss
        if step % self.train_every == 0 or not _finite(loss):
            self.train.append([step, loss, acc])
        if loss is not None and not math.isfinite(loss):
            self._diverge(trainer, step, f"non-finite training loss {loss}")
        elif (self.diverge_factor > 0 and loss is not None and self.first_loss is not None
              and loss > self.diverge_factor * self.first_loss):
            self._diverge(trainer, step, f"training loss {loss:.4g} > {self.diverge_factor:g} x first loss "
                                         f"{self.first_loss:.4g}")

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # on_validation_end runs after Lightning has reduced the epoch-level metrics.
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = [int(trainer.global_step), *(_metric(metrics, k) for k in EVAL_KEYS)]
        if self.eval and self.eval[-1][0] == row[0]:
            self.eval[-1] = row  # evaluated twice at one step (e.g. end of epoch = check interval)
        else:
            self.eval.append(row)
        for key, value in zip(EVAL_KEYS, row[1:]):
            if key.endswith("loss") and value is not None and not math.isfinite(value):
                self._diverge(trainer, row[0], f"non-finite {key} {value}")
        self._write(trainer)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.status == "running":
            self.status = "done"
        self._write(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if self.status == "running":
            self.status = "failed"
        self.error = f"{type(exception).__name__}: {exception}"
        self._write(trainer)
