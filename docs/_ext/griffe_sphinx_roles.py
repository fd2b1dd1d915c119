"""A griffe extension for the API reference: jdeq's docstrings name objects with Sphinx roles
(``:class:`Stats```, ``:func:`jdeq.fixed_point```), which mkdocstrings would print as written.

Each role becomes an optional cross-reference (``<autoref ... optional>``): a link when the name is
rendered somewhere in the reference, plain code otherwise (optional references never warn).
Names are resolved in the scope of the object whose docstring holds them, as Python would.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")


def identifier(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` seen from ``obj`` (as written when it cannot be resolved)."""
    name = name.removesuffix("()")
    if name.startswith("jdeq.") or name == "jdeq":
        return name
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except Exception:  # noqa: BLE001 - any failure: leave the name as written
        return name
    return f"{path}.{rest}" if rest else path


def rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match) -> str:
        name = match.group(1)
        title = html.escape(name)
        return f'<autoref identifier="{html.escape(identifier(obj, name))}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)
