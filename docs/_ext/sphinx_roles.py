"""A griffe extension: aicortex's docstrings, written with Sphinx roles, read as Markdown.

The docstrings in ``src/`` use reStructuredText's roles (``:class:`AsyncStream```,
``:meth:`~aicortex.AsyncCortex.chat```) and its ``::`` literal-block marker. mkdocstrings
renders docstrings as Markdown, where both would show as written. This extension rewrites
each docstring once, when the package is loaded:

* a role whose target names a public object (a name in ``aicortex.__all__`` and its
  members, or a public module such as ``aicortex.tools.check_models``) becomes an
  optional cross-reference: a link when that object is on a page, plain code otherwise;
* any other role (a private helper) becomes plain code;
* ``text::`` before an indented block becomes ``text:``, and a ``::`` line is dropped
  (the indented block stays a code block).

Docs only: nothing here runs when aicortex is used.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>class|meth|func|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
_CALLABLE_ROLES = {"meth", "func"}


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and ``::`` markers in every docstring of ``aicortex``."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "aicortex":
            return
        public = _public_names(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg, public)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and every object defined under it (aliases left out)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_objects(member))  # type: ignore[arg-type]
    return found


def _public_names(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path → the public path it is documented under (``aicortex._stream.AsyncStream``
    → ``aicortex.AsyncStream``), for the names of ``aicortex.__all__`` and the public modules."""
    names: dict[str, str] = {}
    exported = pkg.exports or []
    for name in exported:
        if not isinstance(name, str) or name not in pkg.members:
            continue
        target = _final(pkg.members[name])
        if target is not None:
            names[target.path] = f"aicortex.{name}"
    for module in ("server", "tools"):
        sub = pkg.members.get(module)
        if sub is None:
            continue
        names[sub.path] = sub.path
        for member_name, member in sub.members.items():
            if member_name.startswith("_"):
                continue
            target = _final(member)
            if target is not None:
                names.setdefault(target.path, f"{sub.path}.{member_name}")
    return names


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if obj.is_alias else obj  # type: ignore[union-attr,return-value]
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _lookup(path: str, pkg: griffe.Module) -> griffe.Object | None:
    if path == "aicortex":
        return pkg
    if not path.startswith("aicortex."):
        return None
    try:
        found = pkg[path.removeprefix("aicortex.")]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return _final(found)


def _resolve(target: str, context: griffe.Object, pkg: griffe.Module) -> griffe.Object | None:
    """The object a role's ``target`` names, read the way Sphinx would from ``context``."""
    scopes = [f"aicortex.{target}"]
    scope: griffe.Object | None = context
    while scope is not None:
        scopes.append(f"{scope.path}.{target}")
        scope = scope.parent  # type: ignore[assignment]
    scopes.insert(0, target)
    for path in scopes:
        found = _lookup(path, pkg)
        if found is not None:
            return found
    return None


def _public_path(obj: griffe.Object, public: dict[str, str]) -> str | None:
    """Where ``obj`` is documented, or None when it is private."""
    parts = obj.path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in public:
            rest = parts[cut:]
            if any(part.startswith("_") for part in rest):
                return None
            return ".".join([public[head], *rest])
    return None


def _rewrite(text: str, context: griffe.Object, pkg: griffe.Module, public: dict[str, str]) -> str:
    def role(match: re.Match[str]) -> str:
        kind, target = match["role"], match["target"].strip()
        shown = target
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", target)
        if explicit:
            shown, target = explicit["title"], explicit["target"]
        elif target.startswith("~"):
            target = target[1:]
            shown = target.rsplit(".", 1)[-1]
        target = target.lstrip(".")
        if not explicit and kind in _CALLABLE_ROLES:
            shown += "()"
        code = f"<code>{html.escape(shown)}</code>"
        found = _resolve(target, context, pkg)
        where = _public_path(found, public) if found is not None else None
        if where is None:
            return f"`{shown}`"
        return f'<autoref identifier="{where}" optional>{code}</autoref>'

    text = _ROLE.sub(role, text)
    lines = []
    for line in text.splitlines():
        if line.strip() == "::":
            continue
        if line.endswith("::"):
            line = line[:-1]
        lines.append(line)
    return "\n".join(lines)
