"""Options that take one of a few fixed strings: each has a ``Literal`` type (``Precision``,
``GAUCWeighting``, ``OnError``...) and is checked against it at construction, with an error
naming the option and the values it takes."""

from __future__ import annotations

from typing import Any, get_args

__all__ = ["check_choice"]


def check_choice(value: object, name: str, choices: Any) -> Any:
    """``value`` if it is one of the values of the ``Literal`` type ``choices``.

    Args:
        value: the value given.
        name: the option's name as the user would look for it (``"Trainer: precision"``).
        choices: a ``Literal[...]`` type.

    Raises:
        ValueError: another value: ``"<name> must be 'a', 'b' or 'c', got 'x'"``.

    Examples:
        >>> from typing import Literal
        >>> check_choice("max", "EarlyStopping: mode", Literal["max", "min"])
        'max'
    """
    allowed = get_args(choices)
    if value not in allowed:
        quoted = [repr(a) for a in allowed]
        options = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise ValueError(f"{name} must be {options}, got {value!r}")
    return value
