"""The paper's §6.2 observations, checked against a benchmark's results (the claims table).

:func:`evaluate_claims` reads only the ``results.json`` dictionary (final metrics as mean ± std
over seeds, and, where present, the mean curves of the chosen step sizes), so a claims table can
be rebuilt from an old ``results.json`` without the run records.

Verdict rules (``metric`` is the final evaluated training loss, lower is better, or the final test
accuracy, higher is better; values are the means over seeds; "noise" is √(std_a² + std_b²)):

- *cluster*: the sign-based methods and the non-sign ones occupy separate ranges. **holds**: the two
  groups do not interleave and the gap between them is larger than the spread inside each group;
  **partly**: they do not interleave but a group's spread is at least the gap; **does not hold**:
  they interleave.
- *group ahead* (group A ahead of group B): **holds**: every method of A is better than every method
  of B; **partly**: A's mean is better than B's but the groups overlap; **does not hold** otherwise.
- *at least as good* (method A vs its base B): **holds** when A is better or equal; **holds within
  noise** when A is worse by at most the noise; **does not hold** when A is worse by more.
- *similar* (method A ≈ method B; docs/algorithm.md §1.1, §1.2): **holds within noise** when
  |A − B| is at most the noise; **does not hold** otherwise. These rows are optional: they appear
  only when the benchmark ran both methods (``--methods ... m-ssd-va adam``).

Over the run: the same rule's margin is computed on the mean curves (training loss: the mini-batch
loss, smoothed as in benchmark.png; test accuracy: the evaluations) and the table says since which
step the final order holds, or at which step(s) it changed. The order is strict (no noise allowance),
except for *similar*, which holds at a step when |A − B| is at most that step's noise (the seeds'
std of the two curves there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..plotting import method_label
from .methods import NON_SIGN, SIGN_BASED, VARIANCE_ADAPTED_OF

__all__ = ["Claim", "PAPER_PROBLEMS", "PAPER_SEEDS", "claims_for", "evaluate_claims", "paper_budget", "margin"]

#: DeepOBS budgets of the paper's problems (docs/problems.md): training steps per epoch at batch
#: size 128 (last incomplete batch dropped) and epochs.
PAPER_PROBLEMS: Dict[str, Dict[str, Any]] = {
    "fmnist_2c2d": {"label": "P1", "epochs": 100, "steps_per_epoch": 468},   # 60,000 / 128
    "cifar10_3c3d": {"label": "P2", "epochs": 100, "steps_per_epoch": 390},  # 50,000 / 128
    "cifar100_wrn404": {"label": "P3", "epochs": 200, "steps_per_epoch": 390},
    "tolstoi_char_rnn": {"label": "P4", "epochs": 200, "steps_per_epoch": 1045},  # 200 epochs ≈ 209,000 steps
}
#: DeepOBS seeds 42-51.
PAPER_SEEDS = 10

METRICS = {
    "train_loss": ("final_train_loss", "final training loss", -1.0, "train_smoothed"),
    "test_accuracy": ("final_test_accuracy", "final test accuracy", +1.0, "test_accuracy"),
}
VERDICTS = ("holds", "holds within noise", "partly", "does not hold", "n/a")


@dataclass(frozen=True)
class Claim:
    """One observation of the paper: ``kind`` in cluster / group_ahead / at_least (/ similar)."""

    key: str
    text: str
    kind: str
    metric: str
    a: Tuple[str, ...]
    b: Tuple[str, ...]
    #: left out of the table (not "n/a") when a method was not run: claims about methods outside
    #: the paper's default comparison
    optional: bool = False


_SIGN, _NONSIGN = tuple(SIGN_BASED), tuple(NON_SIGN)
_GENERAL = [
    Claim("cluster-loss", "The methods cluster into sign-based (M-SSD, Adam) and non-sign (M-SGD, M-SVAG)",
          "cluster", "train_loss", _SIGN, _NONSIGN),
    Claim("cluster-acc", "The methods cluster into sign-based (M-SSD, Adam) and non-sign (M-SGD, M-SVAG)",
          "cluster", "test_accuracy", _SIGN, _NONSIGN),
]
_VARIANCE = [
    Claim(f"va-{a}-{m}", f"Variance adaptation at least as good as its base: {method_label(a)} vs {method_label(b)}",
          "at_least", m, (a,), (b,))
    for a, b in VARIANCE_ADAPTED_OF.items() for m in ("train_loss", "test_accuracy")
]
_PROBLEM_CLAIMS: Dict[str, List[Claim]] = {
    "fmnist_2c2d": [
        Claim("p1-sign-loss", "On P1 the sign-based methods are ahead in training loss",
              "group_ahead", "train_loss", _SIGN, _NONSIGN),
        # (no P1 test-accuracy row: the paper's §6.2 test-set observation is about P3, see below)
    ],
    "tolstoi_char_rnn": [
        Claim("p4-nonsign-loss", "On P4 the non-sign methods are better (training loss)",
              "group_ahead", "train_loss", _NONSIGN, _SIGN),
        Claim("p4-nonsign-acc", "On P4 the non-sign methods are better (test accuracy)",
              "group_ahead", "test_accuracy", _NONSIGN, _SIGN),
    ],
    "cifar100_wrn404": [
        Claim("p3-sign-loss", "On P3 Adam and M-SSD reach a lower training loss than M-SVAG",
              "group_ahead", "train_loss", _SIGN, ("m-svag",)),
        Claim("p3-sign-acc", "On P3 Adam and M-SSD reach a worse test accuracy than M-SVAG",
              "group_ahead", "test_accuracy", ("m-svag",), _SIGN),
    ],
}


#: Beyond the paper's §6 comparison: the fourth corner with the paper's estimator against Adam
#: (Fig. 1's 2×2), and the two variance estimators of M-SVAG (§4.1: "similar performance").
_EXTENSIONS = [
    Claim(f"similar-{a}-{b}-{m}", text, "similar", m, (a,), (b,), optional=True)
    for a, b, text in (
        ("m-ssd-va", "adam", "M-SSD-VA (sign + variance adaptation, the paper's estimator) ≈ Adam"),
        ("m-ssd-va-sqrt", "adam", "M-SSD-VA with Adam's factor (1+η²)^(−½) ≈ Adam: only the estimator differs"),
        ("m-svag-mb", "m-svag", "The two variance estimators perform similarly: M-SVAG mini-batch ≈ M-SVAG"),
    )
    for m in ("train_loss", "test_accuracy")
]


def claims_for(problem: str) -> List[Claim]:
    """The observations that apply to ``problem``: the general ones plus the problem's own."""
    return _GENERAL + _PROBLEM_CLAIMS.get(problem, []) + _VARIANCE + _EXTENSIONS


