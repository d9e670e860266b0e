"""The floors of the house: each imports only the floors below it, every import at the top of its file.

Floors, bottom to top (``FLOORS``; docs/architecture.md draws them with their import counts, from
:func:`render_floors`):

0. errors, atomic file writing and the version: ``surgeon/diagnostics.py``, ``surgeon/atomic.py``, ``surgeon/_version.py``
1. ``grammar/``: text -> rules (no torch; it defines what a method signature is, the registry fills its table)
2. ``kernels/``: fused kernels and the quantized ops (no graphs, no rules)
3. ``surgeon/methods/``: one folder per method, the one registry
4. ``surgeon/capture/``: models, export, sites, roles, the capture cache
5. ``surgeon/planning/``: rules x sites -> a plan
6. ``passes/``: insert, lower, fold
7. ``surgeon/checkpoints/``: the file formats (PEFT folders, merged checkpoints, programs) on plain data
8. ``surgeon/compiled/``: the compiled runtime
9. the API: ``surgeon/api.py``, ``surgeon/artifacts.py`` and the rule builders of two commands
10. the CLI, the only place that prints

``surgeon/__init__.py`` is the public face above every floor: it names the API by module name, lazily.

The test reads every module's imports with ``ast`` (those inside functions too) and fails on one that
points up a floor, one that is not at the top of its file, and one that closes a cycle between modules or
between floors. A module named in a string (``importlib.import_module`` by name, where the command line
defers torch) is an import too, as far as floors go: it must point down or along. ``from package import
submodule`` imports the submodule, not the package's ``__init__``.

Run ``python tests/test_floors.py --write`` to redraw the figure in docs/architecture.md.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import NamedTuple

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"surgeon": ROOT / "surgeon", "surgeon.grammar": ROOT / "grammar",
            "surgeon.passes": ROOT / "passes", "surgeon.kernels": ROOT / "kernels"}
ARCHITECTURE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- floors: begin (python tests/test_floors.py --write) -->", "<!-- floors: end -->"

# (floor, name, module prefixes): a module is on the floor of its longest prefix (a package prefix covers its modules).
FLOORS = (
    (0, "errors/io/runtime", ("surgeon.diagnostics", "surgeon.atomic", "surgeon._version", "surgeon.runtime")),
    (1, "grammar", ("surgeon.grammar",)),
    (2, "kernels", ("surgeon.kernels",)),
    (3, "methods", ("surgeon.methods",)),
    (4, "capture", ("surgeon.capture",)),
    (5, "planning", ("surgeon.planning",)),
    (6, "passes", ("surgeon.passes",)),
    (7, "checkpoints", ("surgeon.checkpoints",)),
    (8, "compiled", ("surgeon.compiled",)),
    (9, "API", ("surgeon.api", "surgeon.artifacts", "surgeon.merge_statements", "surgeon.portable_rules")),
    (10, "CLI", ("surgeon.cli", "surgeon.cli_common", "surgeon.cli_check", "surgeon.cli_model", "surgeon.cli_artifacts",
                 "surgeon._render")),
)
TOP = "surgeon"  # the public face (surgeon/__init__.py)
_FLOOR_OF_PREFIX = {prefix: floor for floor, _, prefixes in FLOORS for prefix in prefixes}
_NAMES = {floor: name for floor, name, _ in FLOORS}


class Edge(NamedTuple):
    """One import: ``source`` imports ``target`` at ``line``; ``at_top``: a statement of the module's body;
    ``by_name``: the target is named in a string (loaded with importlib at run time)."""

    source: str
    target: str
    line: int
    at_top: bool
    by_name: bool = False


def modules(packages: dict = PACKAGES) -> dict[str, Path]:
    """Every module of the packages: dotted name -> file."""
    found = {}
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def floor_of(module: str) -> int:
    if module == TOP:
        return 99
    best = max((p for p in _FLOOR_OF_PREFIX if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} is on no floor: add it to FLOORS in tests/test_floors.py"
    return _FLOOR_OF_PREFIX[best]


def _resolved(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - node.level + 1]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: dict) -> list[Edge]:
    """Each import of ``module`` that reaches a surgeon module, as an :class:`Edge` to the module it loads."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []

    def add(target: str, node, by_name: bool = False) -> None:
        if target != "surgeon" and not target.startswith("surgeon."):
            return
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target != module and target in known:
            found.append(Edge(module, target, node.lineno, id(node) in top, by_name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = _resolved(module, path, node)
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            for target in submodules:
                add(target, node)
            if len(submodules) < len(node.names):  # a name the package's __init__ defines
                add(base, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known and "." in node.value:
            add(node.value, node, by_name=True)  # ("surgeon" alone is the program's name more often than a module)
    return found


def edges(known: dict | None = None) -> tuple[dict, list[Edge]]:
    known = modules() if known is None else known
    return known, [edge for module, path in known.items() for edge in imports(module, path, known)]


def _relative(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # a file of the probe's made-up package
        return path.name


# --- the checks (each returns the violations it finds, so the probe below can run them on a made-up tree) ---------


def upward(known: dict, found: list[Edge]) -> list[str]:
    return [f"{_relative(known[e.source])}:{e.line}: {e.source} (floor {floor_of(e.source)}) "
            f"{'names' if e.by_name else 'imports'} {e.target} (floor {floor_of(e.target)})"
            for e in found if floor_of(e.target) > floor_of(e.source)]


def inner(known: dict, found: list[Edge]) -> list[str]:
    return [f"{_relative(known[e.source])}:{e.line}: imports {e.target} inside a function or block"
            for e in found if not e.at_top and not e.by_name]


def module_cycles(found: list[Edge]) -> list[str]:
    """Cycles of imports (names in strings aside: they are loaded after both modules are)."""
    graph = nx.DiGraph((e.source, e.target) for e in found if not e.by_name)
    return [_cycle(cycle) for cycle in nx.simple_cycles(graph)]


def _cycle(cycle: list) -> str:
    """A cycle written from its smallest member round to it again, so that each one has one spelling."""
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    return " -> ".join(str(node) for node in [*cycle, cycle[0]])


def floor_cycles(found: list[Edge]) -> list[str]:
    """Coarser than the module graph: floor to floor (a floor's own modules may import one another)."""
    graph = nx.DiGraph((floor_of(e.source), floor_of(e.target)) for e in found if floor_of(e.source) != floor_of(e.target))
    return [_cycle(cycle) for cycle in nx.simple_cycles(graph)]


def test_every_module_is_on_a_floor():
    for module in modules():
        floor_of(module)


def test_no_import_points_up_a_floor():
    violations = upward(*edges())
    assert not violations, "\n".join(violations)


def test_no_import_hides_inside_a_function():
    violations = inner(*edges())
    assert not violations, "\n".join(violations)


def test_no_two_modules_import_each_other():
    _, found = edges()
    violations = module_cycles(found)
    assert not violations, "\n".join(violations[:20])


def test_no_two_floors_import_each_other():
    _, found = edges()
    violations = floor_cycles(found)
    assert not violations, "\n".join(violations)


def test_the_checks_see_what_they_forbid(tmp_path):
    """The reader is not blind: on a made-up package, an upward import (relative or absolute, at the top or in a
    function, or by name), an import inside a function and a cycle are each reported; ``from package import
    submodule`` is not an import of the package."""
    folder = tmp_path / "surgeon"
    for name, text in {
        "__init__.py": "",
        "cli.py": "import importlib\n",
        "capture/__init__.py": "",
        "capture/probe.py": (
            "import os\n"
            "from surgeon.capture import sites\n"
            "def f():\n"
            "    from ..compiled.model import Compiled\n"
            "    import surgeon.cli\n"
            "LATER = 'surgeon.cli'\n"
        ),
        "capture/sites.py": "from surgeon.capture.cache import load\n",
        "capture/cache.py": "from surgeon.capture import sites\n",
        "compiled/__init__.py": "",
        "compiled/model.py": "from surgeon.capture.probe import f\n",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    known, found = edges(modules({"surgeon": folder}))
    probe = [e for e in found if e.source == "surgeon.capture.probe"]
    assert Edge("surgeon.capture.probe", "surgeon.compiled.model", 4, False) in probe
    assert Edge("surgeon.capture.probe", "surgeon.cli", 5, False) in probe
    assert any(e.target == "surgeon.cli" and e.line == 6 and e.by_name for e in probe)
    assert not any(e.target == "surgeon.capture" for e in probe)  # `from surgeon.capture import sites` reads sites
    assert len(upward(known, found)) == 3
    assert inner(known, found) == ["probe.py:4: imports surgeon.compiled.model inside a function or block",
                                   "probe.py:5: imports surgeon.cli inside a function or block"]
    assert sorted(module_cycles(found)) == sorted([
        "surgeon.capture.cache -> surgeon.capture.sites -> surgeon.capture.cache",
        "surgeon.capture.probe -> surgeon.compiled.model -> surgeon.capture.probe"])
    assert floor_cycles(found) == ["4 -> 8 -> 4"]


# --- the figure of docs/architecture.md ---------------------------------------------------------------------------


def floor_counts(found: list[Edge] | None = None) -> dict[tuple[int, int], int]:
    """(from floor, to floor) -> number of imports between them (by name or not; the face aside)."""
    if found is None:
        _, found = edges()
    counts: dict = {}
    for e in found:
        key = (floor_of(e.source), floor_of(e.target))
        if key[0] != key[1] and e.source != TOP:
            counts[key] = counts.get(key, 0) + 1
    return counts


def _places(prefixes) -> str:
    """Where a floor lives: its folders (``grammar/``) and its files, those of one folder after its name once."""
    known = modules()
    folders, files = [], {}
    for prefix in prefixes:
        path = _relative(known[prefix])
        if path.endswith("/__init__.py"):
            folders.append(path[: -len("__init__.py")])
        else:
            folder, _, name = path.rpartition("/")
            files.setdefault(folder + "/", []).append(name)
    return ", ".join(folders + [f"{folder}: {', '.join(names)}" for folder, names in files.items()])


def render_floors() -> str:
    """The floors, top down: where each lives and how many imports reach each floor below it; then the totals."""
    known, found = edges()
    counts = floor_counts(found)
    lines = []
    for floor, name, prefixes in reversed(FLOORS):
        lines.append(f"{floor:>2} {name:<12} {_places(prefixes)}")
        below = sorted(((to, n) for (start, to), n in counts.items() if start == floor), reverse=True)
        if below:
            lines.append(f"{'':<16}-> " + ", ".join(f"{_NAMES[to]} {n}" for to, n in below))
    up, hidden, cycles = len(upward(known, found)), len(inner(known, found)), len(module_cycles(found))
    lines.append(f"{sum(counts.values())} imports between floors; {up} pointing up, {hidden} inside a function, "
                 f"{cycles} cycle{'s' if cycles != 1 else ''}.")
    return "\n".join(lines)


def _figure() -> str:
    return f"{BEGIN}\n```text\n{render_floors()}\n```\n{END}"


def test_the_architecture_page_draws_the_floors_as_they_are():
    text = ARCHITECTURE.read_text()
    assert BEGIN in text and END in text, f"docs/architecture.md lacks the markers {BEGIN!r} ... {END!r}"
    drawn = text[text.index(BEGIN): text.index(END) + len(END)]
    assert drawn == _figure(), f"the floors changed: run python tests/test_floors.py --write\n{render_floors()}"


def test_the_public_face_names_what_its_modules_define():
    """Every lazy name of ``surgeon/__init__.py`` is defined by the module it names (no stale path after a move)."""
    import surgeon

    for name, module in surgeon._EXPORTS.items():
        assert floor_of(module) <= 10, module
        assert hasattr(importlib.import_module(module), name), f"{module} defines no {name}"
        assert getattr(surgeon, name) is getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        text = ARCHITECTURE.read_text()
        ARCHITECTURE.write_text(text[: text.index(BEGIN)] + _figure() + text[text.index(END) + len(END):])
    print(render_floors())
