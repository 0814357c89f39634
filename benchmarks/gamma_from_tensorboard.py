"""The γ monitor's statistics of finished runs, read back from TensorBoard: a figure and a JSON summary.

For comparing runs that differ in one thing (here: M-SVAG's two variance estimates on the same
model and data), from their TensorBoard folders::

    python benchmarks/gamma_from_tensorboard.py --run "moving average=LOGS/version_ma" \\
        --run "mini-batch=LOGS/version_mb" --out docs/results/transformer

writes ``gamma.png`` (mean γ over all parameters against the step, and the smoothed training
loss) and ``gamma.json`` (per run: the logged steps and values, the mean of mean γ over the run
and over its second half, the last training loss averaged over the last 50 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(folder: Path) -> dict:
    """``{tag: [(step, value), ...]}`` over every event file below ``folder``, sorted by step."""
    found: dict = {}
    for event_file in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in found.items()}


def summarise(folder: Path) -> dict:
    tags = scalars(folder)
    gamma = tags.get("gamma/all/mean")
    loss = tags.get("train/loss")
    if not gamma or not loss:
        raise SystemExit(f"{folder}: no gamma/all/mean or train/loss scalars (was the γ monitor on?)")
    values = [v for _, v in gamma]
    second_half = [v for s, v in gamma if s >= gamma[-1][0] / 2]
    return {
        "gamma_steps": [s for s, _ in gamma],
        "gamma_mean": values,
        "gamma_mean_over_run": statistics.fmean(values),
        "gamma_mean_second_half": statistics.fmean(second_half),
        "loss_steps": [s for s, _ in loss],
        "train_loss": [v for _, v in loss],
        "final_train_loss_last_50": statistics.fmean(v for _, v in loss[-50:]),
    }


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, run in runs.items():
        left.plot(run["gamma_steps"], run["gamma_mean"], marker="o", markersize=3, label=label)
        window = 25
        smoothed = [statistics.fmean(run["train_loss"][max(0, i - window + 1) : i + 1]) for i in range(len(run["train_loss"]))]
        right.plot(run["loss_steps"], smoothed, label=label)
    left.set(xlabel="optimizer step", ylabel="mean γ (all parameters)", ylim=(0, 1.02), title="variance adaptation factor")
    right.set(xlabel="optimizer step", ylabel="training loss (25-step mean)", title="training loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a run's label and its TensorBoard folder (repeat)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gamma.png and gamma.json")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {item!r}: expected LABEL=FOLDER")
        runs[label] = summarise(Path(folder))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gamma.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    plot(runs, args.out / "gamma.png")
    for label, run in runs.items():
        print(f"{label}: mean γ over the run {run['gamma_mean_over_run']:.3f} (second half {run['gamma_mean_second_half']:.3f}), "
              f"training loss (last 50 steps) {run['final_train_loss_last_50']:.3f}")


if __name__ == "__main__":
    main()
