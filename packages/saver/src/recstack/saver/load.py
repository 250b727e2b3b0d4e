"""Loading a checkpoint chain into objects: match names, check everything, then write.

The order is fixed so that a refused load changes nothing: names are matched (``rename``,
``include``/``exclude``) and checked against the objects (a table's row shapes and
dtypes, a module entry's shape, an optimizer's parameter groups), then every file this
rank needs is verified (size, CRC-32, tensor headers against the manifest) and the dense
state decoded. Only then are tables loaded (each rank reads every saved rank's parts and
keeps the keys it owns under core's ``owner``, so N ranks' files load on M), deltas
replayed (tombstones removed, then changed rows imported), modules and other objects
loaded, per-rank state and random generators restored.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recstack.core import AuxiliaryState, IncrementalKeyedState, KeyedState, ShardSpec
from recstack.saver.dense_state import DenseState
from recstack.saver.dtype_names import dtype_from_name
from recstack.saver.errors import CheckpointError
from recstack.saver.manifest import Chain
from recstack.saver.names import NameFilter
from recstack.saver.progress import Progress
from recstack.saver.read import (
    CheckedFile,
    KeptBytes,
    part_expectation,
    read_checked,
    read_json,
    read_parts,
    verify_files,
)
from recstack.saver.replay import ChainFiles, chain_files
from recstack.saver.rng import restore_rng
from recstack.saver.sharded_dense import shard_like_module, shard_like_optimizer
from recstack.saver.stateful import Sorted
from recstack.saver.tree import decode_tree, tensor_names

__all__ = ["LoadReport", "load_chain"]


@dataclass
class LoadReport:
    """What a load did, by name (tables, module entries, objects).

    Attributes:
        step: the checkpoint's step.
        path: its directory.
        loaded: names loaded.
        skipped: names left out by ``include``/``exclude``.
        missing: names of the objects the checkpoint lacks.
        unexpected: names in the checkpoint no object takes.
        mismatched: ``"name: why"`` for entries of another shape or dtype (not loaded).
    """

    step: int
    path: Path
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every missing, unexpected and mismatched entry, in words."""
        return (
            [f"missing from the checkpoint: {n}" for n in self.missing]
            + [f"in the checkpoint but not in the objects: {n}" for n in self.unexpected]
            + [f"mismatched: {n}" for n in self.mismatched]
        )


@dataclass
class _Plan:
    tables: list[tuple[str, str, KeyedState]] = field(default_factory=list)
    modules: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)
    objects: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)
    per_rank: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)


def _slot_problem(saved: dict[str, Any], state: KeyedState) -> str | None:
    """Why a saved table's rows do not fit ``state`` (by its metadata's ``slots``)."""
    meta = state.state_metadata()
    own = meta.get("slots") if isinstance(meta, dict) else None
    if not isinstance(own, dict):
        return None
    for slot, info in saved.items():
        mine = own.get(slot)
        if not isinstance(mine, dict) or not isinstance(info, dict):
            continue
        if list(mine.get("shape", [])) != list(info.get("shape", [])):
            return (
                f"slot {slot!r} has rows of shape {info.get('shape')} in the checkpoint but "
                f"{mine.get('shape')} in the table (dim mismatch)"
            )
        a, b = dtype_from_name(info.get("dtype")), dtype_from_name(mine.get("dtype"))
        if a is None or b is None or a == b:
            continue
        if slot == "values" or a.is_floating_point != b.is_floating_point:
            return (
                f"slot {slot!r} is {info.get('dtype')} in the checkpoint but "
                f"{mine.get('dtype')} in the table (dtype mismatch)"
            )
    return None


def _replay_problem(chain: Chain, state: KeyedState) -> str | None:
    """Why ``state`` cannot end up as saved: it cannot remove keys (to replay a delta's
    tombstones, or to drop keys it holds that the checkpoint lacks)."""
    if isinstance(state, IncrementalKeyedState):
        return None
    if len(chain) > 1:
        return "a delta chain needs a table that can remove keys (remove_keys)"
    meta = state.state_metadata()
    held = meta.get("num_keys") if isinstance(meta, dict) else None
    if isinstance(held, int) and held > 0:
        return f"the table holds {held} keys and cannot remove them; load into an empty one"
    return None


