"""Tests for recstack.core.distributed.

The multi-process tests launch this file as a script, once per rank, with torchrun's
environment variables set, so the workers exercise ``dist_env`` and
``init_process_group`` exactly as under torchrun. Every rank derives what each peer sent
it from ``(seed, case, src, dst)`` and checks the bytes it received.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch

from recstack.core import distributed as rd

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# (dtype, trailing shape): int16 (gloo rejects it natively) and bool prove the byte
# transport; the zero-width rows prove rows without bytes.
CASES: list[tuple[torch.dtype, tuple[int, ...]]] = [
    (torch.int64, ()),
    (torch.float32, (3,)),
    (torch.bfloat16, (2, 2)),
    (torch.int16, (5,)),
    (torch.bool, ()),
    (torch.float32, (0,)),
]


# --------------------------------------------------------------------------- data


def _chunk_rows(seed: int, case: int, src: int, dst: int) -> int:
    if (src + 2 * dst + case) % 4 == 0:
        return 0  # every run has zero-length chunks, including to self
    g = torch.Generator().manual_seed(seed * 7919 + case * 104729 + src * 131 + dst)
    return int(torch.randint(1, 7, (1,), generator=g))


def _chunk(
    seed: int,
    case: int,
    src: int,
    dst: int,
    dtype: torch.dtype,
    trailing: tuple[int, ...],
    rows: int | None = None,
) -> torch.Tensor:
    """What rank ``src`` sends rank ``dst`` in ``case``: any rank can recompute it."""
    rows = _chunk_rows(seed, case, src, dst) if rows is None else rows
    shape = (rows, *trailing)
    g = torch.Generator().manual_seed(seed * 15485863 + case * 7907 + src * 613 + dst * 17 + 1)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) + 100 * src + dst).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _expect_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(
            f"{what}: got {got.dtype} {tuple(got.shape)} {got}, "
            f"want {want.dtype} {tuple(want.shape)} {want}"
        )


# --------------------------------------------------------------------------- worker


def _worker(backend: str, seed: int) -> None:
    env = rd.dist_env()
    device = torch.device(f"cuda:{env.local_rank}" if backend == "nccl" else "cpu")
    state = rd.init_process_group(backend=backend, timeout=timedelta(seconds=60))
    me, world = env.rank, env.world_size
    assert state == env, (state, env)
    assert rd.init_process_group(backend=backend) == env  # second call is a no-op
    assert rd.is_initialized() and rd.rank() == me and rd.world_size() == world

    # One tensor at a time, with list splits and with tensor splits on the device.
    for case, (dtype, trailing) in enumerate(CASES):
        sent = [_chunk(seed, case, me, dst, dtype, trailing) for dst in range(world)]
        splits = [c.shape[0] for c in sent]
        data = torch.cat(sent).to(device)
        send_splits = splits if case % 2 else torch.tensor(splits, device=device)
        got, recv_splits = rd.all_to_all_v(data, send_splits)
        want = [_chunk(seed, case, src, me, dtype, trailing) for src in range(world)]
        assert recv_splits == [w.shape[0] for w in want], (case, recv_splits)
        assert got.device == device
        _expect_equal(got, torch.cat(want), f"rank {me} case {case} ({dtype}, {trailing})")

    # Several tensors with one split: keys, weights and a bf16 payload.
    kinds = [(torch.int64, ()), (torch.float32, ()), (torch.bfloat16, (4,))]
    base = len(CASES)

    def part(k: int, src: int, dst: int) -> torch.Tensor:
        rows = _chunk_rows(seed, base, src, dst)
        return _chunk(seed, base + 1 + k, src, dst, *kinds[k], rows=rows)

    sends = [torch.cat([part(k, me, d) for d in range(world)]).to(device) for k in range(3)]
    splits = [_chunk_rows(seed, base, me, d) for d in range(world)]
    got_list, recv_splits = rd.all_to_all_v_list(sends, splits)
    assert recv_splits == [_chunk_rows(seed, base, s, me) for s in range(world)], recv_splits
    for k, got in enumerate(got_list):
        want = torch.cat([part(k, s, me) for s in range(world)])
        _expect_equal(got, want, f"rank {me} list tensor {k}")

    # Started exchanges overlap later work and each other; waiting gives the same rows.
    first = rd.all_to_all_v_start(sends, splits)
    second = rd.all_to_all_v_start([sends[0] * 2], splits)
    busy = torch.ones(256, 256, device=device) @ torch.ones(256, 256, device=device)
    assert second.recv_splits == recv_splits
    for k, (got, want) in enumerate(zip(first.wait()[0], got_list, strict=True)):
        _expect_equal(got, want, f"rank {me} started tensor {k}")
    _expect_equal(second.wait()[0][0], got_list[0] * 2, f"rank {me} second started exchange")
    assert first.wait()[1] == recv_splits and float(busy[0, 0]) == 256.0

    # Nobody sends anything.
    empty = torch.empty(0, 3, dtype=torch.float32, device=device)
    got, recv_splits = rd.all_to_all_v(empty, [0] * world)
    assert recv_splits == [0] * world and got.shape == (0, 3), (recv_splits, got.shape)

    # Only rank 0 receives, and rank 0 sends nothing: one-sided traffic.
    n = 0 if me == 0 else me + 1
    data = torch.full((n,), me, dtype=torch.int64, device=device)
    got, recv_splits = rd.all_to_all_v(data, [n] + [0] * (world - 1))
    if me == 0:
        assert recv_splits == [0] + [s + 1 for s in range(1, world)], recv_splits
        want = torch.cat([torch.full((s + 1,), s, dtype=torch.int64) for s in range(1, world)])
        _expect_equal(got, want, "rank 0 gathered rows")
    else:
        assert recv_splits == [0] * world and got.numel() == 0

    # Bad host-side splits fail on every rank before any collective starts.
    for bad in ([1] * (world + 1), [1] * world, [-1] + [1] * (world - 1)):
        try:
            rd.all_to_all_v(torch.zeros(world + 5, device=device), bad)
        except ValueError as e:
            assert "send_splits" in str(e), e
        else:
            raise AssertionError(f"send_splits={bad} was accepted")
    if backend == "nccl":
        try:
            rd.all_to_all_v(torch.zeros(world), [1] * world)
        except ValueError as e:
            assert "CUDA" in str(e), e
        else:
            raise AssertionError("a CPU tensor was accepted on NCCL")

    rd.destroy_process_group()
    assert not rd.is_initialized()
    print(f"rank {me}: ok", flush=True)


# --------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_once(world: int, backend: str, seed: int, timeout_s: float) -> list[tuple[int, str]]:
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(r),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(r),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, os.path.abspath(__file__), backend, str(seed)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + timeout_s
    try:
        # A failed rank leaves its peers blocked in a collective: stop them at once.
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p in procs:
        out, _ = p.communicate()
        results.append((p.returncode, out.decode(errors="replace")))
    return results


def _run_ranks(world: int, backend: str, timeout_s: float = 150.0) -> None:
    seed = random.randrange(2**31)
    for attempt in range(2):
        results = _launch_once(world, backend, seed, timeout_s)
        if all(rc == 0 for rc, _ in results):
            return
        port_taken = any("address already in use" in out.lower() for _, out in results)
        if not (port_taken and attempt == 0):
            break
    report = "\n".join(
        f"--- rank {r} (exit {rc}) ---\n{out}" for r, (rc, out) in enumerate(results)
    )
    pytest.fail(f"{world} {backend} ranks failed (seed={seed}):\n{report}")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_v_gloo(world: int) -> None:
    _run_ranks(world, "gloo")


@pytest.mark.gpu
@pytest.mark.slow
def test_all_to_all_v_nccl() -> None:
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs >= 2 CUDA devices")
    _run_ranks(n, "nccl")


# --------------------------------------------------------------------------- single process


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_dist_env_defaults(no_torchrun_env: pytest.MonkeyPatch) -> None:
    assert rd.dist_env() == rd.DistEnv(0, 1, 0, 1)


def test_dist_env_reads_torchrun(no_torchrun_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4").items():
        no_torchrun_env.setenv(k, v)
    assert rd.dist_env() == rd.DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)
    no_torchrun_env.delenv("LOCAL_WORLD_SIZE")
    assert rd.dist_env().local_world_size == 8


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"RANK": "one"}, "RANK"),
        ({"WORLD_SIZE": "2.0"}, "WORLD_SIZE"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK"),
        ({"LOCAL_WORLD_SIZE": ""}, None),  # empty means unset
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ],
)
def test_dist_env_malformed(
    no_torchrun_env: pytest.MonkeyPatch, env: dict[str, str], name: str | None
) -> None:
    for k, v in env.items():
        no_torchrun_env.setenv(k, v)
    if name is None:
        rd.dist_env()
        return
    with pytest.raises(ValueError, match=name):
        rd.dist_env()


def test_dist_env_is_frozen() -> None:
    env = rd.DistEnv(0, 1, 0, 1)
    with pytest.raises(AttributeError):
        env.rank = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="rank"):
        rd.DistEnv(2, 2, 0, 1)


def test_helpers_without_process_group() -> None:
    if rd.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    assert rd.rank() == 0 and rd.world_size() == 1
    rd.destroy_process_group()  # no-op


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_single_process_is_identity(device: torch.device, dtype: torch.dtype, rows: int) -> None:
    x = torch.arange(rows * 2, device=device).reshape(rows, 2).to(dtype)
    got, recv = rd.all_to_all_v(x, [rows])
    assert got is x and recv == [rows]
    got, recv = rd.all_to_all_v(x, torch.tensor([rows], device=device))
    assert got is x and recv == [rows]
    w = torch.ones(rows, device=device)
    got_list, recv = rd.all_to_all_v_list([x, w], (rows,))
    assert got_list[0] is x and got_list[1] is w and recv == [rows]


def test_init_single_process_group(no_torchrun_env: pytest.MonkeyPatch) -> None:
    if rd.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    try:
        env = rd.init_process_group(backend="gloo")
        assert env == rd.DistEnv(0, 1, 0, 1)
        assert rd.is_initialized() and rd.rank() == 0 and rd.world_size() == 1
        assert rd.init_process_group(backend="gloo") == env
        x = torch.arange(5)
        got, recv = rd.all_to_all_v(x, [5])
        assert got is x and recv == [5]
    finally:
        rd.destroy_process_group()
    assert not rd.is_initialized()


def test_init_needs_rendezvous(no_torchrun_env: pytest.MonkeyPatch) -> None:
    if rd.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    no_torchrun_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rd.init_process_group(backend="gloo")
    assert not rd.is_initialized()


@pytest.mark.parametrize(
    ("splits", "err", "match"),
    [
        ([2, 2], ValueError, "world_size=1"),
        ([3], ValueError, "sum to 3"),
        ([-1], ValueError, ">= 0"),
        ([2.0], TypeError, "ints"),
        ([True], TypeError, "ints"),
        (torch.tensor([2.0]), TypeError, "integers"),
        (torch.tensor([[2]]), ValueError, "1-D"),
        (torch.tensor([5]), ValueError, "sum to 5"),
        (torch.tensor([True]), TypeError, "integers"),
        (2, TypeError, "list of ints"),
    ],
)
def test_bad_splits(splits: object, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        rd.all_to_all_v(torch.zeros(2, 3), splits)  # type: ignore[arg-type]


def test_bad_tensors() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        rd.all_to_all_v(torch.tensor(1.0), [1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        rd.all_to_all_v([1, 2], [2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one tensor"):
        rd.all_to_all_v_list([], [0])
    with pytest.raises(ValueError, match=r"tensors\[1\] has 2 rows"):
        rd.all_to_all_v_list([torch.zeros(3), torch.zeros(2)], [3])


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
