r"""``reproduce benchmark`` — the paper's §6 protocol on any problem config (docs/problems.md §5).

For each method: run a log-spaced step-size grid (user-set, largest first: the search goes
downwards from the largest stable step size), pick the step size with the best final test
accuracy, replicate it over seeds, and report curves (mean ± one std over seeds), the step-size
sensitivity and a summary table.

**Runs.** Every (method, lr, seed) is one ordinary Lightning run of ``lightning-msvag fit
--config CONFIG --optimizer CLASS --optimizer.lr LR --seed_everything SEED --trainer.max_steps N
...`` in its own process (a crash or divergence of one run cannot take down the sweep) with its
own TensorBoard log dir ``OUT/runs/<method>/lr=<lr>/seed=<seed>/tb``. A
:class:`~lightning_msvag.experiments.recorder.RunRecorder` callback writes the run's record,
``OUT/runs/<method>/lr=<lr>/seed=<seed>/record.json``: status (``done`` / ``diverged`` / ``failed``),
the training and evaluation curves, the final metrics and the wall time per training step. The
runner adds the run's settings (``spec``, including the exact ``fit`` argv) and, if the process
died without a record, writes a ``failed`` one with the exit code and the log's tail
(``OUT/runs/.../log.txt``).

**Phases.** ``search``: every grid step size with the first seed. ``replicate``: the chosen step size
with the remaining seeds (needs the search records). ``--phase all`` (default) does both and then
collects. ``collect`` (``--collect-only``) builds ``curves.csv``, ``benchmark.png``,
``lr_sensitivity.png``, ``summary.md`` and ``results.json`` from whatever records exist.

**Resume.** A run whose record says ``done`` or ``diverged`` *with the same settings* is never
redone; ``failed``, unfinished (killed) and changed-settings runs are rerun from scratch (their run
folder is cleared first). So re-running the same command continues a partial sweep.

**Spreading runs over machines.** ``--list-runs`` prints the runs of a phase with their index,
status and the command that runs exactly that one (``--run-index I``); ``--shard i/n`` runs every
run whose index is ``i`` mod ``n`` (``0 <= i < n``). Any scheduler works (one process per run, e.g.
a job array over ``--run-index``); all processes must see the same ``--out`` folder (a shared file
system) or their ``runs/`` folders copied together before ``--collect-only``. Settings must be the
same for all processes. Each run may itself use several devices:
``--fit-arg=--trainer.devices=4 --fit-arg=--trainer.strategy=ddp``. Typical cluster use::

    lightning-msvag reproduce benchmark --out OUT --config C ... --phase search --list-runs
    # job array, I = 0 .. K-1:
    lightning-msvag reproduce benchmark --out OUT --config C ... --phase search --run-index $I
    # then the same for --phase replicate, then:
    lightning-msvag reproduce benchmark --out OUT --config C ... --collect-only

**Step-size grids.** ``--grid METHOD=GRID`` (repeatable): ``GRID`` is ``lo:hi:n`` (``n`` log-spaced
values from ``lo`` to ``hi``) or a comma list ``0.1,0.3,1``. ``--patience P`` (> 0) stops a method's
downward search once ``P`` consecutive stable step sizes below the best one did not beat it (the
rest are recorded as ``skipped``); it applies when the search phase runs in one invocation.

**Divergence.** A non-finite training or evaluation loss, or a training loss above
``--diverge-factor`` (default 10) × the first step's loss, stops the run and records it as ``diverged``; it is
listed as such in the summary and never chosen. ``failed`` = the process crashed or timed out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._common import prepare_out, read_json, write_csv, write_json
from .plotting import band, method_color, method_label, method_style, new_figure, save_figure

__all__ = [
    "METHOD_CLASSES", "DEFAULT_GRIDS", "RunSpec", "parse_grid", "plan_search", "plan_replicate",
    "choose_lr", "fit_argv", "collect", "add_arguments", "run",
]

#: Method name -> optimizer class path for LightningCLI's ``--optimizer``.
METHOD_CLASSES: Dict[str, str] = {
    "m-sgd": "lightning_msvag.MSGD",
    "m-ssd": "lightning_msvag.MSSD",
    "m-svag": "lightning_msvag.MSVAG",
    "svag": "lightning_msvag.SVAG",
    "adam": "torch.optim.Adam",
}
#: Default grids (``lo:hi:n``, half-decade spacing). Sign-based steps move each weight by ~α.
DEFAULT_GRIDS: Dict[str, str] = {
    "m-sgd": "0.01:10:7",
    "m-svag": "0.01:10:7",
    "svag": "0.01:10:7",
    "m-ssd": "1e-5:1e-2:7",
    "adam": "1e-5:1e-2:7",
}
DEFAULT_METHODS = ("m-sgd", "m-ssd", "m-svag", "adam")
FINISHED = ("done", "diverged")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- planning
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
class RunSpec:
    """One Lightning run of the sweep."""

    method: str
    lr: float
    seed: int
    phase: str  # "search" or "replicate"

    @property
    def name(self) -> str:
        return f"{self.method}/lr={format_lr(self.lr)}/seed={self.seed}"


def _grids(args: argparse.Namespace) -> Dict[str, List[float]]:
    given: Dict[str, str] = {}
    for item in args.grid or []:
        if "=" not in item:
            raise ValueError(f"--grid expects METHOD=GRID, got {item!r}")
        method, spec = item.split("=", 1)
        method = method.strip().lower()
        if method not in METHOD_CLASSES:
            raise ValueError(f"--grid: unknown method {method!r}; known: {', '.join(METHOD_CLASSES)}")
        given[method] = spec
    return {m: parse_grid(given.get(m, DEFAULT_GRIDS[m])) for m in args.methods}


def _seeds(args: argparse.Namespace) -> List[int]:
    return [args.seed + i for i in range(args.num_seeds)]


def plan_search(args: argparse.Namespace) -> List[RunSpec]:
    """Search runs: every grid step size (largest first) with the first seed, method by method."""
    seed = _seeds(args)[0]
    return [RunSpec(m, lr, seed, "search") for m, lrs in _grids(args).items() for lr in lrs]


def _final(record: Optional[dict], key: str) -> Optional[float]:
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
    with_acc = {lr: r for lr, r in done.items() if _final(r, "test/accuracy") is not None}
    if with_acc:
        def key(lr):
            loss = _final(with_acc[lr], "test/loss")
            return (_final(with_acc[lr], "test/accuracy"), -(loss if loss is not None else math.inf), lr)
        return max(with_acc, key=key), "final test accuracy"
    with_loss = {lr: r for lr, r in done.items() if _final(r, "train/loss") is not None}
    if with_loss:
        return min(with_loss, key=lambda lr: (_final(with_loss[lr], "train/loss"), -lr)), "final training loss"
    return None, "no finished search run"


def plan_replicate(args: argparse.Namespace, out: Path) -> Tuple[List[RunSpec], Dict[str, Any]]:
    """Replicate runs at each method's chosen step size (seeds 2..N), from the search records."""
    seeds = _seeds(args)
    runs: List[RunSpec] = []
    choice: Dict[str, Any] = {}
    for method, lrs in _grids(args).items():
        recs = {lr: _load_record(out, RunSpec(method, lr, seeds[0], "search"), args) for lr in lrs}
        complete = all(r and r.get("status") in FINISHED for r in recs.values())
        lr, criterion = choose_lr(recs)
        choice[method] = {"lr": lr, "criterion": criterion, "search_complete": complete}
        if lr is not None:
            runs.extend(RunSpec(method, lr, s, "replicate") for s in seeds[1:])
    return runs, choice


