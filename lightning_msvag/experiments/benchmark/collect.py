"""Collect: turn the run records into ``curves.csv`` and ``results.json`` (the numbers; :mod:`.report` draws them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .._common import write_csv, write_json
from .claims import evaluate_claims, paper_budget
from .config import BenchmarkConfig, command_line
from .plan import RunSpec, final_metric, load_record, plan_replicate, plan_search

__all__ = ["Collection", "collect", "curve_rows", "eval_matrix", "smoothed_train", "smoothing_window", "MAX_CURVE_POINTS"]

#: results.json keeps at most this many points of each method's smoothed training-loss curve.
MAX_CURVE_POINTS = 400


def curve_rows(spec: RunSpec, rec: dict) -> List[tuple]:
    rows = []
    for step, loss, acc in rec.get("train") or []:
        rows.append((spec.method, spec.lr, spec.seed, step, "train", loss, acc))
    for step, tel, tea, tl, ta in rec.get("eval") or []:
        rows.append((spec.method, spec.lr, spec.seed, step, "train_eval", tel, tea))
        rows.append((spec.method, spec.lr, spec.seed, step, "test", tl, ta))
    return rows


def eval_matrix(recs: List[dict], col: int) -> Tuple[np.ndarray, np.ndarray]:
    """Steps common to all records and the values of eval column ``col`` there, ``[runs, steps]``."""
    series = []
    for rec in recs:
        series.append({int(row[0]): row[col] for row in rec.get("eval") or [] if row[col] is not None})
    if not series:
        return np.array([]), np.empty((0, 0))
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series], dtype=float)


def smoothing_window(recs: List[dict]) -> int:
    """Moving-average window for mini-batch losses: ~5 % of the recorded steps."""
    n = min((len(rec.get("train") or []) for rec in recs), default=0)
    return max(1, n // 20)


def smoothed_train(recs: List[dict]) -> Tuple[np.ndarray, np.ndarray]:
    """Training loss per step, moving average over ~5 % of the run, steps common to all records."""
    series = [{int(r[0]): r[1] for r in rec.get("train") or [] if r[1] is not None} for rec in recs]
    if not series:
        return np.array([]), np.empty((0, 0))
    steps = sorted(set.intersection(*(set(s) for s in series)))
    vals = np.array([[s[t] for t in steps] for s in series], dtype=float)
    w = smoothing_window(recs)
    if w > 1 and vals.shape[1] >= w:
        kernel = np.ones(w) / w
        vals = np.array([np.convolve(v, kernel, mode="valid") for v in vals])
        steps = steps[w - 1:]
    return np.array(steps), vals


def _mean_std(vals: np.ndarray) -> Dict[str, List[float]]:
    return {"mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}


def _curves(recs: List[dict]) -> Optional[Dict[str, Any]]:
    """Mean ± std over seeds of the chosen step size's curves (what benchmark.png shows)."""
    if not recs:
        return None
    curves: Dict[str, Any] = {"n": len(recs)}
    steps, loss = eval_matrix(recs, 1)
    if steps.size and loss.size:
        curves["eval"] = {"step": steps.tolist(), "train_eval_loss": _mean_std(loss)}
        for name, col in (("test_loss", 3), ("test_accuracy", 4)):
            s, v = eval_matrix(recs, col)
            if s.size and v.size and list(s) == list(steps):
                curves["eval"][name] = _mean_std(v)
    steps, vals = smoothed_train(recs)
    if steps.size and vals.size:
        keep = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), MAX_CURVE_POINTS)).round().astype(int))
        curves["train_smoothed"] = {"window": smoothing_window(recs), "step": steps[keep].tolist(),
                                    "loss": {"mean": vals.mean(0)[keep].tolist(), "std": vals.std(0)[keep].tolist()}}
    return curves


@dataclass(frozen=True)
class Collection:
    """What :func:`collect` found: the ``results.json`` dictionary and the records it came from."""

    result: Dict[str, Any]
    records: Dict[RunSpec, Optional[dict]]  # every planned run -> its record (None: missing or stale)
    choice: Dict[str, Any]  # method -> chosen step size, criterion, search_complete


