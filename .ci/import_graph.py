"""Measure jdeq's import graph: modules, levels, cycles, imports running back up a level, private names imported.

Run from the repository root: ``python .ci/import_graph.py [--list]``. Every ``import``/``from ... import``
inside ``jdeq/`` counts, also those inside functions (deferred imports still couple the modules).

- levels: the longest chain of imports (a module that imports nothing from jdeq is on level 1).
- cycles: strongly connected groups of more than one module.
- back up: an import from inside a subpackage to a module outside it that itself (transitively) imports
  the subpackage: the package-level cycle that makes a subpackage not a layer.
- private names: ``from M import _name`` with ``M`` another module; private modules: a ``_module`` imported
  from outside the package that holds it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted((ROOT / "jdeq").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def package_of(name: str, modules: dict[str, Path]) -> str:
    return name if modules[name].name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(target module, imported names)`` of every jdeq import in ``name``."""
    found = []
    for node in ast.walk(ast.parse(modules[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "jdeq"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(name, modules).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "jdeq":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            found += [(m, []) for m in submodules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not submodules:
                found.append((target, rest))
    return [(t, n) for t, n in found if t in modules]


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def main(show: bool) -> dict[str, int]:
    modules = module_names()
    edges = {m: imports(m, modules) for m in modules}
    graph = {m: {t for t, _ in edges[m] if t != m} for m in modules}
    reach = {m: reaches(graph, m) for m in modules}
    cyclic = {m for m in modules if m in reach[m]}
    groups = {frozenset(n for n in reach[m] if m in reach[n]) for m in cyclic}

    level: dict[str, int] = {}

    def depth(m: str) -> int:
        if m not in level:
            level[m] = 0  # a cycle would recurse: counted above, cut here
            level[m] = 1 + max((depth(t) for t in graph[m] if t not in cyclic or m not in reach[t]), default=0)
        return level[m]

    levels = max(map(depth, modules))
    back_up, private_names, private_modules = [], [], []
    for m in modules:
        package = package_of(m, modules)
        for target, names in edges[m]:
            inside = target == package or target.startswith(package + ".")
            if package != "jdeq" and not inside:
                if any(n == package or n.startswith(package + ".") for n in reach[target]):
                    back_up.append(f"{m} -> {target}")
            private_names += [f"{m}: from {target} import {n}" for n in names if n.startswith("_") and target != m]
            last = target.rpartition(".")[2]
            holder = target.rpartition(".")[0]
            if last.startswith("_") and not last.startswith("__") and not (package + ".").startswith(holder + "."):
                private_modules.append(f"{m} -> {target}")
    numbers = {
        "modules": len(modules),
        "levels": levels,
        "cycles": len(groups),
        "back_up": len(back_up),
        "private_names": len(private_names),
        "private_modules_from_outside": len(private_modules),
    }
    print(", ".join(f"{k}: {v}" for k, v in numbers.items()))
    if show:
        for title, rows in [
            ("cycles", [" <-> ".join(sorted(g)) for g in groups]),
            ("back up", back_up),
            ("private names", private_names),
            ("private modules", private_modules),
        ]:
            for row in rows:
                print(f"  {title}: {row}")
    return numbers


if __name__ == "__main__":
    main("--list" in sys.argv)
