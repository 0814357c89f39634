"""Tests of ``lightning-msvag reproduce``: every experiment end to end at tiny size.

The sqp and wilson tests also assert the paper's qualitative findings at sizes where they are
robust (checked over several seeds when the tests were written). The benchmark tests use P4 with
the real War and Peace text and a tiny LSTM, in-process (fast), plus one subprocess run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import stat
import types
from pathlib import Path

import numpy as np
import pytest

from lightning_msvag.command import main as cli_main
from lightning_msvag.experiments import main
from lightning_msvag.experiments import sqp, wilson
from lightning_msvag.experiments.adaptation_factors import adam_factor, max_gap, sign_factor, svag_factor
from lightning_msvag.experiments.benchmark import config as bm_config
from lightning_msvag.experiments.benchmark import plan as bm_plan
from lightning_msvag.experiments.benchmark.runner import collect_and_report

REPO = Path(__file__).resolve().parents[1]
P4_CONFIG = REPO / "configs" / "tolstoi_char_rnn.yaml"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- parser
def test_help_of_every_experiment(capsys):
    for name in ("sqp", "factors", "wilson", "benchmark"):
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense", "--out", "x"])


# -------------------------------------------------------------------------- factors
def test_factors_outputs_and_gap(tmp_path):
    assert cli_main(["reproduce", "factors", "--out", str(tmp_path), "--points", "301"]) == 0
    assert (tmp_path / "factors.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "factors.json").read_text())
    # The gap between the optimal sign factor and Adam's is small (paper Fig. 3: a close approximation).
    # Known values, not the module's own functions: erf(1/√2), 2^(−1/2), 1/2 at η = 1, and the largest
    # gap |erf(1/(√2η)) − (1+η²)^(−1/2)| = 0.0644 at η = 1.913 (computed independently with math.erf).
    assert float(sign_factor(1.0)) == pytest.approx(0.682689, abs=1e-6)
    assert float(adam_factor(1.0)) == pytest.approx(0.707107, abs=1e-6)
    assert float(svag_factor(1.0)) == pytest.approx(0.5, abs=1e-12)
    assert result["max_gap"] == pytest.approx(0.064, abs=5e-4)
    eta = result["eta_at_max_gap"]
    assert eta == pytest.approx(1.91, abs=0.01)
    assert result["max_gap"] == pytest.approx(abs(math.erf(1 / (math.sqrt(2) * eta)) - (1 + eta**2) ** -0.5), abs=1e-12)
    grid = np.logspace(-2, 2, 100_001)
    assert np.max(np.abs(sign_factor(grid) - adam_factor(grid))) <= result["max_gap"] + 1e-9
    rows = _rows(tmp_path / "factors.csv")
    assert len(rows) == 301 and set(rows[0]) == {"eta", "sign_factor", "adam_factor", "svag_factor"}
    assert float(sign_factor(0.0)) == 1.0 and max_gap(1e-2, 1e2)["max_gap"] == pytest.approx(result["max_gap"])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    """JSON and CSV (written atomically through a temporary file) get the same mode as the PNG:
    the one the user's umask gives, not a temporary file's 0600."""
    old = os.umask(umask)
    try:
        assert cli_main(["reproduce", "factors", "--out", str(tmp_path), "--points", "11"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"factors.csv": mode, "factors.json": mode, "factors.png": mode}  # and no *.part left


# ------------------------------------------------------------------------------ sqp
def test_sign_second_moment_is_accurate():
    rng = np.random.default_rng(0)
    rho = np.linspace(-0.995, 0.995, 41)
    zero = np.zeros_like(rho)
    # Zero means: P(X<=0, Y<=0) = 1/4 + arcsin(rho)/(2 pi) exactly.
    assert np.allclose(sqp.bivariate_orthant(zero, zero, rho), 0.25 + np.arcsin(rho) / (2 * math.pi), atol=1e-13)
    # rho = 0: independence.
    h, k = rng.standard_normal(10), rng.standard_normal(10)
    assert np.allclose(sqp.bivariate_orthant(h, k, np.zeros(10)), sqp._phi_cdf(h) * sqp._phi_cdf(k), atol=1e-15)
    # Correlated, non-zero means: quadrature vs many more nodes vs Monte Carlo (4 standard errors).
    d = 5
    a = rng.standard_normal((d, d))
    cov = a @ a.T
    mu = rng.standard_normal(d)
    m = sqp.sign_second_moment(mu, cov)
    assert np.allclose(m, sqp.sign_second_moment(mu, cov, nodes=512), atol=1e-12)
    assert np.allclose(np.diag(m), 1.0)
    n = 100_000
    m_mc = sqp.sign_second_moment(mu, cov, method="mc", samples=n, rng=np.random.default_rng(1))
    assert np.max(np.abs(m - m_mc)) < 4 * 1.0 / math.sqrt(n)
    # Zero variance: deterministic signs.
    assert np.array_equal(sqp.sign_second_moment(mu, np.zeros((d, d))), np.outer(np.sign(mu), np.sign(mu)))


def test_sqp_step_sizes_are_locally_optimal():
    """α* of Eq. 12 minimises the expected loss after one step: it is within 2 % of the minimiser of the
    Monte Carlo estimate of E[L(θ + α z)], a quadratic in α minimised in closed form."""
    rng = np.random.default_rng(3)
    d, nu = 6, 0.5
    q = sqp.make_matrix(sqp.eigenvalues("ill-conditioned", d, rng), "rotated", rng)
    theta = rng.standard_normal(d)
    grad = q @ theta
    cov = nu**2 * q @ q
    eps = rng.standard_normal((200_000, d))
    g = grad - nu * eps @ q  # samples of the stochastic gradient (Q symmetric)

    def expected_loss(alpha, z):
        t = theta + alpha * z
        return 0.5 * np.mean(np.einsum("ni,ij,nj->n", t, q, t))

    a_sgd = sqp.sgd_optimal_step(q, grad, nu, float(np.trace(q @ q @ q)))
    a_ssd = sqp.ssd_optimal_step(q, grad, cov)
    for alpha, z in ((a_sgd, -g), (a_ssd, -np.sign(g))):
        # E[L(θ + αz)] = L(θ) + α E[θᵀQz] + α²/2 E[zᵀQz]  ⇒  argmin = −E[θᵀQz] / E[zᵀQz]
        minimiser = -np.mean(z @ (q @ theta)) / np.mean(np.einsum("ni,ij,nj->n", z, q, z))
        assert alpha == pytest.approx(minimiser, rel=0.02)


def test_sqp_outputs_and_paper_findings(tmp_path):
    args = ["sqp", "--out", str(tmp_path), "--dim", "40", "--steps", "30", "--repeats", "1",
            "--noises", "0", "0.1", "--probe-points", "20"]
    assert main(args) == 0
    rows = _rows(tmp_path / "sqp.csv")
    assert {"spectrum", "basis", "noise", "method", "step", "loss"} <= set(rows[0])
    assert len(rows) == 2 * 2 * 2 * 2 * 31  # spectra x bases x noises x methods x (steps + 1)
    assert (tmp_path / "sqp.png").stat().st_size > 50_000
    result = json.loads((tmp_path / "sqp.json").read_text())
    mats = result["matrices"]
    assert mats["well-conditioned/axis-aligned"]["pdiag"] == pytest.approx(1.0)
    assert mats["ill-conditioned/rotated"]["pdiag"] < 0.2
    for info in mats.values():
        q0 = info["at_theta0"]
        assert q0["I_SGD"] >= q0["I_SGD_bound"] * (1 - 1e-12)
        assert q0["I_SSD"] >= q0["I_SSD_bound_trace"] * (1 - 1e-12) >= q0["I_SSD_bound"] * (1 - 1e-12)

    def ratio(spectrum, basis, noise):  # final SSD loss / final SGD loss
        return result["panels"][f"{spectrum}/{basis}/noise={noise:g}"]["ssd_over_sgd"]

    # Fig. 2: well-conditioned, no noise: SGD far ahead; with noise the gap closes.
    for basis in sqp.BASES:
        assert ratio("well-conditioned", basis, 0.0) > 100
        assert 0.2 < ratio("well-conditioned", basis, 0.1) < 5
    # Ill-conditioned: SSD clearly wins axis-aligned, about equal when rotated.
    for noise in (0.0, 0.1):
        assert ratio("ill-conditioned", "axis-aligned", noise) < 0.2
        assert 0.5 < ratio("ill-conditioned", "rotated", noise) < 2.0


def test_sqp_same_seed_same_numbers(tmp_path):
    common = ["--dim", "8", "--steps", "5", "--repeats", "2", "--probe-points", "5", "--noises", "0.1"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(["sqp", "--out", str(tmp_path / name), "--seed", seed, *common]) == 0
    csv_a = (tmp_path / "a" / "sqp_runs.csv").read_bytes()
    assert csv_a == (tmp_path / "b" / "sqp_runs.csv").read_bytes()
    assert csv_a != (tmp_path / "c" / "sqp_runs.csv").read_bytes()


# --------------------------------------------------------------------------- wilson
@pytest.mark.parametrize("n,seed", [(1, 0), (7, 1), (30, 2)])
def test_wilson_construction_property(n, seed):
    x, y = wilson.wilson_data(n, 0.7, np.random.default_rng(seed))
    assert x.shape == (n, 3 + 5 * n) and y.sum() > 0
    assert np.array_equal(x @ np.sign(x.T @ y), 4.0 * y)  # X sign(X^T y) = c y, c = 4


def test_wilson_lemma3(tmp_path):
    assert main(["wilson", "--out", str(tmp_path), "--n", "20", "--steps", "200", "--test-points", "400"]) == 0
    assert (tmp_path / "wilson.png").stat().st_size > 20_000
    result = json.loads((tmp_path / "wilson.json").read_text())
    assert result["construction"]["c"] == 4.0 and result["construction"]["residual"] == 0.0
    methods = result["methods"]
    assert set(methods) == set(wilson.METHODS)
    negatives = result["test_negative_share"]
    for name in ("adam", "sign", "m-ssd"):  # Lemma 3: stays on the sign(X^T y) ray ...
        assert methods[name]["min_cosine_over_iterations"] > 1 - 1e-6
        assert methods[name]["test_error"] == pytest.approx(negatives)  # ... and predicts +1 everywhere
    for name in ("m-sgd", "m-svag", "gd"):  # gradient-based methods leave it and generalise
        assert methods[name]["cosine_to_sign_Xty"] < 0.9
        assert methods[name]["test_error"] < 0.05
        assert methods[name]["train_loss"] < 1e-3
    # Same seed, same numbers.
    again = tmp_path / "again"
    assert main(["wilson", "--out", str(again), "--n", "20", "--steps", "200", "--test-points", "400",
                 "--methods", "m-svag"]) == 0
    assert json.loads((again / "wilson.json").read_text())["methods"]["m-svag"] == methods["m-svag"]


def test_wilson_loss_panel_draws_the_best_loss_so_far(tmp_path):
    """At a constant step size, sign descent and M-SSD jump back up after their best iterate (from
    iteration ~250 at the defaults); drawn raw, those jumps filled the loss panel and hid Adam's
    curve. The panel draws min over s <= t of R(θ_s), floored at 1e-16."""
    x, y = wilson.wilson_data(50, 0.7, np.random.default_rng([42, 0]))  # the defaults' instance
    steps = 400
    traces = {m: wilson.run_method(m, x, y, steps, wilson.DEFAULT_LR[m]) for m in ("adam", "sign", "m-ssd")}
    for m in ("sign", "m-ssd"):  # the raw loss climbs back by orders of magnitude after its best
        loss = traces[m]["loss"]
        assert loss.min() < 1e-12 and loss[int(np.argmin(loss)):].max() > 1e-6
    results = {m: {"lr": wilson.DEFAULT_LR[m], "test_error": 0.3} for m in traces}
    args = types.SimpleNamespace(steps=steps, n=50, p=0.7, seed=42, test_points=1000)
    drawn = wilson.plot(traces, results, args, 0.3, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 20_000
    assert set(drawn) == set(traces)
    for m, tr in traces.items():
        best, expected = math.inf, []
        for value in tr["loss"]:  # the running minimum, by a plain loop
            best = min(best, float(value))
            expected.append(max(best, 1e-16))
        np.testing.assert_array_equal(drawn[m], expected)
        assert np.all(np.diff(drawn[m]) <= 0)
    assert drawn["adam"][-1] > 1e-12 > drawn["m-ssd"][-1]  # Adam's curve ends well above the others'


# ------------------------------------------------------------------------ benchmark
def test_grid_parsing_and_selection():
    assert bm_config.parse_grid("1e-3:1e-1:3") == [0.1, 0.01, 0.001]
    assert bm_config.parse_grid("1, 0.3,3") == [3.0, 1.0, 0.3]
    for bad in ("", "0,1", "1:0.1:3", "a:b:c", "-1"):
        with pytest.raises(ValueError):
            bm_config.parse_grid(bad)
    runs = [bm_plan.RunSpec("m-sgd", lr, 42, "search") for lr in (3.0, 1.0, 0.3, 0.1, 0.03)]
    ns = types.SimpleNamespace(run_index=None, shard=(1, 2))
    assert [r.lr for r in bm_plan.select(runs, ns)] == [1.0, 0.1]
    args = types.SimpleNamespace(argv=["benchmark", "--out", "o", "--shard=0/2", "--phase", "search", "--jobs", "2",
                                       "--list-runs", "--max-steps", "5"])
    assert bm_config.command_line(args, ["--run-index", "3"]) == \
        "lightning-msvag reproduce benchmark --out o --max-steps 5 --run-index 3"


def test_choose_lr():
    def rec(status, acc, loss=1.0):
        return {"status": status, "final": {"test/accuracy": acc, "test/loss": loss, "train/loss": loss}}

    assert bm_plan.choose_lr({1.0: rec("done", 0.5), 0.1: rec("done", 0.6), 10.0: rec("diverged", 0.9)}) == \
        (0.1, "final test accuracy")
    assert bm_plan.choose_lr({1.0: rec("done", 0.5, 2.0), 0.1: rec("done", 0.5, 1.0)})[0] == 0.1  # tie: lower loss
    assert bm_plan.choose_lr({1.0: rec("failed", 0.5), 0.1: None}) == (None, "no finished search run")


def test_recorder_marks_non_finite_loss_as_diverged(tmp_path):
    torch = pytest.importorskip("torch")
    from lightning_msvag.experiments.benchmark.recorder import RunRecorder

    rec = RunRecorder(str(tmp_path / "r.json"))
    trainer = types.SimpleNamespace(callback_metrics={"train/loss": torch.tensor(float("nan"))}, global_step=3,
                                    is_global_zero=True, should_stop=False, sanity_checking=False)
    rec.on_train_batch_start(trainer, None, None, 0)
    rec.on_train_batch_end(trainer, None, None, None, 0)
    rec.on_fit_end(trainer, None)
    data = json.loads((tmp_path / "r.json").read_text())
    assert trainer.should_stop and data["status"] == "diverged" and data["diverged_at"]["step"] == 3
    assert data["train"] == [[3, "nan", None]]


def _tiny_p4(out: Path, data: Path, *extra: str) -> list[str]:
    return ["benchmark", "--out", str(out), "--config", str(P4_CONFIG), "--data-dir", str(data),
            "--max-steps", "12", "--val-check-interval", "6", "--limit-val-batches", "2", "--no-progress",
            "--fit-arg=--data.init_args.batch_size=4", "--fit-arg=--data.init_args.seq_len=10",
            "--fit-arg=--model.init_args.hidden_size=8", "--fit-arg=--model.init_args.embedding_dim=8",
            "--fit-arg=--trainer.enable_checkpointing=false", "--fit-arg=--trainer.callbacks=[]",
            "--fit-arg=--trainer.enable_model_summary=false", *extra]


@pytest.fixture()
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_benchmark_end_to_end_resume_and_collect(tmp_path, tolstoi_dir, one_thread, capsys):
    out = tmp_path / "sweep"
    args = _tiny_p4(out, tolstoi_dir, "--methods", "m-sgd", "m-ssd", "--grid", "m-sgd=1e6,1", "--grid", "m-ssd=0.01",
                    "--num-seeds", "2", "--launcher", "inprocess")
    assert main(args) == 0
    for name in ("curves.csv", "benchmark.png", "lr_sensitivity.png", "summary.md", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == {
        "m-sgd/lr=1e+06/seed=42": "diverged", "m-sgd/lr=1/seed=42": "done", "m-ssd/lr=0.01/seed=42": "done",
        "m-sgd/lr=1/seed=43": "done", "m-ssd/lr=0.01/seed=43": "done",
    }
    assert results["methods"]["m-sgd"]["chosen_lr"] == 1.0
    assert results["methods"]["m-sgd"]["final_test_accuracy"]["n"] == 2
    assert results["methods"]["m-sgd"]["step_time_rel_m_sgd"] == 1.0
    assert results["step_time_reference"] == "m-sgd" and results["methods"]["m-sgd"]["step_time_rel"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "| M-SGD | 1e+06 | diverged |" in summary and "| M-SSD | 0.01 ★ | done |" in summary
    rows = _rows(out / "curves.csv")
    assert set(rows[0]) == {"method", "lr", "seed", "step", "split", "loss", "accuracy"}
    assert {r["split"] for r in rows} == {"train", "train_eval", "test"}
    test_rows = [r for r in rows if r["method"] == "m-ssd" and r["seed"] == "43" and r["split"] == "test"]
    assert [int(r["step"]) for r in test_rows] == [6, 12]
    record = json.loads((out / "runs/m-sgd/lr=1/seed=42/record.json").read_text())
    assert record["spec"]["argv"][:2] == ["lightning-msvag", "fit"] and record["steps_done"] == 12
    assert (out / "runs/m-sgd/lr=1/seed=42/tb").is_dir()  # an ordinary TensorBoard log dir per run
    capsys.readouterr()

    # Resume: nothing is redone.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/record.json")}
    assert main(args) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/record.json")} == mtimes

    # --list-runs shows each run with its status and the command that runs it alone.
    assert main(args + ["--list-runs"]) == 0
    listing = capsys.readouterr().out
    assert "[0] m-sgd/lr=1e+06/seed=42" in listing and "diverged" in listing
    assert "--phase replicate --run-index 1" in listing

    # Same seed, same numbers: rerun one search run by index into a fresh folder.
    other = tmp_path / "other"
    args2 = _tiny_p4(other, tolstoi_dir, "--methods", "m-sgd", "m-ssd", "--grid", "m-sgd=1e6,1",
                     "--grid", "m-ssd=0.01", "--num-seeds", "2", "--launcher", "inprocess")
    assert main(args2 + ["--phase", "search", "--run-index", "2"]) == 0
    a = json.loads((out / "runs/m-ssd/lr=0.01/seed=42/record.json").read_text())
    b = json.loads((other / "runs/m-ssd/lr=0.01/seed=42/record.json").read_text())
    assert a["eval"] == b["eval"] and a["train"] == b["train"]

    # collect works on a partial sweep and says what is missing.
    assert main(args2 + ["--collect-only"]) == 0
    partial = json.loads((other / "results.json").read_text())
    assert partial["runs"]["m-ssd/lr=0.01/seed=42"] == "done" and partial["runs"]["m-sgd/lr=1/seed=42"] == "missing"
    assert "## Incomplete" in (other / "summary.md").read_text()


@pytest.mark.slow
def test_benchmark_subprocess_failure_is_recorded(tmp_path, tolstoi_dir):
    out = tmp_path / "fail"
    args = _tiny_p4(out, tolstoi_dir, "--methods", "adam", "--grid", "adam=0.01", "--num-seeds", "1",
                    "--fit-arg=--trainer.no_such_option=1")
    assert main(args) == 1  # the sweep finishes, reports the failure ...
    record = json.loads((out / "runs/adam/lr=0.01/seed=42/record.json").read_text())
    assert record["status"] == "failed" and record["returncode"] not in (0, None)
    assert "no_such_option" in record["error"]
    assert "| Adam | 0.01 | failed |" in (out / "summary.md").read_text()  # ... and lists it


# ------------------------------------------------------------------- claims table
P1_CONFIG = REPO / "configs" / "fmnist_2c2d.yaml"


def _synthetic_sweep(out: Path) -> "bm_config.BenchmarkConfig":
    """Hand-made run records of a P1 sweep (no training): 4 methods, one step size, 2 seeds, 100 steps.

    Final training loss: sign-based 0.29-0.31, non-sign 0.40-0.41 (the sign-based methods ahead).
    The sign-based methods start *behind* (flat at 2.0 up to step 20, then down to their final loss at
    step 60); they overtake the non-sign methods (a steady descent) at step ~32. Final test accuracy: M-SSD 0.85, Adam 0.86 | M-SGD 0.87, M-SVAG 0.845 (interleaved).
    """
    cfg = bm_config.BenchmarkConfig(out=str(out), config=str(P1_CONFIG), methods=("m-sgd", "m-ssd", "m-svag", "adam"),
                             grid=("m-sgd=0.1", "m-ssd=0.001", "m-svag=0.1", "adam=0.001"), num_seeds=2,
                             max_steps=100, val_check_interval=50)
    final_loss = {"m-ssd": 0.31, "adam": 0.29, "m-sgd": 0.41, "m-svag": 0.40}
    test_acc = {"m-ssd": 0.85, "adam": 0.86, "m-sgd": 0.87, "m-svag": 0.845}
    for spec in bm_plan.plan_search(cfg):
        for seed, jitter in ((42, -0.005), (43, 0.005)):
            run = bm_plan.RunSpec(spec.method, spec.lr, seed, "search" if seed == 42 else "replicate")
            end = final_loss[run.method] + jitter
            if run.method in ("m-ssd", "adam"):  # flat at 2.0, a steep descent from step 20 to 60, then flat
                train = [2.0 + (end - 2.0) * min(max(t - 20, 0), 40) / 40 for t in range(1, 101)]
            else:  # steady descent
                train = [2.0 + (end - 2.0) * t / 100 for t in range(1, 101)]
            acc = test_acc[run.method] + jitter
            record = {
                "status": "done", "spec": {"name": run.name, "settings": bm_plan.settings(cfg, run)},
                "step_time_s": {"median": 0.1},
                "train": [[t, v, None] for t, v in enumerate(train, start=1)],
                "eval": [[50, train[49], 0.5, train[49], 0.5], [100, end, 0.9, end + 0.05, acc]],
                "final": {"train_eval/loss": end, "test/loss": end + 0.05, "test/accuracy": acc, "train/loss": end},
            }
            folder = bm_plan.run_dir(out, run)
            folder.mkdir(parents=True)
            (folder / "record.json").write_text(json.dumps(record))
    return cfg


def test_claims_table_from_synthetic_records(tmp_path):
    out = tmp_path / "p1"
    cfg = _synthetic_sweep(out)
    result = collect_and_report(cfg, out)
    claims = {row["key"]: row for row in result["claims"]}
    assert result["budget"]["label"] == "P1" and result["budget"]["paper_steps"] == 46_800
    assert result["budget"]["steps"] == 100 and result["budget"]["seeds"] == 2

    # Holds, with its numbers: every sign-based method below every non-sign one in training loss.
    row = claims["p1-sign-loss"]
    assert row["verdict"] == "holds"
    assert row["values"]["adam"]["mean"] == pytest.approx(0.29) and row["values"]["adam"]["std"] == pytest.approx(0.005)
    assert row["values"]["m-svag"]["n"] == 2
    assert row["margin"] == pytest.approx(0.40 - 0.31)  # best non-sign minus worst sign-based
    assert claims["cluster-loss"]["verdict"] == "holds"
    assert claims["cluster-loss"]["margin"] == pytest.approx(0.09 - 0.02)  # gap between groups − spread inside
    # ... and along the run: the sign-based methods started behind and took the lead at step ~32
    # (a few steps later in the 5-step moving average).
    over = row["over_run"]["mini_batch"]
    assert over["held_at_end"] and over["changes_at"] and 30 <= over["since_step"] <= 40
    over = row["over_run"]["eval"]  # evaluated at steps 50 and 100: ahead at both
    assert over["steps"] == [50, 100] and over["held"] == [True, True] and not over["changes_at"]
    assert result["methods"]["adam"]["curves"]["eval"]["step"] == [50, 100]
    assert [r["seed"] for r in result["methods"]["adam"]["final_per_seed"]] == [42, 43]

    # Does not hold, with its numbers: M-SVAG 0.845 vs M-SGD 0.87 test accuracy, noise √(2·0.005²).
    row = claims["va-m-svag-test_accuracy"]
    assert row["verdict"] == "does not hold"
    assert row["margin"] == pytest.approx(0.845 - 0.87) and row["noise"] == pytest.approx(math.sqrt(2) * 0.005)
    assert claims["cluster-acc"]["verdict"] == "does not hold"  # 0.845 < 0.85, 0.86 < 0.87: interleaved
    assert claims["va-adam-train_loss"]["verdict"] == "holds"  # 0.29 < 0.31
    # the paper's test-set observation is P3's (§6.2): no P1 row claims one for the paper
    assert not any(key.startswith("p1-") and row["metric"] == "test_accuracy" for key, row in claims.items())

    summary = (out / "summary.md").read_text()
    assert "## The paper's observations (§6.2) at this budget" in summary
    assert "100 steps per run" in summary and "46,800 steps" in summary
    line = next(s for s in summary.splitlines() if s.startswith("| On P1 the sign-based methods are ahead"))
    assert "**holds**" in line and "Adam 0.290 ± 0.005" in line
    assert "evaluations: held at every point (steps 50–100)" in line and "mini-batch loss (smoothed): holds since step" in line
    line = next(s for s in summary.splitlines()
                if s.startswith("| Variance adaptation") and "M-SVAG vs M-SGD" in s and "test accuracy" in s)
    assert "**does not hold**" in line and "difference -0.0250" in line
    saved = json.loads((out / "results.json").read_text())
    assert [r["verdict"] for r in saved["claims"]] == [r["verdict"] for r in result["claims"]]


def test_claims_rebuilt_from_results_json_alone(tmp_path):
    """An old results.json (final mean ± std only, no curves, no claims) gets a claims table."""
    from lightning_msvag.experiments.benchmark import report

    def method(loss, acc):
        return {"chosen_lr": 1.0, "largest_stable_lr": 1.0, "criterion": "final test accuracy", "search_complete": True,
                "final_train_loss": {"mean": loss, "std": 0.01, "n": 3, "key": "train_eval/loss"},
                "final_test_accuracy": {"mean": acc, "std": 0.005, "n": 3}, "seeds_done": [42, 43, 44],
                "seeds_not_done": [], "step_time_s": 0.1, "step_time_rel_m_sgd": 1.0, "search": []}

    old = {"experiment": "benchmark", "problem": "tolstoi_char_rnn", "config": "configs/tolstoi_char_rnn.yaml",
           "settings": {"methods": ["m-sgd", "m-ssd", "m-svag", "adam"], "grids": {}, "seeds": [42, 43, 44],
                        "max_steps": 400, "val_check_interval": 100, "limit_val_batches": 20.0, "fit_args": [],
                        "patience": 0, "diverge_factor": 10.0},
           "command": "lightning-msvag reproduce benchmark ...", "runs": {},
           "methods": {"m-sgd": method(2.36, 0.33), "m-ssd": method(1.91, 0.436), "m-svag": method(2.10, 0.389),
                       "adam": method(1.79, 0.464)}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert report.main([str(tmp_path / "results.json")]) == 0
    new = json.loads((tmp_path / "results.json").read_text())
    claims = {row["key"]: row for row in new["claims"]}
    assert claims["p4-nonsign-acc"]["verdict"] == "does not hold"  # the sign-based methods lead at 400 steps
    assert claims["va-m-svag-test_accuracy"]["verdict"] == "holds"
    assert claims["cluster-loss"]["verdict"] == "partly"  # separated, but M-SGD/M-SVAG spread 0.26 > gap 0.19
    assert not claims["cluster-loss"]["over_run"]["available"]
    assert new["budget"]["paper_steps"] == 209_000 and new["methods"] == old["methods"]
    summary = (tmp_path / "summary.md").read_text()
    assert "n/a (no curves in results.json)" in summary and "209,000 steps" in summary
    assert "| time/step vs M-SGD |" in summary and "| M-SVAG | 1 | 1 |" in summary


def test_step_times_relative_to_the_first_method_without_msgd(tmp_path):
    """A benchmark without M-SGD (e.g. the two M-SVAG estimators) gives step times relative to its
    first method, and says so."""
    from lightning_msvag.experiments.benchmark.report import summary_md

    def method(time_s, rel):
        return {"chosen_lr": 1.0, "largest_stable_lr": 1.0, "final_train_loss": {"mean": 2.0, "std": 0.01, "n": 3},
                "final_test_accuracy": {"mean": 0.4, "std": 0.01, "n": 3}, "step_time_s": time_s,
                "step_time_rel": rel, "step_time_rel_m_sgd": None, "search": [], "criterion": "final test accuracy",
                "search_complete": True, "seeds_done": [42, 43, 44], "seeds_not_done": []}

    result = {"problem": "tolstoi_char_rnn", "command": "…", "step_time_reference": "m-svag",
              "settings": {"max_steps": 400, "val_check_interval": 100, "limit_val_batches": None, "seeds": [42, 43, 44]},
              "methods": {"m-svag": method(0.1, 1.0), "m-svag-mb": method(0.2, 2.0)}, "claims": []}
    summary = summary_md(result)
    assert "| time/step vs M-SVAG |" in summary and "relative to M-SVAG" in summary
    assert "| 3 | 2.00 |" in summary.splitlines()[[i for i, l in enumerate(summary.splitlines()) if "mini-batch" in l][0]]


# ------------------------------------------------------- Fashion-MNIST offline recipe
def _offline_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fashion_mnist_offline", REPO / "datamodules" / "fashion_mnist_offline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_mnist_offline_header_restore_and_md5_gate(tmp_path):
    """The recipe script on synthetic bytes (no real data): the header is the original layout, the
    deflate stream is kept, and a file whose md5 is not the official one is never written."""
    import gzip
    import struct

    script = _offline_script()
    payload = bytes(range(256)) * 40
    packaged = gzip.compress(payload, mtime=1591315200)  # like the package: no file name, another mtime
    rebuilt = script.restore(packaged, "t10k-labels-idx1-ubyte.gz")
    name = b"t10k-labels-idx1-ubyte\x00"
    assert rebuilt[:10] == b"\x1f\x8b\x08\x08" + struct.pack("<I", 1504176627) + b"\x00\x03"
    assert rebuilt[10:10 + len(name)] == name and rebuilt[10 + len(name):] == packaged[10:]
    assert gzip.decompress(rebuilt) == payload
    assert script.official_header("train-images-idx3-ubyte.gz")[4:8] == struct.pack("<I", 1504176606)

    src = tmp_path / "pkg"
    src.mkdir()
    for n in script.OFFICIAL_MD5:
        (src / n).write_bytes(packaged)  # right format, wrong content: md5 mismatch
    data = tmp_path / "data"
    assert script.main(["--from-dir", str(src), "--data-dir", str(data)]) == 1
    assert not any((data / "FashionMNIST" / "raw").iterdir())
    from torchvision.datasets import FashionMNIST

    assert dict(FashionMNIST.resources) == script.OFFICIAL_MD5  # the script checks torchvision's md5s


@pytest.mark.parametrize("method", ["m-svag-mb", "m-ssd-va-sqrt"])
def test_a_run_of_a_table_row_with_arguments_gets_them(tmp_path, method):
    """The runner names the method; the command adds the row's own arguments (and, for the
    mini-batch estimate, the callback that provides it), so a sweep runs the row's rule."""
    from lightning_msvag.batch_variance_callback import BatchVarianceCallback
    from lightning_msvag.cli import build_cli
    from lightning_msvag.registry import get_method

    cfg = bm_config.BenchmarkConfig(out=str(tmp_path), config=str(P4_CONFIG), methods=(method,),
                                    grid=(f"{method}=0.01",), num_seeds=1, max_steps=2)
    folder = tmp_path / "runs" / method / "lr" / "seed"
    argv = bm_plan.fit_argv(cfg, bm_plan.RunSpec(method, 0.01, 42, "search"), folder)
    cli = build_cli(argv[1:] + ["--data.data_dir", str(tmp_path / "data"), "--trainer.logger", "false"], run=False)
    init_args = cli.config["optimizer"]["init_args"]
    for key, value in get_method(method).init_args.items():
        assert init_args[key] == value
    assert init_args["lr"] == 0.01
    needs = get_method(method).init_args.get("variance") == "minibatch"
    assert any(isinstance(c, BatchVarianceCallback) for c in cli.trainer.callbacks) == needs


