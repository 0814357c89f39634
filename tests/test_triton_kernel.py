"""The fused Triton kernel (lightning_msvag/_triton_kernel.py) against the NumPy oracle.

On CPU the generated source runs under Triton's interpreter (``TRITON_INTERPRET=1``), with
a small block so that tiny tensors still span several programs, full and partial chunks
and the last ``numel % VEC`` elements; on a CUDA device (when present) the compiled kernel
runs with its real block size over 1000 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the fused GPU kernel is generated for Triton; torch's CPU wheels lack it")

from lightning_msvag import _triton_kernel as K  # noqa: E402
from lightning_msvag.functional import RULES  # noqa: E402
from tests.helpers.numpy_reference import NumpyFamily, step_from_state  # noqa: E402

CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
def _rule_id(r):
    name = f"{r.direction[:3]}-sign{int(r.sign)}-va{int(r.variance_adaptation)}"
    return name + (f"-{r.sign_factor}" if r.sign and r.variance_adaptation else "")


RULE_IDS = [_rule_id(r) for r in RULES]
SIZES = [1, 17, 50, 33, 7]  # odd sizes: single elements, partial chunks, VEC remainders
START_STEPS = [0, 3, 0, 1, 7]  # each tensor its own step counter (k = 1 beside k > 1 in one launch)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """``cpu``: the interpreter with 16-element blocks (2 per program); ``cuda``: compiled."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(K, "BLOCK", 16)
        monkeypatch.setattr(K, "ITERS", 2)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert K.available()
    return request.param


def _grads(rng, n_steps, sizes):
    """Per-coordinate mean + noise (γ spread over (0, 1)), exact zeros, one scale per tensor."""
    scales = [10.0 ** rng.uniform(-2, 1) for _ in sizes]
    means = [rng.uniform(-2, 2, size=n) for n in sizes]
    dead = [rng.random(n) < 0.15 for n in sizes]
    for _ in range(n_steps):
        yield [s * np.where(d, 0.0, mu + rng.standard_normal(n)) for n, s, mu, d in zip(sizes, scales, means, dead)]


def _state(rule, dtype, device, rng, sizes=SIZES, starts=START_STEPS):
    params = [torch.tensor(rng.standard_normal(n), dtype=dtype, device=device) for n in sizes]
    exp_avgs = [torch.zeros_like(p) for p in params] if rule.needs_first_moment else None
    exp_avg_sqs = [torch.zeros_like(p) for p in params] if rule.needs_second_moment else None
    steps = [torch.tensor(float(k), dtype=torch.float32, device=device) for k in starts]
    return params, exp_avgs, exp_avg_sqs, steps


def _run(rule, state, grads, *, lr, beta, maximize, **kwargs):
    params, exp_avgs, exp_avg_sqs, steps = state
    torch._foreach_add_(steps, 1)  # the caller's increment (as torch's fused Adam)
    K.fused_update(rule, params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta=beta, maximize=maximize, **kwargs)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_matches_numpy_oracle(rule, dtype, maximize, device):
    """Every rule, several odd-sized tensors with their own step counters in one launch."""
    n_steps = 12 if device == "cpu" else 1000
    _check_against_oracle(rule, dtype, maximize, device, n_steps, lr=0.03, beta=0.9)


@pytest.mark.parametrize("rule", [r for r in RULES if r.variance_adaptation],
                         ids=[_rule_id(r) for r in RULES if r.variance_adaptation])
def test_many_steps_variance_adapted(rule, device):
    """60 steps (1000 on CUDA) with β = 0.8: γ over its whole range, ρ far from its cap."""
    _check_against_oracle(rule, torch.float64, False, device, 60 if device == "cpu" else 1000, lr=0.1, beta=0.8)