# ------------------------------------------------------------------------------ one run
def _run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.method / f"lr={format_lr(spec.lr)}" / f"seed={spec.seed}"


def _config_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _settings(args: argparse.Namespace, spec: RunSpec) -> Dict[str, Any]:
    """What makes a run's result valid to reuse (compared on resume)."""
    config = Path(args.config)
    return {
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "config": config.name,
        "config_sha256": _config_digest(config),
        "max_steps": args.max_steps,
        "val_check_interval": _val_interval(args),
        "limit_val_batches": args.limit_val_batches,
        "diverge_factor": args.diverge_factor,
        "fit_args": list(args.fit_arg or []),
    }


def _val_interval(args: argparse.Namespace) -> Optional[int]:
    if args.val_check_interval is None:
        return max(1, args.max_steps // 10)
    return args.val_check_interval or None  # 0 -> Lightning's default (once per epoch)


def fit_argv(args: argparse.Namespace, spec: RunSpec, run_dir: Path) -> List[str]:
    """The ``lightning-msvag fit ...`` arguments of one run (without the program name)."""
    logger = {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir.parent.parent.parent), "name": str(Path(*run_dir.parts[-3:])),
                      "version": "tb", "default_hp_metric": False},
    }
    recorder = {
        "class_path": "lightning_msvag.experiments.recorder.RunRecorder",
        "init_args": {"path": str(run_dir / "record.json"), "diverge_factor": args.diverge_factor,
                      "train_every": args.record_every},
    }
    argv = [
        "fit", "--config", str(Path(args.config).resolve()),
        "--optimizer", METHOD_CLASSES[spec.method],
        "--optimizer.lr", repr(spec.lr),
        "--seed_everything", str(spec.seed),
        "--data.init_args.seed", str(spec.seed),  # the data order (shuffling, augmentation) varies with the seed too
        "--trainer.max_steps", str(args.max_steps),
        "--trainer.max_epochs", "-1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
    ]
    interval = _val_interval(args)
    if interval:
        argv += ["--trainer.val_check_interval", str(interval), "--trainer.check_val_every_n_epoch", "null"]
    if args.limit_val_batches is not None:
        lvb = args.limit_val_batches
        argv += ["--trainer.limit_val_batches", str(int(lvb)) if float(lvb).is_integer() and lvb >= 1 else str(lvb)]
    if args.data_dir:
        argv += ["--data.init_args.data_dir", str(Path(args.data_dir).resolve())]
    argv += list(args.fit_arg or [])
    # Last, so that no --fit-arg (e.g. --trainer.callbacks=[...]) can drop the log dir or the recorder.
    argv += ["--trainer.logger=" + json.dumps(logger), "--trainer.callbacks+=" + json.dumps(recorder)]
    return argv


