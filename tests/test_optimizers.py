"""The optimizer family against an independent NumPy transcription of docs/algorithm.md §1."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import lightning_msvag as lm
from lightning_msvag import _cpu_kernel
from lightning_msvag import functional as F
from lightning_msvag.functional import CPU_TILE_NUMEL, _default_paths, variance_ratio
from tests.helpers.numpy_reference import NumpyFamily, rho, rho_reference_form, step_from_state

from lightning_msvag.registry import METHODS

def _bound_class(method):
    """The row's optimizer as a class: rows may share a class and differ in ``init_args``
    (M-SSD-VA's factor), so bind them as defaults and expose the row's rule."""
    if not method.init_args:
        return method.cls
    base, args = method.cls, dict(method.init_args)

    def __init__(self, params, *a, **kw):
        base.__init__(self, params, *a, **{**args, **kw})

    return type(base.__name__, (base,), {"rule": method.rule, "__init__": __init__})


#: the project's optimizers, from the method table (every test below is parametrized from it);
#: the mini-batch-variance rows need an estimate per step: tests/test_minibatch_variance.py
CLASSES = {
    m.name: _bound_class(m) for m in METHODS if issubclass(m.cls, lm.DissectedOptimizer) and not m.needs_batch_variance
}
#: the variance-adapted ones (they expose γ)
VA_METHODS = [name for name, cls in CLASSES.items() if cls.rule.variance_adaptation]
#: the ones without a sign: their first step is the SGD step, a NaN gradient reaches θ
NON_SIGN_METHODS = [name for name, cls in CLASSES.items() if not cls.rule.sign]
SHAPES = [(7,), (13, 17), (3, 4, 5), (1,), (200,)]
# two param groups with their own lr and beta; the second holds a non-contiguous parameter
GROUPS = [dict(shapes=SHAPES[:3], lr=0.01, beta=0.9), dict(shapes=SHAPES[3:], lr=0.03, beta=0.7)]


#: every execution path: (optimizer kwargs, CPU tile size, fused-kernel grain, device)
PATHS = {
    "single": (dict(foreach=False, fused=False), None, None, "cpu"),  # the plain reference path
    "multi": (dict(foreach=True, fused=False), None, None, "cpu"),
    "single-tiled": (dict(foreach=False, fused=False), 50, None, "cpu"),
    "multi-tiled": (dict(foreach=True, fused=False), 50, None, "cpu"),
    "fused": (dict(fused=True), None, None, "cpu"),
    # grain 7: the parallel chunks of the C++ kernel start and end inside tensors
    "fused-split": (dict(fused=True), None, 7, "cpu"),
    "default": (dict(), None, None, "cpu"),
    "cuda-single": (dict(foreach=False), None, None, "cuda"),
    "cuda-multi": (dict(foreach=True), None, None, "cuda"),
    "cuda-fused": (dict(fused=True), None, None, "cuda"),  # the generated Triton kernel
    "cuda-default": (dict(), None, None, "cuda"),  # = cuda-fused where Triton runs
    # the step inside torch.compile(fullgraph=True): the default optimizer, its traced path
    "compiled": (dict(), None, None, "cpu"),  # on CPU: the eager step as one custom operator
    "compiled-traced": (dict(), None, None, "cpu"),  # on CPU too: the update traced for inductor, as on CUDA
    "cuda-compiled": (dict(), None, None, "cuda"),
}
#: the plain reference path and the default path run in the quick suite; the others (which
#: must agree with them) in the full one (pytest -m "not slow" is the edit-test loop)
_QUICK_PATHS = ("single", "default")
PATH_MARKS = {
    name: [pytest.mark.cuda] if name.startswith("cuda") else ([] if name in _QUICK_PATHS else [pytest.mark.slow]) for name in PATHS
}


def _path_params():
    return [pytest.param(name, marks=PATH_MARKS[name], id=name) for name in PATHS]


def _use_path(opt, path, monkeypatch):
    """Set the path's tile and grain; returns the function that takes a step on it."""
    _, tile, grain, _ = PATHS[path]
    opt._tile_numel = tile
    if grain is not None:
        monkeypatch.setattr(F, "KERNEL_GRAIN", grain)
    if path == "compiled-traced":
        monkeypatch.setattr(F, "COMPILED_CPU_STEP_AS_OPERATOR", False)
    return compiled_step(opt) if "compiled" in path else opt.step


def compiled_step(opt):
    """``opt.step`` inside ``torch.compile(fullgraph=True)`` (no graph break allowed); the returned
    function's ``graphs()`` counts the graphs compiled since (1: no recompilation after the first step)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    @torch.compile(fullgraph=True)
    def step():
        opt.step()

    step.graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return step


@pytest.fixture
def fresh_kernel(monkeypatch):
    """Start the test with the fused kernel unloaded; forget whatever it did afterwards."""
    _cpu_kernel._reset()
    yield
    _cpu_kernel._reset()


def _gradient_stream(rng, shapes, n_steps, scale_exponents=(-3, 2)):
    """Per-coordinate mean + noise at mixed scales, with exact zeros.

    Each tensor gets its own scale (1e-3 to 1e2 by default); per coordinate a
    signal-to-noise ratio from 0 to 3 so γ covers (0, 1); some coordinates are always
    exactly 0 (m = v = 0), and some entries are 0 at random steps.
    """
    scales = [10.0 ** rng.uniform(*scale_exponents) for _ in shapes]
    means = [rng.uniform(-3, 3, size=s) for s in shapes]
    dead = [rng.random(size=s) < 0.1 for s in shapes]
    for _ in range(n_steps):
        grads = []
        for shape, scale, mean, dead_mask in zip(shapes, scales, means, dead):
            g = scale * (mean + rng.standard_normal(shape))
            g[dead_mask] = 0.0
            g[rng.random(size=shape) < 0.05] = 0.0
            grads.append(g)
        yield grads


def _make_params(rng, dtype):
    params = []
    for gi, group in enumerate(GROUPS):
        ps = []
        for shape in group["shapes"]:
            data = torch.tensor(rng.standard_normal(shape), dtype=dtype)
            ps.append(torch.nn.Parameter(data))
        if gi == 1:  # a non-contiguous parameter exercises the whole-tensor path
            data = torch.tensor(rng.standard_normal((5, 6)), dtype=dtype).t()
            ps.append(torch.nn.Parameter(data))
        params.append(ps)
    return params


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12),
                                              pytest.param(torch.float32, 1e-5, 1e-5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("path", _path_params())
@pytest.mark.parametrize("method", list(CLASSES))
def test_matches_numpy_transcription_of_spec(method, path, maximize, dtype, rtol, atol, monkeypatch):
    """1000 steps of every path (whole tensors, small CPU tiles, the fused C++ kernel with
    whole and split chunks, the default, CUDA) against NumPy, minimizing and maximizing
    (the oracle negates the gradient; the code folds the sign into its own arithmetic)."""
    kwargs, _, _, device = PATHS[path]
    rng = np.random.default_rng(1234)
    torch_params = [[torch.nn.Parameter(p.detach().to(device)) for p in ps] for ps in _make_params(rng, dtype)]
    opt = CLASSES[method](
        [dict(params=ps, lr=g["lr"], beta=g["beta"]) for ps, g in zip(torch_params, GROUPS)],
        maximize=maximize,
        **kwargs,
    )
    step = _use_path(opt, path, monkeypatch)
    flat_params = [p for ps in torch_params for p in ps]
    group_of = [gi for gi, ps in enumerate(torch_params) for _ in ps]
    oracles = [
        NumpyFamily(CLASSES[method].rule, p.detach().cpu().double().numpy(), GROUPS[gi]["lr"], GROUPS[gi]["beta"])
        for p, gi in zip(flat_params, group_of)
    ]
    shapes = [tuple(p.shape) for p in flat_params]
    # fused-split opens a parallel region on every step (~10 ms each on a busy 2-core
    # machine): fewer steps there; its arithmetic is the fused path's, tested for 1000
    n_steps = 300 if path == "fused-split" else 1000
    for grads in _gradient_stream(rng, shapes, n_steps):
        for p, g, oracle in zip(flat_params, grads, oracles):
            g_t = torch.tensor(g, dtype=dtype)
            p.grad = g_t.to(device)
            oracle.step(g_t.double().numpy(), maximize=maximize)  # the oracle sees the same (rounded) gradient
        step()
    if "compiled" in path:
        assert step.graphs() == 1  # one graph for every step: no recompilation as k grows

    for i, (p, oracle) in enumerate(zip(flat_params, oracles)):
        state = opt.state[p]
        assert int(state["step"]) == n_steps
        # atol scales with the tensor: float32 parameters of size ~3 carry ~1e-6 absolute
        # round-off after 1000 rounded updates, however exact each update is
        scale = max(1.0, float(np.abs(oracle.theta).max()))
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), oracle.theta, rtol=rtol, atol=atol * scale, err_msg=f"param {i}")
        rule = CLASSES[method].rule
        # buffers: m~ where a moving average is used, v~ with variance adaptation, none else
        assert ("exp_avg" in state) == rule.needs_first_moment and ("exp_avg_sq" in state) == rule.needs_second_moment
        if rule.needs_first_moment:
            np.testing.assert_allclose(state["exp_avg"].cpu().double().numpy(), oracle.m_tilde, rtol=rtol, atol=atol * 1e-3)
        if rule.needs_second_moment:
            np.testing.assert_allclose(state["exp_avg_sq"].cpu().double().numpy(), oracle.v_tilde, rtol=rtol, atol=atol * 1e-3)
    if path.startswith("fused") or path == "default":  # the C++ kernel ran, no fallback
        assert _cpu_kernel._broken is None, _cpu_kernel._broken
    if method in VA_METHODS:
        gammas = opt.variance_adaptation_factors()
        assert len(gammas) == len(oracles)
        for gamma, oracle in zip(gammas, oracles):
            np.testing.assert_allclose(gamma.cpu().double().numpy(), oracle.gamma, rtol=1e-6 if dtype == torch.float64 else 1e-3, atol=1e-6)
            # coordinates that were always zero: m = v = 0, γ must be 0 not NaN
        assert all(bool(torch.isfinite(g).all()) for g in gammas)


@pytest.mark.parametrize("method", list(CLASSES))
def test_all_paths_agree_at_default_tile(method):
    """A tensor larger than one CPU tile, plus small ones packed into one tile."""
    torch.manual_seed(0)
    shapes = [(CPU_TILE_NUMEL + 1000,), (10, 10), (3,)]
    base = [torch.randn(s) for s in shapes]
    results = []
    for kwargs in (dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True)):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = CLASSES[method](params, lr=0.01, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) + 0.5
            opt.step()
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [dict(), dict(foreach=True), dict(lr_tensor=True)], ids=["default", "foreach", "lr-tensor"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_compiled_cpu_step_is_the_eager_step_bitwise(method, setting):
    """On CPU the compiled step runs the eager step as one operator (docs/algorithm.md §3): the same
    numbers bit for bit over 30 steps, whatever path the group's settings choose; one graph."""
    torch.manual_seed(0)
    shapes = [(CPU_TILE_NUMEL + 1000,), (10, 10), (3,)]
    base = [torch.randn(s) for s in shapes]
    setting = dict(setting)
    lr = torch.tensor(0.01) if setting.pop("lr_tensor", False) else 0.01
    results = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = CLASSES[method](params, lr=lr.clone() if isinstance(lr, torch.Tensor) else lr, **setting)
        step = compiled_step(opt) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) + 0.5
            step()
        if compiled:
            assert step.graphs() == 1
        results.append([p.detach().clone() for p in params] + [t.clone() for st in opt.state.values()
                                                                for t in st.values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_rho_reference_values():
    expected = {1: 0.9999, 2: 0.5014, 3: 0.3358, 5: 0.2044, 10: 0.1090, 20: 0.0672, 100: 0.0526}
    for k, value in expected.items():
        assert variance_ratio(0.9, k) == pytest.approx(value, abs=5e-5), k
        assert rho(0.9, k) == pytest.approx(value, abs=5e-5)
        # the two forms of ρ in docs/algorithm.md §1 agree
        assert rho_reference_form(0.9, k) == pytest.approx(variance_ratio(0.9, k), rel=1e-12)
    assert variance_ratio(0.9, 10**6) == pytest.approx((1 - 0.9) / (1 + 0.9), rel=1e-9)
    assert variance_ratio(0.0, 5) == 0.9999  # β = 0: ρ = 1, capped


@pytest.mark.parametrize("method", NON_SIGN_METHODS)
def test_first_step_is_sgd_step(method):
    torch.manual_seed(0)
    p0 = torch.randn(1000, dtype=torch.float64)
    g = torch.randn(1000, dtype=torch.float64)
    g[:10] = 0
    p = torch.nn.Parameter(p0.clone())
    opt = CLASSES[method]([p], lr=0.3)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), p0 - 0.3 * g, rtol=1e-14, atol=1e-15)
    if method in VA_METHODS:
        gamma = opt.variance_adaptation_factors()[0]
        assert torch.equal(gamma, (g != 0).double())  # γ = 1, and 0 where m = v = 0