def _check_against_oracle(rule, dtype, maximize, device, n_steps, *, lr, beta):
    rng = np.random.default_rng(7)
    state = _state(rule, dtype, device, rng)
    oracles = []
    for p, k in zip(state[0], START_STEPS):
        oracle = NumpyFamily(rule, p.cpu().double().numpy(), lr, beta)
        oracle.k = k  # zero buffers at step k: a valid state for the update of step k + 1
        oracles.append(oracle)
    for grads in _grads(rng, n_steps, SIZES):
        g = [torch.tensor(x, dtype=dtype, device=device) for x in grads]
        for oracle, gt in zip(oracles, g):
            oracle.step(gt.cpu().double().numpy(), maximize=maximize)  # the same (rounded) gradient
        _run(rule, state, g, lr=lr, beta=beta, maximize=maximize)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-5)
    params, exp_avgs, exp_avg_sqs, steps = state
    for i, oracle in enumerate(oracles):
        assert float(steps[i]) == START_STEPS[i] + n_steps
        scale = max(1.0, float(np.abs(oracle.theta).max()))
        np.testing.assert_allclose(params[i].cpu().double().numpy(), oracle.theta, rtol=rtol, atol=atol * scale,
                                   err_msg=f"θ of tensor {i}")
        if rule.needs_first_moment:
            np.testing.assert_allclose(exp_avgs[i].cpu().double().numpy(), oracle.m_tilde, rtol=rtol, atol=atol * 1e-3)
        if rule.needs_second_moment:
            np.testing.assert_allclose(exp_avg_sqs[i].cpu().double().numpy(), oracle.v_tilde, rtol=rtol, atol=atol * 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_16_bit_rounds_once(rule, dtype, device):
    """16-bit: each step equals the float64 step from the 16-bit state rounded once to the
    dtype, to one unit in the last place: the kernel computes in float32 (and Triton's
    interpreter converts float32 to bfloat16 by truncation; compiled code rounds to
    nearest even)."""
    rng = np.random.default_rng(3)
    sizes, starts = [37, 5], [4, 1]  # k ≥ 2: nonzero buffers are reachable states only after step 1
    params, exp_avgs, exp_avg_sqs, steps = _state(rule, dtype, device, rng, sizes, starts)
    for t in (exp_avgs or []) + (exp_avg_sqs or []):  # nonzero 16-bit buffers
        t.copy_(torch.tensor(rng.uniform(0.1, 1.0, t.numel())))
    if exp_avgs is not None and exp_avg_sqs is not None:
        for m, v, k in zip(exp_avgs, exp_avg_sqs, starts):
            # a reachable state: v ≥ m² for the bias-corrected averages, i.e. v~ (1−β^k) ≥ m~²
            # (an unreachable one, m² + s < 0, has no variance to adapt to)
            v.copy_(m.float() ** 2 / (1 - 0.9**k) + v.float())
    eps = torch.finfo(dtype).eps
    for grads in _grads(rng, 4, sizes):
        g = [torch.tensor(x, dtype=dtype, device=device) for x in grads]
        before = [[t.clone() for t in lst] if lst is not None else None for lst in (params, exp_avgs, exp_avg_sqs)]
        k = [int(s) for s in steps]
        _run(rule, (params, exp_avgs, exp_avg_sqs, steps), g, lr=0.05, beta=0.9, maximize=False)
        for i in range(len(sizes)):
            as_np = lambda t: t.cpu().double().numpy()  # noqa: E731
            m0 = as_np(before[1][i]) if exp_avgs is not None else np.zeros(sizes[i])
            v0 = as_np(before[2][i]) if exp_avg_sqs is not None else np.zeros(sizes[i])
            theta, m, v = step_from_state(rule, as_np(before[0][i]), m0, v0, k[i], as_np(g[i]), 0.05, 0.9)
            for actual, exact in ((params[i], theta), ((exp_avgs or [None] * 2)[i], m),
                                  ((exp_avg_sqs or [None] * 2)[i], v)):
                if actual is None:
                    continue
                expected = torch.tensor(exact).to(dtype).double()
                torch.testing.assert_close(actual.cpu().double(), expected, rtol=eps, atol=1e-6)


def test_tensor_lr_equals_float_lr(device):
    """A 0-dim tensor lr (loaded in the kernel) gives bit for bit the float lr's step (float64
    parameters: the kernel keeps lr in float64, so a float32 lr is a different lr)."""
    rule = RULES[1]  # M-SVAG
    results = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64, device=device),
               float(torch.tensor(0.05)), torch.tensor(0.05, dtype=torch.float32, device=device)):
        rng = np.random.default_rng(5)
        state = _state(rule, torch.float64, device, rng)
        for grads in _grads(rng, 3, SIZES):
            _run(rule, state, [torch.tensor(x, dtype=torch.float64, device=device) for x in grads],
                 lr=lr, beta=0.9, maximize=False)
        results.append(state[0])
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[2], results[3]):  # a float32 tensor lr = the float of its value
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(results[0], results[2]))  # the lr mattered


