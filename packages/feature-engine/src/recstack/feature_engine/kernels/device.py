"""``@triton.jit`` device helpers several Feature Engine kernels call.

Searches over sorted tables (which feature or row owns an element, which bucket a value
falls in), loads through a data pointer read from a table, and the row-block plumbing of
the jagged-buffer kernels (:mod:`~recstack.feature_engine.kernels.reshape_rows`,
:mod:`~recstack.feature_engine.kernels.filter_rows`). Triton inlines them into each caller,
so sharing them costs nothing at run time.

Every helper works on scalars or blocks alike where its docstring says so. The host side
lives in :mod:`recstack.feature_engine.kernels.host`; the helpers every package shares
(hashing rounds, paged-row pointers) in :mod:`recstack.core.kernels.device`.
"""

from __future__ import annotations

from recstack.core.kernels import HAS_TRITON

__all__ = [
    "block_bounds",
    "bucket_of",
    "copy_span",
    "feature_of",
    "input_span",
    "last_le",
    "load_as",
    "offsets_flag",
]

# Without Triton every helper is None (only torch references run then).
last_le = feature_of = bucket_of = load_as = None
offsets_flag = block_bounds = input_span = copy_span = None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[no-redef]
    def last_le(table_ptr, x, base, length):
        """Largest ``i`` in ``[base, base + length)`` with ``table[i] <= x`` (table sorted).

        Assumes ``table[base] <= x``. Branchless halving, so ``x``/``base`` may be scalars or
        blocks (``base`` must already have ``x``'s shape); ``length`` is a scalar.
        """
        while length > 1:
            half = length // 2
            probe = tl.load(table_ptr + base + half)
            base = base + half * (probe <= x).to(tl.int64)
            length -= half
        return base

    @triton.jit  # type: ignore[no-redef]
    def feature_of(offsets_ptr, i, num_features, steps):
        """Largest ``f`` in ``[0, F)`` with ``offsets[f] <= i``: the feature owning element ``i``.

        Empty features share their start with the next one and lose the tie. ``steps`` is
        ``ceil(log2(F))``; once ``hi == lo + 1``, ``mid == lo`` and a step is a no-op. ``i``
        is one int64 position or a block of them.
        """
        lo = i * 0
        hi = lo + num_features
        for _ in range(steps):
            mid = (lo + hi) >> 1
            go = tl.load(offsets_ptr + mid) <= i
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        return lo

    @triton.jit  # type: ignore[no-redef]
    def bucket_of(bounds_ptr, x, count, right, steps):
        """``torch.bucketize(x, bounds[0:count], right=right)`` for a block ``x``.

        A lower bound (``right`` false: the first boundary ``>= x``) or an upper bound
        (``right`` true: the first ``> x``), in ``steps >= ceil(log2(count + 1))`` halvings.
        ``bounds_ptr``, ``count`` and ``right`` are scalars or blocks of ``x``'s shape, so
        each element may search its own list; boundaries past ``count`` are never read.
        """
        lo = tl.zeros(x.shape, dtype=tl.int64)
        hi = lo + count
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) >> 1
            b = tl.load(bounds_ptr + mid, mask=active, other=0)
            go = tl.where(right, b <= x, b < x)
            lo = tl.where(active & go, mid + 1, lo)
            hi = tl.where(active & ~go, mid, hi)
        return lo

    @triton.jit  # type: ignore[no-redef]
    def load_as(addr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
        """Load ``offs`` through ``addr``, an int64 data pointer read from a table.

        ``KIND`` is the element type's code in
        :data:`~recstack.feature_engine.kernels.concat.CONCAT_DTYPES` (int64, int32, uint8,
        float32, float64). Pointers loaded from memory carry no alignment facts; a launcher
        sets ``ALIGNED`` only when every pointer it stored is 16-byte aligned, which lets
        contiguous tiles vectorize.
        """
        if KIND == 0:
            base = addr.to(tl.pointer_type(tl.int64))
        elif KIND == 1:
            base = addr.to(tl.pointer_type(tl.int32))
        elif KIND == 2:
            base = addr.to(tl.pointer_type(tl.uint8))
        elif KIND == 3:
            base = addr.to(tl.pointer_type(tl.float32))
        else:
            base = addr.to(tl.pointer_type(tl.float64))
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        return tl.load(base + offs, mask=mask)

    @triton.jit  # type: ignore[no-redef]
    def offsets_flag(start, end, r, in_rows, n_rows, n_values):
        """1 if the rows ``r`` (a block, ``in_rows`` valid) starting at ``start`` and ending at
        ``end`` break ``0 = row_offsets[0] <= ... <= row_offsets[-1] = N``, else 0."""
        bad = (end < start) | ((r == 0) & (start != 0)) | ((r == n_rows - 1) & (end != n_values))
        return tl.max((in_rows & bad).to(tl.int64), axis=0)

    @triton.jit  # type: ignore[no-redef]
    def block_bounds(pid, n_rows, ROWS: tl.constexpr):
        """Rows ``[r0, r1)`` of program ``pid``'s block (``r0 < r1``: grid = row blocks)."""
        r0 = pid * ROWS
        return r0, tl.minimum(r0 + ROWS, n_rows)

    @triton.jit  # type: ignore[no-redef]
    def input_span(row_offsets_ptr, r0, r1, nv):
        """The ids of rows ``[r0, r1)``, clamped into ``[0, nv]`` (bad offsets stay in bounds)."""
        s0 = tl.minimum(tl.maximum(tl.load(row_offsets_ptr + r0), 0), nv)
        s1 = tl.minimum(tl.maximum(tl.load(row_offsets_ptr + r1), s0), nv)
        return s0, s1

    @triton.jit  # type: ignore[no-redef]
    def copy_span(values_ptr, out_ptr, s0, s1, o_start, o_end, CHUNK: tl.constexpr):
        """A block whose rows keep their ids: its input span copied to its output span
        (both masked, so unchecked bad offsets never read or write out of bounds)."""
        for c in range(0, tl.maximum(o_end - o_start, 0), CHUNK):
            k = c + tl.arange(0, CHUNK)
            src = s0 + k
            v = tl.load(values_ptr + src, mask=src < s1, other=0)
            tl.store(out_ptr + o_start + k, v, mask=o_start + k < o_end)