def _plan(
    chain: Chain, objs: Sorted, names: NameFilter, rank: int, dense: DenseState, report: LoadReport
) -> _Plan:
    full = chain[0][1]
    last_dir, last = chain[-1]
    plan = _Plan()
    saved_tables = {names.renamed(n): n for n in full["tables"]}
    for name, state in objs.tables.items():
        if not names.selected(name):
            report.skipped.append(name)
            continue
        saved = saved_tables.get(name)
        if saved is None:
            report.missing.append(name)
            continue
        for ckpt, m in chain[1:]:
            if saved not in m["tables"]:
                raise CheckpointError(f"{ckpt}: the delta lacks table {saved!r} its base has")
        problem = _slot_problem(full["tables"][saved]["slots"], state)
        if problem is None:
            problem = _replay_problem(chain, state)
        if problem:
            report.mismatched.append(f"{name}: {problem}")
            continue
        plan.tables.append((name, saved, state))
    report.unexpected += [
        new for new in saved_tables if new not in objs.tables and names.selected(new)
    ]
    modules = {n: o for n, o in objs.dense.items() if isinstance(o, nn.Module)}
    for name, module in modules.items():
        _plan_module(name, module, dense, names, plan, report)
    for saved, info in dense.trees.items():
        new = names.renamed(saved)
        if info.get("kind") == "module":
            if not any(new == m or new.startswith(m + ".") for m in modules):
                tree = info.get("tree") or {}
                report.unexpected += [f"{new}.{k}" for k in tree if names.selected(f"{new}.{k}")]
            continue
        if new in objs.dense and not isinstance(objs.dense[new], nn.Module):
            if names.selected(new):
                plan.objects[new] = (objs.dense[new], info["tree"], f"{last_dir}: {saved!r}")
        elif names.selected(new):
            report.unexpected.append(new)
    taken = {names.renamed(s) for s in dense.trees}
    for name, obj in objs.dense.items():
        if isinstance(obj, nn.Module):
            continue
        if not names.selected(name):
            report.skipped.append(name)
        elif name not in taken:
            report.missing.append(name)
    entries = last.get("per_rank") or []
    for name, obj in objs.per_rank.items():
        if not names.selected(name):
            report.skipped.append(name)
        elif rank >= len(entries):
            report.missing.append(f"{name} (rank {rank}; the checkpoint has {len(entries)} ranks)")
        else:
            plan.per_rank[name] = (obj, entries[rank], f"{last_dir}: rank {rank} {name!r}")
    return plan


def _plan_module(
    name: str,
    module: nn.Module,
    dense: DenseState,
    names: NameFilter,
    plan: _Plan,
    report: LoadReport,
) -> None:
    """Match a module's state entries one by one (warm start: new or renamed layers)."""
    saved: dict[str, Any] = {}
    for saved_name, info in dense.trees.items():
        if info.get("kind") != "module" or not isinstance(info.get("tree"), dict):
            continue
        for key, value in info["tree"].items():
            full = names.renamed(f"{saved_name}.{key}")
            if full.startswith(name + "."):
                saved[full] = value
    own = module.state_dict()
    chosen: dict[str, Any] = {}
    for key, value in own.items():
        full = f"{name}.{key}"
        if not names.selected(full):
            report.skipped.append(full)
            continue
        if full not in saved:
            report.missing.append(full)
            continue
        problem = _entry_problem(value, saved[full], dense)
        if problem:
            report.mismatched.append(f"{full}: {problem}")
            continue
        chosen[key] = saved[full]
    report.unexpected += [
        full for full in saved if full[len(name) + 1 :] not in own and names.selected(full)
    ]
    if chosen:
        plan.modules[name] = (module, chosen)


