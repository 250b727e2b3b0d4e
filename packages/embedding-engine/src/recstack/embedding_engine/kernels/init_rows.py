"""Initial values of embedding rows: a pure function of (key, column, seed).

A new row's values do not come from a stateful generator: value ``[i, j]`` of
``init_rows(keys, dim, initializer, seed=s)`` depends only on ``keys[i]``, ``j``, ``s``, the
initializer and ``dim``. So a key's initial row is the same on CPU and GPU, in any batch
order or with duplicates, on any rank, and after resharding a checkpoint onto another world
size; an id read in eval mode before it exists can be given the row training would insert.

Random bits (counter-based, SplitMix64-style, on core's MurmurHash3 ``fmix64``)::

    salt = fmix64(seed + GOLDEN)                 # host, once per call
    base = fmix64(key ^ salt)                    # per row
    bits = fmix64(base + (column + 1) * GOLDEN)  # per value; GOLDEN = 0x9E3779B97F4A7C15

all modulo ``2**64``. ``fmix64`` is a bijection, so distinct keys get distinct bases, and a
row's ``dim`` counters are distinct odd multiples of ``GOLDEN`` apart.

Values (every step in float64 with IEEE-754 ``+ - * /`` only, then rounded once to float32,
then to the row dtype with round-to-nearest-even):

* uniform ``[low, high)``: ``low + (high - low) * u`` with ``u = (bits >> 11) * 2**-53``;
* normal and truncated normal, by inversion: ``u = ((bits >> 12) + 0.5) * 2**-52`` (never 0
  or 1), ``p = P(a) + (P(b) - P(a)) * u``, ``z = ndtri(p)`` clamped into ``[a, b]``, value
  ``mean + std * z``. ``P`` is the standard normal CDF, ``a, b = -inf, inf`` for a plain
  normal. One draw per value, no rejection loop, exact truncation for any ``a < b``
  (intervals right of 0 are mirrored to the left tail, where ``P`` keeps full precision).
  ``ndtri`` is Acklam's rational approximation (relative error < 1.2e-9, below float32's
  resolution); its logarithm and square root are computed here from ``+ - * /`` and
  bit manipulation, since ``log``/``sqrt`` of torch, libdevice and numpy differ in the last
  bit. ``P(a)``, ``P(b)`` are computed on the host in decimal arithmetic (Python's
  ``decimal``: exactly specified, so the same on every machine) and rounded to float64.
* xavier: uniform ``±gain*sqrt(3/dim)`` or normal ``std = gain/sqrt(dim)`` (host constants
  from IEEE-exact ``sqrt``); constant and zeros need no bits.

Why this is bit-identical across backends: both paths perform the same sequence of
correctly rounded float64 operations (the Triton kernel is compiled with
``enable_fp_fusion=False``, so no multiply-add is contracted into an FMA, and every
float64 constant enters the kernel as an exact float64, never through Triton's float32
literals). The tests check bit identity of the torch reference and the Triton kernel under
``TRITON_INTERPRET=1``; the ``gpu`` test checks the compiled kernel on CUDA.
"""

from __future__ import annotations

import functools
import math
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.device import TABLE_KINDS
from recstack.core.kernels.hash import check_seed, fmix64_reference, lshr64
from recstack.core.kernels.host import as_int64, next_pow2
from recstack.core.kernels.launch import FastKernel
from recstack.core.paged import PagedTensor
from recstack.embedding_engine.config import Initializer

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.device import tl_to_table_dtype
    from recstack.core.kernels.hash import tl_fmix64

__all__ = [
    "GOLDEN",
    "INIT_ROWS_DEFAULTS",
    "init_rows",
    "init_rows_into",
    "init_rows_reference",
]

#: The SplitMix64 increment (2**64 / golden ratio, odd): step between a row's counters.
GOLDEN = 0x9E3779B97F4A7C15
#: Kernel tile: ``tile_elems`` values per program, at most ``max_block_d`` columns wide.
INIT_ROWS_DEFAULTS: dict[str, int] = {"tile_elems": 1024, "max_block_d": 64, "num_warps": 4}