@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale_unscales_in_the_kernel(scale, device):
    """grad_scale s with gradients s·g equals the step with the pre-divided (s·g)/s."""
    rule = RULES[1]
    runs = []
    for fused_unscale in (True, False):
        rng = np.random.default_rng(11)
        state = _state(rule, torch.float32, device, rng)
        for grads in _grads(rng, 3, SIZES):
            scaled = [torch.tensor(x, dtype=torch.float32, device=device) * scale for x in grads]
            if fused_unscale:
                gs = torch.tensor(scale, device=device)
                _run(rule, state, scaled, lr=0.05, beta=0.9, maximize=False, grad_scale=gs)
            else:
                _run(rule, state, [g / scale for g in scaled], lr=0.05, beta=0.9, maximize=False)
        runs.append(state)
    for lst_a, lst_b in zip(runs[0][:3], runs[1][:3]):
        for a, b in zip(lst_a, lst_b):
            assert torch.equal(a, b)


def test_found_inf_writes_nothing(device):
    rule = RULES[1]
    rng = np.random.default_rng(2)
    state = _state(rule, torch.float32, device, rng)
    grads = [torch.tensor(x, dtype=torch.float32, device=device) for x in next(_grads(rng, 1, SIZES))]
    _run(rule, state, grads, lr=0.05, beta=0.9, maximize=False)  # nonzero buffers
    before = [[t.clone() for t in lst] for lst in state[:3]]
    grads[2][0] = float("inf")
    _run(rule, state, grads, lr=0.05, beta=0.9, maximize=False, found_inf=torch.ones((), device=device))
    for lst, old in zip(state[:3], before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)
    grads[2][0] = 1.0
    _run(rule, state, grads, lr=0.05, beta=0.9, maximize=False, found_inf=torch.zeros((), device=device))
    assert not all(torch.equal(a, b) for a, b in zip(state[0], before[0]))  # found_inf = 0 steps


def test_tables_are_cached_on_addresses(device):
    """Repeated steps on the same tensors build no table; new gradients only theirs."""
    rule = RULES[0]
    rng = np.random.default_rng(1)
    state = _state(rule, torch.float32, device, rng)
    grads = [torch.tensor(x, dtype=torch.float32, device=device) for x in next(_grads(rng, 1, SIZES))]
    _run(rule, state, grads, lr=0.1, beta=0.9, maximize=False)
    builds = K.table_builds
    _run(rule, state, grads, lr=0.2, beta=0.5, maximize=True)
    assert K.table_builds == builds
    _run(rule, state, [g.clone() for g in grads], lr=0.1, beta=0.9, maximize=False)
    assert K.table_builds == builds + 1


def test_empty_and_zero_sized(device):
    rule = RULES[1]
    K.fused_update(rule, [], [], [], [], [], lr=0.1, beta=0.9, maximize=False)
    p = torch.zeros(0, device=device)
    step = torch.ones((), device=device)
    K.fused_update(rule, [p], [p.clone()], [p.clone()], [p.clone()], [step], lr=0.1, beta=0.9, maximize=False)
    assert p.numel() == 0


def test_source_is_traced_from_the_update_definition():
    """The kernel text comes from _update_math and _coefficients (no hand-written math):
    changing the traced ops changes the source."""
    text = K.source()
    assert text.count("@triton.jit(") == 2 * len(RULES)
    assert "_powi(beta64, ki)" in text and "tl.where(k > 1," in text
    rule = RULES[1]
    a = K._kernel_source(rule, False)
    original = K._ElementOps.lerp_
    try:
        K._ElementOps.lerp_ = lambda self, m, g, w: self._new(f"LERP({m}, {g}, {w})")
        assert "LERP(m, g, c0_one_minus_beta)" in K._kernel_source(rule, False) != a
    finally:
        K._ElementOps.lerp_ = original