def _entry_problem(own: Any, tree: Any, dense: DenseState) -> str | None:
    if not isinstance(own, torch.Tensor):
        return None
    if not (isinstance(tree, dict) and set(tree) == {"__tensor__"}):
        return "a tensor in the objects but not in the checkpoint"
    found = dense.shape(tree["__tensor__"])
    if found is None:
        return "its tensor is missing from the checkpoint"
    shape, dtype = found
    if list(own.shape) != shape:
        return f"shape {shape} in the checkpoint, {list(own.shape)} in the objects"
    if dtype is not None and dtype.is_floating_point != own.dtype.is_floating_point:
        return f"dtype {dtype} in the checkpoint, {own.dtype} in the objects"
    return None


# ---------------------------------------------------------------------------- checks


def _check_object(name: str, obj: Any, state: Any, where: str) -> None:
    """What an optimizer's own ``load_state_dict`` checks only after it changed things."""
    if not (isinstance(state, dict) and "param_groups" in state and hasattr(obj, "param_groups")):
        return
    saved, own = state["param_groups"], obj.param_groups
    if len(saved) != len(own) or any(
        len(a.get("params", [])) != len(b["params"]) for a, b in zip(saved, own, strict=True)
    ):
        raise CheckpointError(
            f"{where}: {name!r} has {[len(g.get('params', [])) for g in saved]} parameters per "
            f"group in the checkpoint, {[len(g['params']) for g in own]} in the objects"
        )


# ---------------------------------------------------------------------------- load


def load_chain(
    chain: Chain,
    objs: Sorted,
    *,
    rank: int,
    world_size: int,
    include: list[str] | None,
    exclude: list[str] | None,
    rename: dict[str, str],
    strict: bool,
    rng: bool,
    pool: ThreadPoolExecutor,
    progress: bool | None,
    keep_bytes: int = 0,
) -> LoadReport:
    """Load ``chain`` (full checkpoint first, then its deltas) into ``objs``; up to
    ``keep_bytes`` of the checked tensor files stay in memory for the import."""
    last_dir, last = chain[-1]
    report = LoadReport(step=last["step"], path=last_dir)
    names = NameFilter(include, exclude, rename)
    dense = DenseState(last_dir, last)
    plan = _plan(chain, objs, names, rank, dense, report)
    if strict and report.problems():
        listed = "\n  - ".join(report.problems())
        raise CheckpointError(
            f"{last_dir}: the checkpoint does not fit the objects; nothing was loaded "
            f"(pass strict=False to load what fits):\n  - {listed}"
        )
    # Every file this rank reads, checked before anything changes.
    checks: list[tuple[CheckedFile, dict[str, Any] | None]] = []
    table_files = {}
    for name, saved, _ in plan.tables:
        files = chain_files(chain, saved)
        table_files[name] = files
        slots = chain[0][1]["tables"][saved]["slots"]
        for _, parts, removed, aux in files:
            checks += [(f, part_expectation(slots)) for f in parts]
            checks += [(f, {"keys": ("I64", [-1])}) for f in removed]
            checks += [(f, None) for f in aux]
    needed: set[str] = set()
    for _, chosen in plan.modules.values():
        needed.update(tensor_names(chosen))
    for _, tree, _ in plan.objects.values():
        needed.update(tensor_names(tree))
    checks += dense.checked_files(needed)
    entries = last.get("per_rank") or []
    per_rank_entry = entries[rank] if rank < len(entries) else None
    rank_json = rank_tensors = None
    if per_rank_entry is not None:
        rank_json = CheckedFile(last_dir, last, per_rank_entry["file"])
        checks.append((rank_json, None))
        if per_rank_entry.get("tensors"):
            rank_tensors = CheckedFile(last_dir, last, per_rank_entry["tensors"])
            checks.append((rank_tensors, None))
    verify_files(checks, pool, KeptBytes(keep_bytes))
    # Decode the dense and per-rank state now: a bad tree fails before any write.
    tensors = dense.tensors(needed)
    modules = {
        name: (module, decode_tree(chosen, tensors, f"{last_dir}: {name!r}"))
        for name, (module, chosen) in plan.modules.items()
    }
    objects = {}
    for name, (obj, tree, where) in plan.objects.items():
        state = decode_tree(tree, tensors, where)
        _check_object(name, obj, state, where)
        objects[name] = (obj, state)
    rank_state = read_json(rank_json) if rank_json is not None else {}
    rank_t = read_checked(rank_tensors) if rank_tensors is not None else {}
    per_rank = {}
    for name, (obj, _entry, where) in plan.per_rank.items():
        saved_state = (rank_state.get("states") or {}).get(name)
        if saved_state is None:
            report.missing.append(f"{name} (rank {rank})")
            if strict:
                raise CheckpointError(f"{where}: not in the checkpoint; nothing was loaded")
            continue
        per_rank[name] = (obj, decode_tree(saved_state["tree"], rank_t, where))
    # ---- nothing has changed so far; from here on, write.
    shard = ShardSpec(world_size, rank) if world_size > 1 else None
    total = sum(f.bytes for files in table_files.values() for _, p, _, _ in files for f in p)
    bar = Progress(f"loading step {report.step}", total, enabled=progress)
    for name, saved, state in plan.tables:
        _load_table(chain, saved, state, table_files[name], shard, pool, bar)
        report.loaded.append(name)
    bar.close()
    for name, (module, state) in modules.items():
        module.load_state_dict(shard_like_module(module, state), strict=False)
        report.loaded += [f"{name}.{k}" for k in state]
    for name, (obj, state) in {**objects, **per_rank}.items():
        if isinstance(obj, dict):
            obj.clear()
            obj.update(state)
        elif isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(shard_like_optimizer(obj, state))
        else:
            obj.load_state_dict(state)
        report.loaded.append(name)
    if rng and rank_state.get("rng") is not None:
        restore_rng(rank_state["rng"], f"{last_dir}: rank {rank}")
    return report