_MASK64 = (1 << 64) - 1
_REF_CHUNK = 1 << 20  # values per chunk of the torch reference (bounds its temporaries)

# Kinds the kernel knows; every Initializer maps onto one.
_CONST, _UNIFORM, _NORMAL = 0, 1, 2
_NPARAMS = 8

# Acklam's inverse normal CDF coefficients (https://web.archive.org/web/2015/home.online.no/
# ~pjacklam/notes/invnorm/): central region numerator A, denominator B; tails C, D.
_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_D = (
    7.784695709041462e-03,
    3.224671290700398e-01,
    2.445134137142996e00,
    3.754408661907416e00,
)
_P_LOW = 0.02425
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
_LOG_TERMS = 11  # atanh series terms: |s| < 0.172, so s**24 / 25 < 2**-64
_NEWTON_STEPS = 5  # sqrt: 6% initial error -> below one float64 ulp
_EXP_BIAS_BITS = 0x3FF0000000000000
_MANTISSA_MASK = (1 << 52) - 1
_SQRT_MAGIC = 0x1FF8000000000000  # (1023 << 52) >> 1: halves the biased exponent
_TWO_M52 = 2.0**-52
_TWO_M53 = 2.0**-53


# ----------------------------------------------------------------------------------------
# Host side: validation and the per-initializer parameter vector
# ----------------------------------------------------------------------------------------


def _std_normal_cdf(x: float) -> Decimal:
    """P(x) = (1 + erf(x / sqrt 2)) / 2 in decimal arithmetic (Maclaurin series of erf).

    The series' largest term is about ``exp(z**2)`` and P(x) for ``x < 0`` about
    ``exp(-z**2)``, so the working precision grows with ``z**2`` to keep 30 digits.
    """
    # A fresh context: the caller's decimal settings (precision, rounding) must not matter.
    # 2 z**2 / ln 10 digits with z = x / sqrt 2 (0.44 > 1 / ln 10; no libm call, so the
    # precision, and with it the result, is the same on every machine).
    lost = int(x * x * 0.44) + 1
    with localcontext(Context(prec=40 + lost, rounding=ROUND_HALF_EVEN)) as ctx:
        z = Decimal(x) / Decimal(2).sqrt()
        pi = Decimal(
            "3.14159265358979323846264338327950288419716939937510582097494459230781640628"
            "6208998628034825342117067982148086513282306647093844609550582231725359408128"
        )
        z2 = z * z
        term = z  # (-1)**n z**(2n+1) / n!
        total = z
        tiny = Decimal(10) ** (-ctx.prec)
        n = 0
        while True:
            n += 1
            term = -term * z2 / n
            add = term / (2 * n + 1)
            total += add
            if n > z2 and abs(add) < tiny:
                break
        erf = 2 * total / pi.sqrt()
        return (1 + erf) / 2


@functools.lru_cache(maxsize=256)
def _truncation(a: float, b: float) -> tuple[float, float, float, float, float]:
    """``(p_lo, p_width, z_lo, z_hi, sign)`` of a standard normal truncated to ``[a, b]``.

    Intervals right of zero are mirrored (sample ``-z`` in ``[-b, -a]``) so both CDF values
    are small numbers that float64 holds to full relative precision.
    """
    sign = 1.0
    if a + b > 0:
        a, b, sign = -b, -a, -1.0
    lo, hi = _std_normal_cdf(a), _std_normal_cdf(b)
    with localcontext(Context(prec=60, rounding=ROUND_HALF_EVEN)):
        width = hi - lo
    return float(lo), float(width), a, b, sign


