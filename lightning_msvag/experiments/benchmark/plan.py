"""Plan: which runs the sweep consists of, where each one lives, and its ``fit`` command line."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._common import read_json
from .config import BenchmarkConfig, format_lr

__all__ = [
    "FINISHED", "RunSpec", "plan_search", "plan_replicate", "choose_lr", "final_metric",
    "run_dir", "settings", "fit_argv", "load_record", "is_finished", "chains", "select",
]

FINISHED = ("done", "diverged")


@dataclass(frozen=True)
class RunSpec:
    """One Lightning run of the sweep."""

    method: str
    lr: float
    seed: int
    phase: str  # "search" or "replicate"

    @property
    def name(self) -> str:
        return f"{self.method}/lr={format_lr(self.lr)}/seed={self.seed}"


def plan_search(cfg: BenchmarkConfig) -> List[RunSpec]:
    """Search runs: every grid step size (largest first) with the first seed, method by method."""
    seed = cfg.seeds[0]
    return [RunSpec(m, lr, seed, "search") for m, lrs in cfg.grids().items() for lr in lrs]


def final_metric(record: Optional[dict], key: str) -> Optional[float]:
    """A finite final metric of a run record (``None`` if absent or non-finite)."""
    if not record:
        return None
    value = (record.get("final") or {}).get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def choose_lr(records: Dict[float, Optional[dict]]) -> Tuple[Optional[float], str]:
    """Best step size among finished, non-diverged search runs: highest final test accuracy
    (ties: lower final test loss, then the larger step size); without test metrics, the lowest
    final training loss. Returns ``(lr or None, criterion)``."""
    done = {lr: r for lr, r in records.items() if r and r.get("status") == "done"}
    with_acc = {lr: r for lr, r in done.items() if final_metric(r, "test/accuracy") is not None}
    if with_acc:
        def key(lr):
            loss = final_metric(with_acc[lr], "test/loss")
            return (final_metric(with_acc[lr], "test/accuracy"), -(loss if loss is not None else math.inf), lr)
        return max(with_acc, key=key), "final test accuracy"
    with_loss = {lr: r for lr, r in done.items() if final_metric(r, "train/loss") is not None}
    if with_loss:
        return min(with_loss, key=lambda lr: (final_metric(with_loss[lr], "train/loss"), -lr)), "final training loss"
    return None, "no finished search run"


def plan_replicate(cfg: BenchmarkConfig, out: Path) -> Tuple[List[RunSpec], Dict[str, Any]]:
    """Replicate runs at each method's chosen step size (seeds 2..N), from the search records."""
    seeds = cfg.seeds
    runs: List[RunSpec] = []
    choice: Dict[str, Any] = {}
    for method, lrs in cfg.grids().items():
        recs = {lr: load_record(cfg, out, RunSpec(method, lr, seeds[0], "search")) for lr in lrs}
        complete = all(r and r.get("status") in FINISHED for r in recs.values())
        lr, criterion = choose_lr(recs)
        choice[method] = {"lr": lr, "criterion": criterion, "search_complete": complete}
        if lr is not None:
            runs.extend(RunSpec(method, lr, s, "replicate") for s in seeds[1:])
    return runs, choice


def run_dir(out: Path, spec: RunSpec) -> Path:
    """``OUT/runs/<method>/lr=<lr>/seed=<seed>``."""
    return out / "runs" / spec.method / f"lr={format_lr(spec.lr)}" / f"seed={spec.seed}"


def _config_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def settings(cfg: BenchmarkConfig, spec: RunSpec) -> Dict[str, Any]:
    """What makes a run's result valid to reuse (compared on resume)."""
    config = Path(cfg.config)
    return {
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "config": config.name,
        "config_sha256": _config_digest(config),
        "max_steps": cfg.max_steps,
        "val_check_interval": cfg.val_interval,
        "limit_val_batches": cfg.limit_val_batches,
        "diverge_factor": cfg.diverge_factor,
        "fit_args": list(cfg.fit_arg or []),
    }


def fit_argv(cfg: BenchmarkConfig, spec: RunSpec, folder: Path) -> List[str]:
    """The ``lightning-msvag fit ...`` arguments of one run (without the program name)."""
    logger = {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder.parent.parent.parent), "name": str(Path(*folder.parts[-3:])),
                      "version": "tb", "default_hp_metric": False},
    }
    recorder = {
        "class_path": "lightning_msvag.experiments.benchmark.recorder.RunRecorder",
        "init_args": {"path": str(folder / "record.json"), "diverge_factor": cfg.diverge_factor,
                      "train_every": cfg.record_every},
    }
    argv = [
        "fit", "--config", str(Path(cfg.config).resolve()),
        # the registry name: the command resolves it to the class and adds the row's own
        # arguments (m-svag-mb: variance=minibatch, and with it the BatchVarianceCallback)
        "--optimizer", spec.method,
        "--optimizer.lr", repr(spec.lr),
        "--seed_everything", str(spec.seed),
        "--data.init_args.seed", str(spec.seed),  # the data order (shuffling, augmentation) varies with the seed too
        "--trainer.max_steps", str(cfg.max_steps),
        "--trainer.max_epochs", "-1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
    ]
    interval = cfg.val_interval
    if interval:
        argv += ["--trainer.val_check_interval", str(interval), "--trainer.check_val_every_n_epoch", "null"]
    if cfg.limit_val_batches is not None:
        lvb = cfg.limit_val_batches
        argv += ["--trainer.limit_val_batches", str(int(lvb)) if float(lvb).is_integer() and lvb >= 1 else str(lvb)]
    if cfg.data_dir:
        argv += ["--data.init_args.data_dir", str(Path(cfg.data_dir).resolve())]
    argv += list(cfg.fit_arg or [])
    # Last, so that no --fit-arg (e.g. --trainer.callbacks=[...]) can drop the log dir or the recorder.
    argv += ["--trainer.logger=" + json.dumps(logger), "--trainer.callbacks+=" + json.dumps(recorder)]
    return argv


def load_record(cfg: BenchmarkConfig, out: Path, spec: RunSpec) -> Optional[dict]:
    """The run's record if it belongs to the current settings, else ``None``."""
    rec = read_json(run_dir(out, spec) / "record.json")
    if not rec:
        return None
    if rec.get("spec", {}).get("settings") != settings(cfg, spec):
        return None
    return rec


def is_finished(cfg: BenchmarkConfig, out: Path, spec: RunSpec) -> bool:
    rec = load_record(cfg, out, spec)
    return bool(rec) and rec.get("status") in FINISHED


def chains(runs: List[RunSpec], cfg: Any) -> List[List[RunSpec]]:
    """Groups of runs executed one after the other: a method's search with ``--patience``, else one run each."""
    if cfg.patience > 0 and runs and runs[0].phase == "search":
        by_method: Dict[str, List[RunSpec]] = {}
        for r in runs:
            by_method.setdefault(r.method, []).append(r)
        return list(by_method.values())
    return [[r] for r in runs]


def select(runs: List[RunSpec], cfg: Any) -> List[RunSpec]:
    """The runs of this process: ``--run-index I``, ``--shard i/n``, or all."""
    if cfg.run_index is not None:
        if not 0 <= cfg.run_index < len(runs):
            raise ValueError(f"--run-index {cfg.run_index} out of range: the phase has {len(runs)} runs (0..{len(runs) - 1})")
        return [runs[cfg.run_index]]
    if cfg.shard:
        i, n = cfg.shard
        return [r for k, r in enumerate(runs) if k % n == i]
    return runs
