"""Griffe extension: Sphinx cross-reference roles in docstrings become API links.

The packages' docstrings cross-reference each other the Sphinx way (``:class:`X```,
``:func:`~a.b.f```, ``:meth:`Trainer.fit```, ``:mod:`a.b```, ...). mkdocstrings renders
Markdown, where those roles would show up as literal text. Once a package is loaded, this
extension rewrites every role in every docstring into an autorefs cross-reference whose
identifier is the target's canonical path, resolved the way Sphinx reads the role:

- ``~a.b.C`` shows ``C``; ``Title <a.b.C>`` shows ``Title``; anything else shows the
  target as written; ``:func:`` and ``:meth:`` targets without an explicit title get
  ``()`` appended, as Sphinx shows them.
- The first dotted component is looked up in the docstring's scope (the object, its
  class's bases, its module, up to the package), so names the module imports or defines,
  and siblings of a method in its class, resolve like Python would.
- A name that is not in scope resolves to the object of the package with that name and
  a kind matching the role that sits nearest in the package tree, when one is nearest;
  otherwise the target is taken as an absolute path (``recstack.core.PagedTensor``,
  ``collections.Counter``).

The reference is emitted as mkdocs-autorefs' ``<autoref identifier=... optional>``
element, the form mkdocstrings-python itself uses for type annotations. Markdown's
``[title][identifier]`` syntax has no way to say "optional", and whether a target is
rendered somewhere is only known once every page is rendered: an optional reference
becomes a link when some page (or an objects.inv inventory) defines the identifier and
stays plain code otherwise, so ``mkdocs build --strict`` never fails on a docstring that
mentions an undocumented helper.

Load it through mkdocstrings' ``extensions`` option (see ``mkdocs.yml``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`"
)
"""A Sphinx Python-domain role: ``:class:`Target```, optionally ``:py:``-prefixed."""

EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
"""The ``Title <target>`` form of a role's body."""

ESCAPED_SPACE = re.compile(r"(?:(?<=`)|(?<=</autoref>))\\ ")
"""reST's escaped space after inline markup (``SparseParameter``\\ s reads "SparseParameters");
Markdown has none, so it is dropped."""

CALLABLE_ROLES = frozenset({"func", "meth"})
"""Roles whose displayed title ends with ``()``, as Sphinx shows them."""

ROLE_KINDS: dict[str, frozenset[griffe.Kind]] = {
    "class": frozenset({griffe.Kind.CLASS}),
    "exc": frozenset({griffe.Kind.CLASS}),
    "func": frozenset({griffe.Kind.FUNCTION}),
    "meth": frozenset({griffe.Kind.FUNCTION}),
    "mod": frozenset({griffe.Kind.MODULE}),
    "data": frozenset({griffe.Kind.ATTRIBUTE}),
    "attr": frozenset({griffe.Kind.ATTRIBUTE}),
    "const": frozenset({griffe.Kind.ATTRIBUTE}),
    "obj": frozenset(griffe.Kind),
}
"""Which object kinds a role may name, for the package-wide fallback lookup."""

CONTAINER_KINDS = frozenset({griffe.Kind.CLASS, griffe.Kind.MODULE})
"""What the first component of a dotted target (``Trainer`` in ``Trainer.fit``) may be."""

