"""The one error a run configuration raises: where (file, key path) and what."""

from __future__ import annotations

__all__ = ["ConfigError", "Invalid"]


class ConfigError(ValueError):
    """An invalid run configuration.

    The message reads ``<file>: <key path>: <what is wrong>``, e.g.
    ``demo.yaml: model.mlp_hiden: unknown key (did you mean 'mlp_hidden'?)``.

    Args:
        message: what is wrong.
        file: the configuration file (``None`` for a mapping given in Python).
        key: the full dotted key path, list items as ``[i]`` (``"tasks[0].label"``);
            ``None`` for the whole document.

    Attributes:
        file: the configuration file, or ``None``.
        key: the key path, or ``None``.
        reason: the message without the file and key.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file, self.key, self.reason = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class Invalid(ValueError):
    """Raised by a section's checks; the parser turns it into a :class:`ConfigError` at
    the section's key path (plus ``key`` below it, when given).

    Args:
        message: what is wrong.
        key: the key below the section that is wrong (dotted), or ``None``.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message, self.key = message, key