def paper_budget(result: Mapping[str, Any]) -> Dict[str, Any]:
    """This run's budget next to the paper's (steps, epochs, seeds)."""
    s = result.get("settings") or {}
    problem = PAPER_PROBLEMS.get(result.get("problem", ""))
    steps = s.get("max_steps")
    budget: Dict[str, Any] = {"steps": steps, "seeds": len(s.get("seeds") or [])}
    if problem:
        paper_steps = problem["epochs"] * problem["steps_per_epoch"]
        budget.update({
            "label": problem["label"], "epochs": steps / problem["steps_per_epoch"] if steps else None,
            "paper_epochs": problem["epochs"], "paper_steps": paper_steps, "paper_seeds": PAPER_SEEDS,
            "fraction_of_paper": steps / paper_steps if steps else None,
        })
    return budget


# ------------------------------------------------------------------------------ the rules
def _oriented(values: Mapping[str, float], metric: str) -> Dict[str, float]:
    """Values turned so that larger is better."""
    sign = METRICS[metric][2]
    return {m: sign * v for m, v in values.items()}


def margin(claim: Claim, values: Mapping[str, float]) -> Tuple[float, Optional[bool]]:
    """``(margin, means_in_order)`` of the claim on one set of per-method values (raw, not oriented).

    cluster: gap between the groups' ranges minus the larger within-group spread (``means_in_order``:
    the groups do not interleave). group_ahead: worst of A minus best of B, oriented
    (``means_in_order``: A's mean is better). at_least: A minus B, oriented.
    """
    v = _oriented(values, claim.metric)
    a, b = [v[m] for m in claim.a], [v[m] for m in claim.b]
    if claim.kind == "cluster":
        gap = max(min(a) - max(b), min(b) - max(a))
        spread = max(max(a) - min(a), max(b) - min(b))
        return gap - spread, gap > 0
    if claim.kind == "group_ahead":
        return min(a) - max(b), sum(a) / len(a) > sum(b) / len(b)
    if claim.kind == "at_least":
        return a[0] - b[0], None
    if claim.kind == "similar":
        return -abs(a[0] - b[0]), None
    raise ValueError(f"unknown claim kind {claim.kind!r}")


def _verdict(claim: Claim, m: float, in_order: Optional[bool], noise: float) -> str:
    if claim.kind == "cluster":
        return "holds" if m > 0 else ("partly" if in_order else "does not hold")
    if claim.kind == "group_ahead":
        return "holds" if m > 0 else ("partly" if in_order else "does not hold")
    if claim.kind == "similar":
        return "holds within noise" if -m <= noise else "does not hold"
    if m >= 0:
        return "holds"
    return "holds within noise" if -m <= noise else "does not hold"


def _holds(claim: Claim, values: Mapping[str, float], noise: float = 0.0) -> bool:
    """Strict order of the means for every kind but *similar*, which holds within ``noise``."""
    m, in_order = margin(claim, values)
    verdict = _verdict(claim, m, in_order, noise)
    return verdict == ("holds within noise" if claim.kind == "similar" else "holds")


def _curve(info: Mapping[str, Any], metric: str, source: str) -> Optional[Dict[int, Tuple[float, float]]]:
    """A method's curve, step → (mean, std over seeds): ``source`` "eval" (the evaluations) or
    "mini_batch" (smoothed training loss)."""
    curves = info.get("curves") or {}
    if source == "mini_batch":
        c = curves.get("train_smoothed")
        values = c["loss"] if c else None
    else:
        c = curves.get("eval") or {}
        values = c.get("train_eval_loss" if metric == "train_loss" else "test_accuracy")
    if not values:
        return None
    std = values.get("std") or [0.0] * len(values["mean"])
    return {t: (mean, sd or 0.0) for t, mean, sd in zip(c["step"], values["mean"], std)}


