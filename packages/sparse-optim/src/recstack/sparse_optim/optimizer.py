"""The base of the sparse optimizers: parameters, row-sparse gradients, lazy state, checks.

:class:`SparseOptimizer` is a ``torch.optim.Optimizer`` whose parameters are core
:class:`~recstack.core.PagedTensor`\\ s (e.g. an embedding table's values), core
:class:`~recstack.core.SparseParameter`\\ s (a table plus the gradient its backward left:
``EmbeddingCollection.sparse_parameters()``), or plain 2-D tensors whose gradient is
row-sparse (``nn.Embedding(sparse=True)``). A step reads, for each parameter, one
:class:`~recstack.core.SparseGrad` -- given to :meth:`~SparseOptimizer.step` as
``grads=``, else a sparse parameter's pending gradient or a plain tensor's sparse
``.grad`` -- plus any gradients gathered with :meth:`~SparseOptimizer.accumulate`,
coalesces them (duplicate rows are summed), and updates only those rows of the weight and
of the state slots (lazy semantics). Subclasses give the state slots and the row update.

A :class:`~recstack.core.SparseParameter` is unwrapped to its table when it is added: the
table is the parameter (``param_groups``, ``state`` and ``state_dict`` hold it, as if the
bare table had been given), and the optimizer remembers where its pending gradient comes
from: ``step()`` reads it, ``zero_grad()`` clears it, ``accumulate()`` takes it over.

State slots are fp32 ``PagedTensor``\\ s row-aligned with the parameter, made on the first
step that touches it and grown with it. On a ``PagedTensor`` parameter they are the
table's *companions* (core's ``PagedTensor.add_companion``): rows a new id takes after an
eviction get fresh state when the table announces them (``rows_reset``; the embedding
engine does), and the table's ``KeyedState`` exports each key's slot rows with its weight,
so optimizer state follows its ids through checkpoints and resharding. ``state_dict()``
holds only tensors (the slots as ``PagedTensor``\\ s) and JSON-able scalars; nothing is
pickled.

A gradient with NaN or Inf raises a ``FloatingPointError`` naming the parameter and a row
(``on_nonfinite="raise"``, the default), or skips the whole step and counts it in
:attr:`~SparseOptimizer.skipped_steps` (``on_nonfinite="skip"``); a row is never half
updated. All checks of one step share one host sync.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from recstack.core import PagedTensor, SparseGrad, SparseParameter
from recstack.core.kernels.row_update import apply_row_update, check_rows
from recstack.core.kernels.row_update_many import RowJob, check_and_apply_row_updates
from recstack.core.kernels.segment_sum import coalesce_rows_padded
from recstack.core.row_update import RowUpdate
from recstack.sparse_optim.gates import GateBook
from recstack.sparse_optim.kernels.optimizer_tile import OptimizerTile, optimizer_tile, tile_slots

__all__ = ["Param", "ParamLike", "SlotSpec", "SparseOptimizer"]

#: What a sparse optimizer updates: a PagedTensor, or a plain 2-D float tensor.
Param = PagedTensor | torch.Tensor
#: What a sparse optimizer takes as a parameter: a :data:`Param`, or a core
#: ``SparseParameter`` (unwrapped to its table, whose pending gradient a step reads).
ParamLike = Param | SparseParameter

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class SlotSpec:
    """One state slot: its name, whether it holds one value per row (``[rows, 1]``) instead
    of one per element (``[rows, dim]``), its initial value, and whether its values are
    never negative (sums of squares, counts): a loaded state that breaks that is refused."""

    __slots__ = ("name", "per_row", "init", "nonnegative")

    def __init__(
        self, name: str, *, per_row: bool = False, init: float = 0.0, nonnegative: bool = False
    ) -> None:
        self.name = name
        self.per_row = per_row
        self.init = init
        self.nonnegative = nonnegative


def check_real(owner: str, name: str, value: object, *, minimum: float | None = 0.0) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number (not a bool) and, with
    ``minimum`` given, ``>= minimum``. ``owner`` and ``name`` say whose and which
    hyper-parameter, for the message. NaN compares false with everything, so a plain
    ``value < 0`` check lets it through: finiteness is checked on its own."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    if not ok or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{owner}: {name} must be a float{bound}, got {value!r}")


def check_flag(owner: str, name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (a loaded ``"yes"`` is not one)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


def _rows_of(p: Param) -> int:
    return p.num_rows if isinstance(p, PagedTensor) else p.shape[0]


def _dim_of(p: Param) -> int:
    return p.dim if isinstance(p, PagedTensor) else p.shape[1]


class SparseOptimizer(torch.optim.Optimizer):
    """Base class: row-sparse steps over PagedTensor and plain-tensor parameters.

    Args:
        params: parameters (``PagedTensor``\\ s, core ``SparseParameter``\\ s such as
            ``ec.sparse_parameters()``, or 2-D float tensors) or param-group dicts.
        defaults: the hyper-parameters every group starts from.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``, for a gradient with NaN or Inf.
        deferred_checks: with parameters on one GPU, do not wait for a step's checks at
            its end: their result is copied to the host behind the update and read at the
            end of the next :meth:`step` (after its launches are queued), or by
            :meth:`flush_checks`, :attr:`skipped_steps` or :meth:`state_dict`, which raise
            (or count the skip) then. A bad step still writes nothing, nor does the step
            queued after it unless the bad one is skipped (``on_nonfinite="skip"``); the
            host never waits for the GPU to drain. Fused steps (:meth:`end_row_update`)
            are read the same way, a backward's worth later. Default ``False``: each step
            reads its checks at its end.

    Subclasses set :attr:`slot_specs` and implement :meth:`_update_rows`.
    """

    #: The state slots of every parameter, in order.
    slot_specs: ClassVar[tuple[SlotSpec, ...]] = ()

    def __init__(
        self,
        params: Iterable[ParamLike] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(
                f"{type(self).__name__}: on_nonfinite must be 'raise' or 'skip', "
                f"got {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.deferred_checks = bool(deferred_checks)
        self._skipped = 0
        # Gates, and the reads of deferred steps' gates not done yet.
        self._book = GateBook()
        self._pending: dict[int, list[SparseGrad]] = {}
        self._wrapped: dict[int, tuple[tuple[Any, ...], PagedTensor]] = {}
        self._slot_cache: dict[int, tuple[int, dict[str, Any], dict[str, PagedTensor]]] = {}
        self._whole: bool | None = None
        # Where the pending gradient of a table given as a SparseParameter comes from.
        self._sources: dict[int, SparseParameter] = {}
        # Tables whose row resets drop their rows from the accumulated gradients.
        self._watched: set[int] = set()
        if isinstance(params, (torch.Tensor, PagedTensor)) or _is_sparse_param(params):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of parameters or groups, "
                f"got a single {type(params).__name__} (wrap it in a list)"
            )
        super().__init__(params, defaults)  # type: ignore[arg-type]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN or Inf (``on_nonfinite="skip"``)."""
        self.flush_checks()
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = int(value)

    def flush_checks(self) -> None:
        """Read the checks of steps taken with ``deferred_checks`` (waiting for those
        steps only, not for later work), raising or counting skipped steps now.

        Raises:
            IndexError: such a step had a gradient row outside its parameter.
            FloatingPointError: such a step's gradient held NaN or Inf and
                ``on_nonfinite="raise"``.
        """
        self._flush(keep=0)

    def _flush(self, keep: int) -> None:
        """Read all but the newest ``keep`` deferred gates, oldest first."""
        book = self._book
        while len(book.queue) > keep:
            reading = book.pop()
            if not (reading.out_of_range or reading.nonfinite):
                continue
            for p in reading.params:
                self.state[p]["step"] -= 1
            if reading.nonfinite and not reading.out_of_range and self.on_nonfinite == "skip":
                self._skipped += 1
                continue
            # Later steps on this device inherited the flag (see GateBook.take) and wrote
            # nothing.
            later = book.drop(reading.device)
            for ps in later:
                for p in ps:
                    self.state[p]["step"] -= 1
            name = type(self).__name__
            which = ", ".join(self._param_name(p) for p in reading.params)
            after = f" nor of the {len(later)} step(s) queued after it" if later else ""
            if reading.out_of_range:
                raise IndexError(
                    f"{name}: a deferred step had a gradient row outside its parameter "
                    f"({which}); nothing of that step{after} was written"
                )
            raise FloatingPointError(
                f"{name}: a deferred step's gradient held NaN or Inf ({which}); nothing of "
                f"that step{after} was written. Pass on_nonfinite='skip' to skip such steps"
            )

    # ------------------------------------------------------------------ parameters
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters (hyper-parameters not given come from the defaults).

        Args:
            param_group: ``{"params": [...], **hyper-parameters}``; the parameters are
                PagedTensors, 2-D float tensors or core ``SparseParameter``\\ s (each
                unwrapped to its table, see the module docs).

        Raises:
            TypeError, ValueError: a parameter of another kind, or one given twice (two
                sparse parameters of one table count as one parameter given twice).
        """
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a param group must be a dict, got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, (torch.Tensor, PagedTensor)) or _is_sparse_param(params):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{name}: params must be an ordered sequence, not a set")
        else:
            params = list(params)
        sources = {}
        for i, p in enumerate(params):
            if _is_sparse_param(p):
                table = p.table
                if not isinstance(table, PagedTensor):
                    raise TypeError(
                        f"{name}: a SparseParameter's table must be a PagedTensor, got "
                        f"{type(table).__name__}"
                    )
                sources[id(table)] = p
                params[i] = table
            self._check_param(params[i])
        seen = {id(q) for g in self.param_groups for q in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError(f"{name}: a parameter appears in more than one place")
        group = {**self.defaults, **param_group, "params": params}
        self._check_hyper(group)
        self.param_groups.append(group)
        self._sources.update(sources)

    def _check_param(self, p: object) -> None:
        name = type(self).__name__
        if isinstance(p, PagedTensor):
            return
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"{name}: parameters must be PagedTensors, SparseParameters or tensors, got "
                f"{type(p).__name__}"
            )
        if p.dim() != 2 or p.dtype not in _FLOATS:
            raise ValueError(
                f"{name}: a tensor parameter must be a 2-D fp32/bf16/fp16 table of rows, got "
                f"{p.dtype} {tuple(p.shape)}"
            )
        if not p.is_contiguous():
            raise ValueError(f"{name}: a tensor parameter must be contiguous")

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """Validate one group's hyper-parameters (subclasses extend)."""
        check_real(type(self).__name__, "lr", group.get("lr"))

    def _param_name(self, p: Param) -> str:
        if isinstance(p, PagedTensor):
            return repr(p.name)
        for gi, g in enumerate(self.param_groups):
            for pi, q in enumerate(g["params"]):
                if q is p:
                    return f"param {pi} of group {gi}"
        return "a parameter"

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients, the sparse parameters' pending gradients and the
        tensor parameters' ``.grad``.

        Args:
            set_to_none: set a tensor parameter's ``.grad`` to ``None`` (default) rather
                than to zeros.
        """
        self._pending.clear()
        for source in self._sources.values():
            source.clear_grad()
        for g in self.param_groups:
            for p in g["params"]:
                if isinstance(p, torch.Tensor) and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad = p.grad.detach() * 0

    def _explicit(self, grads: object) -> dict[int, SparseGrad]:
        name = type(self).__name__
        params = [p for g in self.param_groups for p in g["params"]]
        if grads is None:
            return {}
        if isinstance(grads, SparseGrad):
            if len(params) != 1:
                raise ValueError(
                    f"{name}: a single SparseGrad needs exactly one parameter, this optimizer "
                    f"has {len(params)}; pass a mapping {{param: SparseGrad}}"
                )
            return {id(params[0]): grads}
        if isinstance(grads, Mapping):
            ids = {id(p) for p in params}
            out = {}
            for key, g in grads.items():
                if _is_sparse_param(key):
                    key = key.table
                if id(key) not in ids:
                    raise KeyError(f"{name}: grads has a key that is not one of its parameters")
                out[id(key)] = g
            return out
        if isinstance(grads, Sequence):
            if len(grads) != len(params):
                raise ValueError(
                    f"{name}: grads has {len(grads)} entries for {len(params)} parameters"
                )
            return {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}
        raise TypeError(
            f"{name}: grads must be a SparseGrad, a mapping param -> SparseGrad or a sequence, "
            f"got {type(grads).__name__}"
        )

    def _gather(self, p: Param, explicit: dict[int, SparseGrad]) -> list[SparseGrad]:
        parts = list(self._pending.get(id(p), []))
        source = self._sources.get(id(p))
        if id(p) in explicit:
            parts.append(explicit[id(p)])
        elif isinstance(p, torch.Tensor) and p.grad is not None:
            parts.append(self._from_tensor_grad(p))
        elif source is not None:
            g = source.pending_grad()
            if g is not None:
                parts.append(g)
        for g in parts:
            if not isinstance(g, SparseGrad):
                raise TypeError(
                    f"{type(self).__name__}: the gradient of {self._param_name(p)} must be a "
                    f"SparseGrad, got {type(g).__name__}"
                )
            if g.values.shape[1] != _dim_of(p) or g.device != (p.device):
                raise ValueError(
                    f"{type(self).__name__}: the gradient of {self._param_name(p)} has rows of "
                    f"width {g.values.shape[1]} on {g.device}; the parameter's are "
                    f"{_dim_of(p)} on {p.device}"
                )
        return parts

    def _from_tensor_grad(self, p: torch.Tensor) -> SparseGrad:
        grad = p.grad
        assert grad is not None
        if not grad.is_sparse:
            raise ValueError(
                f"{type(self).__name__}: {self._param_name(p)} has a dense gradient; sparse "
                "optimizers take row-sparse ones (nn.Embedding(sparse=True) / "
                "EmbeddingBag(sparse=True)) or a SparseGrad passed to step(grads=...)"
            )
        # Core's coalesce (one sort + one segment-sum launch), not torch's: an nn.Embedding
        # backward leaves one row per id looked up, and torch's coalesce is several times
        # slower on such gradients.
        return SparseGrad(grad._indices()[0], grad._values(), is_coalesced=grad.is_coalesced())

    def accumulate(self, grads: object = None) -> None:
        """Keep this micro-batch's gradients to be summed into the next :meth:`step`.

        Args:
            grads: as for :meth:`step`; parameters not in it give their pending gradient
                (sparse parameters) or sparse ``.grad`` (tensors), which is taken over and
                cleared, so the next backward starts afresh.

        A row of a ``PagedTensor`` parameter that its table announces reset before the
        step (``PagedTensor.rows_reset``: a new id took an evicted id's row) leaves the
        accumulated gradients: they were the evicted id's. A row the table announces moved
        (``PagedTensor.rows_moved``: a tiered table promoting rows to the GPU) takes its
        accumulated gradients along.
        """
        explicit = self._explicit(grads)
        for group in self.param_groups:
            for p in group["params"]:
                g = explicit.get(id(p))
                source = self._sources.get(id(p))
                if g is None and isinstance(p, torch.Tensor) and p.grad is not None:
                    g = self._from_tensor_grad(p)
                    p.grad = None
                elif g is None and source is not None:
                    g = source.pending_grad()
                    source.clear_grad()
                if g is not None:
                    if isinstance(p, PagedTensor):
                        self._watch_resets(p)
                    self._pending.setdefault(id(p), []).append(g)

    def _watch_resets(self, table: PagedTensor) -> None:
        """Drop reset rows of ``table`` from its accumulated gradients from now on."""
        if id(table) in self._watched:
            return
        self._watched.add(id(table))
        # The table holds its callbacks for life: a weak reference lets the optimizer go.
        ref = weakref.ref(self)
        key = id(table)

        def drop(rows: torch.Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._drop_pending_rows(key, rows)

        def move(src: torch.Tensor, dst: torch.Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._move_pending_rows(key, src, dst)

        def holds() -> bool:
            opt = ref()
            return opt is not None and bool(opt._pending.get(key))

        table.on_rows_reset(drop)
        table.on_rows_moved(move, holds=holds)

    def _drop_pending_rows(self, key: int, rows: torch.Tensor) -> None:
        parts = self._pending.get(key)
        if not parts:
            return
        kept = []
        for g in parts:
            keep = ~torch.isin(g.rows, rows.to(g.rows.device))
            # A subset of sorted unique rows is still sorted and unique.
            kept.append(SparseGrad(g.rows[keep], g.values[keep], is_coalesced=g.is_coalesced))
        self._pending[key] = kept

    def _move_pending_rows(self, key: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        parts = self._pending.get(key)
        if not parts:
            return
        self._pending[key] = [g.moved(src, dst) for g in parts]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, grads: object = None
    ) -> Any:
        """Apply one update to the rows of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (as torch optimizers).
            grads: each parameter's :class:`~recstack.core.SparseGrad`: a mapping
                ``{param: grad}`` (a sparse parameter or its table as the key), a sequence
                in parameter order (``None`` for none), or a single ``SparseGrad`` when
                there is one parameter. Parameters not in it use their pending gradient
                (sparse parameters, read and left in place until :meth:`zero_grad`) or
                their sparse ``.grad`` (tensors).

        Returns:
            The closure's loss, if any.

        Raises:
            FloatingPointError: a gradient holds NaN or Inf (``on_nonfinite="raise"``).
            IndexError: a gradient row is outside its parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        explicit = self._explicit(grads)
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                parts = self._gather(p, explicit)
                if not parts:
                    continue
                g = parts[0] if len(parts) == 1 else _concat(parts)
                if not g.rows.numel():
                    continue
                if g.is_coalesced:
                    work.append((group, p, _Rows(g.rows, g.values, None)))
                elif self.deferred_checks:
                    # Summed without a host sync: the number of unique rows stays on the
                    # device, where the check and the update read it. The padding costs
                    # GPU work, so only a step that never waits for the GPU takes it.
                    work.append((group, p, _Rows(*coalesce_rows_padded(g.rows, g.values))))
                else:
                    g = g.coalesce()
                    work.append((group, p, _Rows(g.rows, g.values, None)))
        self._pending.clear()
        devices = {g.device for _, _, g in work}
        # A deferred step on one GPU is queued behind the previous one, whose checks are
        # read only after this step's launches: the host never waits for the GPU to drain.
        pipelined = len(devices) == 1 and self._defers_on(work[0][2].device)
        if not pipelined:
            self.flush_checks()
        if not work:
            return loss
        if len(devices) > 1:
            self._step_on_devices(work)
            return loss
        # Checks and updates are queued back to back: the gate collects every gradient's
        # bounds and NaN/Inf, and a set gate makes every update of the step write nothing.
        # On a GPU that is one check and one update launch for all the parameters (per
        # class of alike ones). The host reads the gate once, at the end.
        gate = self._take_gate(work[0][2].device)
        jobs = [
            RowJob(self._begin(group, p), self._table(p), g.rows, g.values, _rows_of(p), g.count)
            for group, p, g in work
        ]
        check_and_apply_row_updates(jobs, gate)
        if pipelined:
            self._book.defer([p for _, p, _g in work], gate)
            self._flush(keep=1)
            return loss
        out_of_range, nonfinite = self._book.read(gate)
        if out_of_range or nonfinite:
            for _, p, _g in work:
                self.state[p]["step"] -= 1
            self._raise_or_skip(work, out_of_range)
        return loss

    def _step_on_devices(self, work: list[tuple[dict[str, Any], Param, _Rows]]) -> None:
        """A step whose parameters are on several devices. A gate holds back its own
        device's launches only, so every gate is read before any update: a bad gradient on
        one device writes nothing anywhere."""
        gates: dict[torch.device, torch.Tensor] = {}
        for _, p, g in work:
            gate = gates.get(g.device)
            if gate is None:
                gate = gates[g.device] = self._take_gate(g.device)
            check_rows(gate, g.values, g.rows, _rows_of(p), g.count)
        flags = torch.stack([gt.cpu() for gt in gates.values()]).amax(dim=0).tolist()
        if flags[0] or flags[1]:
            self._raise_or_skip(work, bool(flags[0]))
            return
        for group, p, g in work:
            update = self._begin(group, p)
            apply_row_update(update, self._table(p), g.rows, g.values, gates[g.device], g.count)
        self._book.mark_clean(set(gates))

    def _take_gate(self, device: torch.device) -> torch.Tensor:
        return self._book.take(device, skip=self.on_nonfinite == "skip")

    def _raise_or_skip(
        self, work: list[tuple[dict[str, Any], Param, _Rows]], out_of_range: bool
    ) -> None:
        """A gate was set and nothing was written: name the cause, or count the skip."""
        name = type(self).__name__
        if out_of_range:
            for _, p, g in work:
                rows = g.exact()[0]
                bad = (rows < 0) | (rows >= _rows_of(p))
                if bool(bad.any()):
                    row = int(rows[bad][0])
                    raise IndexError(
                        f"{name}: the gradient of {self._param_name(p)} has row {row}, "
                        f"outside its {_rows_of(p)} rows; nothing was updated"
                    )
        if self.on_nonfinite == "skip":
            self._skipped += 1
            return
        for _, p, g in work:
            rows, values = g.exact()
            bad = (~torch.isfinite(values)).any(dim=1)
            if bool(bad.any()):
                raise FloatingPointError(
                    f"{name}: the gradient of {self._param_name(p)} holds NaN or Inf "
                    f"(row {int(rows[bad][0])}); nothing was updated. Pass "
                    "on_nonfinite='skip' to skip such steps"
                )

    def _table(self, p: Param) -> PagedTensor:
        if isinstance(p, PagedTensor):
            return p
        # Wrapped once (wrapping copies a page table to the device), again only if the
        # tensor's storage changed.
        key = (p.data_ptr(), tuple(p.shape), p.dtype)
        cached = self._wrapped.get(id(p))
        if cached is None or cached[0] != key:
            cached = (key, PagedTensor.wrap(p.data, name="param"))
            self._wrapped[id(p)] = cached
        return cached[1]

    def _slots(self, p: Param) -> dict[str, PagedTensor]:
        """The parameter's state slots, made on first use and grown with it."""
        state = self.state[p]
        rows = _rows_of(p)
        # Per-step host time matters (a step's launches are ~20 us each): the slots of a
        # parameter whose rows and state are unchanged since the last step are reused.
        cached = self._slot_cache.get(id(p))
        if cached is not None and cached[0] == rows and cached[1] is state:
            return cached[2]
        for spec in self.slot_specs:
            slot = state.get(spec.name)
            width = 1 if spec.per_row else _dim_of(p)
            if slot is None:
                slot = self._new_slot(p, spec, width, rows)
                state[spec.name] = slot
            slot.ensure_rows(rows, fill=spec.init)
        state.setdefault("step", 0)
        slots = {spec.name: state[spec.name] for spec in self.slot_specs}
        self._slot_cache[id(p)] = (rows, state, slots)
        return slots

    def _new_slot(self, p: Param, spec: SlotSpec, width: int, rows: int) -> PagedTensor:
        """The state slot ``spec`` of ``p``. On a PagedTensor parameter the slot is the
        table's companion of that name (core's ``add_companion``): it grows with the table,
        restarts when the table resets a row, and travels with the rows' keys through a
        checkpoint. A companion the table already has (imported from a checkpoint, or
        left by an earlier optimizer of the table) is taken over: state lives with rows."""
        if isinstance(p, PagedTensor):
            held = p.companions.get(spec.name)
            if held is not None:
                store = held.store
                if store.dim != width or store.dtype != torch.float32:
                    raise ValueError(
                        f"{type(self).__name__}: table {p.name!r} has a companion "
                        f"{spec.name!r} of width {store.dim} ({store.dtype}); this optimizer "
                        f"keeps that slot as fp32 of width {width}. Another optimizer's "
                        f"state? Remove it with table.remove_companion({spec.name!r})"
                    )
                return store
        if isinstance(p, PagedTensor) and not p.is_wrapped:
            # A growable table gets growable slots with its page size.
            slot = PagedTensor(
                width, torch.float32, p.device, page_rows=p.page_rows, name=f"{p.name}.{spec.name}"
            )
        else:
            # A wrapped tensor (one fixed page) gets one fixed page too.
            data = torch.full((rows, width), spec.init, dtype=torch.float32, device=p.device)
            pname = p.name if isinstance(p, PagedTensor) else "param"
            slot = PagedTensor.wrap(data, name=f"{pname}.{spec.name}")
        if isinstance(p, PagedTensor):
            p.add_companion(spec.name, slot, init=spec.init)
        return slot

    def _begin(
        self, group: dict[str, Any], p: Param, gate: torch.Tensor | None = None
    ) -> RowUpdate:
        """Advance ``p``'s step and describe the update (slots grown to its rows)."""
        table = self._table(p)
        slots = self._slots(p)
        state = self.state[p]
        state["step"] += 1
        step = state["step"]
        variant, lr, params, flags = tile_slots(self._tile_args(group, step, _dim_of(p)))

        def reference(rows: torch.Tensor, grad: torch.Tensor) -> None:
            w = table.gather_rows(rows, check_bounds=False).to(torch.float32)
            s = {k: v.gather_rows(rows, check_bounds=False) for k, v in slots.items()}
            w_new, s_new = self._update_rows(group, step, w, grad, s)
            table.scatter_rows(rows, w_new, check_bounds=False)
            for k, v in s_new.items():
                slots[k].scatter_rows(rows, v, check_bounds=False)

        return RowUpdate(
            name=type(self).__name__,
            tile_fn=optimizer_tile,
            reference=reference,
            lr=lr,
            params=params,
            variant=variant,
            flags=flags,
            slots=tuple(slots.values()),
            whole_rows=self._whole_rows(),
            gate=gate,
        )

    def _tile_args(self, group: dict[str, Any], step: int, dim: int) -> OptimizerTile:
        """This group's update at ``step`` on rows of width ``dim``, named for
        :func:`~recstack.sparse_optim.kernels.optimizer_tile.optimizer_tile` (an
        ``SgdTile``, ``AdamTile``...)."""
        raise NotImplementedError

    def _whole_rows(self) -> bool:
        """Whether the update needs whole rows in one tile (per-row state)."""
        if self._whole is None:
            self._whole = any(spec.per_row for spec in self.slot_specs)
        return self._whole

    def _update_rows(
        self,
        group: dict[str, Any],
        step: int,
        w: torch.Tensor,
        g: torch.Tensor,
        slots: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """New ``(weight rows, slot rows)`` from the gathered rows (fp32)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fused backward
    def _owner(self, table: PagedTensor) -> tuple[dict[str, Any], Param] | None:
        for group in self.param_groups:
            for p in group["params"]:
                if p is table or (isinstance(p, torch.Tensor) and self._wrapped.get(id(p))
                                  and self._wrapped[id(p)][1] is table):  # fmt: skip
                    return group, p
        return None

    def begin_row_update(self, table: PagedTensor) -> RowUpdate | None:
        """Core's :class:`~recstack.core.RowUpdater`: this step's update of ``table``, for a
        backward that applies it where it reduces the gradient (the embedding engine's
        fused mode). ``None`` when ``table`` is not one of this optimizer's parameters.
        The update carries this optimizer's gate for the table's device, so its checks
        join the optimizer's (deferred ones included).

        Raises:
            RuntimeError: gradients of ``table`` from :meth:`accumulate` are pending (a
                fused update cannot include them).
        """
        found = self._owner(table)
        if found is None:
            return None
        group, p = found
        if self._pending.get(id(p)):
            raise RuntimeError(
                f"{type(self).__name__}: {self._param_name(p)} has accumulated gradients "
                "waiting for step(); a fused backward applies each gradient at once, so "
                "accumulate() and the fused mode do not mix"
            )
        if not self._defers_on(table.device):
            self.flush_checks()
        return self._begin(group, p, gate=self._take_gate(table.device))

    def end_row_update(self, table: PagedTensor, *, gate: torch.Tensor) -> None:
        """Core's :class:`~recstack.core.RowUpdater`: the fused update of ``table`` ran,
        checking into ``gate`` (the one :meth:`begin_row_update` gave). If a flag is set
        it wrote nothing, and the step is undone, then raised or counted per
        ``on_nonfinite`` (each table's fused step is checked on its own). With
        ``deferred_checks`` on a GPU the gate is read later, as a deferred step's (see
        the class docs): the backward does not wait for the GPU.

        Raises:
            FloatingPointError: the gradient held NaN or Inf and ``on_nonfinite="raise"``
                (or an earlier deferred step's did).
            IndexError: the update had a row outside ``table`` (or an earlier deferred
                step did).
        """
        found = self._owner(table)
        if found is None:
            return
        _, p = found
        if self._defers_on(gate.device):
            self._book.defer([p], gate)
            # As many fused steps as there are parameters (a backward's worth) stay
            # unread; older ones are read. A bad step is reported by a later backward, or
            # by step(), flush_checks(), skipped_steps or state_dict().
            self._flush(keep=sum(len(g["params"]) for g in self.param_groups))
            return
        out_of_range, nonfinite = self._book.read(gate)
        if not (out_of_range or nonfinite):
            return
        self.state[p]["step"] -= 1
        name = type(self).__name__
        if out_of_range:
            raise IndexError(
                f"{name}: the fused update of {self._param_name(p)} had a row outside its "
                f"{_rows_of(p)} rows; nothing was updated"
            )
        if self.on_nonfinite == "skip":
            self._skipped += 1
            return
        raise FloatingPointError(
            f"{name}: the gradient of {self._param_name(p)} holds NaN or Inf; "
            "nothing was updated. Pass on_nonfinite='skip' to skip such steps"
        )

    def _defers_on(self, device: torch.device) -> bool:
        """Whether checks on ``device`` are read later (``deferred_checks`` on a GPU)."""
        return self.deferred_checks and device.type == "cuda"

    # ------------------------------------------------------------------ row state
    def reset_rows(self, param: Param, rows: torch.Tensor) -> None:
        """Give ``rows`` of ``param`` fresh state (for rows a new id took after an eviction)."""
        if id(param) not in {id(p) for g in self.param_groups for p in g["params"]}:
            raise KeyError(f"{type(self).__name__}: reset_rows of an unknown parameter")
        state = self.state.get(param)
        if not state or not rows.numel():
            return
        self._slots(param)  # grown to the parameter's rows first: new rows may be past them
        for spec in self.slot_specs:
            slot = state[spec.name]
            width = 1 if spec.per_row else _dim_of(param)
            fill = torch.full((rows.numel(), width), spec.init, device=slot.device)
            slot.scatter_rows(rows.to(torch.int64), fill)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {slot: PagedTensor, "step": int}}, "param_groups": [...],
        "skipped_steps": int}``: tensors and JSON-able scalars only (no pickle)."""
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            packed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in g["params"]]
            groups.append(packed)
        state = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p in self.state:
                    # Rows the parameter gained since its last step get their initial
                    # state now, so every slot has exactly the parameter's rows.
                    self._slots(p)
                    st = self.state[p]
                    state[index[id(p)]] = {
                        "step": int(st["step"]),
                        **{spec.name: st[spec.name] for spec in self.slot_specs},
                    }
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; slots may be PagedTensors or ``[rows, width]``
        tensors.

        Everything is checked before anything changes, so a refused state leaves the
        optimizer as it was: groups must match this optimizer's in number and sizes, each
        group's hyper-parameters pass the constructor's checks, every parameter's entry
        has an int ``step >= 0`` and exactly this optimizer's slots, each with the
        parameter's rows and width, finite, and not negative where the slot never is. A
        slot may be left out of the state when the ``PagedTensor`` parameter already
        carries it as a companion (its rows came back with the table's keys from a
        checkpoint): the companion is then kept as it is.

        Raises:
            TypeError, ValueError, KeyError: the state is malformed; the message names
                the parameter (or group) and the field.
        """
        name = type(self).__name__
        where = f"{name}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"{where}: the state dict has no {key!r} entry")
        groups = state_dict["param_groups"]
        if (
            not isinstance(groups, Sequence)
            or isinstance(groups, str)
            or len(groups) != len(self.param_groups)
            or any(
                not isinstance(a, Mapping)
                or not isinstance(a.get("params"), Sequence)
                or len(a["params"]) != len(b["params"])
                for a, b in zip(groups, self.param_groups, strict=True)
            )
        ):
            raise ValueError(
                f"{where}: the state dict's param groups do not match this optimizer's"
            )
        pairs = enumerate(zip(groups, self.param_groups, strict=True))
        new_groups = [self._loaded_group(where, gi, saved, own) for gi, (saved, own) in pairs]
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"{where}: skipped_steps must be an int >= 0, got {skipped!r}")
        # The slots an optimizer keeps can depend on its hyper-parameters (SGD keeps a
        # momentum buffer only with momentum): check the state against the loaded ones.
        old_groups = self.param_groups
        self.param_groups = new_groups
        try:
            staged = self._loaded_state(where, state_dict["state"])
        except BaseException:
            self.param_groups = old_groups
            raise
        self.flush_checks()
        self.state.clear()
        self._slot_cache.clear()
        for p, step, dense in staged:
            slots = self._slots(p)
            self.state[p]["step"] = step
            for slot_name, values in dense.items():
                slot = slots[slot_name]
                if values.shape[0]:
                    rows = torch.arange(values.shape[0], device=slot.device)
                    slot.scatter_rows(rows, values)
        self.skipped_steps = skipped

    def _loaded_group(
        self, where: str, gi: int, saved: Mapping[str, Any], own: dict[str, Any]
    ) -> dict[str, Any]:
        """This optimizer's group ``own`` with the saved hyper-parameters, checked."""
        merged = dict(own)
        for k, v in saved.items():
            if k == "params":
                continue
            if isinstance(own.get(k), tuple) and isinstance(v, (list, tuple)):
                v = tuple(v)
            merged[k] = v
        try:
            self._check_hyper(merged)
        except (TypeError, ValueError) as err:
            msg = str(err).removeprefix(f"{type(self).__name__}: ")
            raise ValueError(f"{where}: param group {gi}: {msg}") from None
        return merged

    def _loaded_state(
        self, where: str, state: object
    ) -> list[tuple[Param, int, dict[str, torch.Tensor]]]:
        """``(param, step, {slot: fp32 [rows, width] on the param's device})`` of every
        entry of a saved ``state``, checked."""
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: 'state' must be a dict, got {type(state).__name__}")
        params = [p for g in self.param_groups for p in g["params"]]
        specs = {spec.name: spec for spec in self.slot_specs}
        staged: list[tuple[Param, int, dict[str, torch.Tensor]]] = []
        seen: set[int] = set()
        for key, st in state.items():
            index = _as_index(key)
            if index is None or not 0 <= index < len(params) or index in seen:
                raise ValueError(
                    f"{where}: state key {key!r} is not a distinct parameter index in "
                    f"[0, {len(params)})"
                )
            seen.add(index)
            p = params[index]
            what = f"{where}: state of {self._param_name(p)} (index {index})"
            if not isinstance(st, Mapping):
                raise TypeError(f"{what}: expected a dict, got {type(st).__name__}")
            step = _as_step(st.get("step"))
            if step is None:
                raise ValueError(f"{what}: 'step' must be an int >= 0, got {st.get('step')!r}")
            names = set(st) - {"step"}
            # A slot the table carries as a companion (imported with its rows from a
            # checkpoint) need not be in the state: it is taken over as it is.
            held = p.companions if isinstance(p, PagedTensor) else {}
            unknown = sorted(names - set(specs))
            missing = sorted(n for n in set(specs) - names if n not in held)
            if unknown or missing:
                raise ValueError(
                    f"{what}: slots {sorted(names)} do not match this optimizer's "
                    f"{list(specs)} (unknown: {unknown}, missing: {missing})"
                )
            for slot_name in set(specs) - names:
                width = 1 if specs[slot_name].per_row else _dim_of(p)
                store = held[slot_name].store
                if store.dim != width or store.dtype != torch.float32:
                    raise ValueError(
                        f"{what}: the table's companion {slot_name!r} has width {store.dim} "
                        f"({store.dtype}); this optimizer needs fp32 of width {width}"
                    )
            dense = {}
            for slot_name, spec in specs.items():
                if slot_name not in names:
                    continue
                dense[slot_name] = _loaded_slot(
                    f"{what}, slot {slot_name!r}", st[slot_name], spec, p
                )
            staged.append((p, step, dense))
        return staged


def _is_sparse_param(obj: object) -> bool:
    """Whether ``obj`` is a core ``SparseParameter`` (tensors and tables never are)."""
    return not isinstance(obj, (torch.Tensor, PagedTensor)) and isinstance(obj, SparseParameter)


def _as_index(key: object) -> int | None:
    """A state key as a parameter index (JSON turns int keys into strings)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _as_step(value: object) -> int | None:
    """A saved step count as an int >= 0 (a 0-d integral tensor counts), else ``None``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _loaded_slot(what: str, src: object, spec: SlotSpec, p: Param) -> torch.Tensor:
    """A saved slot as fp32 ``[rows, width]`` on ``p``'s device, checked."""
    if isinstance(src, PagedTensor):
        src = src.to_dense()
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{what}: expected a PagedTensor or tensor, got {type(src).__name__}")
    shape = (_rows_of(p), 1 if spec.per_row else _dim_of(p))
    if tuple(src.shape) != shape:
        raise ValueError(
            f"{what}: has shape {tuple(src.shape)}, the parameter needs {shape} (the "
            "parameter's rows and width: rows missing from the state would silently restart)"
        )
    if not src.is_floating_point():
        raise TypeError(f"{what}: must be a floating tensor, got {src.dtype}")
    values = src.to(device=p.device, dtype=torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what}: holds NaN or Inf")
    if spec.nonnegative and bool((values < 0).any()):
        raise ValueError(f"{what}: holds negative values; this slot never does")
    return values


class _Rows(NamedTuple):
    """A step's gradient of one parameter: unique rows and their sums; with ``count`` (a
    device tensor) only the first ``count`` rows are real, the rest is padding."""

    rows: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real rows and values (reads the count: a host sync, for error paths)."""
        if self.count is None:
            return self.rows, self.values
        k = int(self.count[0])
        return self.rows[:k], self.values[:k]


def _concat(parts: list[SparseGrad]) -> SparseGrad:
    """Several gradients of one parameter as one uncoalesced gradient (fp32 values)."""
    rows = torch.cat([p.rows for p in parts])
    values = torch.cat([p.values.to(torch.float32) for p in parts])
    return SparseGrad(rows, values)