@CUDA
def test_cold_build_is_announced_once_cuda(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LIGHTNING_MSVAG_CACHE", str(tmp_path))
    monkeypatch.setattr(K, "_launched", set())
    rule = RULES[2]
    p = torch.randn(10, device="cuda")
    args = ([p], [torch.randn(10, device="cuda")], [torch.zeros_like(p)], None, [torch.ones((), device="cuda")])
    K.fused_update(rule, *args, lr=0.1, beta=0.9, maximize=False)
    K.fused_update(rule, *args, lr=0.1, beta=0.9, maximize=False)
    assert capfd.readouterr().err.count("compiling the fused Triton optimizer kernel") == 1
    monkeypatch.setattr(K, "_launched", set())  # a fresh process: the marker says it is built
    K.fused_update(rule, *args, lr=0.1, beta=0.9, maximize=False)
    assert "compiling" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------
# The optimizers' route to the kernel (what fused=None / fused=True do on CUDA), checked on
# CPU: the interpreter runs the kernel, and the group is sent down the device route.
# --------------------------------------------------------------------------------------

from lightning_msvag import functional as F  # noqa: E402
from lightning_msvag.registry import METHODS  # noqa: E402

FAMILY = {m.name: m.cls for m in METHODS if getattr(m.cls, "rule", None) is not None}


@pytest.fixture
def device_route(monkeypatch):
    """Fused groups of CPU tensors take the device kernel (interpreted); counts its launches."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "BLOCK", 16)
    monkeypatch.setattr(K, "ITERS", 2)
    monkeypatch.setattr(F, "_device_kernel_for", lambda params: True)
    launches = []
    real = K.fused_update

    def counted(*args, **kwargs):
        launches.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "fused_update", counted)
    return launches


def _pair(cls, lr_fused, **kwargs):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(17, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    return a, b, cls(a, lr=lr_fused, fused=True, **kwargs), cls(b, lr=0.05, foreach=False, **kwargs)


def _set_grads(a, b, gen, scale=1.0):
    for pa, pb in zip(a, b):
        g = torch.randn(pa.shape, generator=gen, dtype=torch.float64) + 0.3
        pa.grad, pb.grad = g * scale, g.clone()


@pytest.mark.parametrize("name", list(FAMILY))
def test_optimizer_steps_through_the_device_kernel_like_the_reference_path(name, device_route):
    """fused=True on the device route: one launch per step, a tensor lr read in the kernel,
    counters kept on the parameters' device, the numbers of the single-tensor path."""
    a, b, fused, reference = _pair(FAMILY[name], torch.tensor(0.05, dtype=torch.float64))
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        _set_grads(a, b, gen)
        fused.step()
        reference.step()
    assert len(device_route) == 8 and all(isinstance(k["lr"], torch.Tensor) for k in device_route)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
        assert float(fused.state[pa]["step"]) == float(reference.state[pb]["step"]) == 8.0
        for key in ("exp_avg", "exp_avg_sq"):
            if key in reference.state[pb]:
                torch.testing.assert_close(fused.state[pa][key], reference.state[pb][key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["m-svag", "m-sgd"])
def test_optimizer_amp_protocol_on_the_device_route(name, device_route):
    """GradScaler's grad_scale divides the gradients in the kernel; found_inf = 1 skips the
    step there and the counters are set back on the device: nothing changes."""
    a, b, fused, reference = _pair(FAMILY[name], 0.05)
    assert fused._step_supports_amp_scaling
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        _set_grads(a, b, gen, scale=512.0)
        fused.grad_scale, fused.found_inf = torch.tensor(512.0), torch.tensor(0.0)
        fused.step()
        reference.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    before = [p.detach().clone() for p in a], {k: v.clone() for k, v in fused.state[a[0]].items()}
    _set_grads(a, b, gen, scale=float("inf"))
    fused.found_inf = torch.tensor(1.0)
    fused.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before[0]))
    assert all(torch.equal(fused.state[a[0]][k], v) for k, v in before[1].items())  # step counter included
    assert float(fused.state[a[0]]["step"]) == 4.0


def test_without_the_kernel_one_warning_and_the_multi_tensor_path(device_route, monkeypatch):
    """Where Triton cannot run, fused=True warns once and steps with the multi-tensor path:
    the same numbers, no launch."""
    monkeypatch.setattr(K, "available", lambda: False)
    monkeypatch.setattr(F, "_warned_no_device_kernel", False)
    a, b, fused, reference = _pair(FAMILY["m-svag"], 0.05)
    gen = torch.Generator().manual_seed(7)
    with pytest.warns(RuntimeWarning, match="fused CUDA kernel") as caught:
        for _ in range(3):
            _set_grads(a, b, gen)
            fused.step()
            reference.step()
    assert len([w for w in caught if "fused CUDA kernel" in str(w.message)]) == 1
    assert not device_route
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
