"""The fused multi-tensor GPU kernel: Triton generated from :func:`~lightning_msvag.rule._update_math`.

The update math is not written here, as for the C++ kernel (:mod:`lightning_msvag._cpu_kernel`):

* :class:`_ElementOps` is an ``ops`` backend whose operations return Triton expressions;
  running ``_update_math`` with it yields the per-element body of each rule.
* :class:`_ScalarOps` / :class:`_Sym` trace the per-step scalars: ``_coefficients`` (and
  through it ``_gamma_coefficients``, ``variance_ratio``, ``bias_correction``) run on a
  symbolic step k, lr and β and yield float64 Triton code evaluated in the kernel from each
  tensor's own step counter (a 0-dim device tensor). The ``va = k > 1`` branch of
  ``_coefficients`` becomes a select: both bodies are traced (γ and plain step) and
  ``tl.where(k > 1, ...)`` picks the new θ (m~ and v~ are the same in both).

One kernel per (rule, maximize) is generated, specialised by Triton per dtype and flags.

Launch: one per call. The grid is the list of *chunks* (``CHUNK = BLOCK * ITERS`` elements)
of all tensors; a device table (int64, cached) holds per tensor the addresses of θ, m~,
v~ and its step counter and its numel, then per chunk its tensor index and start; a second
table holds the gradients' addresses (cached separately: with ``zero_grad(set_to_none=True)``
gradients may move between steps while everything else stays). Each program reads its
tensor's step, computes the scalars in float64, and runs ``ITERS`` blocks of ``BLOCK``
elements (an unmasked loop for full chunks; in a tensor's last chunk a mask whose bound is a
multiple of the 16-byte vector width, then the last ``numel % VEC`` elements, so that the
tails of small tensors vectorise too; ``benchmarks/triton_compile_check.py`` shows it): every
element of g, θ, m~, v~ is read once and θ, m~, v~ written once, the arithmetic in
registers (float32 for 16-bit dtypes, rounded to nearest even once at the store).

Scalars that change without recompiling: ``lr`` (a Python float passed as its 64 bits, or a
0-dim device tensor loaded in the kernel) and β (its 64 bits). ``grad_scale`` divides the
gradient in the kernel (fused AMP unscaling); a nonzero ``found_inf`` makes every program
return without writing. Nothing is read back to the host.

Compilation is Triton's JIT at the first launch of a specialisation, cached on disk by
Triton; a cold build is announced in one line on stderr (a marker file under the package's
cache directory remembers what this machine has built). ``TRITON_INTERPRET=1`` runs the
same generated source on CPU tensors (the tests do).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import linecache
import os
import struct
import sys
import threading
from typing import Dict, List, Optional

import torch

# The paper's math and its per-step scalars (one place to switch the import when they move).
from ._cache import cache_dir
from .rule import RULES, Coefficients, UpdateRule, _coefficients, _update_math

__all__ = ["available", "fused_update", "source", "DTYPES"]

#: Elements per block (one vector operation of the program) and blocks per program.
BLOCK = 1024
ITERS = 4
NUM_WARPS = 4

#: dtypes the kernel handles → (Triton dtype name, compute dtype name, smallest normal of the compute dtype)
DTYPES = {
    torch.float32: ("float32", "float32", torch.finfo(torch.float32).tiny),
    torch.float64: ("float64", "float64", torch.finfo(torch.float64).tiny),
    torch.float16: ("float16", "float32", torch.finfo(torch.float32).tiny),
    torch.bfloat16: ("bfloat16", "float32", torch.finfo(torch.float32).tiny),
}

_lock = threading.Lock()
_broken: Optional[str] = None  # why the kernel cannot be used in this process
_modules: Dict[bool, dict] = {}  # interpret? → namespace of the decorated kernels
_launched: set = set()  # specialisations launched in this process (cold-build check done)
#: statistics of this process (tests and benchmarks read them)
table_builds = 0
announcements = 0


# --------------------------------------------------------------------------------------
# Tracing the per-step scalars (float64, in the kernel)
# --------------------------------------------------------------------------------------


class _Sym:
    """A float64 scalar of the kernel: arithmetic on it appends one line of Triton code."""

    __slots__ = ("trace", "name", "int_name")

    def __init__(self, trace: "_ScalarOps", name: str, int_name: Optional[str] = None):
        self.trace, self.name, self.int_name = trace, name, int_name

    def _bin(self, op: str, other, reverse: bool = False) -> "_Sym":
        a, b = self.name, self.trace.operand(other)
        return self.trace.new(f"{b} {op} {a}" if reverse else f"{a} {op} {b}")

    __add__ = lambda self, o: self._bin("+", o)
    __radd__ = lambda self, o: self._bin("+", o, True)
    __sub__ = lambda self, o: self._bin("-", o)
    __rsub__ = lambda self, o: self._bin("-", o, True)
    __mul__ = lambda self, o: self._bin("*", o)
    __rmul__ = lambda self, o: self._bin("*", o, True)
    __truediv__ = lambda self, o: self._bin("/", o)
    __rtruediv__ = lambda self, o: self._bin("/", o, True)
    __gt__ = lambda self, o: self._bin(">", o)
    __lt__ = lambda self, o: self._bin("<", o)

    def __neg__(self) -> "_Sym":
        return self.trace.new(f"-{self.name}")

    def __pow__(self, exponent) -> "_Sym":
        if isinstance(exponent, float) and exponent == 0.5:  # √upper of the sign factor (rule._coefficients)
            return self.trace.new(f"tl.sqrt({self.name})")
        # β^k with k the step counter: exact square-and-multiply over k's bits (_powi)
        if not isinstance(exponent, _Sym) or exponent.int_name is None:
            raise NotImplementedError("the kernel raises only to the step counter's power")
        return self.trace.new(f"_powi({self.name}, {exponent.int_name})")

    def __bool__(self):
        raise TypeError("a kernel scalar has no Python truth value (use ops.where)")


class _ScalarOps:
    """The ``ops`` of rule's scalar functions (see ``rule._FloatScalars``),
    tracing into float64 Triton code."""

    symbolic = True

    def __init__(self):
        self.lines: List[str] = []
        self._seen: Dict[str, _Sym] = {}  # one line per distinct expression (β^k is asked for 4 times)

    def new(self, expr: str) -> _Sym:
        if expr not in self._seen:
            name = f"s{len(self.lines)}"
            self.lines.append(f"{name} = {expr}")
            self._seen[expr] = _Sym(self, name)
        return self._seen[expr]

    @staticmethod
    def operand(x) -> str:
        if isinstance(x, _Sym):
            return x.name
        if isinstance(x, (bool, int, float)):
            return repr(float(x))  # a float literal: Triton keeps it float64 next to a float64 scalar
        raise TypeError(f"cannot use {type(x).__name__} in a kernel scalar")

    def where(self, condition, a, b):
        return self.new(f"tl.where({condition.name}, {self.operand(a)}, {self.operand(b)})")

    def minimum(self, a, b):
        return self.new(f"tl.minimum({self.operand(a)}, {self.operand(b)})")


# --------------------------------------------------------------------------------------
# Tracing the per-element update
# --------------------------------------------------------------------------------------


class _ElementOps:
    """``ops`` for ``_update_math`` that emit Triton: each operation becomes one assignment.

    Same expressions as the C++ kernel's ``_CodeOps`` (lerp as m + w (g − m); sign and
    clamp by comparisons, so NaN behaves as in C++: sign(NaN) = 0, clamp(NaN) = NaN).
    """

    tiny = "TINY"

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.lines: List[str] = []

    def _new(self, expr: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        return name

    def scale_grad(self, g, s):
        return g if s == 1.0 else self._new(f"{_literal(s)} * {g}")

    def lerp_(self, m, g, w):
        return self._new(f"{m} + {w} * ({g} - {m})")

    def ema_square_(self, v, g, beta, w):
        return self._new(f"{beta} * {v} + {w} * ({g} * {g})")

    def sign(self, x):
        return self._new(f"({x} > 0).to(COMPUTE) - ({x} < 0).to(COMPUTE)")

    def mul(self, a, b):
        return self._new(f"{a} * {b}")

    def add_scaled(self, a, b, k):
        return self._new(f"{a} + {k} * {b}")

    def add_scalar_(self, a, s):
        return self._new(f"{a} + {s}")

    def div_(self, a, b):
        return self._new(f"{a} / {b}")

    def clamp_(self, x, lo, hi):
        # std::min(std::max(x, lo), hi) of the C++ kernel, comparison for comparison
        low = self._new(f"tl.where({x} < {float(lo)!r}, {float(lo)!r}, {x})")
        return self._new(f"tl.where({hi} < {low}, {hi}, {low})")

    def addcmul_(self, p, a, b, s):
        return self._new(f"{p} + {s} * ({a} * {b})")

    def add_(self, p, d, s):
        return self._new(f"{p} + {s} * {d}")

    def rsub_scalar(self, x, s):
        return self._new(f"{s} - {x}")

    def sqrt_(self, x):
        return self._new(f"tl.sqrt({x})")

    def erf_(self, x):
        return self._new(f"tl.math.erf({x})")

    def ema_(self, v, x, decay, w):
        # variance="minibatch" rules (an extra operand σ̂²) are not in RULES: the paths give
        # them the multi-tensor path on CUDA (docs/algorithm.md §1.1); never traced here
        raise NotImplementedError("the Triton kernel has no mini-batch variance operand")


def _literal(x) -> str:
    """A Python number as a float literal of the generated source; other values (names) as they are."""
    return repr(float(x)) if isinstance(x, (int, float)) else str(x)


# --------------------------------------------------------------------------------------
# Source generation
# --------------------------------------------------------------------------------------

_HEADER = '''\
# generated by lightning_msvag/_triton_kernel.py from rule._update_math and
# rule._coefficients; do not edit
import triton
import triton.language as tl


@triton.jit
def _powi(x, k):
    """x ** k for an integer k >= 0 (int32) by square-and-multiply, in x's dtype."""
    result = x * 0.0 + 1.0
    base = x
    for bit in tl.static_range(31):
        result = tl.where(((k >> bit) & 1) != 0, result * base, result)
        base = base * base
    return result