def test_first_step_is_sgd_step_in_float32_too():
    """Computed literally, γ at k = 1 suffers 1e-3 round-off in float32; it is exactly 1 here."""
    torch.manual_seed(0)
    p0, g = torch.randn(10000), torch.randn(10000)
    p = torch.nn.Parameter(p0.clone())
    opt = lm.MSVAG([p], lr=0.1)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), p0 - 0.1 * (g * 0.1 / 0.1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("path", ["single", "multi", "fused"])
def test_zero_gradients_give_no_update_and_no_nan(method, path):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = CLASSES[method]([p], lr=1.0, **PATHS[path][0])
    for _ in range(5):
        p.grad = torch.zeros(4, 3)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 3))
    assert opt.nonfinite_state() == []
    if method in VA_METHODS:
        assert torch.equal(opt.variance_adaptation_factors()[0], torch.zeros(4, 3))


def test_sign_of_zero_is_zero_for_mssd():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = lm.MSSD([p], lr=1.0)
    p.grad = torch.tensor([2.0, 0.0, -5.0])
    opt.step()
    assert p.detach().tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip(method, foreach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(64, 5), torch.randn(64, 2)

    def closure_for(m):
        def closure():
            m.zero_grad()
            idx = torch.randint(0, 64, (8,))
            loss = ((m(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            return loss
        return closure

    opt = CLASSES[method](
        [dict(params=model[0].parameters(), lr=0.05), dict(params=model[2].parameters(), beta=0.8)],
        lr=0.02,
        foreach=foreach,
    )
    torch.manual_seed(1)
    for _ in range(20):
        opt.step(closure_for(model))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    clone = copy.deepcopy(model)
    clone.load_state_dict(saved["model"])
    opt2 = CLASSES[method](
        [dict(params=clone[0].parameters(), lr=0.05), dict(params=clone[2].parameters(), beta=0.8)],
        lr=0.02,
        foreach=foreach,
    )
    opt2.load_state_dict(saved["opt"])
    assert [int(s["step"]) for s in opt2.state.values()] == [20] * 4
    rng_state = torch.get_rng_state()
    for _ in range(20):
        opt.step(closure_for(model))
    torch.set_rng_state(rng_state)
    for _ in range(20):
        opt2.step(closure_for(clone))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        for key in s1:
            assert torch.equal(s1[key], s2[key])


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = lm.MSVAG([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert p.grad is not None


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two 16-bit tensors of the same dtype (±0 are equal)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", ["single", "multi", "single-tiled", "fused", "fused-split"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_16bit_step_is_the_exact_step_rounded(method, path, dtype, monkeypatch):
    """16-bit parameters: after every step, θ, m~ and v~ equal the float64 step from the
    previous 16-bit state, rounded to the dtype (tests.helpers.numpy_reference.step_from_state).

    The code computes in float32, so a result may differ by one unit in the last place
    where the exact value lies within float32 round-off of a rounding boundary: never by
    more, and rarely (≤ 1% of the values).
    """
    rng = np.random.default_rng(7)
    shapes = [(64,), (8, 8), (3,)]
    lr, beta = 1e-2, 0.9
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=dtype)) for s in shapes]
    kwargs, _, _, _ = PATHS[path]
    opt = CLASSES[method](params, lr=lr, beta=beta, **kwargs)
    _use_path(opt, path, monkeypatch)
    off_by_one = total = 0
    for k, grads in enumerate(_gradient_stream(rng, shapes, 60, scale_exponents=(-1, 1))):
        before = []
        for p, g in zip(params, grads):
            state = opt.state.get(p) or {}
            zeros = np.zeros(p.shape)
            before.append((
                p.detach().double().numpy().copy(),
                state["exp_avg"].double().numpy().copy() if "exp_avg" in state else zeros,
                state["exp_avg_sq"].double().numpy().copy() if "exp_avg_sq" in state else zeros,
            ))
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        for p, (theta, m, v) in zip(params, before):
            expected = step_from_state(CLASSES[method].rule, theta, m, v, k, p.grad.double().numpy(), lr, beta)
            state = opt.state[p]
            pairs = [(p.detach(), expected[0])] + [
                (state[key], want) for key, want in zip(("exp_avg", "exp_avg_sq"), expected[1:]) if key in state
            ]
            for got, want in pairs:
                distance = _ulp_distance(got, torch.tensor(want).to(dtype))
                assert int(distance.max()) <= 1, (k, got, want)
                off_by_one += int((distance == 1).sum())
                total += distance.numel()
    assert off_by_one <= 0.01 * total, (off_by_one, total)
    if method in VA_METHODS:
        for gamma in opt.variance_adaptation_factors():
            assert gamma.dtype == torch.float32 and bool(torch.isfinite(gamma).all())
            assert float(gamma.min()) >= 0.0 and float(gamma.max()) <= 1.0


@pytest.mark.parametrize("path", ["single", "multi", "single-tiled", "multi-tiled", "fused", "fused-split"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_sign_descent_on_the_gradient_keeps_no_moving_average(path, maximize, monkeypatch):
    """The rule table's SSD (θ ← θ − α sign(g)) runs on every path with no state buffers."""
    rule = F.UpdateRule(direction="gradient", sign=True)
    assert not rule.needs_first_moment and not rule.needs_second_moment
    kwargs, tile, grain, _ = PATHS[path]
    if grain is not None:
        monkeypatch.setattr(F, "KERNEL_GRAIN", grain)
    rng = np.random.default_rng(3)
    shapes = [(7,), (13, 17), (200,)]
    params = [torch.tensor(rng.standard_normal(s)) for s in shapes]
    oracles = [NumpyFamily(lm.SSD.rule, p.numpy(), 0.01, 0.9) for p in params]
    for k, grads in enumerate(_gradient_stream(rng, shapes, 100), start=1):
        grads = [torch.tensor(g) for g in grads]
        F.dissected_adam(
            params, grads, [None] * 3, [None] * 3, [k] * 3, rule=rule, lr=0.01, beta=0.9, maximize=maximize,
            foreach=kwargs.get("foreach", False), fused=kwargs.get("fused", False), tile_numel=tile,
        )
        for o, g in zip(oracles, grads):
            o.step(g.numpy(), maximize=maximize)
    for p, o in zip(params, oracles):
        np.testing.assert_allclose(p.numpy(), o.theta, rtol=1e-12, atol=1e-12)


def test_noisy_quadratic_convergence_and_gamma_shrinks_with_noise():
    """Each optimizer reduces ½‖θ‖²-type loss under gradient noise; M-SVAG's γ falls with noise."""
    d = 200
    scales = torch.linspace(0.5, 2.0, d, dtype=torch.float64)

    def run(cls, noise, steps=300, lr=0.05):
        gen = torch.Generator().manual_seed(0)
        theta = torch.nn.Parameter(torch.full((d,), 2.0, dtype=torch.float64))
        opt = cls([theta], lr=lr)
        for _ in range(steps):
            theta.grad = scales * theta.detach() + noise * torch.randn(d, generator=gen, dtype=torch.float64)
            opt.step()
        loss = 0.5 * float((scales * theta.detach() ** 2).sum())
        return loss, opt

    initial = 0.5 * float((scales * 4.0).sum())
    for name, cls in CLASSES.items():
        lr = 0.01 if cls.rule.sign else 0.05
        loss, _ = run(cls, noise=1.0, lr=lr)
        assert loss < 0.1 * initial, (name, loss, initial)
    adam_theta = torch.nn.Parameter(torch.full((d,), 2.0, dtype=torch.float64))
    adam = lm.build_optimizer("adam", [adam_theta], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        adam_theta.grad = scales * adam_theta.detach() + torch.randn(d, generator=gen, dtype=torch.float64)
        adam.step()
    assert 0.5 * float((scales * adam_theta.detach() ** 2).sum()) < 0.1 * initial

    # while training, γ also sees the drift of the gradient (θ moves), so it is < 1 even
    # without noise; it still falls as the noise grows
    training_gammas = []
    for noise in (0.0, 0.3, 3.0):
        _, opt = run(lm.MSVAG, noise=noise, steps=100)
        training_gammas.append(float(opt.variance_adaptation_factors()[0].mean()))
    assert training_gammas[0] > training_gammas[1] > training_gammas[2]
    # at a fixed θ (lr = 0) only the noise remains: γ = 1 without it, then falls
    stationary_gammas = []
    for noise in (0.0, 1.0, 4.0, 16.0):
        _, opt = run(lm.MSVAG, noise=noise, steps=100, lr=0.0)
        stationary_gammas.append(float(opt.variance_adaptation_factors()[0].mean()))
    assert stationary_gammas[0] == 1.0
    assert all(a > b for a, b in zip(stationary_gammas, stationary_gammas[1:]))
    assert stationary_gammas[-1] < 0.6


def test_gamma_matches_lemma_1_for_iid_gradients():
    """For i.i.d. g ~ N(μ, σ²) and large k (docs/algorithm.md §1, Lemma 1): var[m] = ρ∞ σ²
    across coordinates, and the variance estimate s that γ = m²/(m² + ρ s) implies is
    unbiased, E[s] = σ², so μ²/(μ² + ρ∞ E[s]) = μ²/(μ² + ρ∞ σ²) = 0.826.

    (The mean of the per-coordinate γ is not that value, γ being a non-linear function of
    noisy m and s; its population form is.) Dropping 1/(1−ρ) from s gives 0.834, and
    s = v − m² without ρ's cap or bias correction is off as well: abs 0.005 catches both.
    """
    gen = torch.Generator().manual_seed(0)
    n, mu, sigma, beta, steps = 50000, 1.0, 2.0, 0.9, 150
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = lm.MSVAG([p], lr=0.0, beta=beta)
    for _ in range(steps):
        p.grad = mu + sigma * torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
    rho_inf = (1 - beta) / (1 + beta)
    m = opt.state[p]["exp_avg"] / (1 - beta**steps)
    gamma = opt.variance_adaptation_factors()[0]
    rho_s = m**2 * (1 / gamma - 1)  # ρ s, from γ = m² / (m² + ρ s)
    expected = mu**2 / (mu**2 + rho_inf * sigma**2)
    assert mu**2 / (mu**2 + float(rho_s.mean())) == pytest.approx(expected, abs=0.005)
    assert float(m.var()) == pytest.approx(rho_inf * sigma**2, rel=0.03)


@pytest.mark.parametrize("cls", list(CLASSES.values()))
def test_bad_hyperparameters_raise_value_error(cls):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in (dict(lr=-0.1), dict(lr=float("nan")), dict(lr=float("inf")), dict(lr=0.1, beta=1.0),
                   dict(lr=0.1, beta=-0.1), dict(lr=0.1, beta=float("nan"))):
        with pytest.raises(ValueError):
            cls(p, **kwargs)
    opt = cls(p, lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(1))], beta=2.0))


@pytest.mark.parametrize("cls", list(CLASSES.values()))
def test_sparse_gradients_raise_naming_the_optimizer(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = cls(emb.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=cls.__name__):
        opt.step()


@pytest.mark.parametrize("method", NON_SIGN_METHODS)
def test_nonfinite_gradient_is_visible_by_default(method):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = CLASSES[method]([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.nonfinite_state() == [(0, 0)]
    assert math.isnan(float(p.detach()[1]))
    assert bool(torch.isfinite(p.detach()[[0, 2]]).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_in_mssd_is_reported_by_nonfinite_state(bad):
    """torch.sign(NaN) = 0 and sign(inf) = 1 keep M-SSD's parameters finite: only
    nonfinite_state() reveals that the moving average is broken."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = lm.MSSD([p], lr=0.1)
    p.grad = torch.tensor([bad, 1.0])
    opt.step()
    assert bool(torch.isfinite(p.detach()).all())
    assert opt.nonfinite_state() == [(0, 0)]


@pytest.mark.parametrize("method", list(CLASSES))
def test_error_if_nonfinite_raises_and_leaves_everything_unchanged(method):
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    opt = CLASSES[method]([dict(params=[a]), dict(params=[b])], lr=0.1, error_if_nonfinite=True)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    params_before = (a.detach().clone(), b.detach().clone())
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("inf")])
    with pytest.raises(RuntimeError, match=r"non-finite gradient.*\(1, 0\)"):
        opt.step()
    assert torch.equal(a.detach(), params_before[0]) and torch.equal(b.detach(), params_before[1])
    after = opt.state_dict()
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][key][name])


def test_variance_adaptation_factors_order_and_read_only():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(4))  # never gets a gradient: no state, not listed
    opt = lm.SVAG([dict(params=[a, c]), dict(params=[b], beta=0.5)], lr=0.1)
    assert opt.variance_adaptation_factors() == []
    for _ in range(3):
        a.grad, b.grad = torch.randn(3), torch.randn(2, 2)
        opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    gammas = opt.variance_adaptation_factors()
    assert [g.shape for g in gammas] == [a.shape, b.shape]
    assert opt.state_dict()["state"].keys() == snapshot["state"].keys()
    for key, state in snapshot["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt.state_dict()["state"][key][name])


def test_registry_names_and_errors():
    assert lm.available_optimizers() == ["m-sgd", "m-ssd", "m-svag", "svag", "m-ssd-va", "m-ssd-va-sqrt",
                                         "m-svag-mb", "svag-mb", "ssd", "adam", "sgd"]
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in [("M-SVAG", lm.MSVAG), ("msvag", lm.MSVAG), ("m-svag", lm.MSVAG), ("MSGD", lm.MSGD),
                      ("m-ssd", lm.MSSD), ("SVAG", lm.SVAG), ("ssd", lm.SSD), ("Adam", torch.optim.Adam),
                      ("sgd", torch.optim.SGD)]:
        assert type(lm.build_optimizer(name, p, lr=0.1)) is cls
    adam = lm.build_optimizer("adam", p)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    assert lm.build_optimizer("m-svag", p, lr=0.2, beta=0.5).defaults["beta"] == 0.5
    assert lm.build_optimizer("m-ssd-va-sqrt", p).rule.sign_factor == "sqrt"
    assert lm.build_optimizer("m-svag-mb", p).rule.variance == "minibatch"
    assert lm.build_optimizer("svag-mb", p).needs_batch_variance and not lm.build_optimizer("svag", p).needs_batch_variance
    with pytest.raises(ValueError, match="m-sgd, m-ssd, m-svag, svag, m-ssd-va, m-ssd-va-sqrt, m-svag-mb, svag-mb, ssd, adam, sgd"):
        lm.build_optimizer("rmsprop", p)


@pytest.mark.cuda
@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                         ids=["single", "multi", "fused"])
def test_cuda_matches_cpu(method, path):
    torch.manual_seed(0)
    shapes = [(300, 7), (5,), (CPU_TILE_NUMEL + 3,)]
    cpu = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu = CLASSES[method](cpu, lr=0.01)
    opt_gpu = CLASSES[method](gpu, lr=0.01, **path)
    for _ in range(20):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape, dtype=torch.float64) + 0.3
            q.grad = p.grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# Path selection and the fused C++ kernel's build / fallback
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(CLASSES))
def test_default_paths_resolve_per_rule_and_device(method):
    """(foreach, fused) that the defaults resolve to: the C++ kernel on CPU for every rule,
    multi-tensor elsewhere; an explicit choice wins."""
    rule = CLASSES[method].rule
    cpu, meta = [torch.zeros(3)], [torch.zeros(3, device="meta")]
    assert F.fused_path_available()  # a C++ compiler is part of the test environment
    assert _default_paths(cpu, None, None, rule) == (False, True)
    assert _default_paths(meta, None, None, rule) == (True, False)
    assert _default_paths(cpu + meta, None, None, rule) == (True, False)
    assert _default_paths(cpu, False, None, rule) == (False, False)
    assert _default_paths(cpu, True, None, rule) == (True, False)
    assert _default_paths(cpu, None, False, rule) == (True, False)
    assert _default_paths(cpu, None, True, rule) == (False, True)


def test_without_a_compiler_defaults_resolve_to_foreach_with_one_warning(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("LIGHTNING_MSVAG_CACHE", str(tmp_path / "cache"))  # nothing cached there
    _cpu_kernel._reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cls in CLASSES.values():
            for _ in range(2):
                assert _default_paths([torch.zeros(3)], None, None, cls.rule) == (True, False)
            p = torch.nn.Parameter(torch.ones(5))
            opt = cls([p], lr=0.1)
            p.grad = torch.ones(5)
            opt.step()
            opt.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0], messages
    assert not F.fused_path_available()


@pytest.mark.parametrize("explicit", [True, False], ids=["fused=True", "default"])
def test_failed_kernel_build_falls_back_with_one_warning_and_exact_numbers(fresh_kernel, monkeypatch, tmp_path, explicit):
    """A compiler that fails ($CXX=false): exactly one warning for the whole process, every
    optimizer then runs the multi-tensor path and still matches the oracle."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("LIGHTNING_MSVAG_CACHE", str(tmp_path / "cache"))
    _cpu_kernel._reset()
    builds = _cpu_kernel.builds
    rng = np.random.default_rng(5)
    shapes = [(7,), (13, 17), (200,)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method, cls in CLASSES.items():
            params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in shapes]
            oracles = [NumpyFamily(CLASSES[method].rule, p.detach().numpy(), 0.01, 0.9) for p in params]
            opt = cls(params, lr=0.01, **(dict(fused=True) if explicit else {}))
            for grads in _gradient_stream(rng, shapes, 50):
                for p, g, o in zip(params, grads, oracles):
                    p.grad = torch.tensor(g)
                    o.step(g)
                opt.step()
            for p, o in zip(params, oracles):
                np.testing.assert_allclose(p.detach().numpy(), o.theta, rtol=1e-10, atol=1e-12)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "fused CPU optimizer kernel unavailable" in messages[0], messages
    assert _cpu_kernel.builds == builds + 1  # tried once, not once per step or optimizer


def test_kernel_is_loaded_once_per_process_across_steps_and_lr_changes(fresh_kernel):
    assert _cpu_kernel.kernel() is not None  # built (or found) on disk
    _cpu_kernel._reset()
    loads, builds = _cpu_kernel.loads, _cpu_kernel.builds
    for cls in CLASSES.values():
        params = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(3))]
        opt = cls([dict(params=params[:1]), dict(params=params[1:], beta=0.5)], lr=0.1)
        for i in range(6):
            for group in opt.param_groups:
                group["lr"] = 0.1 / (i + 1)
            for p in params:
                p.grad = torch.randn(p.shape)
            opt.step()
    assert _cpu_kernel.loads == loads + 1
    assert _cpu_kernel.builds == builds  # cached on disk: no second build


@pytest.mark.slow
def test_concurrent_first_steps_build_the_kernel_once(tmp_path):
    """Two processes (e.g. DDP ranks) starting at once with an empty cache: one builds
    (announced in one line), the other waits on the file lock and loads the result."""
    script = (
        "import torch, lightning_msvag as lm\n"
        "from lightning_msvag import _cpu_kernel\n"
        "p = torch.nn.Parameter(torch.ones(3)); opt = lm.MSVAG([p], lr=0.1)\n"
        "p.grad = torch.ones(3); opt.step()\n"
        "assert _cpu_kernel._broken is None, _cpu_kernel._broken\n"
        "print('builds', _cpu_kernel.builds)\n"
    )
    env = dict(os.environ, LIGHTNING_MSVAG_CACHE=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert sorted(out.split()[-1] for out, _ in outputs) == ["0", "1"]
    announcements = [line for _, err in outputs for line in err.splitlines() if "lightning-msvag" in line]
    assert len(announcements) == 1 and "building the fused CPU optimizer kernel once" in announcements[0], outputs
    assert "CUDA" not in "".join(err for _, err in outputs)  # no CUDA_HOME noise on CPU
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1


@pytest.mark.parametrize("method", list(CLASSES))
def test_fused_true_with_tensors_of_other_devices_raises(method):
    """No silent fallback: the fused path has kernels for CPU (C++) and CUDA (Triton) tensors
    only; others raise torch's error for its fused optimizers (RuntimeError, its wording),
    before any state exists."""
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    p.grad = torch.zeros(4, device="meta")
    opt = CLASSES[method]([p], lr=0.1, fused=True)
    torch_wording = (r"`fused=True` requires all the params to be floating point Tensors of supported devices: "
                     r"\['cpu', 'cuda'\] but torch.float32 and meta")
    with pytest.raises(RuntimeError, match=torch_wording):
        opt.step()
    assert len(opt.state) == 0
    with pytest.raises(RuntimeError, match=torch_wording):
        F.dissected_adam([p], [p.grad], [torch.zeros_like(p)], [torch.zeros_like(p)], [1],
                         rule=CLASSES[method].rule, lr=0.1, beta=0.9, fused=True)
    with pytest.raises(RuntimeError, match=r"^`fused` and `foreach` cannot be `True` together\.$"):
        CLASSES[method]([p], lr=0.1, fused=True, foreach=True)


# --------------------------------------------------------------------------------------
# What a torch.optim user expects to carry over (the behaviours of torch's generic optimizer
# tests, test/test_optim.py, which is not shipped in the torch wheel; issue 18)
# --------------------------------------------------------------------------------------

#: the paths a step may take on CPU (the fused kernel, whole-tensor single and multi)
CPU_PATHS = ["single", "multi", "fused"]


def _snapshot(opt, params):
    """Everything a step may change: parameters, state (deep copy), per-group hyperparameters."""
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy({id(p): s for p, s in opt.state.items()}),
    )


def _assert_unchanged(opt, params, snapshot):
    values, state = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
    now = {id(p): s for p, s in opt.state.items() if len(s)}
    assert now.keys() == state.keys()
    for key, entries in state.items():
        assert now[key].keys() == entries.keys()
        for name, value in entries.items():
            assert torch.equal(now[key][name], value), name


@pytest.mark.parametrize("kind", ["float", "int", "int64-tensor", "float64-tensor"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_loaded_step_of_any_type_continues_like_the_oracle(method, kind):
    """A state_dict whose step is a number or a non-float32 tensor (old checkpoints, hand
    edits) loads like torch's Adam: a float32 0-dim tensor, and the next steps are the
    oracle's continuing from that step."""
    rng = np.random.default_rng(11)
    rule = CLASSES[method].rule
    p = torch.nn.Parameter(torch.tensor(rng.standard_normal(6)))
    oracle = NumpyFamily(rule, p.detach().numpy(), 0.02, 0.8)
    opt = CLASSES[method]([p], lr=0.02, beta=0.8)
    grads = [rng.standard_normal(6) + 0.5 for _ in range(6)]
    for g in grads[:3]:
        p.grad = torch.tensor(g)
        oracle.step(g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    convert = {"float": float, "int": int, "int64-tensor": lambda s: s.to(torch.int64),
               "float64-tensor": lambda s: s.to(torch.float64)}[kind]
    saved["state"][0]["step"] = convert(saved["state"][0]["step"])
    opt2 = CLASSES[method]([p], lr=0.02, beta=0.8)
    opt2.load_state_dict(saved)
    step = opt2.state[p]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0 and float(step) == 3
    for g in grads[3:]:
        p.grad = torch.tensor(g)
        oracle.step(g)
        opt2.step()
    assert float(opt2.state[p]["step"]) == 6
    np.testing.assert_allclose(p.detach().numpy(), oracle.theta, rtol=1e-12, atol=1e-14)


def _complex_setup(method, path, dtype=torch.complex128):
    rng = np.random.default_rng(21)
    shapes = [(5,), (3, 4)]
    params = [
        torch.nn.Parameter(torch.complex(torch.tensor(rng.standard_normal(s)), torch.tensor(rng.standard_normal(s))).to(dtype))
        for s in shapes
    ]
    opt = CLASSES[method](params, lr=0.02, beta=0.8, **PATHS[path][0])
    return rng, params, opt


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("method", list(CLASSES))
def test_complex_parameters_step_their_real_view_like_the_oracle(method, path):
    """Complex parameters are (real, imaginary) pairs on every path: θ, m~, v~ (per real
    coordinate squares) and γ equal the oracle run on torch.view_as_real; the buffers are
    complex-shaped like the parameter (torch's zeros_like(p))."""
    rng, params, opt = _complex_setup(method, path)
    rule = CLASSES[method].rule
    oracles = [NumpyFamily(rule, torch.view_as_real(p.detach()).numpy(), 0.02, 0.8) for p in params]
    for _ in range(30):
        for p, o in zip(params, oracles):
            g = rng.standard_normal(tuple(p.shape) + (2,)) + 0.3
            g[..., 1] *= 10.0  # real and imaginary parts at different scales
            p.grad = torch.view_as_complex(torch.tensor(g))
            o.step(g)
        opt.step()
    for p, o in zip(params, oracles):
        state = opt.state[p]
        np.testing.assert_allclose(torch.view_as_real(p.detach()).numpy(), o.theta, rtol=1e-10, atol=1e-12)
        for key, want in (("exp_avg", o.m_tilde), ("exp_avg_sq", o.v_tilde)):
            if key in state:
                assert state[key].dtype == p.dtype and state[key].shape == p.shape
                np.testing.assert_allclose(torch.view_as_real(state[key]).numpy(), want, rtol=1e-10, atol=1e-14)
    if method in VA_METHODS:
        for gamma, o in zip(opt.variance_adaptation_factors(), oracles):
            assert gamma.shape == o.gamma.shape and gamma.dtype == torch.float64
            np.testing.assert_allclose(gamma.numpy(), o.gamma, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["m-sgd", "m-ssd"])
def test_tracked_gamma_of_complex_parameters_is_that_of_the_real_view(method):
    """The γ monitor's tracker (M-SGD, M-SSD) squares per real coordinate too: its γ equals
    M-SVAG's on the same gradients."""
    from lightning_msvag.factors import MomentTracker, dissected_factors

    rng, params, opt = _complex_setup(method, "single")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    msvag = lm.MSVAG(twins, lr=0.0, beta=0.8)
    tracker = MomentTracker()
    for _ in range(10):
        for p, q in zip(params, twins):
            p.grad = torch.complex(torch.randn(p.shape, dtype=torch.float64), 5 * torch.randn(p.shape, dtype=torch.float64))
            q.grad = p.grad.clone()
        tracker.update(opt)
        opt.step()
        msvag.step()
    # M-SGD's and M-SVAG's m~ are the same moving average of the same gradients
    for factor, gamma in zip(dissected_factors(opt, tracker), msvag.variance_adaptation_factors()):
        assert factor.gamma.shape == gamma.shape == factor.param.shape + (2,)
        torch.testing.assert_close(factor.gamma, gamma, rtol=1e-10, atol=1e-12)


def test_adam_factor_of_complex_parameters_is_that_of_the_real_view():
    from lightning_msvag.factors import adam_factors

    p = torch.nn.Parameter(torch.complex(torch.ones(3), torch.zeros(3)))
    adam = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.complex(torch.ones(3), -2 * torch.ones(3))
    adam.step()
    (factor,) = adam_factors(adam)
    # one step: m = g, v = g² per real coordinate, so |m|/√v = 1 everywhere (0 where g = 0)
    assert factor.gamma.shape == (3, 2) and torch.equal(factor.gamma, torch.ones(3, 2))


def _refusals():
    """(name, how to break a valid second group, exception, message) for the refused-step test."""
    def fused_meta(opt, b):
        opt.param_groups[1]["fused"] = True  # b lives on meta (see the test)
        b.grad = torch.zeros(3, device="meta")

    def sparse(opt, b):
        b.grad = torch.ones(3).to_sparse()

    def lr_shape(opt, b):
        opt.param_groups[1]["lr"] = torch.tensor([0.1, 0.2])

    def lr_negative(opt, b):
        opt.param_groups[1]["lr"] = -1.0

    def lr_tensor_negative(opt, b):
        opt.param_groups[1]["lr"] = torch.tensor(-1.0)

    def fused_and_foreach(opt, b):
        opt.param_groups[1]["fused"] = True
        opt.param_groups[1]["foreach"] = True

    def beta_out_of_range(opt, b):
        opt.param_groups[1]["beta"] = 1.5

    return [
        ("fused-meta", fused_meta, RuntimeError, "`fused=True` requires all the params"),
        ("sparse", sparse, RuntimeError, "does not support sparse gradients"),
        ("lr-shape", lr_shape, ValueError, "Tensor lr must be 1-element"),
        ("lr-negative", lr_negative, ValueError, "invalid learning rate"),
        ("lr-tensor-negative", lr_tensor_negative, ValueError, "invalid learning rate"),
        ("fused-and-foreach", fused_and_foreach, RuntimeError, "`fused` and `foreach` cannot be `True` together"),
        ("beta", beta_out_of_range, ValueError, "invalid beta"),
    ]


@pytest.mark.parametrize("refusal", _refusals(), ids=[r[0] for r in _refusals()])
@pytest.mark.parametrize("method", list(CLASSES))
def test_refused_step_leaves_the_optimizer_unchanged(method, refusal):
    """A step that raises is a no-op: the first group (valid) is not stepped either, no
    state is created, no counter advances (validated before any state changes)."""
    _, breaks, error, message = refusal
    a, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    b = torch.nn.Parameter(torch.ones(3, device="meta" if refusal[0] == "fused-meta" else "cpu"))
    opt = CLASSES[method]([dict(params=[a, c]), dict(params=[b])], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()  # a has state at step 1; b and c none
    c.grad = torch.ones(3)  # would get fresh state in the first group
    b.grad = torch.ones(3, device=b.device)
    breaks(opt, b)
    params = [a, c] + ([] if b.is_meta else [b])
    snapshot = _snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert b not in opt.state and c not in opt.state and int(opt.state[a]["step"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["m-svag", "m-sgd"])
def test_compiled_step_takes_a_float_step_size_that_changes(method):
    """A scheduler writes a new float lr every epoch; the fullgraph compiled step takes it (it once
    failed on the hyperparameter check: Dynamo makes a changing float symbolic, and math.isfinite
    cannot take that) and steps the eager numbers (each new float recompiles: docs/algorithm.md §3
    advises a tensor lr). The eager twin has a real StepLR; the compiled
    one gets the same lr written by hand (Dynamo, fullgraph, refuses the wrapper a scheduler puts
    around ``step``, torch's Adam's too)."""
    torch.manual_seed(0)
    eager_p, compiled_p = (torch.nn.Parameter(torch.ones(5)) for _ in range(2))
    eager, compiled = CLASSES[method]([eager_p], lr=0.1), CLASSES[method]([compiled_p], lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(eager, 1, 0.5)
    step = compiled_step(compiled)
    for _ in range(5):
        g = torch.randn(5)
        eager_p.grad, compiled_p.grad = g.clone(), g.clone()
        compiled.param_groups[0]["lr"] = eager.param_groups[0]["lr"]
        eager.step(), step()
        schedule.step()
    assert eager.param_groups[0]["lr"] == 0.1 / 32
    assert torch.equal(eager_p, compiled_p)


@pytest.mark.slow
@pytest.mark.parametrize("refusal", [r for r in _refusals() if r[0] in ("fused-and-foreach", "beta", "lr-negative")],
                         ids=lambda r: r[0])
def test_refused_compiled_step_leaves_the_optimizer_unchanged(refusal):
    """Inside torch.compile too, what the eager step refuses is refused before any counter moves
    (the CPU operator would otherwise take fused and foreach both set without a word). Under
    fullgraph Dynamo reports a refusal as its own error carrying the project's message."""
    _, breaks, _, message = refusal
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = CLASSES["m-svag"]([dict(params=[a]), dict(params=[b])], lr=0.1)
    step = compiled_step(opt)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    step()
    breaks(opt, b)
    snapshot = _snapshot(opt, [a, b])
    with pytest.raises(Exception, match=message):
        step()
    _assert_unchanged(opt, [a, b], snapshot)
    assert int(opt.state[a]["step"]) == int(opt.state[b]["step"]) == 1


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("method", list(CLASSES))
def test_tensor_lr_gives_the_numbers_of_the_float(method, path):
    """A 0-dim tensor lr (constructor, param group, a scheduler writing tensors) on every
    path: the very numbers of the float lr."""
    rng = np.random.default_rng(4)
    shapes = [(7,), (4, 5)]
    base = [torch.tensor(rng.standard_normal(s)) for s in shapes]
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = CLASSES[method](params[:1], lr=lr, **PATHS[path][0])
        opt.add_param_group(dict(params=params[1:], lr=lr / 2 if isinstance(lr, float) else lr.clone() / 2))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        for grads in _gradient_stream(np.random.default_rng(9), shapes, 10):
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g)
            opt.step()
            scheduler.step()
        assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups) == isinstance(lr, torch.Tensor)
        runs.append([p.detach() for p in params])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", list(CLASSES))
def test_tensor_lr_other_than_one_element_is_refused_with_torchs_wording(method):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for lr in (torch.tensor([0.1, 0.2]), torch.tensor([])):
        with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
            CLASSES[method](p, lr=lr)
    opt = CLASSES[method](p, lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=torch.ones(2, 2)))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("path", ["single", "multi", "single-tiled", "fused"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_grad_scale_divides_the_gradient_on_every_path(method, path):
    """dissected_adam(grad_scale=S) on scaled gradients is the oracle's step on g (the
    scale folds into the math's gradient multiplier); found_inf ≠ 0 writes nothing."""
    rng = np.random.default_rng(8)
    kwargs, tile, _, _ = PATHS[path]
    rule = CLASSES[method].rule
    shapes = [(6,), (3, 3)]
    params = [torch.tensor(rng.standard_normal(s)) for s in shapes]
    m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    v = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    oracles = [NumpyFamily(rule, p.numpy(), 0.03, 0.9) for p in params]
    scale = torch.tensor(1024.0)
    for k, grads in enumerate(_gradient_stream(rng, shapes, 20), start=1):
        scaled = [torch.tensor(g) * 1024.0 for g in grads]
        args = dict(rule=rule, lr=0.03, beta=0.9, maximize=True, foreach=kwargs.get("foreach", False),
                    fused=kwargs.get("fused", False), tile_numel=tile, grad_scale=scale)
        before = [t.clone() for t in params + m + v]
        F.dissected_adam(params, [g * np.inf for g in scaled], m, v, [k] * 2, found_inf=torch.tensor(1.0), **args)
        assert all(torch.equal(x, y) for x, y in zip(before, params + m + v))
        F.dissected_adam(params, scaled, m, v, [k] * 2, found_inf=torch.tensor(0.0), **args)
        for o, g in zip(oracles, grads):
            o.step(g, maximize=True)
    for p, o in zip(params, oracles):
        np.testing.assert_allclose(p.numpy(), o.theta, rtol=1e-12, atol=1e-13)


def _amp_run(method, fused, scaler, steps=6, poison_at=None):
    """A small model trained with or without a GradScaler; returns (model, optimizer, scaled grads seen)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = CLASSES[method](model.parameters(), lr=0.01, fused=fused)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if i == poison_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return model, opt


@pytest.mark.parametrize("fused", [True, None], ids=["fused=True", "default"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_grad_scaler_run_equals_the_unscaled_run(method, fused):
    """A real torch.amp.GradScaler: with fused=True the optimizer takes grad_scale from the
    scaler (torch's fused protocol) and the gradients stay scaled (the step unscales inside
    the update); with the default the scaler unscales them itself. Both give the numbers of
    a run without a scaler (the scale is a power of 2: unscaling is exact)."""
    reference, _ = _amp_run(method, fused, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = _amp_run(method, fused, scaler)
    assert getattr(opt, "_step_supports_amp_scaling", False) == bool(fused)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # the scaler cleaned up
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    # the last step's gradients: still scaled with fused=True, unscaled by the scaler otherwise
    expected = scaler.get_scale() if fused else 1.0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad * expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, None], ids=["fused=True", "default"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_grad_scaler_inf_skips_the_step_and_backs_off(method, fused):
    """An inf gradient under a real GradScaler: that step changes nothing (parameters,
    state, counters) and the scale is halved."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    model, opt = _amp_run(method, fused, scaler, steps=3)
    params = list(model.parameters())
    snapshot = _snapshot(opt, params)
    gen = torch.Generator().manual_seed(5)
    opt.zero_grad()
    scaler.scale((model(torch.randn(16, 4, generator=gen)) ** 2).mean()).backward()
    params[0].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    _assert_unchanged(opt, params, snapshot)
    assert all(int(s["step"]) == 3 for s in opt.state.values())
    assert scaler.get_scale() == 2.0**11


@pytest.mark.parametrize("method", list(CLASSES))
def test_step_counters_that_differ_are_read_per_tensor(method):
    """Counters are read once per group while they agree; a parameter that skips steps (no
    gradient) or a loaded state with other counters makes them differ: each tensor then
    takes its own k, as the oracle."""
    rng = np.random.default_rng(13)
    rule = CLASSES[method].rule
    # b, in the middle, is the one that differs (the agreeing check must not read only the ends)
    a, b, c = (torch.nn.Parameter(torch.tensor(rng.standard_normal(4))) for _ in range(3))
    oracles = {p: NumpyFamily(rule, p.detach().numpy(), 0.05, 0.7) for p in (a, b, c)}
    opt = CLASSES[method]([a, b, c], lr=0.05, beta=0.7)

    def step(*stepped):
        for p in (a, b, c):
            p.grad = None
        for p in stepped:
            g = rng.standard_normal(4) + 0.5
            p.grad = torch.tensor(g)
            oracles[p].step(g)
        opt.step()

    for stepped in [(a, b, c)] * 3 + [(a, c)] * 2 + [(a, b, c)] * 3:
        step(*stepped)
    assert [int(opt.state[p]["step"]) for p in (a, b, c)] == [8, 6, 8]
    saved = opt.state_dict()
    saved["state"][1]["step"] = torch.tensor(20.0)  # b continues at k = 21
    oracles[b].k = 20
    opt.load_state_dict(saved)
    for _ in range(3):
        step(a, b, c)
    assert [int(opt.state[p]["step"]) for p in (a, b, c)] == [11, 23, 11]
    for p, o in oracles.items():
        np.testing.assert_allclose(p.detach().numpy(), o.theta, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------
# The configuration lives where torch keeps hyperparameters (issue 24, rows 7 and 8)
# --------------------------------------------------------------------------------------

#: every row of the method table that is one of the project's classes (mini-batch rows included)
ROWS = {m.name: m for m in METHODS if issubclass(m.cls, lm.DissectedOptimizer)}
ROWS_AND_MB = dict(ROWS)


def _row_optimizer(name, params, **kw):
    method = ROWS[name]
    return method.cls(params, **{**method.init_args, **kw})


def _step_with_estimate(opt, params, rng):
    for p in params:
        p.grad = torch.tensor(rng.standard_normal(tuple(p.shape)))
        if opt.needs_batch_variance:
            p.grad_batch_variance = torch.tensor(rng.uniform(0.0, 1.0, tuple(p.shape)))
    opt.step()


def _public_attributes(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "state_dict"])
@pytest.mark.parametrize("method", list(ROWS))
def test_copies_carry_the_configuration_and_step_the_same_numbers(method, copier):
    """deepcopy, pickle and state_dict carry every argument that changes the numbers (variance,
    factor: hyperparameters in defaults and each param group, as torch keeps lr), so the copy
    steps bitwise the same numbers; torch's test_deepcopy_copies_all_public_attrs holds."""
    import pickle

    rng = np.random.default_rng(3)
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in [(4, 3), (5,)]]
    opt = _row_optimizer(method, params, lr=0.05, beta=0.8)
    for _ in range(3):
        _step_with_estimate(opt, params, rng)
    if copier == "deepcopy":
        twin = copy.deepcopy(opt)
        assert _public_attributes(twin) == _public_attributes(opt)
    elif copier == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        twin = _row_optimizer(method, clones, lr=0.05, beta=0.8)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin.rule == opt.rule == ROWS[method].rule
    # (torch's Optimizer.__setstate__ adds differentiable=False to a copy's defaults)
    assert {k: v for k, v in twin.defaults.items() if k != "differentiable"} == opt.defaults
    for key in opt._RULE_ARGS:
        assert [g[key] for g in twin.param_groups] == [g[key] for g in opt.param_groups] == [ROWS[method].init_args.get(key, g[key]) for g in opt.param_groups]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    state = np.random.default_rng(4)
    twin_state = np.random.default_rng(4)
    for _ in range(3):
        _step_with_estimate(opt, params, state)
        _step_with_estimate(twin, twin_params, twin_state)
    for a, b in zip(params, twin_params):
        assert torch.equal(a.detach(), b.detach())


def test_a_param_group_may_set_its_own_variance_and_factor():
    """variance and factor are per-group hyperparameters: each group steps with its own rule
    (checked against one-group optimizers with that setting), and a bad value is refused
    before the group is added."""
    rng = np.random.default_rng(5)
    a, b = (torch.nn.Parameter(torch.tensor(rng.standard_normal(6))) for _ in range(2))
    ref_a, ref_b = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt = lm.MSSDVA([dict(params=[a]), dict(params=[b], factor="sqrt", variance="minibatch")], lr=0.01)
    single_a = lm.MSSDVA([ref_a], lr=0.01)
    single_b = lm.MSSDVA([ref_b], lr=0.01, factor="sqrt", variance="minibatch")
    assert opt.needs_batch_variance and not single_a.needs_batch_variance
    assert opt.rule_of(opt.param_groups[1]) == single_b.rule != opt.rule
    for _ in range(4):
        g = [torch.tensor(rng.standard_normal(6)) for _ in range(2)]
        s = torch.tensor(rng.uniform(0, 1, 6))
        a.grad, b.grad, ref_a.grad, ref_b.grad = g[0], g[1], g[0].clone(), g[1].clone()
        b.grad_batch_variance, ref_b.grad_batch_variance = s, s.clone()
        opt.step(), single_a.step(), single_b.step()
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    sign_factors = opt.sign_factors()
    assert torch.equal(sign_factors[1], single_b.sign_factors()[0]) and torch.equal(sign_factors[0], single_a.sign_factors()[0])
    with pytest.raises(ValueError, match="sign_factor must be"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.ones(2))], factor="tanh"))
    assert len(opt.param_groups) == 2


def _state_of(name, rng):
    """A state dict of ``name`` after two steps on a (4, 3) and a (5,) parameter."""
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in [(4, 3), (5,)]]
    if name == "adam":
        opt = torch.optim.Adam(params, lr=0.01)
    elif name == "sgd-momentum":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        opt = _row_optimizer(name, params, lr=0.01)
    for _ in range(2):
        _step_with_estimate(opt, params, rng) if name in ROWS else None
        if name not in ROWS:
            for p in params:
                p.grad = torch.tensor(rng.standard_normal(tuple(p.shape)))
            opt.step()
    return opt.state_dict()


def _same_method(a, b):
    ra, rb = ROWS[a].rule, ROWS[b].rule
    return (ra.direction, ra.sign, ra.variance_adaptation) == (rb.direction, rb.sign, rb.variance_adaptation)


@pytest.mark.parametrize("source", list(ROWS) + ["adam", "sgd-momentum"])
@pytest.mark.parametrize("target", ["m-sgd", "m-ssd", "m-svag", "svag", "ssd", "m-ssd-va"])
def test_loading_another_methods_state_is_refused_in_one_line(target, source):
    """load_state_dict refuses the state of another method (recorded in the state dict, or told
    by its buffers and keys: torch's optimizers, states that predate the record) or of another
    variance/factor, in one line naming both, and changes nothing; the optimizer steps on."""
    rng = np.random.default_rng(6)
    saved = _state_of(source, rng)
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in [(4, 3), (5,)]]
    opt = _row_optimizer(target, params, lr=0.01)
    _step_with_estimate(opt, params, rng)
    snapshot = _snapshot(opt, params)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    same = source in ROWS and _same_method(source, target)
    variants = [saved]
    if source in ROWS:  # the same state without the record, as 0.1.0 wrote it
        variants.append({"state": saved["state"], "param_groups": [{k: v for k, v in g.items() if k not in ("variance", "factor")} for g in saved["param_groups"]]})
    buffers = {n: {"step"} | ({"exp_avg"} if ROWS[n].rule.needs_first_moment else set())
               | ({"exp_avg_sq"} if ROWS[n].rule.needs_second_moment else set()) for n in ROWS}
    for state_dict in variants:
        # without the record only the buffers tell (M-SGD and M-SSD keep the same m~, the
        # variance-adapted members the same m~, v~: each can continue the other's numbers)
        told = "rule" in state_dict or source not in ROWS or buffers[source] != buffers[target]
        differs = (not same and told) or any(g.get(k, d) != opt.param_groups[0][k] for g in state_dict["param_groups"]
                                  for k, d in (("variance", "moving_average"), ("factor", opt.param_groups[0].get("factor"))) if k in opt.param_groups[0])
        if not differs:
            opt.load_state_dict(copy.deepcopy(state_dict))
            opt.load_state_dict(opt.state_dict())
            continue
        with pytest.raises(ValueError) as raised:
            opt.load_state_dict(copy.deepcopy(state_dict))
        message = str(raised.value)
        assert "\n" not in message and message.startswith(f"{type(opt).__name__}.load_state_dict:")
        if same or not told:
            assert "variance=" in message or "factor=" in message
        elif "rule" in state_dict:
            assert f"the state is {ROWS[source].rule.label}'s, this optimizer is {ROWS[target].rule.label}" in message
        _assert_unchanged(opt, params, snapshot)
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    _step_with_estimate(opt, params, rng)  # and it steps on


@pytest.mark.parametrize("method", [n for n, c in CLASSES.items() if c.rule.needs_first_moment])
def test_a_failed_step_does_not_advance_the_counter(method):
    """A step that fails inside the update (here: a hand-edited state missing a buffer) leaves
    the counters and the state it would have created as they were."""
    cls = CLASSES[method]
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = cls([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    del opt.state[a]["exp_avg"]
    c = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group(dict(params=[c]))
    c.grad = torch.ones(2)
    with pytest.raises(Exception):
        opt.step()
    assert int(opt.state[a]["step"]) == 1 and int(opt.state[b]["step"]) == 1


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_schedulers_that_cycle_momentum_run_with_the_documented_switch(scheduler):
    """README: OneCycleLR/CyclicLR cycle a `momentum`/`betas` the family does not have: with
    cycle_momentum=False they schedule lr (and leave β alone); without it torch refuses, in its words."""
    p = torch.nn.Parameter(torch.ones(3))
    make = {"OneCycleLR": lambda opt, **kw: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, **kw),
            "CyclicLR": lambda opt, **kw: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3, **kw)}[scheduler]
    opt = lm.MSVAG([p], lr=0.1)
    with pytest.raises(ValueError, match="optimizer must support momentum"):
        make(opt)
    opt = lm.MSVAG([p], lr=0.1)
    sched = make(opt, cycle_momentum=False)
    lrs = []
    for _ in range(6):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) == 6 and opt.param_groups[0]["beta"] == 0.9