def _load_record(out: Path, spec: RunSpec, args: argparse.Namespace) -> Optional[dict]:
    """The run's record if it belongs to the current settings, else ``None``."""
    rec = read_json(_run_dir(out, spec) / "record.json")
    if not rec:
        return None
    if rec.get("spec", {}).get("settings") != _settings(args, spec):
        return None
    return rec


def _is_finished(out: Path, spec: RunSpec, args: argparse.Namespace) -> bool:
    rec = _load_record(out, spec, args)
    return bool(rec) and rec.get("status") in FINISHED


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _threads(args: argparse.Namespace) -> Optional[int]:
    if args.threads:
        return args.threads
    if args.jobs > 1:  # share the cores instead of oversubscribing them
        return max(1, (os.cpu_count() or 1) // args.jobs)
    return None


def _child_env(args: argparse.Namespace) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("MPLBACKEND", "Agg")
    threads = _threads(args)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def execute_run(args: argparse.Namespace, out: Path, spec: RunSpec) -> dict:
    """Run one (method, lr, seed) from scratch and return its (finalised) record."""
    run_dir = _run_dir(out, spec)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished/failed/stale attempt of this same run
    run_dir.mkdir(parents=True)
    argv = fit_argv(args, spec, run_dir)
    spec_info = {"name": spec.name, "phase": spec.phase, "settings": _settings(args, spec),
                 "argv": ["lightning-msvag", *argv], "launcher": args.launcher}
    write_json(run_dir / "record.json", {"status": "running", "spec": spec_info})
    log = run_dir / "log.txt"
    t0 = time.perf_counter()
    returncode: Optional[int] = None
    error: Optional[str] = None
    if args.launcher == "subprocess":
        cmd = [args.python or sys.executable, "-m", "lightning_msvag.cli", *argv]
        with open(log, "w", encoding="utf-8") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=run_dir, env=_child_env(args),
                                      timeout=args.run_timeout)
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                error = f"timed out after {args.run_timeout} s"
    else:  # in-process: for tests and debugging; one failure cannot stop the sweep either
        from lightning_msvag.cli import main as cli_main

        try:
            cli_main(argv)
            returncode = 0
        except SystemExit as exc:  # argument errors
            returncode = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            returncode = 1
            error = f"{type(exc).__name__}: {exc}"
            log.write_text(traceback.format_exc())
    wall = time.perf_counter() - t0
    rec = read_json(run_dir / "record.json") or {}
    status = rec.get("status")
    if status not in FINISHED or (returncode not in (0, None) and status != "diverged"):
        rec["status"] = "failed"
        rec["error"] = rec.get("error") or error or f"exit code {returncode}; log tail:\n{_tail(log)}"
    rec["spec"] = spec_info
    rec["returncode"] = returncode
    rec["process_wall_s"] = wall
    write_json(run_dir / "record.json", rec)
    return rec


