"""The fused CPU kernel: C++ generated from :func:`lightning_msvag.rule._update_math`.

The update math is not written here. :class:`_CodeOps` is an
:class:`~lightning_msvag.rule.UpdateOps` backend whose operations return C++ expressions
instead of tensors; running ``_update_math`` with it,
for every rule of :data:`~lightning_msvag.rule.RULES` and both kinds of step (with
and without γ), yields the loop bodies. The generated source is a multi-tensor kernel: one
call per (param group, step, dtype) runs ``at::parallel_for`` over the concatenated index
space of all tensors, each element is read once (g, θ, m~, v~) and written once (θ, m~,
v~), all arithmetic in registers, as ATen's fused Adam does. Types: float32 and float64
compute in their own precision; float16 and bfloat16 load into float32 and round once at
the store.

Build: the system C++ compiler (``$CXX``, else c++/g++/clang++) against torch's headers
and libraries (about 1 s), once per machine, torch version, compiler and source; the
shared library is cached in ``$LIGHTNING_MSVAG_CACHE`` (default
``$XDG_CACHE_HOME/lightning_msvag`` or ``~/.cache/lightning_msvag``). A file lock makes
concurrent first steps (DDP ranks, parallel test processes) build it once; the build is
announced in one line on stderr. It is loaded with :mod:`ctypes` (no pybind, no
``torch.utils.cpp_extension``). If no compiler exists or the build fails, :func:`kernel`
returns ``None`` after one ``RuntimeWarning`` per process and the caller uses the
multi-tensor path.

This backend imports only the math (:mod:`lightning_msvag.rule`); the paths
(:mod:`lightning_msvag.functional`) import it and call :func:`kernel`.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import List, Optional

import torch

from ._cache import cache_dir
from .rule import MINIBATCH_RULES, RULES, Coefficients, UpdateRule, _update_math

try:
    import fcntl
except ImportError:  # not POSIX: no file lock, so no shared build (the kernel is unavailable)
    fcntl = None

#: dtypes the kernel handles, with their code in the C++ source and their compute type
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CXX_TYPES = {0: ("float", "float"), 1: ("double", "double"), 2: ("c10::Half", "float"), 3: ("c10::BFloat16", "float")}

#: statistics of this process: compiler runs and library loads (tests count them)
builds = 0
loads = 0

_lock = threading.Lock()
_library = None  # ctypes.CDLL once loaded
_broken: Optional[str] = None  # why the kernel cannot be used in this process
_SCALARS = ("grad_sign", "one_minus_beta", "beta", "kappa", "upper", "neg_scale", "var_decay", "var_weight")
#: every rule the kernel is generated for: the rules of the other backends, then the
#: mini-batch ones with their extra operand S = σ̂² (docs/algorithm.md §1.1)
KERNEL_RULES = RULES + MINIBATCH_RULES


class _CodeOps:
    """:class:`~lightning_msvag.rule.UpdateOps` that emit C++: each operation becomes one ``const C``
    (nothing is updated in place: the ``_``-named operations return a new expression too)."""

    tiny = "std::numeric_limits<C>::min()"

    def __init__(self):
        self.lines: List[str] = []

    def _new(self, expr: str) -> str:
        name = f"t{len(self.lines)}"
        self.lines.append(f"const C {name} = {expr};")
        return name

    def scale_grad(self, g, s):
        return self._new(f"{s} * {g}")

    def lerp_(self, m, g, w):
        return self._new(f"{m} + {w} * ({g} - {m})")

    def ema_square_(self, v, g, beta, w):
        return self._new(f"{beta} * {v} + {w} * ({g} * {g})")

    def sign(self, x):
        return self._new(f"static_cast<C>(({x} > C(0)) - ({x} < C(0)))")

    def mul(self, a, b):
        return self._new(f"{a} * {b}")

    def add_scaled(self, a, b, k):
        return self._new(f"{a} + {k} * {b}")

    def add_scalar_(self, a, s):
        return self._new(f"{a} + {s}")

    def div_(self, a, b):
        return self._new(f"{a} / {b}")

    def clamp_(self, x, lo, hi):
        return self._new(f"std::min(std::max({x}, C({float(lo)!r})), {hi})")

    def addcmul_(self, p, a, b, s):
        return self._new(f"{p} + {s} * ({a} * {b})")

    def add_(self, p, d, s):
        return self._new(f"{p} + {s} * {d}")

    def rsub_scalar(self, x, s):
        return self._new(f"{s} - {x}")

    def sqrt_(self, x):
        return self._new(f"std::sqrt({x})")

    def erf_(self, x):
        return self._new(f"lm_erf({x})")

    def ema_(self, v, x, decay, w):
        return self._new(f"{decay} * {v} + {w} * {x}")


def _body(rule: UpdateRule, va: bool) -> str:
    ops = _CodeOps()
    c = Coefficients(**{name: name for name in _SCALARS}, va=va)
    loads = ["const C p = static_cast<C>(P[i]);", "const C g = static_cast<C>(G[i]);"]
    if rule.needs_first_moment:
        loads.append("const C m = static_cast<C>(M[i]);")
    if rule.needs_second_moment:
        loads.append("const C v = static_cast<C>(V[i]);")
    if rule.needs_batch_variance:
        loads.append("const C s = static_cast<C>(S[i]);")
    p, m, v = _update_math(rule, ops, c, "p", "g", "m" if rule.needs_first_moment else None,
                             "v" if rule.needs_second_moment else None,
                             "s" if rule.needs_batch_variance else None)
    stores = [f"P[i] = static_cast<T>({p});"]
    if rule.needs_first_moment:
        stores.append(f"M[i] = static_cast<T>({m});")
    if rule.needs_second_moment:
        stores.append(f"V[i] = static_cast<T>({v});")
    return "\n        ".join(loads + ops.lines + stores)


_HEADER = r"""// generated by lightning_msvag/_cpu_kernel.py from rule._update_math; do not edit
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// erf of a non-negative argument (the M-SSD-VA factor, docs/algorithm.md §1.2). Double: libm.
// Float (also the compute type of float16/bfloat16): a rational approximation that the compiler
// vectorizes (libm's erff is scalar and made the step ~7x Adam's), odd numerator over even
// denominator, so its relative error stays < 5e-7 (<= 7.5 ulp) down to the smallest arguments
// (tests/test_minibatch_variance.py checks it against math.erf); erf(x) rounds to 1.0f for x >= 4.
inline double lm_erf(double x) { return std::erf(x); }
inline float lm_erf(float x) {
  const float y = std::min(x, 4.0f), y2 = y * y;
  float num = -2.72614225801306e-10f;
  num = num * y2 + 2.77068142495902e-08f;
  num = num * y2 - 2.10102402082508e-06f;
  num = num * y2 - 5.69250639462346e-05f;
  num = num * y2 - 7.34990630326855e-04f;
  num = num * y2 - 2.95459980854025e-03f;
  num = num * y2 - 1.60960333262415e-02f;
  float den = -1.45660718464996e-05f;
  den = den * y2 - 2.13374055278905e-04f;
  den = den * y2 - 1.68282697438203e-03f;
  den = den * y2 - 7.37332916720468e-03f;
  den = den * y2 - 1.42647390514189e-02f;
  const float approx = y * num / den;  // computed unconditionally: a select, not a branch, vectorizes
  return x >= 4.0f ? 1.0f : approx;
}
"""

_RULE_TEMPLATE = r"""
template <typename T, typename C, bool VA>
void body_NAME(int64_t n, T* __restrict P, const T* __restrict G, T* __restrict M, T* __restrict V,
               const T* __restrict S, const C grad_sign, const C one_minus_beta, const C beta, const C kappa,
               const C upper, const C neg_scale, const C var_decay, const C var_weight) {
  (void)M; (void)V; (void)beta; (void)kappa; (void)upper; (void)one_minus_beta;
  (void)S; (void)var_decay; (void)var_weight;
  if constexpr (VA) {
    for (int64_t i = 0; i < n; ++i) {
        BODY_VA
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
        BODY_PLAIN
    }
  }
}
"""

_FOOTER = r"""
template <typename T, typename C>
void run(int rule, int64_t n, const int64_t* numel, void* const* Ps, void* const* Gs, void* const* Ms,
         void* const* Vs, void* const* Ss, const double* s, int va, int64_t grain) {
  std::vector<int64_t> offset(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) offset[t + 1] = offset[t] + numel[t];
  const C grad_sign = static_cast<C>(s[0]), one_minus_beta = static_cast<C>(s[1]), beta = static_cast<C>(s[2]),
          kappa = static_cast<C>(s[3]), upper = static_cast<C>(s[4]), neg_scale = static_cast<C>(s[5]),
          var_decay = static_cast<C>(s[6]), var_weight = static_cast<C>(s[7]);
  at::parallel_for(0, offset[n], grain, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offset[t + 1]);
      const int64_t local = begin - offset[t], len = stop - begin;
      if (len > 0) {
        T* P = static_cast<T*>(Ps[t]) + local;
        const T* G = static_cast<const T*>(Gs[t]) + local;
        T* M = Ms ? static_cast<T*>(Ms[t]) + local : nullptr;
        T* V = Vs ? static_cast<T*>(Vs[t]) + local : nullptr;
        const T* S = Ss ? static_cast<const T*>(Ss[t]) + local : nullptr;
        switch (rule) {
DISPATCH
          default: break;
        }
      }
      begin = stop;
      ++t;
    }
  });
}

}  // namespace

