"""The package's layers: no module imports from a layer above its own, and no import cycles.

Module names come from the folders alone: core/ is the source root, so the file
core/handoff/protocol/keys.py is the module handoff.protocol.keys. The layers, lowest
first, are named in each subpackage's docstring. handoff/__init__.py and __main__.py (the
public face) may import anything.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = ROOT / "core"

# (module prefix, layer); the longest matching prefix decides.
LAYERS: dict[str, int] = {
    "handoff.config": 0,
    "handoff.errors": 0,
    "handoff.backoff": 0,
    "handoff.connection": 1,
    "handoff.protocol": 2,
    "handoff.runtime": 3,
    "handoff.observe": 4,
    "handoff.client": 5,
    "handoff.async_client": 5,
    "handoff.producing": 5,
    "handoff.bench": 6,
    "handoff.cli": 7,
    "handoff.testing": 7,
    "handoff.__main__": 8,
    "handoff": 8,  # the package's __init__: the public interface
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def modules_under(source_root: Path) -> dict[str, Path]:
    """Module name -> file: a file's path under the source root is its import name."""
    modules: dict[str, Path] = {}
    for path in (source_root / "handoff").rglob("*.py"):
        parts = list(path.relative_to(source_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every handoff module `module` imports (absolute or relative):
    `from handoff.x import y` counts as handoff.x.y when that is a module, else handoff.x."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {n for n in names if n in modules}


def upward_imports(source_root: Path) -> list[str]:
    modules = modules_under(source_root)
    found = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for target in sorted(imported(module, path, modules)):
            if layer_of(target) > own:
                found.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target)})")
    return found


def import_cycles(source_root: Path) -> list[list[str]]:
    """Cycles among the package's imports, at any depth (an import inside a function that
    only dodges a loop is still a loop). A package's __init__ re-exporting its own
    submodules is not a cycle of design, so a module's edge to a package containing it is
    left out."""
    modules = modules_under(source_root)
    graph = {
        m: sorted(t for t in imported(m, p, modules) if t != m and not m.startswith(t + "."))
        for m, p in modules.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(SOURCE_ROOT) == []


def test_no_import_cycle_anywhere_in_the_package():
    assert import_cycles(SOURCE_ROOT) == []


def test_every_module_belongs_to_a_named_layer():
    modules = modules_under(SOURCE_ROOT)
    unplaced = [m for m in modules if layer_of(m) == LAYERS["handoff"] and m != "handoff"]
    assert unplaced == ["handoff.__main__"]


def test_a_planted_upward_import_is_found(tmp_path):
    """The check itself can fail: the connection layer importing the runtime is caught."""
    shutil.copytree(SOURCE_ROOT, tmp_path / "core")
    package = tmp_path / "core" / "handoff"
    pool = package / "connection" / "pool.py"
    pool.write_text(pool.read_text() + "\nfrom handoff.runtime.worker import Worker\n")
    relative = package / "protocol" / "keys.py"
    relative.write_text(relative.read_text() + "\nfrom ..observe import monitor\n")
    assert upward_imports(tmp_path / "core") == [
        "handoff.connection.pool (layer 1) imports handoff.runtime.worker (layer 3)",
        "handoff.protocol.keys (layer 2) imports handoff.observe.monitor (layer 4)",
    ]


def test_a_planted_import_cycle_is_found(tmp_path):
    """The cycle check itself can fail: two modules of one layer importing each other."""
    shutil.copytree(SOURCE_ROOT, tmp_path / "core")
    config = tmp_path / "core" / "handoff" / "config"
    checks = config / "checks.py"
    checks.write_text(checks.read_text() + "\nfrom handoff.config import redact\n")
    redact = config / "redact.py"
    redact.write_text(redact.read_text() + "\nfrom handoff.config import checks\n")
    cycles = import_cycles(tmp_path / "core")
    assert ["handoff.config.checks", "handoff.config.redact", "handoff.config.checks"] in cycles


def test_each_layer_says_what_it_may_import():
    for package in ("connection", "protocol", "runtime", "observe", "bench", "testing"):
        path = SOURCE_ROOT / "handoff" / package / "__init__.py"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and "May import:" in doc, package


MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 60


def oversized(source_root: Path) -> list[str]:
    """Product files over MAX_FILE_LINES and functions over MAX_FUNCTION_LINES: a file or a
    function that long is doing several things (tests, benchmarks/ and harness/ aside)."""
    found = []
    for module, path in sorted(modules_under(source_root).items()):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            found.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{module}.{node.name}: {length} lines")
    return found


def test_no_product_file_or_function_is_too_long():
    assert oversized(SOURCE_ROOT) == []


def test_a_planted_long_function_is_found(tmp_path):
    shutil.copytree(SOURCE_ROOT, tmp_path / "core")
    keys = tmp_path / "core" / "handoff" / "protocol" / "keys.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    keys.write_text(keys.read_text() + f"\n\ndef planted():\n{body}")
    assert oversized(tmp_path / "core") == ["handoff.protocol.keys.planted: 62 lines"]