# --------------------------------------------------------------------------- scheduling
def _progress(total: int, initial: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with pytorch_lightning
        tqdm = None
    if tqdm is None or not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)


def _search_concluded(out: Path, args: argparse.Namespace, chain: Sequence[RunSpec], upto: int) -> Optional[str]:
    """With --patience: has the downward search of this chain already found its best step size?"""
    if args.patience <= 0:
        return None
    accs = []
    for spec in chain[:upto]:
        rec = _load_record(out, spec, args)
        if rec and rec.get("status") == "done":
            acc = _final(rec, "test/accuracy")
            accs.append(-_final(rec, "train/loss") if acc is None and _final(rec, "train/loss") is not None else acc)
    accs = [a for a in accs if a is not None]
    if not accs:
        return None
    best = int(np.argmax(accs))
    if len(accs) - 1 - best >= args.patience:
        return f"{args.patience} smaller stable step size(s) did not beat lr={format_lr(chain[best].lr)}"
    return None


def execute(args: argparse.Namespace, out: Path, chains: List[List[RunSpec]], bar, label: str) -> Dict[str, int]:
    """Run chains of runs (each chain sequentially, chains in parallel with --jobs); skip finished runs."""
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": 0, "reused": 0}
    lock = threading.Lock()

    def run_chain(chain: List[RunSpec]) -> None:
        for k, spec in enumerate(chain):
            if _is_finished(out, spec, args):
                with lock:
                    counts["reused"] += 1
                continue
            reason = _search_concluded(out, args, chain, k) if spec.phase == "search" else None
            if reason:
                run_dir = _run_dir(out, spec)
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json(run_dir / "record.json", {"status": "skipped", "reason": reason,
                                                     "spec": {"name": spec.name, "phase": spec.phase,
                                                              "settings": _settings(args, spec)}})
                status = "skipped"
            else:
                status = execute_run(args, out, spec).get("status", "failed")
            with lock:
                counts[status] = counts.get(status, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{label}: {spec.name} {status}", refresh=True)
                elif not args.quiet:
                    print(f"[{label}] {spec.name}: {status}", flush=True)

    if args.jobs <= 1 or len(chains) <= 1:
        for chain in chains:
            run_chain(chain)
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in as_completed([pool.submit(run_chain, c) for c in chains]):
                fut.result()
    return counts


def _chains(runs: List[RunSpec], args: argparse.Namespace) -> List[List[RunSpec]]:
    if args.patience > 0 and runs and runs[0].phase == "search":
        by_method: Dict[str, List[RunSpec]] = {}
        for r in runs:
            by_method.setdefault(r.method, []).append(r)
        return list(by_method.values())
    return [[r] for r in runs]


def _select(runs: List[RunSpec], args: argparse.Namespace) -> List[RunSpec]:
    if args.run_index is not None:
        if not 0 <= args.run_index < len(runs):
            raise ValueError(f"--run-index {args.run_index} out of range: the phase has {len(runs)} runs (0..{len(runs) - 1})")
        return [runs[args.run_index]]
    if args.shard:
        i, n = args.shard
        return [r for k, r in enumerate(runs) if k % n == i]
    return runs


# ------------------------------------------------------------------------------ collect
def _curve_rows(spec: RunSpec, rec: dict) -> List[tuple]:
    rows = []
    for step, loss, acc in rec.get("train") or []:
        rows.append((spec.method, spec.lr, spec.seed, step, "train", loss, acc))
    for step, tel, tea, tl, ta in rec.get("eval") or []:
        rows.append((spec.method, spec.lr, spec.seed, step, "train_eval", tel, tea))
        rows.append((spec.method, spec.lr, spec.seed, step, "test", tl, ta))
    return rows


def _eval_matrix(recs: List[dict], col: int) -> Tuple[np.ndarray, np.ndarray]:
    """Steps common to all records and the values of eval column ``col`` there, ``[runs, steps]``."""
    series = []
    for rec in recs:
        series.append({int(row[0]): row[col] for row in rec.get("eval") or [] if row[col] is not None})
    if not series:
        return np.array([]), np.empty((0, 0))
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series], dtype=float)


