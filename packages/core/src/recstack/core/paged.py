"""PagedTensor: a growable 2-D row store kept in fixed-size pages.

Embedding values and every optimizer state slot are PagedTensors. Rows live in contiguous
``[page_rows, dim]`` pages; an int64 ``page_table`` holds the pages' data pointers so a
kernel reaches row ``r`` at page ``r >> page_shift``, offset ``r & page_mask``. Growing
adds pages and never moves an existing row, so pointers and rows handed out stay valid.

Pages can live in two tiers: :meth:`PagedTensor.place_pages` keeps the first ``n`` pages
on the store's device and the rest in host memory (pinned when the device is a GPU, so
kernels read and write those rows in place through the same page table: CUDA maps pinned
host memory into the GPU's address space). A row's number says its tier: rows below
:attr:`PagedTensor.device_rows` are on the device. On a CPU store the two tiers are two
sets of host pages, so the tier logic runs (and is tested) everywhere.

A PagedTensor can carry *companions*: named PagedTensors row-aligned with it (a sparse
optimizer's moments of an embedding table). A companion grows with its table, its rows
are reset to its initial value when the table announces them reset (a new id took an
evicted id's row), and whatever exports the table's rows by key (the embedding engine's
``KeyedState``) exports and imports the companions' rows with them. That is how optimizer
state follows its ids through a checkpoint and a resharding without the optimizer and the
table knowing each other.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch

from recstack.core.kernels.paged_rows import gather_paged_rows, scatter_paged_rows
from recstack.core.kernels.paged_swap import swap_paged_rows

__all__ = ["Companion", "PagedTensor", "move_rows"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A shift this large maps every valid row of a wrapped tensor to page 0, so one kernel
# serves paged and wrapped storage alike.
_WRAP_SHIFT = 62


def _as_int(value: object) -> int | None:
    """``value`` as a Python int (numpy/torch integers too), or None; bools are not ints."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _normalize_device(device: torch.device | str | int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in _DTYPES:
        raise TypeError(
            f"PagedTensor {name!r}: dtype {dtype} is not supported; use one of "
            f"{', '.join(str(d) for d in _DTYPES)}"
        )


