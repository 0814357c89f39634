"""The runner of ``reproduce benchmark``: the phases (plan, launch, collect, report) in order (see the package doc)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

from .._common import prepare_out, read_json, write_json
from .collect import collect
from .config import BenchmarkConfig, command_line
from .launch import Interrupted, execute, progress, stop_runs
from .plan import RunSpec, chains, is_finished, plan_replicate, plan_search, run_dir, select, settings
from .report import write_report

__all__ = ["run", "collect_and_report"]


def _list(cfg: BenchmarkConfig, out: Path, phase: str, runs: List[RunSpec], note: str = "") -> None:
    print(f"phase {phase}: {len(runs)} runs{note}")
    for k, spec in enumerate(runs):
        rec = read_json(run_dir(out, spec) / "record.json")
        stale = rec and rec.get("spec", {}).get("settings") != settings(cfg, spec)
        status = (rec.get("status") if rec else "pending") + (" (other settings: will rerun)" if stale else "")
        print(f"  [{k}] {spec.name:32s} {status}")
        print(f"      {command_line(cfg, ['--phase', phase, '--run-index', str(k)])}")


def collect_and_report(cfg: BenchmarkConfig, out: Path) -> Dict[str, Any]:
    """Collect the run records (``curves.csv``, ``results.json``), draw the report from them
    (``benchmark.png``, ``lr_sensitivity.png``, ``summary.md``); return the results dictionary."""
    collected = collect(cfg, out)
    write_report(cfg, collected, out)
    return collected.result


def run(args: "argparse.Namespace | BenchmarkConfig") -> Dict[str, Any]:
    """Entry point of ``reproduce benchmark`` (see the package doc).

    SIGTERM or Ctrl-C stops the runner and its run processes (each writes its checkpoint and is
    recorded as ``interrupted``; none is left behind), and the runner exits with 128 + the signal
    (143, 130); the same command continues the sweep. A run held by another live runner is
    refused in one line."""
    import signal
    import threading

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda number, frame: stop_runs(number))
    try:
        return _run(args)
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"benchmark: stopped by {name}: the runs in progress were stopped and recorded as interrupted; "
              "the same command continues the sweep", file=sys.stderr, flush=True)
        return {"exit_code": 128 + stop.signum}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: "argparse.Namespace | BenchmarkConfig") -> Dict[str, Any]:
    cfg = args if isinstance(args, BenchmarkConfig) else BenchmarkConfig.from_namespace(args)
    cfg.validate()
    out = prepare_out(cfg.out).resolve()  # runs execute in their own folders: absolute paths
    if cfg.list_runs:
        search = plan_search(cfg)
        if cfg.phase in ("all", "search"):
            _list(cfg, out, "search", search)
        if cfg.phase in ("all", "replicate"):
            replicate, choice = plan_replicate(cfg, out)
            pending = [m for m, c in choice.items() if not c["search_complete"]]
            _list(cfg, out, "replicate", replicate,
                  f" (search not complete for {', '.join(pending)}: list may change)" if pending else "")
        return {"exit_code": 0}
    if cfg.collect_only:
        result = collect_and_report(cfg, out)
        print(f"benchmark: collected {sum(v != 'missing' for v in result['runs'].values())} run records into {out}")
        return result

    write_json(out / "sweep.json", {"command": command_line(cfg, keep=("--jobs",)), "config": str(cfg.config),
                                    "methods": list(cfg.methods), "grids": cfg.grids(), "seeds": cfg.seeds,
                                    "max_steps": cfg.max_steps})
    counts: Dict[str, int] = {}

    def add(new: Dict[str, int]) -> None:
        for k, v in new.items():
            counts[k] = counts.get(k, 0) + v

    search = plan_search(cfg)
    selected_search = select(search, cfg) if cfg.phase == "search" else (search if cfg.phase == "all" else [])
    n_rep_planned = len(cfg.methods) * (cfg.num_seeds - 1)
    total = len(selected_search) + (n_rep_planned if cfg.phase == "all" else 0)
    bar = None
    if cfg.phase == "replicate":
        replicate, choice = plan_replicate(cfg, out)
        missing = [m for m, c in choice.items() if c["lr"] is None]
        if missing:
            print(f"benchmark: no finished search run for {', '.join(missing)}; nothing to replicate for them",
                  file=sys.stderr)
        partial = [m for m, c in choice.items() if c["lr"] is not None and not c["search_complete"]]
        if partial:
            print(f"benchmark: warning: the search is not complete for {', '.join(partial)}; replicating the best "
                  "step size found so far", file=sys.stderr)
        selected = select(replicate, cfg)
        done = sum(is_finished(cfg, out, s) for s in selected)
        bar = progress(len(selected), done, "benchmark runs", not cfg.no_progress)
        add(execute(cfg, out, chains([s for s in selected if not is_finished(cfg, out, s)], cfg), bar, "replicate"))
    else:
        done = sum(is_finished(cfg, out, s) for s in selected_search)
        bar = progress(total, done, "benchmark runs", not cfg.no_progress)
        todo = [s for s in selected_search if not is_finished(cfg, out, s)]
        # --patience needs the whole chain (finished runs included) to decide where to stop.
        add(execute(cfg, out, chains(selected_search if cfg.patience > 0 else todo, cfg), bar, "search"))
        if cfg.phase == "all":
            replicate, _ = plan_replicate(cfg, out)
            if bar is not None:
                bar.total = len(selected_search) + len(replicate)  # a method without a stable lr has none
                bar.update(sum(is_finished(cfg, out, s) for s in replicate))
            todo = [s for s in replicate if not is_finished(cfg, out, s)]
            add(execute(cfg, out, chains(todo, cfg), bar, "replicate"))
    if bar is not None:
        bar.close()
    failed = counts.get("failed", 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"benchmark: {summary or 'nothing to run'}" + (f" (see {out}/runs/*/*/*/record.json)" if failed else ""))
    result: Dict[str, Any] = {"counts": counts}
    if cfg.phase == "all" and cfg.run_index is None and not cfg.shard:
        result.update(collect_and_report(cfg, out))
        print(f"benchmark: wrote {out / 'summary.md'}, {out / 'benchmark.png'}, {out / 'lr_sensitivity.png'}, "
              f"{out / 'curves.csv'}")
    else:
        print("benchmark: run the other phases/shards, then --collect-only to build the summary")
    result["exit_code"] = 1 if failed else 0
    return result
