"""The kernel backend switch: per-device choice, forcing, env default, launch counting."""

from __future__ import annotations

import threading

import pytest
import torch

from recstack.core import kernels


def test_auto_follows_device_and_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    with kernels.use_backend("auto"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert kernels.use_triton(cpu) is False
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.use_triton(cpu) is kernels.HAS_TRITON
        if torch.cuda.is_available():
            assert kernels.use_triton(cpu.cuda()) is kernels.HAS_TRITON


def test_forcing_restores_previous_choice() -> None:
    before = kernels.get_backend()
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
        assert kernels.use_triton(torch.zeros(1)) is False
        with kernels.use_backend("auto"):
            assert kernels.get_backend() == "auto"
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == before


def test_forcing_is_per_thread() -> None:
    seen: list[str] = []
    with kernels.use_backend("torch"):
        thread = threading.Thread(target=lambda: seen.append(kernels.get_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_env_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTACK_KERNELS", "torch")
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv("RECSTACK_KERNELS", "fast")
    with pytest.raises(ValueError, match="RECSTACK_KERNELS='fast'"):
        kernels.get_backend()


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.set_backend("cuda")  # type: ignore[arg-type]


def test_forced_triton_that_cannot_run_names_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with (
        kernels.use_backend("triton"),
        pytest.raises(RuntimeError, match="gather_rows: the Triton backend was forced"),
    ):
        kernels.use_triton(torch.zeros(1), op="gather_rows")


def test_count_launches_nests_and_counts_live() -> None:
    with kernels.count_launches() as outer:
        kernels.record_launch("a")
        assert outer == {"a": 1}
        with kernels.count_launches() as inner:
            kernels.record_launch("b", 2)
        assert inner == {"b": 2}
        kernels.record_launch("a")
    assert outer == {"a": 2, "b": 2}
    kernels.record_launch("c")  # outside any block: not counted anywhere
    assert "c" not in outer


def test_count_launches_counts_other_threads() -> None:
    # Autograd runs a CUDA backward pass in a device thread of its own.
    import threading

    with kernels.count_launches() as outer, kernels.count_launches() as inner:
        worker = threading.Thread(target=kernels.record_launch, args=("bwd",))
        worker.start()
        worker.join()
    assert outer == {"bwd": 1} and inner == {"bwd": 1}
    with kernels.count_launches() as later:
        pass
    assert later == {}  # both blocks left the active list, equal counters included


def test_interpreted_kernels_run_from_two_threads() -> None:
    # Triton's interpreter swaps triton.language functions process-wide while a kernel
    # runs; recstack serializes interpreted launches so threads cannot undo each other.
    if not (kernels.HAS_TRITON and kernels.interpret_mode()):
        pytest.skip("needs TRITON_INTERPRET=1")
    from recstack.core.kernels.hash import fmix64, fmix64_reference

    x = torch.arange(-3000, 3000, dtype=torch.int64)
    want = fmix64_reference(x)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with kernels.use_backend("triton"):
                for _ in range(6):
                    assert torch.equal(fmix64(x), want)
        except BaseException as exc:  # reported on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_backward_runs_under_the_forwards_backend_in_any_thread() -> None:
    # Autograd runs a CUDA backward in a device thread of its own; here a thread stands in.
    seen: list[str] = []

    @kernels.carry_backend
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            seen.append(kernels.get_backend())
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    for forced in ("torch", "triton"):
        x = torch.tensor([1.5, -2.0], requires_grad=True)
        with kernels.use_backend(forced):
            y = Square.apply(x).sum()
        thread = threading.Thread(target=y.backward)
        thread.start()
        thread.join()
        assert x.grad.tolist() == [3.0, -4.0]
    assert seen == ["torch", "triton"]
    assert kernels.get_backend() == "auto"