def _saved_metadata(saved_meta: Any, state: KeyedState) -> Any:
    """The exporting side's metadata, with its table entry also under this state's own
    table name (a table loaded under another name finds itself in it)."""
    if not isinstance(saved_meta, dict) or not isinstance(saved_meta.get("tables"), dict):
        return saved_meta
    own = state.state_metadata()
    mine, theirs = own.get("table") if isinstance(own, dict) else None, saved_meta.get("table")
    if mine is None or theirs is None or mine == theirs or theirs not in saved_meta["tables"]:
        return saved_meta
    return {**saved_meta, "tables": {**saved_meta["tables"], mine: saved_meta["tables"][theirs]}}


def _clear(state: KeyedState) -> None:
    """Remove the keys a table holds before loading, so it ends up as saved (a table that
    cannot remove keys was checked to be empty)."""
    meta = state.state_metadata()
    if isinstance(meta, dict) and meta.get("num_keys") == 0:
        return
    if not isinstance(state, IncrementalKeyedState):
        return
    held = [keys for keys, _ in state.export_chunks(1 << 22)]
    if held:
        state.remove_keys(torch.cat(held), None)


def _load_table(
    chain: Chain,
    saved: str,
    state: KeyedState,
    files: ChainFiles,
    shard: ShardSpec | None,
    pool: ThreadPoolExecutor,
    bar: Progress,
) -> None:
    _clear(state)
    for (i, parts, removed, _aux), (_, m) in zip(files, chain, strict=True):
        meta = _saved_metadata(m["tables"][saved]["metadata"], state)
        if i and isinstance(state, IncrementalKeyedState):
            for f in removed:
                state.remove_keys(read_checked(f, crc=False)["keys"], shard)
        for f, tensors in zip(parts, read_parts(parts, pool, crc=False), strict=True):
            slots = {k[5:]: v for k, v in tensors.items() if k.startswith("slot/")}
            state.import_chunk(tensors["keys"], slots, meta, shard)
            bar.add(f.bytes)
    aux_files = files[-1][3]
    if aux_files and isinstance(state, AuxiliaryState):
        state.load_auxiliary_state([read_checked(f, crc=False) for f in aux_files])
