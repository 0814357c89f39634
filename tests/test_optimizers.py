"""The optimizer family against an independent NumPy transcription of docs/algorithm.md §1."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

import lightning_msvag as lm
from lightning_msvag.functional import CPU_TILE_NUMEL, variance_ratio
from numpy_reference import NumpyFamily, rho, rho_reference_form

CLASSES = {"m-sgd": lm.MSGD, "m-ssd": lm.MSSD, "m-svag": lm.MSVAG, "svag": lm.SVAG}
SHAPES = [(7,), (13, 17), (3, 4, 5), (1,), (200,)]
# two param groups with their own lr and beta; the second holds a non-contiguous parameter
GROUPS = [dict(shapes=SHAPES[:3], lr=0.01, beta=0.9), dict(shapes=SHAPES[3:], lr=0.03, beta=0.7)]


def _gradient_stream(rng, shapes, n_steps):
    """Per-coordinate mean + noise at mixed scales, with exact zeros.

    Each tensor gets its own scale (1e-3 to 1e2); per coordinate a signal-to-noise ratio
    from 0 to 3 so γ covers (0, 1); some coordinates are always exactly 0 (m = v = 0), and
    some entries are 0 at random steps.
    """
    scales = [10.0 ** rng.uniform(-3, 2) for _ in shapes]
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


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize(
    "foreach,fused,tile",
    [(False, False, None), (True, False, None), (False, False, 50), (True, False, 50),
     (False, "each", 50), (False, "gathered", 50)],
    ids=["single", "multi", "single-tiled", "multi-tiled", "fused-each", "fused-gathered"],
)
@pytest.mark.parametrize("method", list(CLASSES))
def test_matches_numpy_transcription_of_spec(method, foreach, fused, tile, dtype, rtol, atol, monkeypatch):
    """≥ 1000 steps of every path (whole tensors, small CPU tiles, compiled) against NumPy.

    fused-each: one compiled call per tensor; fused-gathered: the small tensors of a step
    are concatenated into flat buffers for one call and scattered back.
    """
    if fused == "each":  # every tensor counts as large
        monkeypatch.setattr(lm.functional, "FUSED_MIN_NUMEL", 2)
    elif fused == "gathered":  # every tensor counts as small
        monkeypatch.setattr(lm.functional, "FUSED_MIN_NUMEL", 10**9)
    fused = bool(fused)
    rng = np.random.default_rng(1234)
    torch_params = _make_params(rng, dtype)
    opt = CLASSES[method](
        [dict(params=ps, lr=g["lr"], beta=g["beta"]) for ps, g in zip(torch_params, GROUPS)],
        foreach=foreach,
        fused=fused,
    )
    opt._tile_numel = tile
    flat_params = [p for ps in torch_params for p in ps]
    group_of = [gi for gi, ps in enumerate(torch_params) for _ in ps]
    oracles = [
        NumpyFamily(method, p.detach().double().numpy(), GROUPS[gi]["lr"], GROUPS[gi]["beta"])
        for p, gi in zip(flat_params, group_of)
    ]
    shapes = [tuple(p.shape) for p in flat_params]
    n_steps = 1000
    for grads in _gradient_stream(rng, shapes, n_steps):
        for p, g, oracle in zip(flat_params, grads, oracles):
            g_t = torch.tensor(g, dtype=dtype)
            p.grad = g_t
            oracle.step(g_t.double().numpy())  # the oracle sees the same (rounded) gradient
        opt.step()

    for i, (p, oracle) in enumerate(zip(flat_params, oracles)):
        state = opt.state[p]
        assert int(state["step"]) == n_steps
        # atol scales with the tensor: float32 parameters of size ~3 carry ~1e-6 absolute
        # round-off after 1000 rounded updates, however exact each update is
        scale = max(1.0, float(np.abs(oracle.theta).max()))
        np.testing.assert_allclose(p.detach().double().numpy(), oracle.theta, rtol=rtol, atol=atol * scale, err_msg=f"param {i}")
        np.testing.assert_allclose(state["exp_avg"].double().numpy(), oracle.m_tilde, rtol=rtol, atol=atol * 1e-3)
        if method in ("m-svag", "svag"):
            np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), oracle.v_tilde, rtol=rtol, atol=atol * 1e-3)
        else:
            assert "exp_avg_sq" not in state  # one buffer per parameter for M-SGD / M-SSD
    if fused:  # the compiled kernel ran, no fallback to the multi-tensor path
        assert lm.functional._fused_broken is None, lm.functional._fused_broken
    if method in ("m-svag", "svag"):
        gammas = opt.variance_adaptation_factors()
        assert len(gammas) == len(oracles)
        for gamma, oracle in zip(gammas, oracles):
            np.testing.assert_allclose(gamma.double().numpy(), oracle.gamma, rtol=1e-6 if dtype == torch.float64 else 1e-3, atol=1e-6)
            # coordinates that were always zero: m = v = 0, γ must be 0 not NaN
        assert all(bool(torch.isfinite(g).all()) for g in gammas)


@pytest.mark.parametrize("method", list(CLASSES))
def test_single_and_multi_tensor_paths_agree_at_default_tile(method):
    """A tensor larger than one CPU tile, plus small ones packed into one tile."""
    torch.manual_seed(0)
    shapes = [(CPU_TILE_NUMEL + 1000,), (10, 10), (3,)]
    base = [torch.randn(s) for s in shapes]
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = CLASSES[method](params, lr=0.01, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) + 0.5
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_rho_reference_values():
    expected = {1: 0.9999, 2: 0.5014, 3: 0.3358, 5: 0.2044, 10: 0.1090, 20: 0.0672, 100: 0.0526}
    for k, value in expected.items():
        assert variance_ratio(0.9, k) == pytest.approx(value, abs=5e-5), k
        assert rho(0.9, k) == pytest.approx(value, abs=5e-5)
        # the two forms of ρ in docs/algorithm.md §1 agree
        assert rho_reference_form(0.9, k) == pytest.approx(variance_ratio(0.9, k), rel=1e-12)
    assert variance_ratio(0.9, 10**6) == pytest.approx((1 - 0.9) / (1 + 0.9), rel=1e-9)
    assert variance_ratio(0.0, 5) == 0.9999  # β = 0: ρ = 1, capped


@pytest.mark.parametrize("method", ["m-svag", "svag", "m-sgd"])
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
    if method != "m-sgd":
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
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradients_give_no_update_and_no_nan(method, foreach):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = CLASSES[method]([p], lr=1.0, foreach=foreach)
    for _ in range(5):
        p.grad = torch.zeros(4, 3)
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 3))
    assert opt.nonfinite_state() == []
    if method in ("m-svag", "svag"):
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


@pytest.mark.parametrize("method", list(CLASSES))
def test_maximize_equals_minimizing_the_negative(method):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = CLASSES[method]([a], lr=0.1, maximize=True)
    opt_b = CLASSES[method]([b], lr=0.1)
    for _ in range(30):
        g = torch.randn(50, dtype=torch.float64) + 1.0
        a.grad, b.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["m-svag", "svag"])
@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_gamma_is_finite_and_close_to_float64(method, foreach):
    rng = np.random.default_rng(0)
    shapes = [(64,), (8, 8)]
    p16 = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    opt = CLASSES[method](p16, lr=1e-3, foreach=foreach)
    oracles = [NumpyFamily(method, np.zeros(s), 1e-3, 0.9) for s in shapes]
    for grads in _gradient_stream(rng, shapes, 50):
        for p, g, o in zip(p16, grads, oracles):
            g16 = torch.tensor(g, dtype=torch.bfloat16)
            p.grad = g16
            o.step(g16.double().numpy())
        opt.step()
    for gamma, o in zip(opt.variance_adaptation_factors(), oracles):
        assert gamma.dtype == torch.float32
        assert bool(torch.isfinite(gamma).all())
        assert float(gamma.min()) >= 0.0 and float(gamma.max()) <= 1.0
        # bf16 state holds 8 mantissa bits: γ agrees to a few percent on average
        assert np.abs(gamma.double().numpy() - o.gamma).mean() < 0.05
    assert all(bool(torch.isfinite(p).all()) for p in p16)


def test_float16_parameters_step():
    p = torch.nn.Parameter(torch.ones(10, dtype=torch.float16))
    opt = lm.MSVAG([p], lr=0.01)
    for i in range(5):
        p.grad = torch.full((10,), 0.5 + 0.1 * i, dtype=torch.float16)
        opt.step()
    assert p.dtype == torch.float16 and bool(torch.isfinite(p).all()) and float(p.detach().max()) < 1.0


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
        lr = 0.01 if name == "m-ssd" else 0.05
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
    """For i.i.d. g ~ N(μ, σ²) and large k, γ → μ²/(μ² + ρ∞ σ²) on average (docs/algorithm.md §1, Lemma 1)."""
    gen = torch.Generator().manual_seed(0)
    n, mu, sigma = 20000, 1.0, 2.0
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = lm.MSVAG([p], lr=0.0)
    for _ in range(200):
        p.grad = mu + sigma * torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
    rho_inf = 0.1 / 1.9
    expected = mu**2 / (mu**2 + rho_inf * sigma**2)
    assert float(opt.variance_adaptation_factors()[0].median()) == pytest.approx(expected, abs=0.06)


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


@pytest.mark.parametrize("method", ["m-sgd", "m-svag", "svag"])
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
    assert lm.available_optimizers() == ["m-sgd", "m-ssd", "m-svag", "svag", "adam", "sgd"]
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in [("M-SVAG", lm.MSVAG), ("msvag", lm.MSVAG), ("m-svag", lm.MSVAG), ("MSGD", lm.MSGD),
                      ("m-ssd", lm.MSSD), ("SVAG", lm.SVAG), ("Adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]:
        assert type(lm.build_optimizer(name, p, lr=0.1)) is cls
    adam = lm.build_optimizer("adam", p)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    assert lm.build_optimizer("m-svag", p, lr=0.2, beta=0.5).defaults["beta"] == 0.5
    with pytest.raises(ValueError, match="m-sgd, m-ssd, m-svag, svag, adam, sgd"):
        lm.build_optimizer("rmsprop", p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on CI)")
@pytest.mark.parametrize("method", list(CLASSES))
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_matches_cpu(method, foreach):
    torch.manual_seed(0)
    shapes = [(300, 7), (5,), (CPU_TILE_NUMEL + 3,)]
    cpu = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opt_cpu = CLASSES[method](cpu, lr=0.01)
    opt_gpu = CLASSES[method](gpu, lr=0.01, foreach=foreach)
    for _ in range(20):
        for p, q in zip(cpu, gpu):
            p.grad = torch.randn(p.shape, dtype=torch.float64) + 0.3
            q.grad = p.grad.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-10, atol=1e-12)