// lm_erf of the float kernels, for the accuracy test (tests/test_minibatch_variance.py).
extern "C" void lightning_msvag_erf_float(int64_t n, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = lm_erf(x[i]);
}

extern "C" int lightning_msvag_step(int rule, int dtype, int64_t n, const int64_t* numel, void* const* P,
                                    void* const* G, void* const* M, void* const* V, void* const* S,
                                    const double* scalars, int va, int64_t grain) {
  if (rule < 0 || rule >= NRULES) return 2;
  try {
    switch (dtype) {
      case 0: run<float, float>(rule, n, numel, P, G, M, V, S, scalars, va, grain); break;
      case 1: run<double, double>(rule, n, numel, P, G, M, V, S, scalars, va, grain); break;
      case 2: run<c10::Half, float>(rule, n, numel, P, G, M, V, S, scalars, va, grain); break;
      case 3: run<c10::BFloat16, float>(rule, n, numel, P, G, M, V, S, scalars, va, grain); break;
      default: return 3;
    }
  } catch (...) {
    return 1;
  }
  return 0;
}
"""


def _rule_name(rule: UpdateRule) -> str:
    name = f"{rule.direction}_sign{int(rule.sign)}_va{int(rule.variance_adaptation)}"
    if rule.sign and rule.variance_adaptation:  # M-SSD-VA's two factors (docs/algorithm.md §1.2)
        name += f"_{rule.sign_factor}"
    if rule.needs_batch_variance:  # docs/algorithm.md §1.1
        name += "_minibatch"
    return name


@functools.lru_cache(maxsize=None)
def source() -> str:
    """The complete C++ source, generated from ``_update_math`` for every rule."""
    parts = [_HEADER]
    dispatch = []
    for index, rule in enumerate(KERNEL_RULES):
        name = _rule_name(rule)
        parts.append(
            _RULE_TEMPLATE.replace("NAME", name)
            .replace("BODY_VA", _body(rule, True) if rule.variance_adaptation else "(void)0;")
            .replace("BODY_PLAIN", _body(rule, False))
        )
        args = "len, P, G, M, V, S, grad_sign, one_minus_beta, beta, kappa, upper, neg_scale, var_decay, var_weight"
        dispatch.append(
            f"          case {index}: if (va) body_{name}<T, C, true>({args}); "
            f"else body_{name}<T, C, false>({args}); break;"
        )
    parts.append(_FOOTER.replace("DISPATCH", "\n".join(dispatch)).replace("NRULES", str(len(KERNEL_RULES))))
    return "".join(parts)


@functools.lru_cache(maxsize=None)
def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    return None


def _torch_dirs():
    root = os.path.dirname(os.path.realpath(torch.__file__))  # one key however the venv is reached
    return os.path.join(root, "include"), os.path.join(root, "lib")


@functools.lru_cache(maxsize=None)
def _flags() -> tuple:
    include, lib = _torch_dirs()
    flags = [
        "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", "-fno-math-errno", "-fno-trapping-math",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-isystem", include,
    ]
    try:  # vector width as torch itself uses on this CPU (part of the cache key)
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = "DEFAULT"
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return tuple(flags + ["-L" + lib, "-lc10", "-ltorch_cpu", "-Wl,-rpath," + lib])


def _library_path() -> str:
    key = hashlib.sha256("\0".join([source(), torch.__version__, " ".join(_flags()), sys.platform]).encode())
    key = key.hexdigest()[:20]
    return os.path.join(cache_dir(), f"cpu_kernel_{key}.so")


def _build(compiler: str, target: str) -> None:
    global builds
    directory = os.path.dirname(target)
    print(f"lightning-msvag: building the fused CPU optimizer kernel once (cached in {directory})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, "cpu_kernel.cpp")
        out = os.path.join(tmp, "cpu_kernel.so")
        with open(src, "w") as f:
            f.write(source())
        builds += 1
        result = subprocess.run([compiler, src, "-o", out, *_flags()], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{os.path.basename(compiler)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: other processes see no or a complete library


def _load():
    """Load the cached library, building it first if needed (under a file lock)."""
    global loads
    compiler = _compiler()
    target = _library_path()
    if not os.path.exists(target):
        if fcntl is None:
            raise RuntimeError("building needs POSIX file locks (fcntl)")
        if compiler is None:
            raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # DDP ranks: one builds, the others wait
            try:
                if not os.path.exists(target):
                    _build(compiler, target)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    library = ctypes.CDLL(target)
    function = library.lightning_msvag_step
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [
        ctypes.c_int, ctypes.c_int64
    ]
    loads += 1
    return function


def available() -> bool:
    """True unless the kernel is known not to work here (no compiler and nothing cached,
    or a failed build/load in this process). Starts no build; the first time it finds no
    compiler it warns (once per process)."""
    global _broken
    if _broken is not None:
        return False
    if _library is not None or _compiler() is not None or os.path.exists(_library_path()):
        return True
    with _lock:
        if _broken is None:
            _broken = "no C++ compiler found ($CXX, c++, g++, clang++)"
            _warn()
    return False


def _warn() -> None:
    warnings.warn(
        f"lightning-msvag: fused CPU optimizer kernel unavailable ({_broken}); using the multi-tensor path",
        RuntimeWarning,
        stacklevel=5,
    )


def kernel():
    """The step function (see :func:`_step`), or ``None`` (after one warning) if unavailable."""
    global _library, _broken
    if _library is None and _broken is None:
        with _lock:
            if _library is None and _broken is None:
                try:
                    _library = _load()
                except Exception as error:  # no compiler, failed build, unloadable library
                    _broken = f"{type(error).__name__}: {error}"
                    _warn()
    return _step if _library is not None else None


def erf_float(x: torch.Tensor) -> torch.Tensor:
    """The kernels' float erf (``lm_erf``) of a contiguous float32 CPU tensor of arguments ≥ 0,
    for tests; requires the kernel (builds it if needed)."""
    if kernel() is None:
        raise RuntimeError(f"fused CPU optimizer kernel unavailable ({_broken})")
    x = x.contiguous()
    out = torch.empty_like(x)
    function = ctypes.CDLL(_library_path()).lightning_msvag_erf_float
    function.restype = None
    function.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    function(x.numel(), x.data_ptr(), out.data_ptr())
    return out


def _reset() -> None:
    """Forget the loaded library and any failure (tests)."""
    global _library, _broken
    with _lock:
        _library, _broken = None, None
    _compiler.cache_clear()


_RULE_INDEX = {rule: i for i, rule in enumerate(KERNEL_RULES)}
_DATA_PTR = torch.Tensor.data_ptr


def _step(rule, dtype, params, grads, exp_avgs, exp_avg_sqs, c: Coefficients, grain: int,
          batch_variances=None) -> None:
    """One kernel call over lists of contiguous CPU tensors of one dtype (``None`` lists for
    buffers the rule does not keep; ``batch_variances``: σ̂² for the mini-batch rules)."""
    n = len(params)
    numels = array.array("q", map(torch.Tensor.numel, params))
    pointers = array.array("q", map(_DATA_PTR, params))
    pointers.extend(map(_DATA_PTR, grads))
    if exp_avgs is not None:
        pointers.extend(map(_DATA_PTR, exp_avgs))
    if exp_avg_sqs is not None:
        pointers.extend(map(_DATA_PTR, exp_avg_sqs))
    if batch_variances is not None:
        pointers.extend(map(_DATA_PTR, batch_variances))
    base = pointers.buffer_info()[0]
    width = pointers.itemsize * n
    m_at = base + 2 * width if exp_avgs is not None else None
    v_at = base + (3 if exp_avgs is not None else 2) * width if exp_avg_sqs is not None else None
    rows = 2 + (exp_avgs is not None) + (exp_avg_sqs is not None)
    s_at = base + rows * width if batch_variances is not None else None
    scalars = array.array("d", [c.grad_sign, c.one_minus_beta, c.beta, c.kappa, c.upper, c.neg_scale,
                                c.var_decay, c.var_weight])
    status = _library(
        _RULE_INDEX[rule], DTYPES[dtype], n, numels.buffer_info()[0], base, base + width, m_at, v_at, s_at,
        scalars.buffer_info()[0], int(c.va), grain,
    )
    if status != 0:
        raise RuntimeError(f"lightning-msvag: fused CPU kernel failed (status {status})")