def _plan(initializer: Initializer, dim: int) -> tuple[int, tuple[float, ...]]:
    """The kernel kind and its float64 parameters for ``initializer`` at width ``dim``."""
    p = initializer.params
    kind = initializer.kind
    if kind == "zeros":
        return _CONST, _pad((0.0,))
    if kind == "constant":
        # + 0.0 turns -0.0 into 0.0, which the kernel's splat would do anyway.
        return _CONST, _pad((p["value"] + 0.0,))
    if kind in ("uniform", "xavier_uniform"):
        if kind == "uniform":
            low, high = p["low"], p["high"]
        else:
            high = p["gain"] * math.sqrt(3.0 / dim)
            low = -high
        return _UNIFORM, _pad((low, high - low))
    if kind in ("normal", "xavier_normal"):
        mean, std = (p["mean"], p["std"]) if kind == "normal" else (0.0, p["gain"] / math.sqrt(dim))
        return _NORMAL, _pad((0.0, 1.0, mean, std, -math.inf, math.inf, 1.0))
    if kind == "truncated_normal":
        p_lo, p_width, z_lo, z_hi, sign = _truncation(p["a"], p["b"])
        return _NORMAL, _pad((p_lo, p_width, p["mean"], p["std"], z_lo, z_hi, sign))
    raise ValueError(f"init_rows: unsupported initializer kind {kind!r}")  # pragma: no cover


def _pad(values: tuple[float, ...]) -> tuple[float, ...]:
    return values + (0.0,) * (_NPARAMS - len(values))