def move_rows(rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``rows`` with each row found in ``src`` replaced by its ``dst`` (what
    :meth:`PagedTensor.rows_moved` announces), the others unchanged.

    Args:
        rows: int64 rows, any shape.
        src: int64 ``[n]`` rows that moved, distinct, on ``rows``' device.
        dst: int64 ``[n]``, where each went.

    Examples:
        >>> import torch
        >>> move_rows(torch.tensor([4, 1, 7]), torch.tensor([7, 4]), torch.tensor([4, 7])).tolist()
        [7, 1, 4]
    """
    if not src.numel() or not rows.numel():
        return rows
    order = torch.argsort(src)
    s, d = src[order], dst[order]
    pos = torch.searchsorted(s, rows).clamp_(max=s.numel() - 1)
    return torch.where(s[pos] == rows, d[pos], rows)


class Companion(NamedTuple):
    """A companion of a :class:`PagedTensor`: its row store and the value new and reset
    rows start from."""

    store: PagedTensor
    init: float


class PagedTensor:
    """A growable ``[num_rows, dim]`` row store in fixed-size pages.

    Args:
        dim: row width (> 0).
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        device: where the pages (and the page table) live.
        page_rows: rows per page, a power of two.
        capacity: rows to allocate up front (``num_rows`` stays 0 until rows are appended).
        name: the table's name, used in every error message.

    Examples:
        >>> import torch
        >>> t = PagedTensor(dim=4, page_rows=8, name="item_emb")
        >>> ids = t.append_rows(20)  # rows 0..19, spread over 3 pages, zero-filled
        >>> t.scatter_rows(torch.tensor([3, 17]), torch.ones(2, 4))
        >>> t.gather_rows(torch.tensor([17, 0])).tolist()
        [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | int = "cpu",
        page_rows: int = 65536,
        capacity: int = 0,
        name: str = "paged",
    ) -> None:
        self._name = str(name)
        dim_, rows_, capacity_ = _as_int(dim), _as_int(page_rows), _as_int(capacity)
        if dim_ is None or dim_ <= 0:
            raise ValueError(f"PagedTensor {self._name!r}: dim must be a positive int, got {dim!r}")
        _check_dtype(dtype, self._name)
        if rows_ is None or rows_ <= 0 or rows_ & (rows_ - 1):
            raise ValueError(
                f"PagedTensor {self._name!r}: page_rows must be a power of two, got {page_rows!r}"
            )
        if capacity_ is None or capacity_ < 0:
            raise ValueError(
                f"PagedTensor {self._name!r}: capacity must be an int >= 0, got {capacity!r}"
            )
        dim, page_rows, capacity = dim_, rows_, capacity_
        self._dim = dim
        self._dtype = dtype
        self._device = _normalize_device(device)
        self._page_rows = page_rows
        self._page_shift = page_rows.bit_length() - 1
        self._page_mask = page_rows - 1
        self._pages: list[torch.Tensor] = []
        self._num_rows = 0
        self._fixed = False
        self._page_table = torch.empty(0, dtype=torch.int64, device=self._device)
        self._pages_aligned = True
        self._device_pages: int | None = None
        self._reserve(capacity)

    @classmethod
    def wrap(cls, tensor: torch.Tensor, name: str = "paged") -> PagedTensor:
        """View a contiguous 2-D tensor as a one-page PagedTensor, without copying.

        Writes through the PagedTensor change ``tensor``. The result has a fixed capacity
        (the tensor's row count): ``append_rows`` past it raises.

        Examples:
            >>> import torch
            >>> w = torch.zeros(3, 2)
            >>> PagedTensor.wrap(w, name="w").scatter_rows(torch.tensor([1]), torch.ones(1, 2))
            >>> w[1].tolist()
            [1.0, 1.0]
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"PagedTensor.wrap {name!r}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.dim() != 2:
            raise ValueError(
                f"PagedTensor.wrap {name!r}: tensor must be 2-D, got shape {tuple(tensor.shape)}"
            )
        _check_dtype(tensor.dtype, name)
        if tensor.shape[1] == 0:
            raise ValueError(f"PagedTensor.wrap {name!r}: tensor has zero columns")
        if not tensor.is_contiguous():
            raise ValueError(
                f"PagedTensor.wrap {name!r}: tensor must be contiguous (wrapping never copies; "
                "pass tensor.contiguous() and keep that tensor)"
            )
        self = cls.__new__(cls)
        self._name = str(name)
        self._dim = int(tensor.shape[1])
        self._dtype = tensor.dtype
        self._device = _normalize_device(tensor.device)
        self._page_rows = int(tensor.shape[0])
        self._page_shift = _WRAP_SHIFT
        self._page_mask = (1 << _WRAP_SHIFT) - 1
        self._pages = [tensor]
        self._num_rows = int(tensor.shape[0])
        self._fixed = True
        self._device_pages = None
        self._rebuild_page_table()
        return self

    @classmethod
    def like(
        cls,
        other: PagedTensor,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        dim: int | None = None,
    ) -> PagedTensor:
        """A zero-filled PagedTensor row-aligned with ``other`` (same page_rows and num_rows).

        Used for optimizer state slots: ``dtype`` defaults to ``other.dtype`` and ``dim`` to
        ``other.dim`` (pass ``dim=1`` for a per-row scalar such as row-wise Adagrad). A
        wrapped ``other`` gives a wrapped, fixed-capacity result of the same row count.
        """
        dtype = other.dtype if dtype is None else dtype
        dim = other.dim if dim is None else dim
        name = f"{other.name}.like" if name is None else name
        if other._fixed:
            _check_dtype(dtype, name)
            return cls.wrap(
                torch.zeros((other.num_rows, dim), dtype=dtype, device=other.device), name=name
            )
        out = cls(
            dim,
            dtype=dtype,
            device=other.device,
            page_rows=other.page_rows,
            capacity=0,
            name=name,
        )
        out._device_pages = other._device_pages
        out.append_rows(other.num_rows)
        return out

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def __len__(self) -> int:
        return self._num_rows

    @property
    def page_rows(self) -> int:
        """Rows per page (for a wrapped tensor: its row count)."""
        return self._page_rows

    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def device_pages(self) -> int | None:
        """Pages kept on :attr:`device`; the rest live in host memory (``None``: all on the
        device). See :meth:`place_pages`."""
        return self._device_pages

    @property
    def device_rows(self) -> int | None:
        """Rows below this live in device pages (``None``: every row does)."""
        return None if self._device_pages is None else self._device_pages * self._page_rows

    @property
    def capacity(self) -> int:
        """Rows allocated; ``append_rows`` up to this adds no page."""
        return self._page_rows * len(self._pages)

    @property
    def is_wrapped(self) -> bool:
        """True for a :meth:`wrap` view (fixed capacity, one page)."""
        return self._fixed

    @property
    def pages(self) -> tuple[torch.Tensor, ...]:
        """The page tensors, each ``[page_rows, dim]`` (rows past ``num_rows`` are zeros)."""
        return tuple(self._pages)

    @property
    def page_table(self) -> torch.Tensor:
        """int64 data pointers of the pages, on the table's device (for kernels)."""
        return self._page_table

    @property
    def page_shift(self) -> int:
        """Row ``r`` lives in page ``r >> page_shift`` (62 for a wrapped tensor)."""
        return self._page_shift

    @property
    def page_mask(self) -> int:
        """Row ``r`` lives at offset ``r & page_mask`` of its page."""
        return self._page_mask

    # ------------------------------------------------------------------ growth
    def _rebuild_page_table(self) -> None:
        ptrs = [p.data_ptr() for p in self._pages]
        self._page_table = torch.tensor(ptrs, dtype=torch.int64).to(self._device)
        self._pages_aligned = all(ptr % 16 == 0 for ptr in ptrs)

    def _reserve(self, rows: int) -> None:
        missing = -(-rows // self._page_rows) - len(self._pages)
        if missing <= 0:
            return
        for _ in range(missing):
            self._pages.append(self._new_page(len(self._pages)))
        self._rebuild_page_table()

    def reserve(self, rows: int) -> None:
        """Allocate pages for ``rows`` rows now (``num_rows`` does not change)."""
        n = _as_int(rows)
        if n is None or n < 0:
            raise ValueError(f"PagedTensor {self._name!r}: reserve needs an int >= 0, got {rows!r}")
        if self._fixed and n > self.capacity:
            raise ValueError(
                f"PagedTensor {self._name!r} wraps a fixed tensor of {self.capacity} rows; "
                f"cannot reserve {n}"
            )
        self._reserve(n)

    def _on_device(self, page: int) -> bool:
        return self._device_pages is None or page < self._device_pages

    def _new_page(self, index: int) -> torch.Tensor:
        # Zeroed, not empty: rows past num_rows must never expose stale memory.
        shape = (self._page_rows, self._dim)
        if self._on_device(index):
            return torch.zeros(shape, dtype=self._dtype, device=self._device)
        return torch.zeros(shape, dtype=self._dtype, pin_memory=self._device.type == "cuda")

    def _page_in_tier(self, page: torch.Tensor, index: int) -> torch.Tensor:
        """``page`` moved to where page ``index`` belongs (itself if it is there)."""
        if self._on_device(index):
            return page if page.device == self._device else page.to(self._device)
        pinned = self._device.type == "cuda"
        if page.device.type == "cpu" and (page.is_pinned() or not pinned):
            return page
        moved = torch.empty(page.shape, dtype=page.dtype, pin_memory=pinned)
        return moved.copy_(page)

    def _fill_range(self, start: int, stop: int, value: float) -> None:
        row = start
        while row < stop:
            page, offset = row >> self._page_shift, row & self._page_mask
            take = min(stop - row, self._page_rows - offset)
            self._pages[page][offset : offset + take].fill_(value)
            row += take

    def append_rows(self, n: int, fill: float | None = 0.0) -> torch.Tensor:
        """Add ``n`` rows filled with ``fill`` (``None`` means zeros); return their int64 ids.

        New ids follow the last row contiguously. Pages are added as needed; existing rows
        and pages never move.
        """
        n_ = _as_int(n)
        if n_ is None or n_ < 0:
            raise ValueError(
                f"PagedTensor {self._name!r}: append_rows needs an int n >= 0, got {n!r}"
            )
        n = n_
        start, stop = self._num_rows, self._num_rows + n
        if self._fixed and stop > self.capacity:
            raise ValueError(
                f"PagedTensor {self._name!r} wraps a fixed tensor of {self.capacity} rows; "
                f"cannot append {n} rows to its {self._num_rows} (create a PagedTensor to grow)"
            )
        self._reserve(stop)
        self._fill_range(start, stop, 0.0 if fill is None else float(fill))
        self._num_rows = stop
        for companion in self.__dict__.get("_companions", {}).values():
            companion.store.ensure_rows(stop, fill=companion.init)
        return torch.arange(start, stop, dtype=torch.int64, device=self._device)

    def ensure_rows(self, n: int, fill: float | None = 0.0) -> None:
        """Grow to at least ``n`` rows (new rows filled with ``fill``); never shrinks."""
        if n > self._num_rows:
            self.append_rows(n - self._num_rows, fill=fill)

    # ------------------------------------------------------------------ row access
    def gather_rows(
        self,
        rows: torch.Tensor,
        check_bounds: bool = True,
        out: torch.Tensor | None = None,
        **tile: int,
    ) -> torch.Tensor:
        """Return rows ``rows`` (1-D, any integer dtype) as a ``[len(rows), dim]`` tensor.

        ``check_bounds`` costs one ``aminmax`` and a host sync and raises
        :class:`IndexError` naming the table and the bad row; pass ``False`` for rows known
        valid. ``out`` (``[len(rows), dim]``, table dtype) receives the rows if given.
        ``tile`` keywords (``tile_elems``, ``max_block_d``, ``num_warps``) tune the kernel.
        """
        return gather_paged_rows(self, rows, out=out, check_bounds=check_bounds, **tile)

    def scatter_rows(
        self,
        rows: torch.Tensor,
        values: torch.Tensor,
        reduce: str = "set",
        check_bounds: bool = True,
        **tile: int,
    ) -> None:
        """Store (``"set"``) or add (``"add"``) ``values`` ``[len(rows), dim]`` at ``rows``.

        Values of any float dtype are cast to the table dtype. ``"add"`` sums all duplicate
        rows (fp32 accumulation, one rounding); ``"set"`` with duplicates stores one of them.
        """
        scatter_paged_rows(self, rows, values, reduce=reduce, check_bounds=check_bounds, **tile)

    def to_dense(self) -> torch.Tensor:
        """A ``[num_rows, dim]`` copy of every row."""
        parts = []
        row = 0
        for page in self._pages:
            if row >= self._num_rows:
                break
            take = min(self._num_rows - row, page.shape[0])
            parts.append(page[:take].to(self._device))
            row += take
        if not parts:
            return torch.empty((0, self._dim), dtype=self._dtype, device=self._device)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    # ------------------------------------------------------------------ row lifetime
    def on_rows_reset(self, callback: Callable[[torch.Tensor], None]) -> None:
        """Register ``callback(rows)``, called by every :meth:`rows_reset` of this table.

        State kept per row elsewhere (an optimizer's moments) registers here to learn when
        a row starts holding something new, e.g. a new id taking an evicted id's row.
        Callbacks are held for the table's life; one that should not keep its owner alive
        holds it through a weak reference.
        """
        if not callable(callback):
            raise TypeError(f"PagedTensor {self._name!r}: on_rows_reset takes a callable")
        self.__dict__.setdefault("_reset_listeners", []).append(callback)

    def rows_reset(self, rows: torch.Tensor) -> None:
        """Announce that ``rows`` (1-D int64) now hold new contents: every companion's
        rows are set to its initial value, then every callback given to
        :meth:`on_rows_reset` is called with them, in registration order."""
        if not rows.numel():
            return
        for companion in self.__dict__.get("_companions", {}).values():
            fill = torch.full(
                (rows.numel(), companion.store.dim),
                companion.init,
                dtype=companion.store.dtype,
                device=companion.store.device,
            )
            companion.store.scatter_rows(rows, fill, check_bounds=False)
        for callback in self.__dict__.get("_reset_listeners", ()):
            callback(rows)

    # ------------------------------------------------------------------ companions
    def add_companion(self, name: str, store: PagedTensor, *, init: float = 0.0) -> None:
        """Register ``store`` as this table's companion ``name`` (e.g. an optimizer slot).

        From now on ``store`` grows with this table (new rows filled with ``init``) and
        :meth:`rows_reset` sets its reset rows to ``init``. ``store`` is grown to this
        table's rows now. Registering the same store under the same name again is a no-op.

        Raises:
            TypeError: ``store`` is not a PagedTensor, or ``name`` not a non-empty str.
            ValueError: ``name`` is taken by another store, ``store`` is this table, lives
                on another device, is some table's companion already, or has more rows.
        """
        where = f"PagedTensor {self._name!r}: add_companion"
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: name must be a non-empty str, got {name!r}")
        if not isinstance(store, PagedTensor):
            raise TypeError(f"{where} {name!r}: expected a PagedTensor, got {type(store).__name__}")
        init = float(init)
        companions: dict[str, Companion] = self.__dict__.setdefault("_companions", {})
        held = companions.get(name)
        if held is not None:
            if held.store is store and held.init == init:
                return
            raise ValueError(f"{where}: this table already has a companion named {name!r}")
        if store is self:
            raise ValueError(f"{where} {name!r}: a table cannot be its own companion")
        if store.device != self._device:
            raise ValueError(
                f"{where} {name!r}: the store is on {store.device}, the table on {self._device}"
            )
        if store.companion_of is not None:
            raise ValueError(f"{where} {name!r}: the store is a companion of another table")
        if store.num_rows > self._num_rows:
            raise ValueError(
                f"{where} {name!r}: the store has {store.num_rows} rows, more than the "
                f"table's {self._num_rows}"
            )
        store._place(self._device_pages)
        store.ensure_rows(self._num_rows, fill=init)
        store.__dict__["_companion_of"] = weakref.ref(self)
        companions[name] = Companion(store, init)

    def remove_companion(self, name: str) -> PagedTensor:
        """Unregister companion ``name`` and return its store (which keeps its rows).

        Raises:
            KeyError: no companion of that name.
        """
        companions = self.__dict__.get("_companions", {})
        if name not in companions:
            raise KeyError(
                f"PagedTensor {self._name!r}: no companion named {name!r} "
                f"(it has {sorted(companions)})"
            )
        store = companions.pop(name).store
        store.__dict__.pop("_companion_of", None)
        return store

    @property
    def companions(self) -> Mapping[str, Companion]:
        """This table's companions by name (a read-only view), in registration order."""
        return MappingProxyType(self.__dict__.setdefault("_companions", {}))

    @property
    def companion_of(self) -> PagedTensor | None:
        """The table this store is a companion of, or ``None``."""
        ref = self.__dict__.get("_companion_of")
        return None if ref is None else ref()

    # ------------------------------------------------------------------ tiers
    def place_pages(self, device_pages: int | None) -> PagedTensor:
        """Keep the first ``device_pages`` pages on :attr:`device`, the others in host memory.

        Host pages are pinned when the device is a GPU: every kernel reaches their rows
        through the page table as it reaches device rows (over the bus, so slower), which
        is what lets a table hold more rows than the GPU's memory. Pages added later land
        by the same rule. Companions are placed alike (they are row-aligned). Row numbers
        and values never change; only where the pages sit.

        Args:
            device_pages: pages on the device (an int >= 0), or ``None`` for all.

        Returns:
            ``self``.

        Raises:
            ValueError: this store is a companion (place its table) or a :meth:`wrap` view,
                or ``device_pages`` is negative.
        """
        where = f"PagedTensor {self._name!r}: place_pages({device_pages!r})"
        n = None if device_pages is None else _as_int(device_pages)
        if device_pages is not None and (n is None or n < 0):
            raise ValueError(f"{where}: device_pages must be None or an int >= 0")
        table = self.companion_of
        if table is not None:
            raise ValueError(f"{where}: it is a companion of table {table.name!r}; place that")
        stores = [self, *(c.store for c in self.companions.values())]
        if any(s._fixed for s in stores):
            raise ValueError(f"{where}: a wrapped tensor has one page that cannot move")
        for s in stores:
            s._place(n)
        return self

    def _place(self, device_pages: int | None) -> None:
        if self._fixed:
            if device_pages is not None:
                raise ValueError(
                    f"PagedTensor {self._name!r}: a wrapped tensor cannot keep pages in host memory"
                )
            return
        self._device_pages = device_pages
        pages = [self._page_in_tier(p, i) for i, p in enumerate(self._pages)]
        if any(a is not b for a, b in zip(pages, self._pages, strict=True)):
            self._pages = pages
            self._rebuild_page_table()

    def swap_rows(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Exchange the contents of rows ``a[i]`` and ``b[i]``, in this table and every
        companion, then announce the moves (:meth:`rows_moved`). No host sync.

        Args:
            a: int64 ``[n]`` rows below :attr:`num_rows` (not checked), each in one pair
                (``a[i] == b[i]`` is a pair left as it is); ``-1`` skips the pair, so a
                caller can size the pairs before it knows which move.
            b: int64 ``[n]``, the other row of each pair (``-1`` skips it too).
        """
        if not a.numel():
            return
        for s in (self, *(c.store for c in self.companions.values())):
            swap_paged_rows(s, a, b)
        listeners = self.__dict__.get("_move_listeners", ())
        if not any(holds is None or holds() for _, holds in listeners):
            return  # nobody holds rows of this table now: five launches saved
        ok = (a >= 0) & (b >= 0)
        a, b = torch.where(ok, a, -1), torch.where(ok, b, -1)
        self.rows_moved(torch.cat([a, b]), torch.cat([b, a]))

    def on_rows_moved(
        self,
        callback: Callable[[torch.Tensor, torch.Tensor], None],
        *,
        holds: Callable[[], bool] | None = None,
    ) -> None:
        """Register ``callback(src, dst)``, called by every :meth:`rows_moved` of this table.

        Whatever holds row numbers of this table across calls (a sparse optimizer's
        accumulated gradients) registers here to follow its rows. Callbacks are held for
        the table's life; one that should not keep its owner alive holds it weakly.

        Args:
            callback: called with the moves.
            holds: says whether the callback holds any row now (``None``: always). When
                every callback says no, :meth:`swap_rows` skips building its
                announcement (a few small launches); :meth:`rows_moved` still calls them.
        """
        if not callable(callback):
            raise TypeError(f"PagedTensor {self._name!r}: on_rows_moved takes a callable")
        if holds is not None and not callable(holds):
            raise TypeError(f"PagedTensor {self._name!r}: on_rows_moved's holds is not callable")
        self.__dict__.setdefault("_move_listeners", []).append((callback, holds))

    def rows_moved(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Announce that the contents of rows ``src[i]`` now live at ``dst[i]`` (1-D int64;
        a row appears in ``src`` once, or several times with the same ``dst``; ``-1``
        entries are nothing; rows not in ``src`` stayed): every :meth:`on_rows_moved`
        callback is called with them, in registration order."""
        for callback, _ in self.__dict__.get("_move_listeners", ()):
            callback(src, dst)

    def fill_(self, value: float) -> PagedTensor:
        """Set every row to ``value``; returns ``self``."""
        self._fill_range(0, self._num_rows, float(value))
        return self

    def move_to_(self, device: torch.device | str | int) -> PagedTensor:
        """Move the pages, the page table and every companion to ``device``, in place.

        Pages :meth:`place_pages` keeps in host memory stay there (pinned when ``device``
        is a GPU).

        The object stays the same, so whatever holds it (an optimizer's state keyed by
        it, its companions, :meth:`on_rows_reset` callbacks) keeps working; row numbers
        and values are unchanged. Every copy is made before anything changes, so a copy
        that fails (out of memory) leaves the table and its companions as they were.

        Args:
            device: where the rows go.

        Returns:
            ``self``.

        Raises:
            ValueError: this store is a companion (move its table: companions move with
                it), or it or a companion is a :meth:`wrap` view (it cannot move without
                leaving the caller's tensor behind; wrap the moved tensor instead).
        """
        device = _normalize_device(device)
        where = f"PagedTensor {self._name!r}: move_to_({device})"
        table = self.companion_of
        if table is not None:
            raise ValueError(
                f"{where}: it is a companion of table {table.name!r}; move that table "
                "(its companions move with it)"
            )
        stores = [self, *(c.store for c in self.companions.values())]
        for s in stores:
            if s._fixed:
                raise ValueError(
                    f"{where}: {s._name!r} wraps a caller's tensor, which would stay behind; "
                    "wrap the moved tensor instead"
                )
        if all(s._device == device for s in stores):
            return self
        old = [s._device for s in stores]
        try:
            moved = []
            for s in stores:
                s._device = device  # where _page_in_tier puts device pages
                moved.append([s._page_in_tier(p, i) for i, p in enumerate(s._pages)])
        except BaseException:
            for s, d in zip(stores, old, strict=True):
                s._device = d
            raise
        for s, pages in zip(stores, moved, strict=True):
            s._pages = pages
            s._rebuild_page_table()
        return self

    def __repr__(self) -> str:
        kind = ", wrapped" if self._fixed else ""
        if self._device_pages is not None:
            kind += f", device_pages={self._device_pages}"
        return (
            f"PagedTensor(name={self._name!r}, num_rows={self._num_rows}, dim={self._dim}, "
            f"dtype={self._dtype}, device={self._device}, page_rows={self._page_rows}, "
            f"num_pages={self.num_pages}{kind})"
        )