def _track(claim: Claim, methods: Mapping[str, Any], source: str) -> Optional[Dict[str, Any]]:
    """Where along one kind of curve the claim held (strict order of the means)."""
    curves = {m: _curve(methods[m], claim.metric, source) for m in claim.a + claim.b}
    if any(c is None for c in curves.values()):
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not steps:
        return None
    def noise(t: int) -> float:  # the similar rows' per-point noise, as the final verdict's
        return math.sqrt(curves[claim.a[0]][t][1] ** 2 + curves[claim.b[0]][t][1] ** 2) if claim.kind == "similar" else 0.0

    held = [_holds(claim, {m: c[t][0] for m, c in curves.items()}, noise(t)) for t in steps]
    margins = [margin(claim, {m: c[t][0] for m, c in curves.items()})[0] for t in steps]
    changes = [steps[i] for i in range(1, len(steps)) if held[i] != held[i - 1]]
    since = steps[0]
    for i in range(len(steps) - 1, 0, -1):
        if held[i - 1] != held[-1]:
            since = steps[i]
            break
    half = (len(steps) - 1) // 2
    track = {"first_step": steps[0], "last_step": steps[-1], "held_at_end": held[-1], "since_step": since,
             "changes_at": changes, "margin_first": margins[0], "margin_mid": margins[half], "mid_step": steps[half],
             "margin_end": margins[-1], "steps": steps, "held": held, "margins": margins, "extrapolated_change": None}
    if not held[-1] and len(steps) >= 2:
        # The claim fails at the end; if the last two points show its margin moving towards the sign
        # that would make it hold, where would a straight line through them cross 0? (A hint for
        # longer runs, not a measurement.)
        slope = (margins[-1] - margins[-2]) / (steps[-1] - steps[-2])
        if slope > 0:
            track["extrapolated_change"] = int(round(steps[-1] - margins[-1] / slope))
    return track


def _over_run(claim: Claim, methods: Mapping[str, Any]) -> Dict[str, Any]:
    """Where along the run the claim held, from the mean curves of the chosen step sizes: at the
    evaluations (the quantity of the verdict) and, for training loss, on the smoothed mini-batch loss
    (every step, noisier)."""
    out: Dict[str, Any] = {"available": False}
    for source in ("eval", "mini_batch") if claim.metric == "train_loss" else ("eval",):
        track = _track(claim, methods, source)
        if track and source == "mini_batch":  # hundreds of points: keep the summary only
            for key in ("steps", "held", "margins", "extrapolated_change"):
                track.pop(key)
        if track:
            out[source] = track
            out["available"] = True
    return out


def evaluate_claims(result: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The claims table of a ``results.json`` dictionary: one row per applicable observation."""
    methods = result.get("methods") or {}
    budget = result.get("budget") or paper_budget(result)
    ran = (result.get("settings") or {}).get("methods")  # None: an old results.json, every row
    rows = []
    for claim in claims_for(result.get("problem", "")):
        key, _, _, _ = METRICS[claim.metric]
        needed = claim.a + claim.b
        if ran is not None and not set(needed) <= set(ran):
            continue  # the benchmark did not compare these methods (a run without a result stays n/a)
        stats = {m: (methods.get(m) or {}).get(key) or {} for m in needed}
        row: Dict[str, Any] = {"key": claim.key, "claim": claim.text, "kind": claim.kind, "metric": claim.metric,
                               "groups": [list(claim.a), list(claim.b)],
                               "values": {m: {"mean": s.get("mean"), "std": s.get("std"), "n": s.get("n")}
                                          for m, s in stats.items()}}
        missing = [m for m, s in stats.items() if s.get("mean") is None or not math.isfinite(s["mean"])]
        if missing and claim.optional:
            continue
        if missing:
            row.update({"verdict": "n/a", "note": f"no result for {', '.join(method_label(m) for m in missing)}"})
            rows.append(row)
            continue
        means = {m: float(s["mean"]) for m, s in stats.items()}
        m, in_order = margin(claim, means)
        noise = math.sqrt(sum(float(stats[x].get("std") or 0.0) ** 2 for x in (claim.a[0], claim.b[0]))) \
            if claim.kind in ("at_least", "similar") else None
        row.update({"margin": m, "noise": noise, "verdict": _verdict(claim, m, in_order, noise or 0.0),
                    "over_run": _over_run(claim, methods), "note": _note(claim, budget)})
        rows.append(row)
    return rows


def _note(claim: Claim, budget: Mapping[str, Any]) -> str:
    if "paper_steps" not in budget:
        return ""
    return (f"paper: {budget['paper_epochs']} epochs = {budget['paper_steps']:,} steps, {budget['paper_seeds']} seeds; "
            f"here: {budget['steps']:,} steps, {budget['seeds']} seed{'s' if budget['seeds'] != 1 else ''}")
