"""Launch: run planned runs (one process each, or in this process), skip finished ones, record failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .._common import read_json, write_json
from .config import BenchmarkConfig, format_lr
from .plan import FINISHED, RunSpec, final_metric, fit_argv, is_finished, load_record, run_dir, settings

__all__ = ["execute_run", "execute", "progress"]

_PROJECT_ROOT = Path(__file__).resolve().parents[3]  # benchmark/ -> experiments/ -> lightning_msvag/ -> repo


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _threads(cfg: BenchmarkConfig) -> Optional[int]:
    if cfg.threads:
        return cfg.threads
    if cfg.jobs > 1:  # share the cores instead of oversubscribing them
        return max(1, (os.cpu_count() or 1) // cfg.jobs)
    return None


def _child_env(cfg: BenchmarkConfig) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(_PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("MPLBACKEND", "Agg")
    threads = _threads(cfg)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def execute_run(cfg: BenchmarkConfig, out: Path, spec: RunSpec) -> dict:
    """Run one (method, lr, seed) from scratch and return its (finalised) record."""
    folder = run_dir(out, spec)
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished/failed/stale attempt of this same run
    folder.mkdir(parents=True)
    argv = fit_argv(cfg, spec, folder)
    spec_info = {"name": spec.name, "phase": spec.phase, "settings": settings(cfg, spec),
                 "argv": ["lightning-msvag", *argv], "launcher": cfg.launcher}
    write_json(folder / "record.json", {"status": "running", "spec": spec_info})
    log = folder / "log.txt"
    t0 = time.perf_counter()
    returncode: Optional[int] = None
    error: Optional[str] = None
    if cfg.launcher == "subprocess":
        cmd = [cfg.python or sys.executable, "-m", "lightning_msvag.cli", *argv]
        with open(log, "w", encoding="utf-8") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=folder, env=_child_env(cfg),
                                      timeout=cfg.run_timeout)
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                error = f"timed out after {cfg.run_timeout} s"
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
    rec = read_json(folder / "record.json") or {}
    status = rec.get("status")
    if status not in FINISHED or (returncode not in (0, None) and status != "diverged"):
        rec["status"] = "failed"
        rec["error"] = rec.get("error") or error or f"exit code {returncode}; log tail:\n{_tail(log)}"
    rec["spec"] = spec_info
    rec["returncode"] = returncode
    rec["process_wall_s"] = wall
    write_json(folder / "record.json", rec)
    return rec


def progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, or ``None`` (disabled, or no tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with pytorch_lightning
        tqdm = None
    if tqdm is None or not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)


def _search_concluded(cfg: BenchmarkConfig, out: Path, chain: Sequence[RunSpec], upto: int) -> Optional[str]:
    """With --patience: has the downward search of this chain already found its best step size?"""
    if cfg.patience <= 0:
        return None
    accs = []
    for spec in chain[:upto]:
        rec = load_record(cfg, out, spec)
        if rec and rec.get("status") == "done":
            acc = final_metric(rec, "test/accuracy")
            loss = final_metric(rec, "train/loss")
            accs.append(-loss if acc is None and loss is not None else acc)
    accs = [a for a in accs if a is not None]
    if not accs:
        return None
    best = int(np.argmax(accs))
    if len(accs) - 1 - best >= cfg.patience:
        return f"{cfg.patience} smaller stable step size(s) did not beat lr={format_lr(chain[best].lr)}"
    return None


def execute(cfg: BenchmarkConfig, out: Path, chains: List[List[RunSpec]], bar, label: str) -> Dict[str, int]:
    """Run chains of runs (each chain sequentially, chains in parallel with --jobs); skip finished runs."""
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": 0, "reused": 0}
    lock = threading.Lock()

    def run_chain(chain: List[RunSpec]) -> None:
        for k, spec in enumerate(chain):
            if is_finished(cfg, out, spec):
                with lock:
                    counts["reused"] += 1
                continue
            reason = _search_concluded(cfg, out, chain, k) if spec.phase == "search" else None
            if reason:
                folder = run_dir(out, spec)
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / "record.json", {"status": "skipped", "reason": reason,
                                                    "spec": {"name": spec.name, "phase": spec.phase,
                                                             "settings": settings(cfg, spec)}})
                status = "skipped"
            else:
                status = execute_run(cfg, out, spec).get("status", "failed")
            with lock:
                counts[status] = counts.get(status, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{label}: {spec.name} {status}", refresh=True)
                elif not cfg.quiet:
                    print(f"[{label}] {spec.name}: {status}", flush=True)

    if cfg.jobs <= 1 or len(chains) <= 1:
        for chain in chains:
            run_chain(chain)
    else:
        with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            for fut in as_completed([pool.submit(run_chain, c) for c in chains]):
                fut.result()
    return counts
