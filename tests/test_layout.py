"""The package's floors, read from the source's imports: ``core`` below ``workers`` below ``service``, no circles.

``core`` is the algorithm alone (no Ray, no HTTP), ``workers`` may use Ray but never the service, and no module
imports the top-level ``diffinject`` package, whose ``__init__`` is the public API built on them.
"""

import ast
from importlib.metadata import version
from pathlib import Path

import diffinject

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"core": 0, "workers": 1, "service": 2}
SERVING = ("ray", "fastapi", "starlette", "pydantic", "uvicorn")


def modules() -> dict[str, Path]:
    """Every module of the three subpackages, by its installed name."""
    out = {}
    for floor in FLOORS:
        for path in (ROOT / floor).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(["diffinject", *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return out


def imported(name: str, path: Path) -> set[str]:
    """The absolute names ``path`` imports (``from . import x`` resolved against its package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imported(m, p) for m, p in mods.items()}


def test_floors_hold():
    for module, names in graph().items():
        floor = FLOORS[module.split(".")[1]]
        assert "diffinject" not in names, f"{module} imports the top-level package"
        for name in names:
            top = name.split(".")
            if top[0] == "diffinject" and len(top) > 1:
                assert FLOORS[top[1]] <= floor, f"{module} imports {name}, a floor above it"
            if floor == 0:
                assert top[0] not in SERVING, f"core module {module} imports {name}"


def test_no_circles():
    edges = graph()
    mods = set(edges)
    edges = {m: {n for n in names if n in mods and n != m and not n.startswith(m + ".")}
             for m, names in edges.items()}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for n in edges[m]:
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(mods):
        visit(m)


def test_the_graph_is_read():  # the checks above would pass on an empty graph: make sure they saw the real one
    edges = graph()
    assert "diffinject.core.injection" in edges["diffinject.core.stages"]
    assert "ray" in {n.split(".")[0] for n in edges["diffinject.workers.injector"]}


def test_version_is_the_installed_one():
    assert diffinject.__version__ == version("diffinject")
    assert callable(diffinject.make_config) and "diffinject" in diffinject.METHODS
