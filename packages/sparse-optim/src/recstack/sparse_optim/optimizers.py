"""The sparse optimizers: SGD, Adagrad, row-wise Adagrad, Adam, AdamW and FTRL.

Each is a :class:`~recstack.sparse_optim.optimizer.SparseOptimizer`: lazy (only the rows of
a step's gradient change), with fp32 state in PagedTensors row-aligned with the parameter,
and the update of :mod:`recstack.sparse_optim.rules`.

Examples:
    >>> import torch
    >>> from recstack.core import PagedTensor, SparseGrad
    >>> w = PagedTensor.wrap(torch.ones(4, 2), name="table")
    >>> opt = SparseAdam([w], lr=0.1)
    >>> opt.step(grads=SparseGrad(torch.tensor([2]), torch.ones(1, 2)))
    >>> [round(x, 4) for x in w.to_dense()[:, 0].tolist()]  # only row 2 moved, by lr
    [1.0, 1.0, 0.9, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from recstack.sparse_optim.kernels.optimizer_tile import (
    AdagradTile,
    AdamTile,
    FtrlTile,
    RowWiseAdagradTile,
    SgdTile,
    log2_beta,
)
from recstack.sparse_optim.optimizer import (
    ParamLike,
    SlotSpec,
    SparseOptimizer,
    check_flag,
    check_real,
)
from recstack.sparse_optim.rules import (
    adagrad_rows,
    adam_rows,
    ftrl_rows,
    rowwise_adagrad_rows,
    sgd_rows,
)

__all__ = [
    "RowWiseAdagrad",
    "SparseAdagrad",
    "SparseAdam",
    "SparseAdamW",
    "SparseFTRL",
    "SparseSGD",
]

_Params = Iterable[ParamLike] | Iterable[dict[str, Any]]


def _nonneg(opt: SparseOptimizer, group: dict[str, Any], *names: str) -> None:
    for name in names:
        check_real(type(opt).__name__, name, group.get(name))


class SparseSGD(SparseOptimizer):
    """Row-sparse SGD with optional momentum (``torch.optim.SGD`` with ``dampening=0``).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        momentum: momentum factor; a row's buffer starts at zero and decays only on the
            steps that touch the row.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty added to the gradient.
        on_nonfinite: ``"raise"`` or ``"skip"`` (see :class:`SparseOptimizer`).
        deferred_checks: read the step\'s checks at the next call (see :class:`SparseOptimizer`).
    """

    def __init__(
        self,
        params: _Params,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": bool(nesterov),
            "weight_decay": weight_decay,
        }
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, deferred_checks=deferred_checks
        )

    @property
    def slot_specs(self) -> tuple[SlotSpec, ...]:  # type: ignore[override]
        # Plain SGD keeps no state; momentum keeps one buffer.
        if any(g["momentum"] for g in self.param_groups):
            return (SlotSpec("momentum_buffer"),)
        return ()

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        _nonneg(self, group, "momentum", "weight_decay")
        check_flag("SparseSGD", "nesterov", group.get("nesterov"))
        if group["nesterov"] and not group["momentum"]:
            raise ValueError("SparseSGD: nesterov needs momentum > 0")

    def _tile_args(self, group, step, dim):
        return SgdTile(
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            has_momentum=bool(group["momentum"]),
            nesterov=bool(group["nesterov"]),
        )

    def _update_rows(self, group, step, w, g, slots):
        buf = slots.get("momentum_buffer")
        w, buf = sgd_rows(
            w,
            g,
            buf if group["momentum"] else None,
            lr=group["lr"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
        )
        return w, (
            {} if buf is None or "momentum_buffer" not in slots else {"momentum_buffer": buf}
        )


class SparseAdagrad(SparseOptimizer):
    """Row-sparse Adagrad (``torch.optim.Adagrad``'s update on the touched rows).

    Args:
        params: parameters or param groups.
        lr: learning rate.
        lr_decay: ``lr / (1 + (t - 1) * lr_decay)`` at the group's step ``t``.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: the accumulator's starting value.
        eps: added to the accumulator's square root.
        on_nonfinite: ``"raise"`` or ``"skip"``.
        deferred_checks: read the step\'s checks at the next call (see :class:`SparseOptimizer`).
    """

    def __init__(
        self,
        params: _Params,
        lr: float = 0.01,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "eps": eps,
        }
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, deferred_checks=deferred_checks
        )

    @property
    def slot_specs(self) -> tuple[SlotSpec, ...]:  # type: ignore[override]
        init = self.param_groups[0]["initial_accumulator_value"] if self.param_groups else 0.0
        return (SlotSpec("sum", init=init, nonnegative=True),)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        _nonneg(self, group, "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def _tile_args(self, group, step, dim):
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        return AdagradTile(lr=clr, eps=group["eps"], weight_decay=group["weight_decay"])

    def _update_rows(self, group, step, w, g, slots):
        w, acc = adagrad_rows(
            w,
            g,
            slots["sum"],
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            step=step,
        )
        return w, {"sum": acc}


class RowWiseAdagrad(SparseOptimizer):
    """Adagrad with one accumulator per row (the mean of the row's squared gradient): the
    state is ``1 / dim`` of :class:`SparseAdagrad`'s.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient.
        eps: added to the accumulator's square root.
        on_nonfinite: ``"raise"`` or ``"skip"``.
        deferred_checks: read the step\'s checks at the next call (see :class:`SparseOptimizer`).
    """

    slot_specs = (SlotSpec("sum", per_row=True, nonnegative=True),)

    def __init__(
        self,
        params: _Params,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        eps: float = 1e-10,
        *,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "eps": eps}
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, deferred_checks=deferred_checks
        )

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        _nonneg(self, group, "weight_decay", "eps")

    def _tile_args(self, group, step, dim):
        return RowWiseAdagradTile(
            lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"], dim=float(dim)
        )

    def _update_rows(self, group, step, w, g, slots):
        w, acc = rowwise_adagrad_rows(
            w, g, slots["sum"], lr=group["lr"], eps=group["eps"], weight_decay=group["weight_decay"]
        )
        return w, {"sum": acc}


class SparseAdam(SparseOptimizer):
    """Row-sparse (lazy) Adam.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: epsilon of the denominator.
        weight_decay: L2 penalty added to the gradient (:class:`SparseAdamW` decouples it).
        step_count: ``"global"`` (one count per parameter, advanced by every step that
            touches it, as TensorFlow's ``LazyAdam``) or ``"per_row"`` (each row counts its
            own updates: a row seen rarely gets the bias correction of a young row).
        tf_compat: TensorFlow's form of the update,
            ``lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``,
            ``w -= lr_t * m / (sqrt(v) + eps)`` (epsilon outside the correction), so
            hyper-parameters tuned in TensorFlow carry over.
        on_nonfinite: ``"raise"`` or ``"skip"``.
        deferred_checks: read the step\'s checks at the next call (see :class:`SparseOptimizer`).
    """

    _decoupled = False

    def __init__(
        self,
        params: _Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        step_count: str = "global",
        tf_compat: bool = False,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        if step_count not in ("global", "per_row"):
            raise ValueError(
                f"{type(self).__name__}: step_count must be 'global' or 'per_row', "
                f"got {step_count!r}"
            )
        self.step_count = step_count
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "tf_compat": bool(tf_compat),
        }
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, deferred_checks=deferred_checks
        )

    @property
    def slot_specs(self) -> tuple[SlotSpec, ...]:  # type: ignore[override]
        specs = (SlotSpec("exp_avg"), SlotSpec("exp_avg_sq", nonnegative=True))
        if self.step_count == "per_row":
            specs += (SlotSpec("row_step", per_row=True, nonnegative=True),)
        return specs

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        _nonneg(self, group, "eps", "weight_decay")
        check_flag(type(self).__name__, "tf_compat", group.get("tf_compat"))
        betas = group.get("betas")
        ok = isinstance(betas, (tuple, list)) and len(betas) == 2
        for b in betas if ok else ():
            ok = ok and isinstance(b, (int, float)) and not isinstance(b, bool)
            ok = ok and math.isfinite(b) and 0.0 <= b < 1.0
        if not ok:
            raise ValueError(
                f"{type(self).__name__}: betas must be two floats in [0, 1), got {betas!r}"
            )

    def _tile_args(self, group, step, dim):
        beta1, beta2 = group["betas"]
        per_row = self.step_count == "per_row"
        if per_row:
            corr1, corr2 = log2_beta(beta1), log2_beta(beta2)
        else:
            corr1, corr2 = 1 - beta1**step, 1 - beta2**step
        return AdamTile(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            correction1=corr1,
            correction2=corr2,
            decoupled=self._decoupled,
            tf_compat=bool(group["tf_compat"]),
            per_row_steps=per_row,
        )

    def _update_rows(self, group, step, w, g, slots):
        beta1, beta2 = group["betas"]
        out: dict[str, torch.Tensor] = {}
        t: float | torch.Tensor = float(step)
        if "row_step" in slots:
            t = slots["row_step"] + 1
            out["row_step"] = t
        w, m, v = adam_rows(
            w,
            g,
            slots["exp_avg"],
            slots["exp_avg_sq"],
            t,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=self._decoupled,
            tf_compat=group["tf_compat"],
        )
        out["exp_avg"], out["exp_avg_sq"] = m, v
        return w, out


class SparseAdamW(SparseAdam):
    """Row-sparse Adam with decoupled weight decay (``torch.optim.AdamW``'s update on the
    touched rows): ``w *= 1 - lr * weight_decay`` before the Adam step. Same arguments as
    :class:`SparseAdam`, with ``weight_decay`` defaulting to 0.01 as AdamW's."""

    _decoupled = True

    def __init__(
        self,
        params: _Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        step_count: str = "global",
        tf_compat: bool = False,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            step_count=step_count,
            tf_compat=tf_compat,
            on_nonfinite=on_nonfinite,
            deferred_checks=deferred_checks,
        )


class SparseFTRL(SparseOptimizer):
    """FTRL-Proximal (McMahan et al., 2013), the classic CTR optimizer, per coordinate.

    Args:
        params: parameters or param groups.
        lr: ``alpha``, the learning rate.
        beta: the ``beta`` of the per-coordinate rate ``alpha / (beta + sqrt(n))``.
        l1: L1 strength; coordinates with ``|z| <= l1`` are exactly zero.
        l2: L2 strength.
        on_nonfinite: ``"raise"`` or ``"skip"``.
        deferred_checks: read the step\'s checks at the next call (see :class:`SparseOptimizer`).

    The weight is a function of the state (``z``, ``n``): FTRL recomputes every touched
    coordinate from it, so a row's first update replaces its initial value.
    """

    slot_specs = (SlotSpec("z"), SlotSpec("n", nonnegative=True))

    def __init__(
        self,
        params: _Params,
        lr: float = 0.05,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
        *,
        on_nonfinite: str = "raise",
        deferred_checks: bool = False,
    ) -> None:
        defaults = {"lr": lr, "beta": beta, "l1": l1, "l2": l2}
        super().__init__(
            params, defaults, on_nonfinite=on_nonfinite, deferred_checks=deferred_checks
        )

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        _nonneg(self, group, "beta", "l1", "l2")
        if not group["lr"] > 0:
            raise ValueError(f"SparseFTRL: lr must be > 0, got {group['lr']!r}")

    def _tile_args(self, group, step, dim):
        return FtrlTile(lr=group["lr"], beta=group["beta"], l1=group["l1"], l2=group["l2"])

    def _update_rows(self, group, step, w, g, slots):
        w, z, n = ftrl_rows(
            w,
            g,
            slots["z"],
            slots["n"],
            lr=group["lr"],
            beta=group["beta"],
            l1=group["l1"],
            l2=group["l2"],
        )
        return w, {"z": z, "n": n}
