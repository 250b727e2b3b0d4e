"""A stand-in for a torch optimizer, whose first construction imports torch._dynamo (about
4 s): ``state_dict()``/``load_state_dict()``, not a module, not a table."""

from __future__ import annotations

from typing import Any


class SGD:
    """An optimizer's state over ``params``, and nothing else.

    Args:
        params: the parameters.
    """

    def __init__(self, params: Any) -> None:
        self.param_groups = [{"params": list(params), "lr": 0.1}]

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": self.param_groups}

    def load_state_dict(self, state: dict) -> None:
        pass
