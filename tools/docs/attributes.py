"""Griffe extensions for module and class attributes, as the sources write them.

``DocComments``: the packages document constants and class attributes the way Sphinx's
autodoc reads them, with ``#:`` comment lines right above the assignment::

    #: The formats ColumnIO reads, by the name ``format=`` takes.
    FORMATS = ("parquet", "orc", "ipc")

Griffe only knows docstrings written as a string below the assignment, so without this
extension such attributes count as undocumented and the reference (which hides what
has no docstring) drops them. Every attribute that has no docstring but has ``#:``
lines directly above it gets those lines as its docstring.

``PrivateValues``: the reference shows an attribute's initial value next to its name,
which is useful for constants. A sentinel built from a private class
(``MISSING: Any = _Missing()``) would put a private name on the page, though, and
readers can do nothing with it: the value of every attribute whose value expression
names an underscore-prefixed object is dropped, so it renders as ``MISSING: Any``.

Both run once a package is fully loaded. Load them through mkdocstrings' ``extensions``
option, before ``sphinx_roles`` so the roles in doc-comments are rewritten too (see
``mkdocs.yml``).
"""

from __future__ import annotations

from typing import Any

import griffe

MARKER = "#:"
"""How a doc-comment line starts (after indentation)."""


class DocComments(griffe.Extension):
    """Give undocumented attributes the ``#:`` comment above them as their docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Attach doc-comments to the attributes of ``pkg`` once it is fully loaded.

        Args:
            pkg: The package griffe just finished loading.
            loader: The loader, whose docstring parser the new docstrings use.
            **kwargs: Further hook arguments (unused; griffe passes them for forward
                compatibility).
        """
        for attr in attributes(pkg):
            if attr.docstring is not None or attr.lineno is None:
                continue
            try:
                lines = attr.lines_collection[attr.filepath]
            except (KeyError, TypeError):
                continue
            comment = comment_above(lines, attr.lineno)
            if comment:
                attr.docstring = griffe.Docstring(
                    comment,
                    lineno=attr.lineno,
                    endlineno=attr.lineno,
                    parent=attr,
                    parser=loader.docstring_parser,
                    parser_options=loader.docstring_options,
                )


def attributes(obj: griffe.Object) -> list[griffe.Attribute]:
    """Every attribute defined in ``obj``'s tree (aliases are not followed).

    Args:
        obj: The root of the tree.
    """
    found: list[griffe.Attribute] = []
    for member in obj.members.values():
        if member.is_alias:
            continue
        if isinstance(member, griffe.Attribute):
            found.append(member)
        else:
            found.extend(attributes(member))
    return found


def comment_above(lines: list[str], lineno: int) -> str:
    """The text of the ``#:`` lines directly above line ``lineno`` (1-based), or ``""``.

    Args:
        lines: The source file's lines.
        lineno: The line the assignment starts on.
    """
    block: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].lstrip().startswith(MARKER):
        text = lines[index].lstrip()[len(MARKER) :]
        block.append(text.removeprefix(" "))
        index -= 1
    return "\n".join(reversed(block))


class PrivateValues(griffe.Extension):
    """Hide attribute values that mention private names."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Drop the values that name private objects in ``pkg``'s attributes.

        Args:
            pkg: The package griffe just finished loading.
            loader: The loader in use (unused).
            **kwargs: Further hook arguments (unused; griffe passes them for forward
                compatibility).
        """
        for attr in attributes(pkg):
            if names_private(attr.value):
                attr.value = None


def names_private(value: str | griffe.Expr | None) -> bool:
    """Whether an attribute's value expression names an underscore-prefixed object.

    Args:
        value: The value as griffe parsed it (an expression, or a plain string).
    """
    if not isinstance(value, griffe.Expr):
        return False
    for element in value.iterate(flat=True):
        if isinstance(element, griffe.ExprName):
            name = element.name
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                return True
    return False