@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=256)
def _params_tensor(params: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # float64 on the device: Triton would pass Python floats as float32 scalars. Kept per
    # initializer and device (kernels only read it): no host-to-device copy a launch.
    return torch.tensor(params, dtype=torch.float64, device=device)


def _salt(seed: int) -> int:
    """``fmix64(seed + GOLDEN)`` as a Python int (exact uint64 arithmetic)."""
    k = (seed + GOLDEN) & _MASK64
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    return k ^ (k >> 33)


def _check_keys(keys: object, op: str) -> torch.Tensor:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{op}: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        raise TypeError(f"{op}: keys must be int64, got {keys.dtype}")
    if keys.dim() != 1:
        raise ValueError(f"{op}: keys must be 1-D, got shape {tuple(keys.shape)}")
    return keys.contiguous()


def _check_args(
    dim: object, initializer: object, seed: object, dtype: object, op: str
) -> tuple[int, int]:
    dim = check_int(dim, f"{op}: dim", minimum=1)
    if not isinstance(initializer, Initializer):
        raise TypeError(
            f"{op}: initializer must be an Initializer, got {type(initializer).__name__}"
        )
    if dtype not in TABLE_KINDS:
        raise TypeError(
            f"{op}: dtype must be one of {', '.join(map(str, TABLE_KINDS))}, got {dtype}"
        )
    return dim, check_seed(seed)


# ----------------------------------------------------------------------------------------
# torch reference (float64 math mirrored operation by operation in the kernel)
# ----------------------------------------------------------------------------------------


def _horner(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    acc = x * coeffs[0] + coeffs[1]
    for c in coeffs[2:]:
        acc = acc * x + c
    return acc


def _log_ref(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float64 values: exponent * ln2 + 2 atanh series."""
    bits = x.view(torch.int64)
    e = (bits >> 52) - 1023
    m = ((bits & _MANTISSA_MASK) | _EXP_BIAS_BITS).view(torch.float64)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    poly = torch.full_like(s, 1.0 / (2 * _LOG_TERMS + 1))
    for k in range(_LOG_TERMS - 1, -1, -1):
        poly = poly * s2 + 1.0 / (2 * k + 1)
    return e.to(torch.float64) * _LN2 + (s * 2.0) * poly


def _sqrt_ref(x: torch.Tensor) -> torch.Tensor:
    """Square root of positive float64 values: exponent-halving guess, Newton steps."""
    y = ((x.view(torch.int64) >> 1) + _SQRT_MAGIC).view(torch.float64)
    for _ in range(_NEWTON_STEPS):
        y = (y + x / y) * 0.5
    return y


def _ndtri_ref(p: torch.Tensor) -> torch.Tensor:
    """Acklam's inverse standard normal CDF for ``p`` in (0, 1)."""
    lower = p < 0.5
    q = torch.where(lower, p, 1.0 - p)
    r = _sqrt_ref(_log_ref(q) * -2.0)
    t = _horner(r, _C) / (_horner(r, _D) * r + 1.0)
    tail = torch.where(lower, t, -t)
    c = p - 0.5
    c2 = c * c
    central = (_horner(c2, _A) * c) / (_horner(c2, _B) * c2 + 1.0)
    return torch.where(q < _P_LOW, tail, central)


def _values_ref(
    keys: torch.Tensor, dim: int, kind: int, params: tuple[float, ...], salt: int
) -> torch.Tensor:
    if kind == _CONST:
        return torch.full((keys.numel(), dim), params[0], dtype=torch.float64, device=keys.device)
    base = fmix64_reference(keys ^ as_int64(salt))
    cols = torch.arange(1, dim + 1, dtype=torch.int64, device=keys.device)
    bits = fmix64_reference(base[:, None] + cols[None, :] * as_int64(GOLDEN))
    if kind == _UNIFORM:
        u = lshr64(bits, 11).to(torch.float64) * _TWO_M53
        return u * params[1] + params[0]
    p_lo, p_width, mean, std, z_lo, z_hi, sign = params[:7]
    u = (lshr64(bits, 12).to(torch.float64) + 0.5) * _TWO_M52
    z = _ndtri_ref(u * p_width + p_lo)
    z = torch.clamp(z, z_lo, z_hi) * sign
    return z * std + mean


def init_rows_reference(
    keys: torch.Tensor,
    dim: int,
    initializer: Initializer,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference of :func:`init_rows` (any device), in chunks of about 2**20 values."""
    keys = _check_keys(keys, "init_rows")
    dim, seed = _check_args(dim, initializer, seed, dtype, "init_rows")
    kind, params = _plan(initializer, dim)
    salt = _salt(seed)
    out = torch.empty((keys.numel(), dim), dtype=dtype, device=keys.device)
    step = max(1, _REF_CHUNK // dim)
    for start in range(0, keys.numel(), step):
        v = _values_ref(keys[start : start + step], dim, kind, params, salt)
        out[start : start + step] = v.to(torch.float32).to(dtype)
    return out


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------

if HAS_TRITON:
    _GOLDEN_C = tl.constexpr(GOLDEN)
    _LOG_TERMS_C = tl.constexpr(_LOG_TERMS)
    _NEWTON_C = tl.constexpr(_NEWTON_STEPS)

    @triton.jit
    def _f64(c: tl.constexpr):
        # A float64 constant: a bare Python float would enter the kernel as float32.
        return tl.full([], c, tl.float64)

    @triton.jit
    def _tl_log(x):
        bits = x.to(tl.int64, bitcast=True)
        e = (bits >> 52) - 1023
        m = ((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000).to(tl.float64, bitcast=True)
        big = m > _f64(1.4142135623730951)
        m = tl.where(big, m * 0.5, m)
        e = tl.where(big, e + 1, e)
        s = (m - 1.0) / (m + 1.0)
        s2 = s * s
        one = _f64(1.0)
        poly = s2 * 0.0 + one / (2 * _LOG_TERMS_C + 1)
        for i in tl.static_range(_LOG_TERMS_C):
            poly = poly * s2 + one / (2 * (_LOG_TERMS_C - 1 - i) + 1)
        return e.to(tl.float64) * _f64(0.6931471805599453) + (s * 2.0) * poly

    @triton.jit
    def _tl_sqrt(x):
        y = ((x.to(tl.int64, bitcast=True) >> 1) + 0x1FF8000000000000).to(tl.float64, bitcast=True)
        for _ in tl.static_range(_NEWTON_C):
            y = (y + x / y) * 0.5
        return y

    @triton.jit
    def _tl_ndtri(p):
        lower = p < 0.5
        q = tl.where(lower, p, 1.0 - p)
        r = _tl_sqrt(_tl_log(q) * -2.0)
        num = r * _f64(-7.784894002430293e-03) + _f64(-3.223964580411365e-01)
        num = num * r + _f64(-2.400758277161838e00)
        num = num * r + _f64(-2.549732539343734e00)
        num = num * r + _f64(4.374664141464968e00)
        num = num * r + _f64(2.938163982698783e00)
        den = r * _f64(7.784695709041462e-03) + _f64(3.224671290700398e-01)
        den = den * r + _f64(2.445134137142996e00)
        den = den * r + _f64(3.754408661907416e00)
        t = num / (den * r + 1.0)
        tail = tl.where(lower, t, -t)
        c = p - 0.5
        c2 = c * c
        num = c2 * _f64(-3.969683028665376e01) + _f64(2.209460984245205e02)
        num = num * c2 + _f64(-2.759285104469687e02)
        num = num * c2 + _f64(1.383577518672690e02)
        num = num * c2 + _f64(-3.066479806614716e01)
        num = num * c2 + _f64(2.506628277459239e00)
        den = c2 * _f64(-5.447609879822406e01) + _f64(1.615858368580409e02)
        den = den * c2 + _f64(-1.556989798598866e02)
        den = den * c2 + _f64(6.680131188771972e01)
        den = den * c2 + _f64(-1.328068155288572e01)
        central = (num * c) / (den * c2 + 1.0)
        return tl.where(q < _f64(0.02425), tail, central)

    @triton.jit(do_not_specialize=["n", "dim", "salt"])
    def _init_rows_kernel(
        keys_ptr,
        out_ptr,
        params_ptr,
        n,
        dim,
        salt,
        KIND: tl.constexpr,
        OUT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = r < n
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < dim)[None, :]
        p0 = tl.load(params_ptr)
        if KIND == 0:
            v = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float64) + p0
        else:
            keys = tl.load(keys_ptr + r, mask=row_ok, other=0).to(tl.uint64, bitcast=True)
            salt_u = salt.to(tl.int64).to(tl.uint64, bitcast=True)
            base = tl_fmix64(keys ^ salt_u)
            ctr = (cols + 1).to(tl.uint64, bitcast=True) * _GOLDEN_C
            bits = tl_fmix64(base[:, None] + ctr[None, :])
            p1 = tl.load(params_ptr + 1)
            if KIND == 1:
                u = (bits >> 11).to(tl.int64, bitcast=True).to(tl.float64) * _f64(2.0**-53)
                v = u * p1 + p0
            else:
                u = (bits >> 12).to(tl.int64, bitcast=True).to(tl.float64) + 0.5
                u = u * _f64(2.0**-52)
                z = _tl_ndtri(u * p1 + p0)
                z = tl.minimum(tl.maximum(z, tl.load(params_ptr + 4)), tl.load(params_ptr + 5))
                z = z * tl.load(params_ptr + 6)
                v = z * tl.load(params_ptr + 3) + tl.load(params_ptr + 2)
        out = tl_to_table_dtype(v.to(tl.float32), OUT)
        tl.store(out_ptr + r[:, None] * dim + cols[None, :], out, mask=mask)

    _INIT_ROWS = FastKernel(_init_rows_kernel)


def _launch(
    keys: torch.Tensor, out: torch.Tensor, kind: int, params: tuple[float, ...], salt: int
) -> None:
    n, dim = out.shape
    block_d = min(next_pow2(dim), INIT_ROWS_DEFAULTS["max_block_d"])
    block_r = next_pow2(max(1, INIT_ROWS_DEFAULTS["tile_elems"] // block_d))
    grid = (triton.cdiv(n, block_r), triton.cdiv(dim, block_d))
    _INIT_ROWS(
        grid,
        keys,
        out,
        _params_tensor(params, keys.device),
        n,
        dim,
        as_int64(salt),
        kind,
        TABLE_KINDS[out.dtype],
        block_r,
        block_d,
        num_warps=INIT_ROWS_DEFAULTS["num_warps"],
        # Contracting a*b + c into an FMA would round differently from the reference.
        enable_fp_fusion=False,
    )


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def init_rows(
    keys: torch.Tensor,
    dim: int,
    initializer: Initializer,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial rows ``[len(keys), dim]`` of ``keys``, each a pure function of (key, seed).

    Args:
        keys: int64 ``[N]`` ids (any values, duplicates allowed: equal keys get equal rows).
        dim: row width (> 0).
        initializer: the distribution (:class:`~recstack.embedding_engine.config.Initializer`).
        seed: an int in ``[0, 2**64)``; rows for different seeds are independent.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        A new ``[N, dim]`` tensor of ``dtype`` on ``keys``' device; bit-identical on every
        backend and device (see the module docstring for the construction).

    Raises:
        TypeError: keys not an int64 tensor, a bad initializer or dtype.
        ValueError: keys not 1-D, ``dim < 1``, a seed outside ``[0, 2**64)``.

    Examples:
        >>> import torch
        >>> from recstack.embedding_engine.config import Initializer
        >>> a = init_rows(torch.tensor([7, 3]), 4, Initializer.normal(std=0.1), seed=1)
        >>> b = init_rows(torch.tensor([3]), 4, Initializer.normal(std=0.1), seed=1)
        >>> torch.equal(a[1], b[0])
        True
    """
    keys = _check_keys(keys, "init_rows")
    dim, seed = _check_args(dim, initializer, seed, dtype, "init_rows")
    if not kernels.use_triton(keys, op="init_rows"):
        kernels.record_launch("init_rows_reference")
        return init_rows_reference(keys, dim, initializer, seed=seed, dtype=dtype)
    out = torch.empty((keys.numel(), dim), dtype=dtype, device=keys.device)
    if keys.numel():
        kind, params = _plan(initializer, dim)
        kernels.record_launch("init_rows")
        _launch(keys, out, kind, params, _salt(seed))
    return out


def init_rows_into(
    paged: PagedTensor,
    rows: torch.Tensor,
    keys: torch.Tensor,
    initializer: Initializer,
    *,
    seed: int = 0,
    check_bounds: bool = True,
) -> None:
    """Write the initial values of ``keys`` into ``paged`` rows ``rows`` (new or reused rows).

    ``rows[i]`` receives :func:`init_rows` ``(keys, paged.dim, initializer, seed=seed,
    dtype=paged.dtype)[i]``, through core's paged scatter. ``check_bounds`` is passed on to
    :meth:`PagedTensor.scatter_rows` (``False`` skips its host sync for rows known valid).

    Raises:
        TypeError / ValueError: as :func:`init_rows`; ``rows`` not a 1-D integer tensor of
            ``len(keys)`` on the table's device.
        IndexError: a row outside the table (with ``check_bounds``).
    """
    if not isinstance(paged, PagedTensor):
        raise TypeError(f"init_rows_into: paged must be a PagedTensor, got {type(paged).__name__}")
    keys = _check_keys(keys, f"init_rows_into on {paged.name!r}")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.numel() != keys.numel():
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(
            f"init_rows_into on {paged.name!r}: rows must be a 1-D tensor with one row per "
            f"key ({keys.numel()}), got {shape}"
        )
    if keys.device != paged.device:
        raise ValueError(
            f"init_rows_into on {paged.name!r}: keys are on {keys.device} but the table is "
            f"on {paged.device}"
        )
    values = init_rows(keys, paged.dim, initializer, seed=seed, dtype=paged.dtype)
    paged.scatter_rows(rows, values, check_bounds=check_bounds)
