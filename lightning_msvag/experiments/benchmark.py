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

**Claims table.** ``summary.md`` and ``results.json`` (``claims``) check the paper's §6.2
observations that apply to the problem (sign-based vs non-sign clusters, the problem's own
finding, variance adaptation vs its base) against the measured mean ± std over seeds, with this
run's budget next to the paper's and, from the mean curves, where along the run the order changed
(rules: :mod:`~lightning_msvag.experiments.benchmark_claims`).

**Code layout** (modules beside this one): ``benchmark_config`` (the frozen
:class:`BenchmarkConfig` and the CLI options), ``methods`` (method names, optimizer classes,
default grids, sign-based groups), ``benchmark_plan`` (runs, folders, ``fit`` command lines),
``benchmark_launch`` (running them), ``benchmark_collect`` (records -> ``curves.csv``,
``results.json``), ``benchmark_report`` (figures, ``summary.md``), ``benchmark_claims``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

from ._common import prepare_out, read_json, write_json
from .benchmark_claims import evaluate_claims, paper_budget
from .benchmark_collect import collect
from .benchmark_config import BenchmarkConfig, add_arguments
from .benchmark_config import command_line as _command_line
from .benchmark_launch import execute, execute_run, progress
from .methods import DEFAULT_GRIDS, DEFAULT_METHODS, METHOD_CLASSES, NON_SIGN, SIGN_BASED
from .benchmark_plan import (
    FINISHED, RunSpec, choose_lr, fit_argv, format_lr, is_finished, parse_grid, plan_replicate, plan_search, run_dir,
    settings,
)
from .benchmark_plan import chains as _chains
from .benchmark_plan import select as _select

__all__ = [
    "METHOD_CLASSES", "DEFAULT_GRIDS", "DEFAULT_METHODS", "SIGN_BASED", "NON_SIGN", "BenchmarkConfig", "RunSpec",
    "parse_grid", "plan_search", "plan_replicate", "choose_lr", "fit_argv", "collect", "evaluate_claims",
    "paper_budget", "add_arguments", "run", "execute_run", "FINISHED", "format_lr",
]


def _list(cfg: BenchmarkConfig, out: Path, phase: str, runs: List[RunSpec], note: str = "") -> None:
    print(f"phase {phase}: {len(runs)} runs{note}")
    for k, spec in enumerate(runs):
        rec = read_json(run_dir(out, spec) / "record.json")
        stale = rec and rec.get("spec", {}).get("settings") != settings(cfg, spec)
        status = (rec.get("status") if rec else "pending") + (" (other settings: will rerun)" if stale else "")
        print(f"  [{k}] {spec.name:32s} {status}")
        print(f"      {_command_line(cfg, ['--phase', phase, '--run-index', str(k)])}")


def run(args: "argparse.Namespace | BenchmarkConfig") -> Dict[str, Any]:
    """Entry point of ``reproduce benchmark`` (see the module doc)."""
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
        result = collect(cfg, out)
        print(f"benchmark: collected {sum(v != 'missing' for v in result['runs'].values())} run records into {out}")
        return result

    write_json(out / "sweep.json", {"command": _command_line(cfg, keep=("--jobs",)), "config": str(cfg.config),
                                    "methods": list(cfg.methods), "grids": cfg.grids(), "seeds": cfg.seeds,
                                    "max_steps": cfg.max_steps})
    counts: Dict[str, int] = {}

    def add(new: Dict[str, int]) -> None:
        for k, v in new.items():
            counts[k] = counts.get(k, 0) + v

    search = plan_search(cfg)
    selected_search = _select(search, cfg) if cfg.phase == "search" else (search if cfg.phase == "all" else [])
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
        selected = _select(replicate, cfg)
        done = sum(is_finished(cfg, out, s) for s in selected)
        bar = progress(len(selected), done, "benchmark runs", not cfg.no_progress)
        add(execute(cfg, out, _chains([s for s in selected if not is_finished(cfg, out, s)], cfg), bar, "replicate"))
    else:
        done = sum(is_finished(cfg, out, s) for s in selected_search)
        bar = progress(total, done, "benchmark runs", not cfg.no_progress)
        todo = [s for s in selected_search if not is_finished(cfg, out, s)]
        # --patience needs the whole chain (finished runs included) to decide where to stop.
        add(execute(cfg, out, _chains(selected_search if cfg.patience > 0 else todo, cfg), bar, "search"))
        if cfg.phase == "all":
            replicate, _ = plan_replicate(cfg, out)
            if bar is not None:
                bar.total = len(selected_search) + len(replicate)  # a method without a stable lr has none
                bar.update(sum(is_finished(cfg, out, s) for s in replicate))
            todo = [s for s in replicate if not is_finished(cfg, out, s)]
            add(execute(cfg, out, _chains(todo, cfg), bar, "replicate"))
    if bar is not None:
        bar.close()
    failed = counts.get("failed", 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"benchmark: {summary or 'nothing to run'}" + (f" (see {out}/runs/*/*/*/record.json)" if failed else ""))
    result: Dict[str, Any] = {"counts": counts}
    if cfg.phase == "all" and cfg.run_index is None and not cfg.shard:
        result.update(collect(cfg, out))
        print(f"benchmark: wrote {out / 'summary.md'}, {out / 'benchmark.png'}, {out / 'lr_sensitivity.png'}, "
              f"{out / 'curves.csv'}")
    else:
        print("benchmark: run the other phases/shards, then --collect-only to build the summary")
    result["exit_code"] = 1 if failed else 0
    return result
