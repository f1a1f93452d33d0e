"""The package's layers: no module imports from a layer above its own.

The layers, lowest first, are named in each subpackage's docstring. A module may import
from its own layer and any below; handoff/__init__.py and __main__.py (the public face)
may import anything.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
    "handoff.bench": 6,
    "handoff.cli": 7,
    "handoff.testing": 7,
    "handoff.__main__": 8,
    "handoff": 8,  # the package's __init__: the public interface
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def installed_modules(core: Path, config: Path) -> dict[str, Path]:
    """Module name -> file, as pyproject.toml maps them (core/ -> handoff, config/ ->
    handoff.config)."""
    modules: dict[str, Path] = {}
    for top, name in ((core, "handoff"), (config, "handoff.config")):
        for path in top.rglob("*.py"):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every handoff module `module` imports (absolute or relative, at any depth):
    `from handoff.x import y` counts as handoff.x.y when that is a module, else handoff.x."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {n for n in names if n in modules}


def upward_imports(core: Path, config: Path) -> list[str]:
    modules = installed_modules(core, config)
    found = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for target in sorted(imported(module, path, modules)):
            if layer_of(target) > own:
                found.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target)})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(ROOT / "core", ROOT / "config") == []


def test_every_module_belongs_to_a_named_layer():
    modules = installed_modules(ROOT / "core", ROOT / "config")
    unplaced = [m for m in modules if layer_of(m) == LAYERS["handoff"] and m != "handoff"]
    assert unplaced == ["handoff.__main__"]


def test_a_planted_upward_import_is_found(tmp_path):
    """The check itself can fail: the connection layer importing the runtime is caught."""
    core, config = tmp_path / "core", tmp_path / "config"
    shutil.copytree(ROOT / "core", core)
    shutil.copytree(ROOT / "config", config)
    pool = core / "connection" / "pool.py"
    pool.write_text(pool.read_text() + "\nfrom handoff.runtime.worker import Worker\n")
    relative = core / "protocol" / "keys.py"
    relative.write_text(relative.read_text() + "\nfrom ..observe import monitor\n")
    assert upward_imports(core, config) == [
        "handoff.connection.pool (layer 1) imports handoff.runtime.worker (layer 3)",
        "handoff.protocol.keys (layer 2) imports handoff.observe.monitor (layer 4)",
    ]


def test_each_layer_says_what_it_may_import():
    for package in ("connection", "protocol", "runtime", "observe", "bench", "testing"):
        doc = ast.get_docstring(ast.parse((ROOT / "core" / package / "__init__.py").read_text()))
        assert doc and "May import:" in doc, package
