"""The mini-batch variance estimate in M-SVAG / SVAG (docs/algorithm.md §1.1) and M-SSD-VA (§1.2),
against the NumPy transcription (tests/helpers/numpy_reference.py) and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lightning_msvag as lm
from lightning_msvag import _cpu_kernel
from lightning_msvag import functional as F
from lightning_msvag.batch_variance import BatchVarianceEstimator
from lightning_msvag.registry import METHODS
from lightning_msvag.rule import MINIBATCH_RULES, RULES, UpdateRule, _sign_factor_math, variance_ratio
from tests.test_optimizers import compiled_step
from tests.helpers.numpy_reference import NumpyFamily

#: the mini-batch rows of the method table, plus M-SSD-VA with the mini-batch estimate
MINIBATCH = {m.name: (m.cls, dict(m.init_args)) for m in METHODS if m.needs_batch_variance}
MINIBATCH["m-ssd-va-mb"] = (lm.MSSDVA, dict(variance="minibatch"))
MINIBATCH["m-ssd-va-sqrt-mb"] = (lm.MSSDVA, dict(variance="minibatch", factor="sqrt"))

PATHS = {
    "single": dict(foreach=False, fused=False),
    "multi": dict(foreach=True, fused=False),
    "fused": dict(fused=True),  # the C++ kernel with its fifth operand σ̂²
    "default": dict(),
    "compiled": dict(),  # the default optimizer's step inside torch.compile(fullgraph=True): an operator on CPU
    "compiled-traced": dict(),  # the same, the update traced for inductor (as on CUDA)
}
SHAPES = [(7,), (13, 17), (3, 4, 5), (1,)]


def _stream(rng, shapes, n_steps):
    """Gradients with per-coordinate signal-to-noise from 0 to 3 and a matching σ̂² sequence
    (varying, with exact zeros: coordinates that never move, and zero gradients)."""
    means = [rng.uniform(-3, 3, size=s) for s in shapes]
    dead = [rng.random(size=s) < 0.1 for s in shapes]
    for _ in range(n_steps):
        grads, variances = [], []
        for shape, mean, dead_mask in zip(shapes, means, dead):
            g = mean + rng.standard_normal(shape)
            s = rng.uniform(0.0, 2.0, size=shape) ** 2
            g[dead_mask], s[dead_mask] = 0.0, 0.0
            grads.append(g)
            variances.append(s)
        yield grads, variances


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("method", list(MINIBATCH))
def test_minibatch_rules_match_numpy_oracle(method, path, maximize, dtype, rtol, atol, monkeypatch):
    """300 steps of every path with a known σ̂² sequence fed through ``p.grad_batch_variance``."""
    calls = []
    if path in ("fused", "default"):  # the C++ kernel runs these rules (no fallback)
        kernel = _cpu_kernel.kernel

        def counting():
            step = kernel()
            return lambda *a: calls.append(a[0]) or step(*a)

        monkeypatch.setattr(_cpu_kernel, "kernel", counting)
    cls, args = MINIBATCH[method]
    rng = np.random.default_rng(7)
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=dtype)) for s in SHAPES]
    opt = cls([dict(params=params[:2], lr=0.01, beta=0.9), dict(params=params[2:], lr=0.03, beta=0.7)],
              maximize=maximize, **args, **PATHS[path])
    assert opt.needs_batch_variance and opt.rule.variance == "minibatch"
    groups = [opt.param_groups[0]] * 2 + [opt.param_groups[1]] * 2
    oracles = [NumpyFamily(opt.rule, p.detach().double().numpy(), g["lr"], g["beta"]) for p, g in zip(params, groups)]
    if path == "compiled-traced":
        monkeypatch.setattr(F, "COMPILED_CPU_STEP_AS_OPERATOR", False)
    step = compiled_step(opt) if path.startswith("compiled") else opt.step
    for grads, variances in _stream(rng, SHAPES, 300):
        for p, g, s, oracle in zip(params, grads, variances, oracles):
            p.grad = torch.tensor(g, dtype=dtype)
            p.grad_batch_variance = torch.tensor(s, dtype=dtype)
            oracle.step(p.grad.double().numpy(), maximize=maximize, batch_variance=p.grad_batch_variance.double().numpy())
        step()
    if path.startswith("compiled"):
        assert step.graphs() == 1 and all(p.grad_batch_variance is None for p in params)  # used up, one graph
    if path in ("fused", "default"):
        assert calls and set(calls) == {opt.rule} and _cpu_kernel._broken is None
    gammas = opt.variance_adaptation_factors()
    for i, (p, oracle, gamma) in enumerate(zip(params, oracles, gammas)):
        np.testing.assert_allclose(p.detach().double().numpy(), oracle.theta, rtol=rtol, atol=atol * 3, err_msg=f"param {i}")
        np.testing.assert_allclose(opt.state[p]["exp_avg"].double().numpy(), oracle.m_tilde, rtol=rtol, atol=atol)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].double().numpy(), oracle.u, rtol=rtol, atol=atol)
        # the γ monitor's reading is the γ of the step (mini-batch: from m~ and u)
        np.testing.assert_allclose(gamma.double().numpy(), oracle.gamma, rtol=1e-6 if dtype == torch.float64 else 1e-4, atol=1e-6)
    if opt.rule.sign:
        for sign_gamma, oracle in zip(opt.sign_factors(), oracles):
            np.testing.assert_allclose(sign_gamma.double().numpy(), oracle.sign_gamma, rtol=1e-6 if dtype == torch.float64 else 1e-4, atol=1e-6)


def test_minibatch_first_step_uses_the_estimate():
    """k = 1: γ = g²/(g² + σ̂²) for both (a real estimate from the first batch, unlike s = 0)."""
    for cls in (lm.MSVAG, lm.SVAG):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = cls([p], lr=1.0, variance="minibatch")
        p.grad = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
        p.grad_batch_variance = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        opt.step()
        gamma = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
        torch.testing.assert_close(opt.variance_adaptation_factors()[0], gamma)
        torch.testing.assert_close(p.detach(), -gamma * p.grad)


def test_constant_variance_identity_equals_rho():
    """For constant σ², u_k/(1−β^k)² = ρ(β, k) σ² (paper Eq. (20)-(21)), k = 1..100: the M-SVAG
    buffer u after k steps, divided by (1−β^k)², against the closed form of ρ (uncapped)."""
    for beta in (0.9, 0.5, 0.99):
        sigma2 = 2.5
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = lm.MSVAG([p], lr=0.0, beta=beta, variance="minibatch")
        for k in range(1, 101):
            p.grad = torch.ones(1, dtype=torch.float64)
            p.grad_batch_variance = torch.full((1,), sigma2, dtype=torch.float64)
            opt.step()
            u = float(opt.state[p]["exp_avg_sq"])
            rho = (1 - beta) * (1 + beta**k) / ((1 + beta) * (1 - beta**k))
            assert u / (1 - beta**k) ** 2 == pytest.approx(rho * sigma2, rel=1e-12), (beta, k)
            if k > 1:  # the library's ρ (capped only at k = 1)
                assert u / (1 - beta**k) ** 2 == pytest.approx(variance_ratio(beta, k) * sigma2, rel=1e-12)


@pytest.mark.parametrize("with_closure", [False, True])
@pytest.mark.parametrize("method", list(MINIBATCH))
def test_step_without_estimate_raises_before_changing_anything(method, with_closure):
    cls, args = MINIBATCH[method]
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = cls([a, b], lr=0.1, **args)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    a.grad_batch_variance = torch.ones(3)  # b has none
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match="needs the mini-batch variance estimate.*BatchVarianceEstimator.*BatchVarianceCallback"):
        opt.step((lambda: 1.0) if with_closure else None)
    assert len(opt.state) == 0
    assert all(torch.equal(x, y) for x, y in zip(before, (a, b)))
    b.grad_batch_variance = None  # what BatchVarianceEstimator.record() leaves: stale means none
    with pytest.raises(RuntimeError, match="needs the mini-batch variance estimate"):
        opt.step()
    b.grad = None  # a parameter without gradient needs no estimate
    opt.step()
    assert int(opt.state[a]["step"]) == 1 and b not in opt.state


def test_moving_average_default_ignores_missing_estimate_and_constructor_validates():
    p = torch.nn.Parameter(torch.ones(2))
    opt = lm.MSVAG([p], lr=0.1)
    assert not opt.needs_batch_variance and opt.rule == lm.MSVAG.rule
    p.grad = torch.ones(2)
    opt.step()
    with pytest.raises(ValueError, match="variance must be"):
        lm.MSVAG([p], lr=0.1, variance="batch")
    with pytest.raises(ValueError, match="sign_factor must be"):
        lm.MSSDVA([p], lr=0.1, factor="tanh")
    with pytest.raises(ValueError, match="variance adaptation only"):
        UpdateRule(variance="minibatch")
    with pytest.raises(ValueError, match="sign \\+ variance adaptation only"):
        UpdateRule(sign_factor="sqrt")
    # the kernels' rule lists: four operands in RULES, the mini-batch rules (fifth operand) apart
    assert not any(r.needs_batch_variance for r in RULES)
    assert all(r.needs_batch_variance for r in MINIBATCH_RULES) and len(set(MINIBATCH_RULES)) == 6
    assert {r.sign_factor for r in RULES if r.sign and r.variance_adaptation} == {"erf", "sqrt"}
    assert set(_cpu_kernel.KERNEL_RULES) == set(RULES) | set(MINIBATCH_RULES)


def test_sign_factor_closed_forms():
    """γ^s from γ (1 + η² = 1/γ): erf(√(γ/(2(1−γ)))) and √γ, at γ = 0 and 1 without NaN;
    γ = 1/2 is η = 1, where erf(1/√2) = P(|Z| < 1) = 0.682689 and (1 + 1)^−½ = 0.707107."""
    gamma = torch.tensor([0.0, 1e-12, 0.2, 0.5, 0.8, 1 - 1e-12, 1.0], dtype=torch.float64)
    ops = F._TensorOps(torch.float64)
    erf = _sign_factor_math(ops, gamma.clone(), 1.0, "erf")
    sqrt = _sign_factor_math(ops, gamma.clone(), 1.0, "sqrt")
    expected = [0.0] + [math.erf(math.sqrt(x / (2 * (1 - x)))) for x in gamma.tolist()[1:-1]] + [1.0]
    np.testing.assert_allclose(erf.numpy(), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sqrt.numpy(), np.sqrt(gamma.numpy()), rtol=1e-15)
    assert erf[3].item() == pytest.approx(0.682689492, abs=1e-9) and sqrt[3].item() == pytest.approx(0.707106781, abs=1e-9)
    # with upper ≠ 1 (γ' = γ · upper) the same factor: the step divides by √upper for sqrt only
    upper = 3.7
    torch.testing.assert_close(_sign_factor_math(ops, gamma * upper, upper, "erf"), erf)
    torch.testing.assert_close(_sign_factor_math(ops, gamma * upper, upper, "sqrt") / math.sqrt(upper), sqrt)
    # paper Fig. 3: Adam's factor approximates the optimal one (largest gap 0.064)
    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    diff = _sign_factor_math(ops, grid.clone(), 1.0, "erf") - _sign_factor_math(ops, grid.clone(), 1.0, "sqrt")
    assert float(diff.abs().max()) == pytest.approx(0.064, abs=5e-4)  # docs/algorithm.md §1


def test_mssdva_first_step_is_mssd_step_and_zero_moment_gives_no_move():
    for factor in ("erf", "sqrt"):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = lm.MSSDVA([p], lr=0.5, factor=factor)
        p.grad = torch.tensor([2.0, -0.1, 0.0], dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([-0.5, 0.5, 0.0], dtype=torch.float64))
        torch.testing.assert_close(opt.sign_factors()[0], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 4)
        self.fc2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_end_to_end_with_the_estimator_matches_oracle_with_brute_force_variances():
    """BatchVarianceEstimator + MSVAG(variance="minibatch") on a small model for 5 steps (with
    an L2 term, deterministic) against the oracle fed σ̂² from per-example backward passes."""
    torch.manual_seed(0)
    model = _Net().double()
    ref = _Net().double()
    ref.load_state_dict(model.state_dict())
    params = list(model.parameters())
    opt = lm.MSVAG(params, lr=0.05, variance="minibatch")
    oracles = [NumpyFamily(opt.rule, p.detach().numpy(), 0.05, 0.9) for p in ref.parameters()]
    estimator = BatchVarianceEstimator(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    B = 8
    for _ in range(5):
        x, y = torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
        opt.zero_grad()
        with estimator.record():
            loss = loss_fn(model(x), y) + 1e-3 * sum((p**2).sum() for p in params)
            loss.backward()
        estimator.compute()
        opt.step()
        # brute force: B per-example backward passes of the data term on the reference copy
        per_example = []
        for k in range(B):
            grads = torch.autograd.grad(loss_fn(ref(x[k : k + 1]), y[k : k + 1]), list(ref.parameters()))
            per_example.append([g.detach() for g in grads])
        total = torch.autograd.grad(loss_fn(ref(x), y) + 1e-3 * sum((p**2).sum() for p in ref.parameters()),
                                    list(ref.parameters()))
        with torch.no_grad():
            for i, (p, oracle) in enumerate(zip(ref.parameters(), oracles)):
                stack = torch.stack([e[i] for e in per_example])
                sigma2 = ((stack**2).mean(0) - stack.mean(0) ** 2) / (B - 1)
                oracle.step(total[i].numpy(), batch_variance=sigma2.numpy())
                p.copy_(torch.from_numpy(oracle.theta))
    estimator.close()
    for p, oracle in zip(params, oracles):
        np.testing.assert_allclose(p.detach().numpy(), oracle.theta, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), oracle.u, rtol=1e-7, atol=1e-15)


def test_bfloat16_minibatch_step_is_the_float32_step_rounded():
    torch.manual_seed(1)
    p16 = torch.nn.Parameter(torch.randn(50).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    opts = [lm.MSVAG([p], lr=0.1, variance="minibatch", foreach=False) for p in (p16, p32)]
    for _ in range(3):
        g, s = torch.randn(50).bfloat16(), torch.rand(50).bfloat16()
        p16.grad, p16.grad_batch_variance = g, s
        p32.grad, p32.grad_batch_variance = g.float(), s.float()
        for opt in opts:
            opt.step()
        # both computed in float32 from the same values; the 16-bit one is rounded once per step
        torch.testing.assert_close(p16.detach(), p32.detach().bfloat16(), rtol=0, atol=0)
        p32.data.copy_(p16.detach().float())
        for key in ("exp_avg", "exp_avg_sq"):
            opts[1].state[p32][key].copy_(opts[0].state[p16][key].float())


@pytest.mark.parametrize("fused", [True, None])
def test_fused_minibatch_with_estimate_of_another_dtype_falls_back_with_same_numbers(fused):
    """σ̂² in float32 for float64 parameters: that tensor takes the multi-tensor path; the numbers
    equal the single-tensor path's fed the same values."""
    torch.manual_seed(3)
    base = [torch.randn(40, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)]
    results = []
    for kwargs in (dict(fused=fused), dict(foreach=False, fused=False)):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = lm.MSVAG(params, lr=0.1, variance="minibatch", **kwargs)
        gen = torch.Generator().manual_seed(5)
        for _ in range(4):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.3
                s = torch.rand(p.shape, generator=gen)
                p.grad_batch_variance = s if i == 0 else s.double()  # the first one float32
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [lm.MSVAG, lm.SVAG, lm.MSSDVA])
def test_state_dict_records_the_estimator_and_refuses_the_other(cls):
    """exp_avg_sq holds v~ (moving average) or u / σ̂² (mini-batch): the state dict says which,
    the same estimator loads it, the other is refused before anything changes, and a state
    dict without the record (0.1.0) still loads."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    p.grad, p.grad_batch_variance = torch.randn(5), torch.rand(5)
    saved = {}
    for variance in ("moving_average", "minibatch"):
        opt = cls([p], lr=0.1, variance=variance)
        opt.step()
        saved[variance] = opt.state_dict()
        assert saved[variance]["param_groups"][0]["variance"] == variance  # where torch keeps hyperparameters
    for variance, other in (("moving_average", "minibatch"), ("minibatch", "moving_average")):
        target = cls([p], lr=0.1, variance=variance)
        target.load_state_dict(saved[variance])
        before = {k: v.clone() for k, v in target.state[p].items()}
        with pytest.raises(ValueError, match=f"built with variance='{other}'"):
            target.load_state_dict(saved[other])
        assert all(torch.equal(before[k], v) for k, v in target.state[p].items())
    # a state of 0.1.0: no method record, the estimator (moving average) only at the top level
    legacy = {"state": saved["moving_average"]["state"],
              "param_groups": [{k: v for k, v in g.items() if k not in ("variance", "factor")}
                               for g in saved["moving_average"]["param_groups"]]}
    cls([p], lr=0.1).load_state_dict(legacy)
    with pytest.raises(ValueError, match="built with variance='moving_average'"):
        cls([p], lr=0.1, variance="minibatch").load_state_dict(legacy)


def test_cpu_kernel_float_erf_is_within_8_ulp_of_libm():
    """The fused CPU kernel's float erf (a vectorizable rational approximation; float64 uses libm,
    docs/algorithm.md §1.2) against math.erf, from the smallest normal arguments to erf = 1."""
    if _cpu_kernel.kernel() is None:
        pytest.skip("no C++ compiler: the fused CPU kernel is not built here")
    x = np.concatenate([np.logspace(-37, 0.7, 20_000), np.linspace(0.0, 6.0, 20_001), [np.inf]]).astype(np.float32)
    got = _cpu_kernel.erf_float(torch.from_numpy(x)).double().numpy()
    want = np.array([math.erf(float(v)) for v in x])
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 7.5
    nonzero = want > 0
    assert np.max(np.abs(got - want)[nonzero] / want[nonzero]) < 5e-7
    assert got[x == 0].tolist() == [0.0] and got[-1] == 1.0 and got[x >= 4].min() == 1.0