def _processes_in(folder):
    """PIDs of live processes whose working folder is below ``folder`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(Path(os.readlink(entry / "cwd"))).startswith(str(folder)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_sigterm_stops_the_benchmark_runner_and_its_runs(tmp_path, tolstoi_dir):
    """A real SIGTERM to a real `reproduce benchmark`: the run in progress is stopped (no process of
    it left), recorded as interrupted, the runner exits 143; a second runner on the same runs is
    refused in one line while the first holds them."""
    import signal
    import subprocess
    import time

    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "lightning_msvag", "reproduce", "benchmark", "--out", str(out),
            "--config", str(REPO / "configs" / "tolstoi_char_rnn.yaml"), "--data-dir", str(tolstoi_dir),
            "--methods", "m-sgd", "--grid", "m-sgd=0.1", "--num-seeds", "1", "--max-steps", "5000", "--no-progress"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    runner = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        records = []
        while time.time() < deadline and not records:
            records = [p for p in out.rglob("record.json")] if out.exists() else []
            time.sleep(0.5)
        assert records, "no run started"
        time.sleep(3)
        second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "a second runner on the same runs is refused" in second.stderr
        assert len([line for line in second.stderr.splitlines() if "error" in line]) == 1
        assert _processes_in(out / "runs"), "the run process is not running"
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    time.sleep(1)
    assert not _processes_in(out / "runs")  # no orphan
    record = json.loads(records[0].read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