def collect(cfg: BenchmarkConfig, out: Path) -> Collection:
    """Read the run records; write ``curves.csv`` and ``results.json`` (with the claims table's verdicts)."""
    seeds = cfg.seeds
    search = plan_search(cfg)
    replicate, choice = plan_replicate(cfg, out)
    records: Dict[RunSpec, Optional[dict]] = {}
    for spec in search + replicate:
        records[spec] = load_record(cfg, out, spec)

    rows: List[tuple] = []
    for spec, rec in records.items():
        if rec:
            rows.extend(curve_rows(spec, rec))
    write_csv(out / "curves.csv", ["method", "lr", "seed", "step", "split", "loss", "accuracy"], rows)

    # Per-method statistics at the chosen step size.
    methods: Dict[str, Any] = {}
    step_time: Dict[str, Optional[float]] = {}
    for method in cfg.methods:
        times = [float(r["step_time_s"]["median"]) for s, r in records.items()
                 if s.method == method and r and r.get("status") == "done"
                 and (r.get("step_time_s") or {}).get("median") is not None]
        step_time[method] = float(np.mean(times)) if times else None
    # Step times relative to M-SGD (the paper's base method); without it, to the first method.
    reference = "m-sgd" if "m-sgd" in cfg.methods else cfg.methods[0]
    ref = step_time.get(reference)
    for method in cfg.methods:
        lr = choice[method]["lr"]
        search_rows = []
        for spec in (s for s in search if s.method == method):
            rec = records.get(spec)
            status = rec.get("status") if rec else "missing"
            search_rows.append({
                "lr": spec.lr, "status": status,
                "test_accuracy": final_metric(rec, "test/accuracy"), "test_loss": final_metric(rec, "test/loss"),
                "train_loss": final_metric(rec, "train_eval/loss") if final_metric(rec, "train_eval/loss") is not None
                else final_metric(rec, "train/loss"),
                "detail": (rec or {}).get("diverged_at") or (rec or {}).get("error") or (rec or {}).get("reason"),
            })
        stable = [r["lr"] for r in search_rows if r["status"] == "done"]
        chosen = [(s, r) for s, r in records.items() if s.method == method and lr is not None and s.lr == lr]
        done = [(s, r) for s, r in chosen if r and r.get("status") == "done"]
        final_recs = [r for _, r in done]
        unfinished = [s.name + f" ({r.get('status') if r else 'missing'})" for s, r in chosen
                      if not (r and r.get("status") == "done")]

        def stat(key):
            vals = [final_metric(r, key) for r in final_recs]
            vals = [v for v in vals if v is not None]
            return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else (None, None, 0)

        train_key = "train_eval/loss" if any(final_metric(r, "train_eval/loss") is not None for r in final_recs) \
            else "train/loss"
        tl, tl_sd, n_tl = stat(train_key)
        ta, ta_sd, n_ta = stat("test/accuracy")
        methods[method] = {
            "chosen_lr": lr,
            "criterion": choice[method]["criterion"],
            "search_complete": choice[method]["search_complete"],
            "largest_stable_lr": max(stable) if stable else None,
            "final_train_loss": {"mean": tl, "std": tl_sd, "n": n_tl, "key": train_key},
            "final_test_accuracy": {"mean": ta, "std": ta_sd, "n": n_ta},
            "seeds_done": sorted(s.seed for s, _ in done),
            "seeds_not_done": unfinished,
            "step_time_s": step_time[method],
            "step_time_rel": (step_time[method] / ref) if (ref and step_time[method]) else None,
            "step_time_rel_m_sgd": (step_time[method] / ref) if (ref and step_time[method] and reference == "m-sgd") else None,
            "search": search_rows,
            "final_per_seed": [{"seed": s.seed, "train_loss": final_metric(r, train_key),
                                "test_loss": final_metric(r, "test/loss"),
                                "test_accuracy": final_metric(r, "test/accuracy")}
                               for s, r in sorted(done, key=lambda sr: sr[0].seed)],
            "curves": _curves(final_recs),
        }

    result: Dict[str, Any] = {
        "experiment": "benchmark",
        "problem": cfg.problem,
        "config": str(cfg.config),
        "settings": {
            "methods": list(cfg.methods), "grids": {m: v for m, v in cfg.grids().items()}, "seeds": seeds,
            "max_steps": cfg.max_steps, "val_check_interval": cfg.val_interval,
            "limit_val_batches": cfg.limit_val_batches, "fit_args": list(cfg.fit_arg or []),
            "patience": cfg.patience, "diverge_factor": cfg.diverge_factor,
        },
        "command": command_line(cfg, keep=("--jobs",)),
        "methods": methods,
        "step_time_reference": reference,
        "runs": {s.name: (r.get("status") if r else "missing") for s, r in records.items()},
    }
    result["budget"] = paper_budget(result)
    result["claims"] = evaluate_claims(result)
    write_json(out / "results.json", result)
    return Collection(result, records, choice)
