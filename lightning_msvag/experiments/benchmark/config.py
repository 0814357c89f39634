"""The sweep's settings: a frozen :class:`BenchmarkConfig`, built from the command line."""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .methods import DEFAULT_GRIDS, DEFAULT_METHODS, METHOD_CLASSES

__all__ = ["BenchmarkConfig", "add_arguments", "command_line", "format_lr", "parse_grid"]


def format_lr(lr: float) -> str:
    """Step size as used in run names (4 significant digits, e.g. ``0.001``, ``3``, ``1e-05``)."""
    return f"{lr:.4g}"


def parse_grid(spec: str) -> List[float]:
    """``"lo:hi:n"`` (n log-spaced values, both ends included) or ``"a,b,c"`` -> sorted descending."""
    spec = spec.strip()
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            lo_f, hi_f, n_i = float(lo), float(hi), int(n)
            if not (0 < lo_f <= hi_f) or n_i < 1:
                raise ValueError
            values = [lo_f] if n_i == 1 else np.logspace(math.log10(lo_f), math.log10(hi_f), n_i).tolist()
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad step-size grid {spec!r}: use 'lo:hi:n' (log-spaced) or a comma list 'a,b,c'") from None
    values = sorted({float(format_lr(v)) for v in values}, reverse=True)
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"step sizes must be positive and finite: {spec!r}")
    return values


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything ``reproduce benchmark`` was asked to do (one object, never mutated).

    Field names are the command-line options' ``dest`` names (``--max-steps`` -> ``max_steps``);
    list options are tuples. ``argv`` is the invoking command line (for the commands printed into
    summaries and ``--list-runs``).
    """

    out: str
    config: str
    seed: int = 42
    data_dir: Optional[str] = None
    methods: Tuple[str, ...] = DEFAULT_METHODS
    grid: Tuple[str, ...] = ()
    num_seeds: int = 10
    max_steps: int = 1000
    val_check_interval: Optional[int] = None
    limit_val_batches: Optional[float] = None
    fit_arg: Tuple[str, ...] = ()
    diverge_factor: float = 10.0
    patience: int = 0
    record_every: int = 1
    phase: str = "all"
    list_runs: bool = False
    run_index: Optional[int] = None
    shard: Optional[Tuple[int, int]] = None
    collect_only: bool = False
    jobs: int = 1
    launcher: str = "subprocess"
    threads: Optional[int] = None
    python: Optional[str] = None
    run_timeout: Optional[float] = None
    no_progress: bool = False
    quiet: bool = False
    argv: Tuple[str, ...] = ()

    @classmethod
    def from_namespace(cls, ns: Any) -> "BenchmarkConfig":
        """From the parsed command line (an ``argparse.Namespace`` or any object with the fields)."""
        values: Dict[str, Any] = {}
        for f in fields(cls):
            if not hasattr(ns, f.name):
                continue
            value = getattr(ns, f.name)
            if f.name in ("methods", "grid", "fit_arg", "argv"):
                value = tuple(value or ())
            elif f.name == "shard" and value is not None:
                value = tuple(value)
            values[f.name] = value
        return cls(**values)

    # -- derived settings -------------------------------------------------------------------
    @property
    def problem(self) -> str:
        """The problem's name: the config file's stem (``fmnist_2c2d``)."""
        return Path(self.config).stem

    @property
    def seeds(self) -> List[int]:
        """``seed, seed + 1, ...``; the first one runs the step-size search."""
        return [self.seed + i for i in range(self.num_seeds)]

    @property
    def val_interval(self) -> Optional[int]:
        """Steps between evaluations (default ``max_steps // 10``; ``None`` = once per epoch)."""
        if self.val_check_interval is None:
            return max(1, self.max_steps // 10)
        return self.val_check_interval or None  # 0 -> Lightning's default (once per epoch)

    def grids(self) -> Dict[str, List[float]]:
        """Each method's step sizes, largest first (``--grid`` or :data:`DEFAULT_GRIDS`)."""
        given: Dict[str, str] = {}
        for item in self.grid:
            if "=" not in item:
                raise ValueError(f"--grid expects METHOD=GRID, got {item!r}")
            method, spec = item.split("=", 1)
            method = method.strip().lower()
            if method not in METHOD_CLASSES:
                raise ValueError(f"--grid: unknown method {method!r}; known: {', '.join(METHOD_CLASSES)}")
            given[method] = spec
        return {m: parse_grid(given.get(m, DEFAULT_GRIDS[m])) for m in self.methods}

    def validate(self) -> None:
        """Raise ``FileNotFoundError`` / ``ValueError`` for settings that cannot run."""
        if not Path(self.config).is_file():
            raise FileNotFoundError(f"config {self.config} not found")
        if self.max_steps < 1 or self.num_seeds < 1 or self.jobs < 1 or self.record_every < 1:
            raise ValueError("need --max-steps, --num-seeds, --jobs, --record-every >= 1")
        if self.run_index is not None and self.phase == "all":
            raise ValueError("--run-index needs --phase search or --phase replicate")
        if self.run_index is not None and self.shard:
            raise ValueError("use either --run-index or --shard")
        if self.shard and self.phase == "all":
            raise ValueError("--shard needs --phase search or --phase replicate")
        self.grids()


# ----------------------------------------------------------------------------------- CLI
_RUN_SELECTION_OPTS = {"--list-runs": 0, "--collect-only": 0, "--shard": 1, "--run-index": 1, "--phase": 1, "--jobs": 1}


def command_line(cfg: Any, extra: Sequence[str] = (), keep: Sequence[str] = ()) -> str:
    """The invoking command without run-selection options (except ``keep``), plus ``extra``, shell-quoted."""
    argv = list(getattr(cfg, "argv", None) or [])
    kept: List[str] = []
    skip = 0
    for tok in argv:
        if skip:
            skip -= 1
            continue
        name = tok.split("=", 1)[0]
        if name in _RUN_SELECTION_OPTS and name not in keep:
            skip = _RUN_SELECTION_OPTS[name] if "=" not in tok else 0
            continue
        kept.append(tok)
    return " ".join(shlex.quote(t) for t in ["lightning-msvag", "reproduce", *kept, *extra])


def _shard(value: str) -> Tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {value!r}")
    return i, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("problem and budget")
    g.add_argument("--config", required=True, help="problem config, e.g. configs/tolstoi_char_rnn.yaml")
    g.add_argument("--data-dir", help="data folder passed as --data.init_args.data_dir")
    g.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHOD_CLASSES),
                   help="methods to compare (default: m-sgd m-ssd m-svag adam)")
    g.add_argument("--grid", action="append", metavar="METHOD=GRID",
                   help="step-size grid of a method: 'lo:hi:n' (log-spaced) or 'a,b,c'; repeatable. Defaults: "
                        + ", ".join(f"{m}={v}" for m, v in DEFAULT_GRIDS.items()))
    g.add_argument("--num-seeds", type=int, default=10,
                   help="seeds --seed, --seed+1, ...; the first for the search (default 10, as DeepOBS 42-51)")
    g.add_argument("--max-steps", type=int, default=1000, help="training steps per run (default 1000)")
    g.add_argument("--val-check-interval", type=int, default=None,
                   help="evaluate every N steps (default max_steps/10; 0 = Lightning's default, once per epoch)")
    g.add_argument("--limit-val-batches", type=float, default=None,
                   help="evaluate on this many batches per split (int) or fraction (<1); default all")
    g.add_argument("--fit-arg", action="append", metavar="ARG",
                   help="extra LightningCLI argument for every run, e.g. --fit-arg=--trainer.accelerator=gpu; repeatable")
    g.add_argument("--diverge-factor", type=float, default=10.0,
                   help="call a run diverged when its training loss exceeds this multiple of the first step's "
                        "(default 10; 0: only non-finite losses count)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop a method's downward search after this many stable step sizes below the best "
                        "did not beat it (default 0: run the whole grid)")
    g.add_argument("--record-every", type=int, default=1, help="keep every N-th training step in the record")
    r = parser.add_argument_group("execution")
    r.add_argument("--phase", choices=("all", "search", "replicate"), default="all",
                   help="all (default): search, replicate, collect; or one phase (then no collect)")
    r.add_argument("--list-runs", action="store_true", help="print the phase's runs, their status and commands; run nothing")
    r.add_argument("--run-index", type=int, help="run only the phase's run number I (see --list-runs)")
    r.add_argument("--shard", type=_shard, help="run only runs with index = i mod n (i/n, 0 <= i < n)")
    r.add_argument("--collect-only", action="store_true", help="only build curves/plots/summary from existing records")
    r.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine (default 1)")
    r.add_argument("--launcher", choices=("subprocess", "inprocess"), default="subprocess",
                   help="one process per run (default) or in this process (tests, debugging)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run process (OMP_NUM_THREADS; default: inherited, or cores/jobs with --jobs > 1)")
    r.add_argument("--python", help="Python executable for the run processes (default: this one)")
    r.add_argument("--run-timeout", type=float, default=None, help="seconds before a run is killed and marked failed")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (print one line per run)")
    r.add_argument("--quiet", action="store_true", help="with --no-progress: print nothing per run")
