"""Launch: run planned runs (one process each, or in this process), skip finished ones, record failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...errors import UserError
from .._common import read_json, write_json
from .config import BenchmarkConfig, format_lr
from .plan import FINISHED, RunSpec, final_metric, fit_argv, is_finished, load_record, run_dir, settings

__all__ = ["execute_run", "execute", "progress", "RunBusy", "Interrupted", "stop_runs"]


class RunBusy(UserError):
    """Another live process holds a run of this sweep (a second runner on the same runs)."""


class Interrupted(Exception):
    """The runner was asked to stop (SIGTERM, Ctrl-C): its runs were stopped and recorded."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: The run processes alive now, and whether the runner has been asked to stop.
_children: "set[subprocess.Popen]" = set()
_children_lock = threading.Lock()
_stopping: List[int] = []


def stop_runs(signum: int, grace: float = 30.0) -> None:
    """Stop the runner (safe in a signal handler: it neither waits nor takes a lock a waiting
    thread may hold): no new run starts, every run process gets SIGTERM (it writes its checkpoint
    and exits), and SIGKILL after ``grace`` seconds; the runs are recorded as ``interrupted``."""
    if not _stopping:
        _stopping.append(signum)
    children = list(_children)
    for child in children:
        child.send_signal(signal.SIGTERM)

    def kill_the_rest() -> None:
        time.sleep(grace)
        for child in children:
            if child.returncode is None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    threading.Thread(target=kill_the_rest, daemon=True).start()


def _lock_run(folder: Path):
    """An exclusive lock on the run (a file beside its folder, held while it runs): a second runner
    of the same runs is refused in one line; the lock goes with the process that holds it."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    handle = open(folder.parent / f".{folder.name}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunBusy(f"{folder} is being run by {holder}: a second runner on the same runs is refused; "
                      "wait for it, or stop it and run the same command again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle

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
    lock = _lock_run(folder)
    try:
        return _execute_locked(cfg, folder, spec, lock.fileno())
    finally:
        lock.close()


def _execute_locked(cfg: BenchmarkConfig, folder: Path, spec: RunSpec, lock_fd: int) -> dict:
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
            # the run holds its lock too (the inherited descriptor): a run whose runner was killed
            # outright keeps it while it lives, and no second runner starts it beside it
            child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=folder, env=_child_env(cfg),
                                     pass_fds=(lock_fd,))
            with _children_lock:
                _children.add(child)
            try:
                returncode = child.wait(timeout=cfg.run_timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                error = f"timed out after {cfg.run_timeout} s"
            finally:
                with _children_lock:
                    _children.discard(child)
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
    if _stopping and status not in FINISHED:
        rec["status"] = "interrupted"
        rec["error"] = f"stopped by {signal.Signals(_stopping[0]).name} to the runner (exit code {returncode})"
    elif status not in FINISHED or (returncode not in (0, None) and status != "diverged"):
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
            if _stopping:
                return
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
    if _stopping:
        raise Interrupted(_stopping[0])
    return counts