_LOOKUP_ERRORS = (KeyError, IndexError, griffe.AliasResolutionError, griffe.CyclicAliasError)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in the docstrings of every loaded package into autorefs."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the docstrings of ``pkg`` once its whole object tree is loaded.

        Args:
            pkg: The package griffe just finished loading.
            loader: The loader, whose modules collection resolves absolute paths.
            **kwargs: Further hook arguments (unused; griffe passes them for forward
                compatibility).
        """
        objects = list(walk(pkg))
        index = name_index(objects)
        for obj in objects:
            if obj.docstring is None:
                continue
            if ROLE.search(obj.docstring.value):
                obj.docstring.value = rewrite(obj.docstring.value, obj, loader, index)
            obj.docstring.value = ESCAPED_SPACE.sub("", obj.docstring.value)


def walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    """Yield ``obj`` and every object it defines (aliases are skipped: they share docstrings).

    Args:
        obj: The root of the tree to walk.
    """
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from walk(member)


def name_index(objects: list[griffe.Object]) -> dict[str, list[griffe.Object]]:
    """Map each short name to the objects of the package that carry it.

    Args:
        objects: Every object defined in the package.
    """
    index: dict[str, list[griffe.Object]] = defaultdict(list)
    for obj in objects:
        index[obj.name].append(obj)
    return index


def rewrite(
    text: str,
    obj: griffe.Object,
    loader: griffe.GriffeLoader,
    index: dict[str, list[griffe.Object]],
) -> str:
    """Replace every Sphinx role in ``text`` with an optional autorefs cross-reference.

    Args:
        text: A docstring.
        obj: The object the docstring belongs to (the scope relative names resolve in).
        loader: The loader whose modules collection canonicalizes resolved paths.
        index: The package's objects by short name (see :func:`name_index`).
    """

    def replace(match: re.Match[str]) -> str:
        role, body = match["role"], match["body"].strip()
        explicit = EXPLICIT_TITLE.match(body)
        target = (explicit["target"] if explicit else body).strip()
        short = target.startswith("~")
        # A role's target may wrap onto the next docstring line.
        target = re.sub(r"\s+", "", target).lstrip("~.").removesuffix("()")
        if explicit:
            title = explicit["title"]
        elif short:
            title = target.rpartition(".")[2]
        else:
            title = target
        if role in CALLABLE_ROLES and not explicit and not title.endswith(")"):
            title += "()"
        identifier = canonical(resolve(target, role, obj, index), loader)
        return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'

    return ROLE.sub(replace, text)


def resolve(
    target: str, role: str, obj: griffe.Object, index: dict[str, list[griffe.Object]]
) -> str:
    """The full path a role's target names, seen from ``obj``'s docstring.

    Args:
        target: The role's target without ``~`` (``Trainer.fit``, ``recstack.core.X``).
        role: The role's name (``class``, ``meth``, ...), used by the package-wide lookup.
        obj: The object whose docstring holds the role.
        index: The package's objects by short name.
    """
    head, _, rest = target.partition(".")
    base = in_scope(head, obj)
    if base is None:
        kinds = ROLE_KINDS[role] if not rest else CONTAINER_KINDS
        base = nearest([o.path for o in index.get(head, ()) if o.kind in kinds], obj.path)
    if base is None:
        return target
    return f"{base}.{rest}" if rest else base


def nearest(paths: list[str], origin: str) -> str | None:
    """The one path in ``paths`` closest to ``origin`` in the package tree, if unique.

    Closeness is the number of leading dotted components shared with ``origin``: a
    ``Column`` mentioned in ``recstack.columnio`` means columnio's own ``Column``.

    Args:
        paths: Candidate paths carrying the wanted name.
        origin: The path of the object whose docstring holds the reference.
    """
    if not paths:
        return None
    parts = origin.split(".")

    def shared(path: str) -> int:
        count = 0
        for mine, theirs in zip(parts, path.split("."), strict=False):
            if mine != theirs:
                break
            count += 1
        return count

    best = max(shared(p) for p in paths)
    closest = {p for p in paths if shared(p) == best}
    return closest.pop() if len(closest) == 1 else None


def in_scope(name: str, obj: griffe.Object) -> str | None:
    """The path ``name`` refers to from ``obj``: its members, its class's, its module's.

    Args:
        name: One identifier (no dots).
        obj: The innermost scope.
    """
    scope: griffe.Object | None = obj
    while scope is not None:
        if scope.name == name and not scope.is_module:
            return scope.path
        member = member_of(scope, name)
        if member is not None:
            return member.target_path if member.is_alias else member.path
        scope = scope.parent
    return None


def member_of(scope: griffe.Object, name: str, depth: int = 0) -> Any:
    """``scope``'s member ``name``, looking through a class's bases; ``None`` if absent.

    Args:
        scope: A module, class, function or attribute.
        name: The member's name.
        depth: How many base classes deep the lookup already is (stops runaway chains).
    """
    if name in scope.members:
        return scope.members[name]
    if not scope.is_class or depth > 8:
        return None
    for base in scope.bases:
        path = base.canonical_path if isinstance(base, griffe.Expr) else str(base)
        try:
            base_obj = scope.modules_collection[path]
        except _LOOKUP_ERRORS:
            continue
        if base_obj.is_class:
            found = member_of(base_obj, name, depth + 1)
            if found is not None:
                return found
    return None


def canonical(path: str, loader: griffe.GriffeLoader) -> str:
    """Where the object at ``path`` is defined, when it is loaded; ``path`` otherwise.

    Autorefs knows each rendered object by its canonical path, so any import path of a
    documented object (``recstack.core.JaggedTensor``, or a module that imports it) links.

    Args:
        path: A dotted path, possibly through re-exports.
        loader: The loader holding the loaded packages.
    """
    try:
        return loader.modules_collection[path].canonical_path
    except _LOOKUP_ERRORS:
        return path
