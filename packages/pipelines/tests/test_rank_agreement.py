"""Ranks of a data-parallel Trainer run agree before each step: uneven shares of the data
end the epoch on every rank at the same step (no hang), grad-accumulation remainders of
equal size still train, a stop on one rank stops all, and a rank that dies makes the
others raise RankLostError at once instead of waiting.

Run as a script (``python test_rank_agreement.py RANK WORLD INIT_FILE OUT SCENARIO``) this
file is one gloo rank of those runs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rank_processes import ranks_ended

from recstack.pipelines import Callback, Trainer
from recstack.pipelines.rank_agreement import RankAgreement, RankLostError

THIS = Path(__file__)


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        if step == self.at:
            trainer.should_stop = True


class _DieAt(Callback):
    def __init__(self, step: int) -> None:
        self.at = step

    def on_step_end(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None:
        if step == self.at:
            os._exit(3)  # a crash: no cleanup, no goodbye to the other ranks


def _rank(rank: int, world: int, init: str, out: str, scenario: str) -> None:
    from toys import Toy, toy_data

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(1)
    model = Toy()
    model.net[2].p = 0.0
    data = toy_data(n=64 * 10)
    share = data[rank::world]
    kwargs: dict = {"epochs": 1}
    if scenario == "uneven":
        share = share[: 5 if rank == 0 else 3]
    elif scenario == "accumulation":
        share, kwargs = share[:5], {"grad_accumulation": 2}
    elif scenario == "stop":
        kwargs["callbacks"] = [_StopAt(2)] if rank == 1 else []
    elif scenario == "die":
        kwargs["callbacks"] = [_DieAt(2)] if rank == 1 else []
    trainer = Trainer(
        model, share, device="cpu", progress=False, rank_timeout=60,
        dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.05), **kwargs,
    )  # fmt: skip
    report: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = trainer.fit(resume=False)
            report = {"step": result.step, "stopped_by": result.stopped_by}
        except RankLostError as exc:
            report = {"lost": str(exc)}
    report["warnings"] = [str(w.message) for w in caught]
    report["weight"] = model.net[0].weight.detach().flatten()[:8].tolist()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if "lost" not in report:
        dist.barrier()
        dist.destroy_process_group()


def _run(tmp_path: Path, scenario: str, world: int = 2) -> list[dict]:
    """Every rank's report; a rank exits with 0, but the one the 'die' scenario kills."""
    ended = ranks_ended(
        THIS,
        world,
        lambda r: [str(tmp_path / "init"), str(tmp_path), scenario],
        env={"PYTHONPATH": str(THIS.parent)},
        timeout=240,
    )
    reports = []
    for r, (code, log) in enumerate(ended):
        path = tmp_path / f"rank{r}.json"
        expected = 3 if (scenario, r) == ("die", 1) else 0
        assert code == expected, f"rank {r} exited with {code}:\n{log[-3000:]}"
        reports.append(json.loads(path.read_text()) if path.is_file() else {})
    return reports


@pytest.mark.slow
def test_uneven_shares_end_the_epoch_on_every_rank_at_the_same_step(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "uneven")
    assert r0["step"] == r1["step"] == 3  # rank 1 has 3 batches, rank 0 5
    assert r0["weight"] == r1["weight"]  # the replicas took the same steps
    assert any("another rank's data ran out before step 4" in w for w in r0["warnings"])
    assert not any("ran out" in w for w in r1["warnings"])


@pytest.mark.slow
def test_equal_accumulation_remainders_still_train(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "accumulation")
    assert r0["step"] == r1["step"] == 3  # 5 batches, 2 a step: 2 full steps and 1 partial
    assert r0["weight"] == r1["weight"]


@pytest.mark.slow
def test_a_stop_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "stop")
    assert r0["step"] == r1["step"] == 2
    assert (r0["stopped_by"], r1["stopped_by"]) == ("another rank", "callback")


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_others_fail_with_a_clear_error(tmp_path: Path) -> None:
    r0, _ = _run(tmp_path, "die")  # rank 1 exits with 3
    assert "Trainer rank 0 of 2: lost contact with the other ranks before step 3" in r0["lost"]


def test_an_agreement_needs_a_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="RankAgreement: needs an initialized"):
        RankAgreement()


def test_the_trainer_checks_rank_timeout() -> None:
    from toys import Toy, toy_data

    with pytest.raises(ValueError, match=r"Trainer: rank_timeout must be > 0 seconds, got 0"):
        Trainer(Toy(), toy_data(), device="cpu", progress=False, rank_timeout=0)


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
