"""recstack.pipelines.config.schedule: the built-in LR schedules and torch's by name."""

from __future__ import annotations

import json

import pytest
import torch
from config_testdata import demo_doc

from recstack.pipelines.config import (
    build_scheduler,
    lr_factor,
    parse_config,
)


def test_builtin_schedules() -> None:
    cosine = lr_factor("cosine", 4, 14, 0.1)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(9) == pytest.approx(0.55) and cosine(14) == pytest.approx(0.1)
    assert cosine(100) == pytest.approx(0.1)
    linear = lr_factor("linear", 0, 10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(20) == 0.0
    assert lr_factor("constant", 2, None)(1) == 1.0 and lr_factor("constant", 2, None)(9) == 1.0
    config = parse_config(demo_doc(), overrides=["schedule.type=cosine", "trainer.max_steps=10"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = build_scheduler(config.schedule, opt, config.trainer.max_steps)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5)
    json.dumps(sched.state_dict())  # checkpoints keep it as JSON
    config = parse_config(demo_doc(), overrides=["schedule.type=StepLR", "schedule.step_size=2"])
    assert type(build_scheduler(config.schedule, opt, None)).__name__ == "StepLR"