@triton.jit
def _f64(hi, lo):
    """The float64 whose bits are (hi << 32) | lo (two int32 kernel arguments)."""
    bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 4294967295)
    return bits.to(tl.float64, bitcast=True)
'''

_KERNEL = '''

@triton.jit(do_not_specialize=["n", "lr_hi", "lr_lo", "beta_hi", "beta_lo"])
def NAME(table, gtable, n, lr, lr_hi, lr_lo, beta_hi, beta_lo, grad_scale, found_inf,
         DTYPE: tl.constexpr, COMPUTE: tl.constexpr, TINY: tl.constexpr, LR_TENSOR: tl.constexpr,
         HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
         BLOCK: tl.constexpr, ITERS: tl.constexpr, VEC: tl.constexpr):
    if HAS_INF:
        go = tl.load(found_inf) == 0  # AMP found an inf/NaN gradient: write nothing
    else:
        go = True
    if go:
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(table + 5 * n + 2 * pid)
        start = tl.load(table + 5 * n + 2 * pid + 1)
        numel = tl.load(table + 4 * n + t)
        LOAD_POINTERS
        k = tl.load(tl.load(table + 3 * n + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
        ki = k.to(tl.int32)
        if LR_TENSOR:
            lr64 = tl.load(lr).to(tl.float64)
        else:
            lr64 = _f64(lr_hi, lr_lo)
        beta64 = _f64(beta_hi, beta_lo)
        SCALARS
        if HAS_SCALE:
            scale = tl.load(grad_scale).to(COMPUTE)
        if start + BLOCK * ITERS <= numel:
            for i_full in range(ITERS):
                offs = start + i_full * BLOCK + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
                BODY_FULL
        else:
            # the tensor's last chunk: whole VEC-element groups under a mask that Triton
            # can vectorise (its bound a multiple of VEC), then the last numel % VEC
            lim = tl.multiple_of((numel // VEC) * VEC, VEC)
            for i_tail in range((lim - start + BLOCK - 1) // BLOCK):  # (no tl.cdiv: a jit function, which the interpreter cannot call unless set before triton is imported)
                offs = start + i_tail * BLOCK + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
                mask = offs < lim
                BODY_TAIL
            if lim < numel:
                offs = lim + tl.arange(0, VEC)
                mask = offs < numel
                BODY_REST
'''


def _rule_name(rule: UpdateRule, maximize: bool) -> str:
    name = f"step_{rule.direction}_sign{int(rule.sign)}_va{int(rule.variance_adaptation)}"
    if rule.sign and rule.variance_adaptation:  # M-SSD-VA's two factors (docs/algorithm.md §1.2)
        name += f"_{rule.sign_factor}"
    return f"{name}_max{int(maximize)}"


def _pointer(row: str, name: str) -> List[str]:
    return [
        f"{name} = tl.load(table + {row} * n + t)" if row != "G" else f"{name} = tl.load(gtable + t)",
        f"{name} = {name}.to(tl.pointer_type(DTYPE))",
        "if ALIGNED:",
        f"    {name} = tl.multiple_of({name}, 16)",
    ]


def _kernel_source(rule: UpdateRule, maximize: bool) -> str:
    need_m, need_v = rule.needs_first_moment, rule.needs_second_moment
    pointers = _pointer("0", "P") + _pointer("G", "G")
    if need_m:
        pointers += _pointer("1", "M")
    if need_v:
        pointers += _pointer("2", "V")

    # the scalars: _coefficients traced on symbolic (lr, β, k), in float64
    scalars = _ScalarOps()
    k = _Sym(scalars, "k", int_name="ki")
    lr, beta = _Sym(scalars, "lr64"), _Sym(scalars, "beta64")
    branches = [False, True] if rule.variance_adaptation else [False]
    coefficients = []
    for va in branches:
        c = _coefficients(rule, lr, beta, k, maximize, ops=scalars, va=va)
        assert c.va == va
        coefficients.append(c)
    scalar_lines = list(scalars.lines)
    compute_coefficients = []  # the same, as compute-dtype names
    for j, c in enumerate(coefficients):
        fields = []
        for field, value in zip(Coefficients._fields, c):
            if field == "va" or not isinstance(value, _Sym):
                fields.append(value)
            else:
                name = f"c{j}_{field}"
                scalar_lines.append(f"{name} = {value.name}.to(COMPUTE)")
                fields.append(name)
        compute_coefficients.append(Coefficients(*fields))

    def body(masked: bool, indent: int = 16) -> str:
        mask = "mask" if masked else "None"
        lines = [
            f"p = tl.load(P + offs, mask={mask}).to(COMPUTE)",
            f"g = tl.load(G + offs, mask={mask}).to(COMPUTE)",
            "if HAS_SCALE:",
            "    g = g / scale",
        ]
        if need_m:
            lines.append(f"m = tl.load(M + offs, mask={mask}).to(COMPUTE)")
        if need_v:
            lines.append(f"v = tl.load(V + offs, mask={mask}).to(COMPUTE)")
        results = []
        for j, c in enumerate(compute_coefficients):
            ops = _ElementOps(f"e{j}_")
            results.append(_update_math(rule, ops, c, "p", "g", "m" if need_m else None, "v" if need_v else None))
            lines += ops.lines
        p_new, m_new, v_new = results[-1]
        if len(results) == 2:
            # k = 1: the plain step (γ = 1 exactly); k > 1: the γ step (docs/algorithm.md §1)
            p_new = f"tl.where(k > 1, {results[1][0]}, {results[0][0]})"
        lines.append(f"tl.store(P + offs, ({p_new}).to(DTYPE, fp_downcast_rounding='rtne'), mask={mask})")
        if need_m:
            lines.append(f"tl.store(M + offs, {m_new}.to(DTYPE, fp_downcast_rounding='rtne'), mask={mask})")
        if need_v:
            lines.append(f"tl.store(V + offs, {v_new}.to(DTYPE, fp_downcast_rounding='rtne'), mask={mask})")
        return ("\n" + " " * indent).join(lines)

    return (
        _KERNEL.replace("NAME", _rule_name(rule, maximize))
        .replace("LOAD_POINTERS", "\n        ".join(pointers))
        .replace("SCALARS", "\n        ".join(scalar_lines))
        .replace("BODY_FULL", body(False))
        .replace("BODY_TAIL", body(True))
        .replace("BODY_REST", body(True))
    )


@functools.lru_cache(maxsize=None)
def source() -> str:
    """The complete Triton source: one kernel per (rule of RULES, maximize)."""
    return _HEADER + "".join(_kernel_source(rule, maximize) for rule in RULES for maximize in (False, True))


# --------------------------------------------------------------------------------------
# Loading (decorating) the generated kernels
# --------------------------------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels(interpret: bool) -> dict:
    """The generated module's namespace, its kernels decorated in the current mode
    (``triton.jit`` reads TRITON_INTERPRET when it decorates)."""
    namespace = _modules.get(interpret)
    if namespace is None:
        with _lock:
            namespace = _modules.get(interpret)
            if namespace is None:
                text = source()
                # Triton reads a kernel's source through inspect: register it with linecache
                filename = f"<lightning_msvag triton kernel {hashlib.sha256(text.encode()).hexdigest()[:16]}>"
                linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
                namespace = {"__name__": "lightning_msvag._triton_generated"}
                exec(compile(text, filename, "exec"), namespace)
                _modules[interpret] = namespace
    return namespace


def available() -> bool:
    """Whether the fused Triton kernel can run here: Triton imports and CUDA is present (or
    ``TRITON_INTERPRET=1``), and no build failed in this process. Starts no build, never raises."""
    if _broken is not None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        return _interpret() or torch.cuda.is_available()
    except Exception:
        return False


def unavailable_reason() -> str:
    """Why :func:`available` is false, in a few words (for the fallback's warning)."""
    if _broken is not None:
        return _broken
    try:
        import triton  # noqa: F401
    except Exception as error:
        return f"Triton does not import: {type(error).__name__}: {error}"
    return "no CUDA device"


def _reset() -> None:
    """Forget decorated kernels, tables and any failure (tests)."""
    global _broken
    with _lock:
        _broken = None
        _modules.clear()
        _launched.clear()
        _tables.clear()
        _grad_tables.clear()


# --------------------------------------------------------------------------------------
# Launch tables (device int64 tensors, cached on the tensors' addresses)
# --------------------------------------------------------------------------------------

_TABLE_CACHE = 64  # entries per cache: many param groups must not evict each other every step
_tables: "collections.OrderedDict[bytes, tuple]" = collections.OrderedDict()
_grad_tables: "collections.OrderedDict[bytes, torch.Tensor]" = collections.OrderedDict()
_DATA_PTR = torch.Tensor.data_ptr
_NO_CONTEXT = contextlib.nullcontext()
_NUMEL = torch.Tensor.numel


def _remember(cache: collections.OrderedDict, key, value):
    cache[key] = value
    if len(cache) > _TABLE_CACHE:
        cache.popitem(last=False)
    return value


def _main_table(device, chunk: int, params, exp_avgs, exp_avg_sqs, steps):
    """(table, number of chunks, aligned): per tensor the addresses of θ, m~, v~, step and
    its numel, then per chunk (tensor index, start). Cached on its exact content: a miss
    costs a host-to-device copy, which waits for the work queued on the device."""
    global table_builds
    n = len(params)
    none = (0,) * n  # no buffer: the rule's kernel never reads that row
    words = (  # a tuple: the cheapest key to build and hash (about 0.1 µs per entry)
        *map(_DATA_PTR, params),
        *(none if exp_avgs is None else map(_DATA_PTR, exp_avgs)),
        *(none if exp_avg_sqs is None else map(_DATA_PTR, exp_avg_sqs)),
        *map(_DATA_PTR, steps),
        *map(_NUMEL, params),
    )
    key = (device, chunk, words)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    table_builds += 1
    head = torch.tensor(words, dtype=torch.int64)
    numels = head[4 * n :]
    per_tensor = (numels + chunk - 1) // chunk
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner]) * chunk
    table = torch.cat([head, torch.stack([owner, starts], 1).reshape(-1)]).to(device)
    aligned = all(w % 16 == 0 for w in words[: 3 * n])  # 16-byte vectors for every buffer (0: unused)
    return _remember(_tables, key, (table, owner.numel(), aligned))


def _grad_table(device, grads):
    """(table, aligned) of the gradients' addresses, cached like :func:`_main_table`."""
    global table_builds
    words = tuple(map(_DATA_PTR, grads))
    key = (device, words)
    hit = _grad_tables.get(key)
    if hit is not None:
        _grad_tables.move_to_end(key)
        return hit
    table_builds += 1
    table = torch.tensor(words, dtype=torch.int64).to(device)
    return _remember(_grad_tables, key, (table, all(w % 16 == 0 for w in words)))


def _halves(x: float):
    """The 64 bits of the float64 x as two int32 kernel arguments (Triton passes Python
    floats as float32; the scalars must stay float64 to match the other paths)."""
    (bits,) = struct.unpack("<q", struct.pack("<d", float(x)))
    lo = bits & 0xFFFFFFFF
    return bits >> 32, lo - (1 << 32) if lo >= 1 << 31 else lo


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def _announce(kernel_name: str, dtype, flags) -> Optional[str]:
    """Print one line before a specialisation's first build on this machine; returns the
    marker file to create once it has built (None: nothing to announce)."""
    global announcements
    import triton

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    key = "\0".join(map(str, (source(), kernel_name, dtype, flags, triton.__version__, torch.__version__, capability)))
    marker = os.path.join(cache_dir(), f"triton_{hashlib.sha256(key.encode()).hexdigest()[:20]}.built")
    if os.path.exists(marker):
        return None
    announcements += 1
    print(
        f"lightning-msvag: compiling the fused Triton optimizer kernel ({kernel_name}, {dtype}) once "
        f"(cached by Triton)",
        file=sys.stderr,
        flush=True,
    )
    return marker


def fused_update(
    rule: UpdateRule, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta: float, maximize: bool,
    grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One step of ``rule`` on lists of contiguous tensors of one dtype on one device, in one launch.

    ``steps``: 0-dim float32 tensors on the same device, already counting this step (each
    tensor's own k is read in the kernel). ``exp_avgs`` / ``exp_avg_sqs``: ``None`` (or lists
    of ``None``) where the rule keeps no such buffer. ``lr``: a float or a 0-dim tensor on the
    device. ``grad_scale``: gradients are divided by it; ``found_inf``: if nonzero, nothing is
    written. Raises ``RuntimeError`` if the kernel cannot be built or run (the caller warns
    once and takes the multi-tensor path).
    """
    global _broken
    if not params:
        return
    interpret = _interpret()
    dtype = params[0].dtype
    device = params[0].device
    if dtype not in DTYPES:
        raise TypeError(f"lightning-msvag: the fused Triton kernel handles {sorted(map(str, DTYPES))}, not {dtype}")
    if interpret != (device.type == "cpu"):
        raise ValueError(
            f"lightning-msvag: the fused Triton kernel runs on {'CPU' if interpret else 'CUDA'} tensors "
            f"{'under' if interpret else 'without'} TRITON_INTERPRET=1, got {device.type} tensors"
        )
    if _broken is not None:
        raise RuntimeError(f"lightning-msvag: fused Triton kernel unavailable ({_broken})")
    if steps[0].dtype != torch.float32:
        raise TypeError(f"lightning-msvag: the fused Triton kernel reads float32 step counters, got {steps[0].dtype}")
    for what, scalar in (("lr", lr), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if isinstance(scalar, torch.Tensor) and scalar.device != device:  # the kernel dereferences it
            raise ValueError(f"lightning-msvag: {what} is on {scalar.device}, the parameters on {device}")
    exp_avgs = exp_avgs if rule.needs_first_moment else None
    exp_avg_sqs = exp_avg_sqs if rule.needs_second_moment else None
    chunk = BLOCK * ITERS
    table, chunks, aligned = _main_table(device, chunk, params, exp_avgs, exp_avg_sqs, steps)
    if chunks == 0:
        return
    gtable, grads_aligned = _grad_table(device, grads)
    lr_tensor = isinstance(lr, torch.Tensor)
    lr_hi, lr_lo = (0, 0) if lr_tensor else _halves(lr)
    beta_hi, beta_lo = _halves(beta)
    name = _rule_name(rule, maximize)
    triton_dtype, compute, tiny = DTYPES[dtype]
    flags = (lr_tensor, grad_scale is not None, found_inf is not None, aligned and grads_aligned)
    try:
        import triton.language as tl

        kernel = _kernels(interpret)[name]
        spec = (interpret, name, dtype, flags)
        marker = None
        if spec not in _launched and not interpret:
            marker = _announce(name, dtype, flags)
        on_device = (
            torch.cuda.device(device)  # Triton launches on the current device
            if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
            else _NO_CONTEXT
        )
        with on_device:
            kernel[(chunks,)](
                table, gtable, len(params), lr if lr_tensor else table, lr_hi, lr_lo, beta_hi, beta_lo,
                grad_scale if grad_scale is not None else table, found_inf if found_inf is not None else table,
                DTYPE=getattr(tl, triton_dtype), COMPUTE=getattr(tl, compute), TINY=tiny, LR_TENSOR=flags[0],
                HAS_SCALE=flags[1], HAS_INF=flags[2], ALIGNED=flags[3], BLOCK=BLOCK, ITERS=ITERS,
                VEC=max(1, 16 // params[0].element_size()),
                num_warps=NUM_WARPS,
            )
        if spec not in _launched:
            _launched.add(spec)
            if marker is not None:
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                open(marker, "w").close()
    except Exception as error:  # no usable Triton, a failed build or launch
        _broken = f"{type(error).__name__}: {error}"
        raise RuntimeError(f"lightning-msvag: fused Triton kernel failed ({_broken})") from error
