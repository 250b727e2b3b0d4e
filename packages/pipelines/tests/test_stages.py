"""Multi-stage runs: per-stage data, lengths, learning rates, frozen parts; exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toys import Toy, same, toy_data

from recstack.pipelines import Stage, Trainer
from recstack.saver import Checkpointer


def staged(root: Path | None, **kw) -> tuple[Toy, Trainer]:
    torch.manual_seed(1)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    stages = [
        Stage("warmup", toy_data(seed=1), epochs=2, freeze=["net.0.*"]),
        Stage("main", toy_data(seed=2), max_steps=7, dense_lr=0.01),
        Stage("finetune", toy_data(n=320, seed=3), epochs=1, dense_lr=0.001),
    ]
    trainer = Trainer(
        model, eval_data=toy_data(seed=9), stages=stages, dense_optimizer=opt, device="cpu",
        progress=False, checkpointer=Checkpointer(root, progress=False) if root else None, **kw,
    )  # fmt: skip
    return model, trainer


def test_stages_run_in_order_with_their_settings() -> None:
    model, trainer = staged(None)
    first = model.net[0].weight.detach().clone()
    seen: list[tuple[str, float, bool]] = []
    orig = trainer._train_step

    def spy(micro):
        st = trainer.stages[trainer.stage]
        seen.append((st.name, trainer.dense_optimizer.param_groups[0]["lr"],
                     model.net[0].weight.requires_grad))  # fmt: skip
        orig(micro)

    trainer._train_step = spy  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.step == 20 + 7 + 5
    names = [s[0] for s in seen]
    assert names == ["warmup"] * 20 + ["main"] * 7 + ["finetune"] * 5
    assert all(lr == 0.05 and not grad for n, lr, grad in seen if n == "warmup")
    assert all(lr == 0.01 and grad for n, lr, grad in seen if n == "main")
    assert all(lr == 0.001 for n, lr, _ in seen if n == "finetune")
    assert not torch.equal(first, model.net[0].weight)  # trained after the warm-up


@pytest.mark.parametrize("stop_at", [5, 20, 24, 29])
def test_resume_inside_any_stage_is_exact(tmp_path: Path, stop_at: int) -> None:
    full, trainer = staged(tmp_path / "a")
    trainer.fit()
    _, first = staged(tmp_path / "b")
    first_steps = [0]

    from recstack.pipelines import Callback

    class StopAt(Callback):
        def on_step_end(self, t, step, logs):
            if step == stop_at:
                t.should_stop = True

    first.callbacks.append(StopAt())
    assert first.fit().step == stop_at
    first_steps[0] = stop_at
    resumed, second = staged(tmp_path / "b")
    result = second.fit()
    assert result.resumed_from == stop_at and result.step == 32
    assert same(full, resumed)


def test_stage_errors_name_the_stage() -> None:
    with pytest.raises(ValueError, match="Stage 'x': epochs"):
        Stage("x", [], epochs=0)
    model = Toy()
    trainer = Trainer(model, stages=[Stage("s", toy_data(), freeze=["tower.*"])], device="cpu")
    with pytest.raises(ValueError, match="Trainer stage 's': freeze pattern 'tower.\\*'"):
        trainer.fit()
    with pytest.raises(ValueError, match="either train_data or stages"):
        Trainer(model, toy_data(), stages=[Stage("s", toy_data())])
