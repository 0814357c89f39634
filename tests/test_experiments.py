"""Tests of ``lightning-msvag reproduce``: every experiment end to end at tiny size.

The sqp and wilson tests also assert the paper's qualitative findings at sizes where they are
robust (checked over several seeds when the tests were written). The benchmark tests use P4 with
the real War and Peace text and a tiny LSTM, in-process (fast), plus one subprocess run.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from lightning_msvag.cli import main as cli_main
from lightning_msvag.experiments import main
from lightning_msvag.experiments import benchmark as bm
from lightning_msvag.experiments import sqp, wilson
from lightning_msvag.experiments.factors import adam_factor, max_gap, sign_factor

REPO = Path(__file__).resolve().parents[1]
TOLSTOI_TEXT = Path(__file__).resolve().parents[2] / "shared/data/war_and_peace.txt"
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
    assert 0.05 < result["max_gap"] < 0.08
    eta = result["eta_at_max_gap"]
    assert result["max_gap"] == pytest.approx(abs(sign_factor(eta) - adam_factor(eta)), abs=1e-12)
    grid = np.logspace(-2, 2, 100_001)
    assert np.max(np.abs(sign_factor(grid) - adam_factor(grid))) <= result["max_gap"] + 1e-9
    rows = _rows(tmp_path / "factors.csv")
    assert len(rows) == 301 and set(rows[0]) == {"eta", "sign_factor", "adam_factor", "svag_factor"}
    assert float(sign_factor(0.0)) == 1.0 and max_gap(1e-2, 1e2)["max_gap"] == pytest.approx(result["max_gap"])


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
    """α* of Eq. 12 minimises the expected loss after one step (checked against neighbours by Monte Carlo)."""
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
        best = expected_loss(alpha, z)
        assert best <= expected_loss(0.8 * alpha, z) and best <= expected_loss(1.2 * alpha, z)


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


# ------------------------------------------------------------------------ benchmark
def test_grid_parsing_and_selection():
    assert bm.parse_grid("1e-3:1e-1:3") == [0.1, 0.01, 0.001]
    assert bm.parse_grid("1, 0.3,3") == [3.0, 1.0, 0.3]
    for bad in ("", "0,1", "1:0.1:3", "a:b:c", "-1"):
        with pytest.raises(ValueError):
            bm.parse_grid(bad)
    runs = [bm.RunSpec("m-sgd", lr, 42, "search") for lr in (3.0, 1.0, 0.3, 0.1, 0.03)]
    ns = types.SimpleNamespace(run_index=None, shard=(1, 2))
    assert [r.lr for r in bm._select(runs, ns)] == [1.0, 0.1]
    args = types.SimpleNamespace(argv=["benchmark", "--out", "o", "--shard=0/2", "--phase", "search", "--jobs", "2",
                                       "--list-runs", "--max-steps", "5"])
    assert bm._command_line(args, ["--run-index", "3"]) == \
        "lightning-msvag reproduce benchmark --out o --max-steps 5 --run-index 3"


def test_choose_lr():
    def rec(status, acc, loss=1.0):
        return {"status": status, "final": {"test/accuracy": acc, "test/loss": loss, "train/loss": loss}}

    assert bm.choose_lr({1.0: rec("done", 0.5), 0.1: rec("done", 0.6), 10.0: rec("diverged", 0.9)}) == \
        (0.1, "final test accuracy")
    assert bm.choose_lr({1.0: rec("done", 0.5, 2.0), 0.1: rec("done", 0.5, 1.0)})[0] == 0.1  # tie: lower loss
    assert bm.choose_lr({1.0: rec("failed", 0.5), 0.1: None}) == (None, "no finished search run")


def test_recorder_marks_non_finite_loss_as_diverged(tmp_path):
    torch = pytest.importorskip("torch")
    from lightning_msvag.experiments.recorder import RunRecorder

    rec = RunRecorder(str(tmp_path / "r.json"))
    trainer = types.SimpleNamespace(callback_metrics={"train/loss": torch.tensor(float("nan"))}, global_step=3,
                                    is_global_zero=True, should_stop=False, sanity_checking=False)
    rec.on_train_batch_start(trainer, None, None, 0)
    rec.on_train_batch_end(trainer, None, None, None, 0)
    rec.on_fit_end(trainer, None)
    data = json.loads((tmp_path / "r.json").read_text())
    assert trainer.should_stop and data["status"] == "diverged" and data["diverged_at"]["step"] == 3
    assert data["train"] == [[3, "nan", None]]


@pytest.fixture(scope="module")
def tolstoi_dir(tmp_path_factory):
    if not TOLSTOI_TEXT.is_file():
        pytest.skip(f"War and Peace text not found at {TOLSTOI_TEXT}")
    root = tmp_path_factory.mktemp("data")
    (root / "tolstoi").mkdir()
    shutil.copy(TOLSTOI_TEXT, root / "tolstoi" / "war-and-peace.txt")
    return root


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


def test_benchmark_subprocess_failure_is_recorded(tmp_path, tolstoi_dir):
    out = tmp_path / "fail"
    args = _tiny_p4(out, tolstoi_dir, "--methods", "adam", "--grid", "adam=0.01", "--num-seeds", "1",
                    "--fit-arg=--trainer.no_such_option=1")
    assert main(args) == 1  # the sweep finishes, reports the failure ...
    record = json.loads((out / "runs/adam/lr=0.01/seed=42/record.json").read_text())
    assert record["status"] == "failed" and record["returncode"] not in (0, None)
    assert "no_such_option" in record["error"]
    assert "| Adam | 0.01 | failed |" in (out / "summary.md").read_text()  # ... and lists it