def _smoothing_window(recs: List[dict]) -> int:
    """Moving-average window for mini-batch losses: ~5 % of the recorded steps."""
    n = min((len(rec.get("train") or []) for rec in recs), default=0)
    return max(1, n // 20)


def _smoothed_train(recs: List[dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Training loss per step, moving average over ~5 % of the run, steps common to all records."""
    series = [{int(r[0]): r[1] for r in rec.get("train") or [] if r[1] is not None} for rec in recs]
    if not series:
        return np.array([]), np.empty((0, 0))
    steps = sorted(set.intersection(*(set(s) for s in series)))
    vals = np.array([[s[t] for t in steps] for s in series], dtype=float)
    w = _smoothing_window(recs)
    if w > 1 and vals.shape[1] >= w:
        kernel = np.ones(w) / w
        vals = np.array([np.convolve(v, kernel, mode="valid") for v in vals])
        steps = steps[w - 1:]
    return np.array(steps), vals


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Build ``curves.csv``, ``benchmark.png``, ``lr_sensitivity.png``, ``summary.md``, ``results.json``."""
    seeds = _seeds(args)
    search = plan_search(args)
    replicate, choice = plan_replicate(args, out)
    records: Dict[RunSpec, Optional[dict]] = {}
    for spec in search + replicate:
        rec = _load_record(out, spec, args)
        records[spec] = rec

    rows: List[tuple] = []
    for spec, rec in records.items():
        if rec:
            rows.extend(_curve_rows(spec, rec))
    write_csv(out / "curves.csv", ["method", "lr", "seed", "step", "split", "loss", "accuracy"], rows)

    # Per-method statistics at the chosen step size.
    methods: Dict[str, Any] = {}
    step_time: Dict[str, Optional[float]] = {}
    for method in args.methods:
        times = [float(r["step_time_s"]["median"]) for s, r in records.items()
                 if s.method == method and r and r.get("status") == "done"
                 and (r.get("step_time_s") or {}).get("median") is not None]
        step_time[method] = float(np.mean(times)) if times else None
    ref = step_time.get("m-sgd")
    for method in args.methods:
        lr = choice[method]["lr"]
        search_rows = []
        for spec in (s for s in search if s.method == method):
            rec = records.get(spec)
            status = rec.get("status") if rec else "missing"
            search_rows.append({
                "lr": spec.lr, "status": status,
                "test_accuracy": _final(rec, "test/accuracy"), "test_loss": _final(rec, "test/loss"),
                "train_loss": _final(rec, "train_eval/loss") if _final(rec, "train_eval/loss") is not None
                else _final(rec, "train/loss"),
                "detail": (rec or {}).get("diverged_at") or (rec or {}).get("error") or (rec or {}).get("reason"),
            })
        stable = [r["lr"] for r in search_rows if r["status"] == "done"]
        chosen = [(s, r) for s, r in records.items() if s.method == method and lr is not None and s.lr == lr]
        final_recs = [r for _, r in chosen if r and r.get("status") == "done"]
        unfinished = [s.name + f" ({r.get('status') if r else 'missing'})" for s, r in chosen
                      if not (r and r.get("status") == "done")]

        def stat(key):
            vals = [_final(r, key) for r in final_recs]
            vals = [v for v in vals if v is not None]
            return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (None, None, 0)

        train_key = "train_eval/loss" if any(_final(r, "train_eval/loss") is not None for r in final_recs) else "train/loss"
        tl, tl_sd, n_tl = stat(train_key)
        ta, ta_sd, n_ta = stat("test/accuracy")
        methods[method] = {
            "chosen_lr": lr,
            "criterion": choice[method]["criterion"],
            "search_complete": choice[method]["search_complete"],
            "largest_stable_lr": max(stable) if stable else None,
            "final_train_loss": {"mean": tl, "std": tl_sd, "n": n_tl, "key": train_key},
            "final_test_accuracy": {"mean": ta, "std": ta_sd, "n": n_ta},
            "seeds_done": sorted(s.seed for s, r in chosen if r and r.get("status") == "done"),
            "seeds_not_done": unfinished,
            "step_time_s": step_time[method],
            "step_time_rel_m_sgd": (step_time[method] / ref) if (ref and step_time[method]) else None,
            "search": search_rows,
        }

    problem = Path(args.config).stem
    result = {
        "experiment": "benchmark",
        "problem": problem,
        "config": str(args.config),
        "settings": {
            "methods": list(args.methods), "grids": {m: v for m, v in _grids(args).items()}, "seeds": seeds,
            "max_steps": args.max_steps, "val_check_interval": _val_interval(args),
            "limit_val_batches": args.limit_val_batches, "fit_args": list(args.fit_arg or []),
            "patience": args.patience, "diverge_factor": args.diverge_factor,
        },
        "command": _command_line(args, keep=("--jobs",)),
        "methods": methods,
        "runs": {s.name: (r.get("status") if r else "missing") for s, r in records.items()},
    }
    write_json(out / "results.json", result)
    _plot_curves(args, records, choice, out / "benchmark.png")
    _plot_sensitivity(args, methods, out / "lr_sensitivity.png")
    (out / "summary.md").write_text(_summary_md(args, result), encoding="utf-8")
    return result


def _plot_curves(args, records, choice, path) -> None:
    fig, axes = new_figure(1, 3, width=5.0, height=4.0)
    ax_mb, ax_loss, ax_acc = axes[0, 0], axes[0, 1], axes[0, 2]
    window = 1
    for method in args.methods:
        lr = choice[method]["lr"]
        if lr is None:
            continue
        recs = [r for s, r in records.items() if s.method == method and s.lr == lr and r and r.get("status") == "done"]
        if not recs:
            continue
        label = f"{method_label(method)} (α={format_lr(lr)}, {len(recs)} seed{'s' if len(recs) > 1 else ''})"
        for ax, (steps, vals) in ((ax_mb, _smoothed_train(recs)), (ax_loss, _eval_matrix(recs, 1)),
                                  (ax_acc, _eval_matrix(recs, 4))):
            if vals.size:
                band(ax, steps, vals.mean(0), vals.std(0) if len(recs) > 1 else None, method=method, label=label)
        window = _smoothing_window(recs)
    ax_mb.set_ylabel("mini-batch training loss")
    ax_mb.set_title("Training loss (mini-batches" + (f", {window}-step average)" if window > 1 else ")"))
    evals = f"{args.limit_val_batches:g} batches" if args.limit_val_batches is not None else "full split"
    ax_loss.set_ylabel(f"training loss (train-eval split, {evals})")
    ax_loss.set_title("Training loss (evaluated)")
    ax_acc.set_ylabel(f"test accuracy ({evals})")
    ax_acc.set_title("Test accuracy")
    for ax in (ax_mb, ax_loss, ax_acc):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    fig.suptitle(f"{Path(args.config).stem}: best step size per method, mean ± 1 std over seeds "
                 f"({args.max_steps} steps per run)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_figure(fig, path)


def _plot_sensitivity(args, methods, path) -> None:
    fig, axes = new_figure(1, 2, width=5.6, height=4.0)
    ax_acc, ax_loss = axes[0, 0], axes[0, 1]
    bad_handles = False
    for method, info in methods.items():
        rows = info["search"]
        ok = [r for r in rows if r["status"] == "done"]
        bad = [r for r in rows if r["status"] in ("diverged", "failed")]
        kw = dict(color=method_color(method), ls=method_style(method), marker="o", ms=4, label=method_label(method))
        if ok:
            ok = sorted(ok, key=lambda r: r["lr"])
            xs = [r["lr"] for r in ok]
            ax_acc.plot(xs, [np.nan if r["test_accuracy"] is None else r["test_accuracy"] for r in ok], **kw)
            ax_loss.plot(xs, [np.nan if r["train_loss"] is None else r["train_loss"] for r in ok], **kw)
        if info["chosen_lr"] is not None:
            chosen = [r for r in ok if r["lr"] == info["chosen_lr"]]
            if chosen and chosen[0]["test_accuracy"] is not None:
                ax_acc.plot([info["chosen_lr"]], [chosen[0]["test_accuracy"]], marker="*", ms=14,
                            color=method_color(method), mec="k", ls="none")
        for r in bad:
            bad_handles = True
            for ax in (ax_acc, ax_loss):
                ax.plot([r["lr"]], [0.0], transform=ax.get_xaxis_transform(), marker="x", ms=9, mew=2,
                        color=method_color(method), ls="none", clip_on=False)
    for ax in (ax_acc, ax_loss):
        ax.set_xscale("log")
        ax.set_xlabel("step size α (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    ax_acc.set_ylabel("final test accuracy")
    ax_acc.set_title("Step-size sensitivity: test accuracy (★ = chosen)")
    ax_loss.set_ylabel("final training loss")
    ax_loss.set_title("Step-size sensitivity: training loss")
    handles, labels = ax_acc.get_legend_handles_labels()
    if bad_handles:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="x", color="k", ls="none", mew=2))
        labels.append("diverged / failed")
    if handles:
        ax_acc.legend(handles, labels, fontsize=8)
    seed = _seeds(args)[0]
    fig.suptitle(f"{Path(args.config).stem}: step-size search (seed {seed}, {args.max_steps} steps)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, path)


def _summary_md(args, result) -> str:
    s = result["settings"]
    lines = [
        f"# Benchmark summary: `{result['problem']}`",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- {s['max_steps']} training steps per run; evaluation every {s['val_check_interval'] or 'epoch'} steps"
        + (f" on {s['limit_val_batches']:g} batches per split" if s["limit_val_batches"] is not None else " on the full splits"),
        f"- seeds {', '.join(map(str, s['seeds']))}; step-size search with seed {s['seeds'][0]}, "
        f"chosen step size = best final test accuracy",
        "- final train loss: the evaluated training loss (train-eval split) at the last step, "
        "mean ± std over seeds (std with ddof = 0)",
        "- time/step: median wall time of a training step (forward, backward, optimizer step) "
        "averaged over the method's runs, relative to M-SGD",
        "",
        "| method | chosen lr | largest stable lr | final train loss | final test accuracy | seeds | time/step vs M-SGD |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, info in result["methods"].items():
        tl, ta = info["final_train_loss"], info["final_test_accuracy"]
        rel = info["step_time_rel_m_sgd"]
        lines.append(
            f"| {method_label(method)} | {format_lr(info['chosen_lr']) if info['chosen_lr'] is not None else 'none'} "
            f"| {format_lr(info['largest_stable_lr']) if info['largest_stable_lr'] is not None else 'none'} "
            f"| {_fmt(tl['mean'], tl['std'])} | {_fmt(ta['mean'], ta['std'])} | {ta['n']} "
            f"| {f'{rel:.2f}' if rel else 'n/a'} |"
        )
    lines += ["", f"## Step-size search (seed {s['seeds'][0]})", "",
              "| method | lr | status | final train loss | final test loss | final test accuracy | note |",
              "|---|---|---|---|---|---|---|"]
    for method, info in result["methods"].items():
        for r in info["search"]:
            note = r["detail"]
            if isinstance(note, dict):
                note = f"step {note.get('step')}: {note.get('reason')}"
            note = (str(note).splitlines()[0][:80] if note else "")
            star = " ★" if r["lr"] == info["chosen_lr"] else ""
            lines.append(f"| {method_label(method)} | {format_lr(r['lr'])}{star} | {r['status']} | {_fmt(r['train_loss'])} "
                         f"| {_fmt(r['test_loss'])} | {_fmt(r['test_accuracy'])} | {note.replace('|', '/')} |")
    problems = [(m, i) for m, i in result["methods"].items() if i["seeds_not_done"] or not i["search_complete"]]
    if problems:
        lines += ["", "## Incomplete", ""]
        for m, i in problems:
            if not i["search_complete"]:
                lines.append(f"- {method_label(m)}: step-size search not complete (choice may change)")
            for name in i["seeds_not_done"]:
                lines.append(f"- {name}")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
_RUN_SELECTION_OPTS = {"--list-runs": 0, "--collect-only": 0, "--shard": 1, "--run-index": 1, "--phase": 1, "--jobs": 1}


def _command_line(args: argparse.Namespace, extra: Sequence[str] = (), keep: Sequence[str] = ()) -> str:
    """The invoking command without run-selection options (except ``keep``), plus ``extra``, shell-quoted."""
    import shlex

    argv = list(getattr(args, "argv", None) or [])
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


def _list(args: argparse.Namespace, out: Path, phase: str, runs: List[RunSpec], note: str = "") -> None:
    print(f"phase {phase}: {len(runs)} runs{note}")
    for k, spec in enumerate(runs):
        rec = read_json(_run_dir(out, spec) / "record.json")
        stale = rec and rec.get("spec", {}).get("settings") != _settings(args, spec)
        status = (rec.get("status") if rec else "pending") + (" (other settings: will rerun)" if stale else "")
        print(f"  [{k}] {spec.name:32s} {status}")
        print(f"      {_command_line(args, ['--phase', phase, '--run-index', str(k)])}")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Entry point of ``reproduce benchmark`` (see the module doc)."""
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config {args.config} not found")
    if args.max_steps < 1 or args.num_seeds < 1 or args.jobs < 1 or args.record_every < 1:
        raise ValueError("need --max-steps, --num-seeds, --jobs, --record-every >= 1")
    if args.run_index is not None and args.phase == "all":
        raise ValueError("--run-index needs --phase search or --phase replicate")
    if args.run_index is not None and args.shard:
        raise ValueError("use either --run-index or --shard")
    if args.shard and args.phase == "all":
        raise ValueError("--shard needs --phase search or --phase replicate")
    out = prepare_out(args.out).resolve()  # runs execute in their own folders: absolute paths
    _grids(args)  # validate early
    if args.list_runs:
        search = plan_search(args)
        if args.phase in ("all", "search"):
            _list(args, out, "search", search)
        if args.phase in ("all", "replicate"):
            replicate, choice = plan_replicate(args, out)
            pending = [m for m, c in choice.items() if not c["search_complete"]]
            _list(args, out, "replicate", replicate,
                  f" (search not complete for {', '.join(pending)}: list may change)" if pending else "")
        return {"exit_code": 0}
    if args.collect_only:
        result = collect(args, out)
        print(f"benchmark: collected {sum(v != 'missing' for v in result['runs'].values())} run records into {out}")
        return result

    write_json(out / "sweep.json", {"command": _command_line(args, keep=("--jobs",)), "config": str(args.config),
                                    "methods": args.methods, "grids": _grids(args), "seeds": _seeds(args),
                                    "max_steps": args.max_steps})
    counts: Dict[str, int] = {}
    search = plan_search(args)
    selected_search = _select(search, args) if args.phase == "search" else (search if args.phase == "all" else [])
    n_rep_planned = len(args.methods) * (args.num_seeds - 1)
    total = len(selected_search) + (n_rep_planned if args.phase == "all" else 0)
    bar = None
    if args.phase == "replicate":
        replicate, choice = plan_replicate(args, out)
        missing = [m for m, c in choice.items() if c["lr"] is None]
        if missing:
            print(f"benchmark: no finished search run for {', '.join(missing)}; nothing to replicate for them",
                  file=sys.stderr)
        partial = [m for m, c in choice.items() if c["lr"] is not None and not c["search_complete"]]
        if partial:
            print(f"benchmark: warning: the search is not complete for {', '.join(partial)}; replicating the best "
                  "step size found so far", file=sys.stderr)
        selected = _select(replicate, args)
        done = sum(_is_finished(out, s, args) for s in selected)
        bar = _progress(len(selected), done, "benchmark runs", not args.no_progress)
        for k, v in execute(args, out, _chains([s for s in selected if not _is_finished(out, s, args)], args),
                            bar, "replicate").items():
            counts[k] = counts.get(k, 0) + v
    else:
        done = sum(_is_finished(out, s, args) for s in selected_search)
        bar = _progress(total, done, "benchmark runs", not args.no_progress)
        todo = [s for s in selected_search if not _is_finished(out, s, args)]
        # --patience needs the whole chain (finished runs included) to decide where to stop.
        chains = _chains(selected_search if args.patience > 0 else todo, args)
        for k, v in execute(args, out, chains, bar, "search").items():
            counts[k] = counts.get(k, 0) + v
        if args.phase == "all":
            replicate, _ = plan_replicate(args, out)
            if bar is not None:
                bar.total = len(selected_search) + len(replicate)  # a method without a stable lr has none
                bar.update(sum(_is_finished(out, s, args) for s in replicate))
            todo = [s for s in replicate if not _is_finished(out, s, args)]
            for k, v in execute(args, out, _chains(todo, args), bar, "replicate").items():
                counts[k] = counts.get(k, 0) + v
    if bar is not None:
        bar.close()
    failed = counts.get("failed", 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"benchmark: {summary or 'nothing to run'}" + (f" (see {out}/runs/*/*/*/record.json)" if failed else ""))
    result: Dict[str, Any] = {"counts": counts}
    if args.phase == "all" and args.run_index is None and not args.shard:
        result.update(collect(args, out))
        print(f"benchmark: wrote {out / 'summary.md'}, {out / 'benchmark.png'}, {out / 'lr_sensitivity.png'}, "
              f"{out / 'curves.csv'}")
    else:
        print("benchmark: run the other phases/shards, then --collect-only to build the summary")
    result["exit_code"] = 1 if failed else 0
    return result
