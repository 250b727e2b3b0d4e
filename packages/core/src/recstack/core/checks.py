"""Argument checks shared by every package: one message shape for a bad option.

A bad value raises at construction with the option's qualified name (``Checkpointer:
part_bytes``, ``SyntheticCTRConfig.rows``), the accepted range and the value given, so a
mistake in a run configuration names what to fix.
"""

from __future__ import annotations

import operator

__all__ = ["check_int"]


def check_int(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as a Python int, if it is an integer (not a bool) in ``[minimum, maximum]``.

    Anything with ``__index__`` counts as an integer (NumPy and 0-d torch integers too).

    Args:
        value: the value given.
        name: the option's name as the user would look for it, for the message.
        minimum: the smallest allowed value (``None``: no bound).
        maximum: the largest allowed value (``None``: no bound).

    Raises:
        TypeError: ``value`` is not an integer (a bool, a float, a string...).
        ValueError: ``value`` is outside the range.

    Examples:
        >>> check_int(8, "Checkpointer: threads", minimum=1)
        8
        >>> check_int(0, "Checkpointer: threads", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: Checkpointer: threads must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    result = operator.index(value)
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        raise ValueError(f"{name} must be an int {' and '.join(bounds)}, got {result}")
    return result
