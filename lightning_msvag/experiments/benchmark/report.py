"""Report: benchmark.png, lr_sensitivity.png and summary.md (with the claims table), drawn from
what :func:`.collect.collect` computed.

``python -m lightning_msvag.experiments.benchmark.report RESULTS_JSON`` rebuilds ``summary.md`` and
the claims of ``results.json`` from a ``results.json`` alone (no run records needed), e.g. for
results made before the claims table existed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .._common import read_json, write_json
from ..plotting import band, method_color, method_label, method_style, new_figure, save_figure
from .claims import evaluate_claims, paper_budget
from .collect import Collection, eval_matrix, smoothed_train, smoothing_window
from .config import BenchmarkConfig, format_lr

__all__ = ["write_report", "plot_curves", "plot_sensitivity", "summary_md", "claims_md", "rewrite_summary", "main"]


def _fmt(mean: Optional[float], std: Optional[float] = None, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(cfg: BenchmarkConfig, collected: Collection, out: Path) -> None:
    """Write ``benchmark.png``, ``lr_sensitivity.png`` and ``summary.md`` into ``out``."""
    plot_curves(cfg, collected.records, collected.choice, out / "benchmark.png")
    plot_sensitivity(cfg, collected.result["methods"], out / "lr_sensitivity.png")
    (out / "summary.md").write_text(summary_md(collected.result), encoding="utf-8")


def plot_curves(cfg: BenchmarkConfig, records, choice, path) -> None:
    """benchmark.png: the chosen step sizes' curves, mean ± 1 std over seeds."""
    fig, axes = new_figure(1, 3, width=5.0, height=4.0)
    ax_mb, ax_loss, ax_acc = axes[0, 0], axes[0, 1], axes[0, 2]
    window = 1
    for method in cfg.methods:
        lr = choice[method]["lr"]
        if lr is None:
            continue
        recs = [r for s, r in records.items() if s.method == method and s.lr == lr and r and r.get("status") == "done"]
        if not recs:
            continue
        label = f"{method_label(method)} (α={format_lr(lr)}, {len(recs)} seed{'s' if len(recs) > 1 else ''})"
        for ax, (steps, vals) in ((ax_mb, smoothed_train(recs)), (ax_loss, eval_matrix(recs, 1)),
                                  (ax_acc, eval_matrix(recs, 4))):
            if vals.size:
                band(ax, steps, vals.mean(0), vals.std(0) if len(recs) > 1 else None, method=method, label=label)
        window = smoothing_window(recs)
    ax_mb.set_ylabel("mini-batch training loss")
    ax_mb.set_title("Training loss (mini-batches" + (f", {window}-step average)" if window > 1 else ")"))
    evals = f"{cfg.limit_val_batches:g} batches" if cfg.limit_val_batches is not None else "full split"
    ax_loss.set_ylabel(f"training loss (train-eval split, {evals})")
    ax_loss.set_title("Training loss (evaluated)")
    ax_acc.set_ylabel(f"test accuracy ({evals})")
    ax_acc.set_title("Test accuracy")
    for ax in (ax_mb, ax_loss, ax_acc):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8)
    fig.suptitle(f"{cfg.problem}: best step size per method, mean ± 1 std over seeds "
                 f"({cfg.max_steps} steps per run)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_figure(fig, path)


def plot_sensitivity(cfg: BenchmarkConfig, methods, path) -> None:
    """lr_sensitivity.png: final test accuracy and training loss of every search run."""
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
    seed = cfg.seeds[0]
    fig.suptitle(f"{cfg.problem}: step-size search (seed {seed}, {cfg.max_steps} steps)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_figure(fig, path)


def summary_md(result: Mapping[str, Any]) -> str:
    """summary.md from the results.json dictionary alone."""
    s = result["settings"]
    reference = method_label(result.get("step_time_reference", "m-sgd"))
    lines = [
        f"# Benchmark summary: `{result['problem']}`",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- {s['max_steps']} training steps per run; evaluation every {s['val_check_interval'] or 'epoch'} steps"
        + (f" on {s['limit_val_batches']:g} batches per split" if s["limit_val_batches"] is not None else " on the full splits")
        + _budget_text(result),
        f"- seeds {', '.join(map(str, s['seeds']))}; step-size search with seed {s['seeds'][0]}, "
        f"chosen step size = best final test accuracy",
        "- final train loss: the evaluated training loss (train-eval split) at the last step, "
        "mean ± std over seeds (std with ddof = 0)",
        "- time/step: median wall time of a training step (forward, backward, optimizer step) "
        f"averaged over the method's runs, relative to {reference}",
        "",
        f"| method | chosen lr | largest stable lr | final train loss | final test accuracy | seeds | time/step vs {reference} |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, info in result["methods"].items():
        tl, ta = info["final_train_loss"], info["final_test_accuracy"]
        rel = info.get("step_time_rel", info.get("step_time_rel_m_sgd"))  # results.json before 0.2: M-SGD only
        lines.append(
            f"| {method_label(method)} | {format_lr(info['chosen_lr']) if info['chosen_lr'] is not None else 'none'} "
            f"| {format_lr(info['largest_stable_lr']) if info['largest_stable_lr'] is not None else 'none'} "
            f"| {_fmt(tl['mean'], tl['std'])} | {_fmt(ta['mean'], ta['std'])} | {ta['n']} "
            f"| {f'{rel:.2f}' if rel else 'n/a'} |"
        )
    lines += claims_md(result)
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




def _epochs(epochs: float) -> str:
    return f"{epochs:.2g} epoch" + ("" if f"{epochs:.2g}" == "1" else "s")


def _budget_text(result: Mapping[str, Any]) -> str:
    b = result.get("budget") or paper_budget(result)
    if "paper_steps" not in b:
        return ""
    return (f" ({_epochs(b['epochs'])}; the paper: {b['paper_epochs']} epochs = "
            f"{b['paper_steps']:,} steps, {b['paper_seeds']} seeds)")


_VERDICT_MARK = {"holds": "**holds**", "holds within noise": "**holds** (within noise)", "partly": "partly",
                 "does not hold": "**does not hold**", "n/a": "n/a"}


def _measured(row: Mapping[str, Any]) -> str:
    digits = 3 if row["metric"] == "test_accuracy" else 3

    def one(m):
        v = row["values"][m]
        return f"{method_label(m)} {_fmt(v['mean'], v['std'], digits)}"

    a, b = row["groups"]
    if row["kind"] == "similar" and row.get("margin") is not None:
        # the margin is −|A − B|: say by how much and which one is better
        va, vb = row["values"][a[0]]["mean"], row["values"][b[0]]["mean"]
        better = a[0] if (va < vb) == (row["metric"] == "train_loss") else b[0]
        ahead = f", {method_label(better)} better" if va != vb else ""
        return f"{one(a[0])} vs {one(b[0])}; means {abs(va - vb):.4f} apart{ahead} (noise {row['noise']:.4f})"
    if row["kind"] in ("at_least", "similar"):  # one method against one
        text = f"{one(a[0])} vs {one(b[0])}"
        if row.get("margin") is not None:
            text += f"; difference {row['margin']:+.4f}" + (f" (noise {row['noise']:.4f})" if row.get("noise") is not None else "")
        return text
    text = ", ".join(one(m) for m in a) + " | " + ", ".join(one(m) for m in b)
    if row.get("margin") is not None:
        label = {"cluster": "gap − spread", "group_ahead": "margin"}[row["kind"]]
        text += f"; {label} {row['margin']:+.4f}"
    return text


def _track_text(o: Mapping[str, Any], src: str) -> str:
    span = f"steps {o['first_step']}–{o['last_step']}"
    if not o["changes_at"]:
        return f"{src}: {'held at every point' if o['held_at_end'] else 'held at no point'} ({span})" + _trend(o)
    changes = o["changes_at"]
    listed = ", ".join(str(c) for c in changes[-3:]) + (f" and {len(changes) - 3} earlier" if len(changes) > 3 else "")
    text = f"{src}: {'holds' if o['held_at_end'] else 'fails'} since step {o['since_step']} (changed at {listed}; {span})"
    return text + _trend(o)


def _trend(o: Mapping[str, Any]) -> str:
    if o["held_at_end"]:
        return ""
    text = (f"; margin {o['margin_first']:+.4f} (step {o['first_step']}) → {o['margin_mid']:+.4f} (step {o['mid_step']}) "
            f"→ {o['margin_end']:+.4f} (step {o['last_step']})")
    if o.get("extrapolated_change"):
        text += f", closing: a straight line through the last two points reaches 0 at step ≈ {o['extrapolated_change']:,}"
    elif "extrapolated_change" in o:
        text += ", not closing at the end"
    return text


def _over_run_text(row: Mapping[str, Any]) -> str:
    o = row.get("over_run") or {}
    if not o.get("available"):
        return "n/a (no curves in results.json)" if row.get("verdict") != "n/a" else ""
    parts = []
    if o.get("eval"):
        parts.append(_track_text(o["eval"], "evaluations"))
    if o.get("mini_batch"):
        parts.append(_track_text(o["mini_batch"], "mini-batch loss (smoothed)"))
    return "; ".join(parts)


def claims_md(result: Mapping[str, Any]) -> List[str]:
    """The claims table (paper §6.2 observations vs this run) as markdown lines."""
    rows = result.get("claims")
    if rows is None:
        rows = evaluate_claims(result)
    if not rows:
        return []
    b = result.get("budget") or paper_budget(result)
    lines = ["", "## The paper's observations (§6.2) at this budget", ""]
    if "paper_steps" in b:
        lines.append(
            f"Budget: {b['steps']:,} steps per run ({_epochs(b['epochs'])}, {b['fraction_of_paper']:.2%} of the "
            f"paper's {b['paper_epochs']} epochs = {b['paper_steps']:,} steps), {b['seeds']} seeds (paper: "
            f"{b['paper_seeds']}); step sizes tuned for this budget. Values: mean ± std over seeds at each "
            "method's chosen step size; training loss = final evaluated training loss (lower is better).")
    else:
        lines.append(f"Budget: {b.get('steps')} steps per run, {b.get('seeds')} seeds.")
    lines += ["Rules: `lightning_msvag/experiments/benchmark/claims.py` (cluster: the groups' ranges do not "
              "interleave and the gap between them exceeds each group's spread; group ahead: every method of one "
              "group better than every method of the other, *partly* if only the group means are; at least as "
              "good: better or equal, or worse by at most √(std₁² + std₂²)).", "",
              "| observation (paper §6.2) | metric | measured | at this budget | over the run (mean curves; strict order, similar rows within noise) |",
              "|---|---|---|---|---|"]
    for row in rows:
        metric = "training loss" if row["metric"] == "train_loss" else "test accuracy"
        measured = _measured(row) if row.get("verdict") != "n/a" else row.get("note", "")
        lines.append(f"| {row['claim']} | {metric} | {measured.replace('|', '/')} "
                     f"| {_VERDICT_MARK.get(row['verdict'], row['verdict'])} | {_over_run_text(row)} |")
    not_holding = [r for r in rows if r.get("verdict") in ("does not hold", "partly")]
    if not_holding and "paper_steps" in b:
        lines += ["", f"Where an observation does not (fully) hold here: the paper ran {b['paper_epochs']} epochs "
                  f"({b['paper_steps']:,} steps, {1 / b['fraction_of_paper']:.0f}× this budget) with {b['paper_seeds']} "
                  "seeds; the 'over the run' column says whether and where the order changed within this run."]
    return lines


def rewrite_summary(results_path: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    """Recompute budget and claims of a ``results.json`` and rewrite it and ``summary.md`` beside it."""
    result = read_json(results_path)
    if not result:
        raise FileNotFoundError(f"no readable results.json at {results_path}")
    result["budget"] = paper_budget(result)
    result["claims"] = evaluate_claims(result)
    folder = Path(out) if out else Path(results_path).parent
    write_json(folder / "results.json", result)
    (folder / "summary.md").write_text(summary_md(result), encoding="utf-8")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_msvag.experiments.benchmark.report",
                                description="Rebuild summary.md (with the claims table) from a benchmark's results.json.")
    p.add_argument("results", type=Path, help="results.json of a 'reproduce benchmark' run")
    p.add_argument("--out", type=Path, help="write results.json and summary.md here (default: beside RESULTS)")
    args = p.parse_args(argv)
    result = rewrite_summary(args.results, args.out)
    for row in result["claims"]:
        print(f"{row['verdict']:>20}  {row['claim']} [{row['metric']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
