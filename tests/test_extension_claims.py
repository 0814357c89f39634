"""The claims rows beyond the paper's §6 comparison: M-SSD-VA ≈ Adam, mini-batch ≈ moving-average M-SVAG."""

from __future__ import annotations

import math

import pytest

from lightning_msvag.experiments.benchmark.claims import evaluate_claims


def _result(**finals):
    """A results.json dictionary with final (loss mean, loss std, accuracy mean, accuracy std) per method."""
    methods = {
        name: {"final_train_loss": {"mean": lm, "std": ls, "n": 3}, "final_test_accuracy": {"mean": am, "std": as_, "n": 3}}
        for name, (lm, ls, am, as_) in finals.items()
    }
    return {"problem": "tolstoi_char_rnn", "methods": methods, "settings": {"max_steps": 100, "seeds": [42, 43, 44]}}


def test_similar_rows_verdicts_and_margins():
    result = _result(**{"m-sgd": (2.0, 0.01, 0.4, 0.01), "m-ssd": (2.1, 0.01, 0.38, 0.01),
                        "m-svag": (2.0, 0.01, 0.41, 0.01), "adam": (1.90, 0.03, 0.45, 0.004),
                        "m-ssd-va": (1.93, 0.04, 0.40, 0.003)})
    rows = {row["key"]: row for row in evaluate_claims(result)}
    loss = rows["similar-m-ssd-va-adam-train_loss"]
    # |1.93 − 1.90| = 0.03 ≤ √(0.04² + 0.03²) = 0.05: within noise
    assert loss["kind"] == "similar" and loss["margin"] == pytest.approx(-0.03) and loss["noise"] == pytest.approx(0.05)
    assert loss["verdict"] == "holds within noise"
    acc = rows["similar-m-ssd-va-adam-test_accuracy"]  # 0.05 apart, noise 0.005
    assert acc["verdict"] == "does not hold" and acc["noise"] == pytest.approx(math.hypot(0.003, 0.004))
    # the mini-batch M-SVAG and M-SSD-VA with Adam's factor were not run: their rows are left
    # out (optional), not "n/a"
    assert not any(key.startswith(("similar-m-svag-mb", "similar-m-ssd-va-sqrt")) for key in rows)
    assert rows["va-m-svag-train_loss"]["verdict"] in ("holds", "holds within noise", "does not hold")


def test_similar_rows_absent_without_the_methods():
    result = _result(**{"m-sgd": (2.0, 0.01, 0.4, 0.01), "adam": (1.9, 0.03, 0.45, 0.004)})
    assert not any(row["kind"] == "similar" for row in evaluate_claims(result))


def test_similar_over_the_run_uses_each_steps_seed_noise():
    """Along the run a similar row holds where |A − B| ≤ √(std_A² + std_B²) at that step (a strict
    equality of two means would never hold); the other rows keep the strict order."""
    result = _result(**{"m-svag": (2.0, 0.01, 0.40, 0.01), "m-svag-mb": (2.01, 0.01, 0.40, 0.01)})
    steps = [100, 200, 300]
    curves = {  # eval accuracy: 0.1 apart at step 100 (noise 0.014), then 0.005 (noise 0.014), then 0.02 (noise 0.028)
        "m-svag": {"mean": [0.30, 0.35, 0.40], "std": [0.01, 0.01, 0.02]},
        "m-svag-mb": {"mean": [0.20, 0.355, 0.42], "std": [0.01, 0.01, 0.02]},
    }
    for name, acc in curves.items():
        result["methods"][name]["curves"] = {"n": 3, "eval": {"step": steps, "test_accuracy": acc}}
    rows = {row["key"]: row for row in evaluate_claims(result)}
    track = rows["similar-m-svag-mb-m-svag-test_accuracy"]["over_run"]["eval"]
    assert track["held"] == [False, True, True]
    assert track["since_step"] == 200 and track["changes_at"] == [200]
    assert track["margins"] == pytest.approx([-0.1, -0.005, -0.02])


def test_the_sqrt_factor_row_compares_with_adam():
    result = _result(**{"adam": (1.90, 0.03, 0.45, 0.004), "m-ssd-va-sqrt": (1.95, 0.01, 0.44, 0.004)})
    rows = {row["key"]: row for row in evaluate_claims(result)}
    loss = rows["similar-m-ssd-va-sqrt-adam-train_loss"]  # 0.05 apart, noise 0.032
    assert loss["groups"] == [["m-ssd-va-sqrt"], ["adam"]] and loss["verdict"] == "does not hold"
    assert rows["similar-m-ssd-va-sqrt-adam-test_accuracy"]["verdict"] == "does not hold"  # 0.01 apart, noise 0.0057


def test_rows_of_methods_the_benchmark_did_not_run_are_left_out_and_similar_says_who_is_better():
    """A benchmark of only the extension methods has no M-SGD/M-SSD rows (not a column of n/a);
    a method that was run but has no result still gives n/a; a similar row names the better one."""
    from lightning_msvag.experiments.benchmark.report import claims_md

    result = _result(**{"m-ssd-va": (0.26, 0.012, 0.884, 0.003), "adam": (0.30, 0.016, 0.876, 0.007)})
    result["problem"] = "fmnist_2c2d"
    result["settings"]["methods"] = ["m-ssd-va", "adam", "m-svag"]  # M-SVAG ran, without a result
    rows = {row["key"]: row for row in evaluate_claims(result)}
    assert not any(set(row["groups"][0] + row["groups"][1]) & {"m-sgd", "m-ssd"} for row in rows.values())
    assert not any("m-svag" in row["groups"][0] + row["groups"][1] for row in rows.values())  # needs M-SGD too
    assert rows["similar-m-ssd-va-adam-train_loss"]["verdict"] == "does not hold"
    text = "\n".join(claims_md({**result, "claims": list(rows.values())}))
    assert "means 0.0400 apart, M-SSD-VA better (noise 0.0200)" in text
    assert "means 0.0080 apart, M-SSD-VA better" in text
