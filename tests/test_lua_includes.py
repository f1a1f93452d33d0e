"""Each Lua script names the shared helper files it uses (`-- include:` over lua/lib/), and
this checks the names against the code: what a script calls, at any depth, is defined by
a file it includes; nothing it includes is unused; a helper declared ahead in one file
and defined in another comes with both.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from handoff.protocol import scripts

LUA = Path(scripts.__file__).parent / "lua"
COMMENT = re.compile(r"--.*$", re.MULTILINE)
# Top-level definitions: `local function f(`, `f = function(` (defining a name declared
# ahead), `local NAME =` (a constant) and `local f` alone (a declaration ahead).
DEFINITION = re.compile(
    r"^(?:local function (\w+)\(|(\w+) = function\(|local ([A-Za-z_]\w*) =|local (\w+)\s*$)",
    re.MULTILINE,
)
DECLARED_AHEAD = re.compile(r"^local (\w+)\s*$", re.MULTILINE)
ASSIGNED_LATER = re.compile(r"^(\w+) = function\(", re.MULTILINE)
MAX_SCRIPT_LINES, MAX_HELPER_LINES = 200, 60


def lib_text(name: str) -> str:
    return (LUA / "lib" / f"{name}.lua").read_text()


def defined_in(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in DEFINITION.finditer(text)}


def used_in(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", COMMENT.sub("", text)))


def scripts_with_includes() -> list[str]:
    return [name for name in scripts.NAMES if name not in scripts.STANDALONE]


@pytest.mark.parametrize("name", scripts_with_includes())
def test_a_script_includes_what_it_uses_and_nothing_more(name):
    body = (LUA / f"{name}.lua").read_text()
    assert scripts.INCLUDE.search(body), f"{name}.lua has no `-- include:` line"
    included = scripts.includes(body)
    every = {lib: defined_in(lib_text(lib)) for lib in scripts.lib_order()}
    wanted = used_in(body)
    for lib in included:  # an included file's own calls must resolve too
        wanted |= used_in(lib_text(lib))
    for lib, names in every.items():
        missing = (names & wanted) if lib not in included else set()
        assert not missing, f"{name}.lua uses {sorted(missing)} from lib/{lib}.lua: include it"
    for lib in included:
        needed = every[lib] & (used_in(body) | set().union(
            *(used_in(lib_text(o)) for o in included if o != lib)))  # fmt: skip
        assert needed, f"{name}.lua includes lib/{lib}.lua but uses nothing it defines"
    text = "".join(lib_text(lib) for lib in included)
    all_libs = "".join(lib_text(lib) for lib in scripts.lib_order())
    for ahead in DECLARED_AHEAD.findall(text):  # a function declared ahead comes defined
        if re.search(rf"^{ahead} = function\(", all_libs, re.MULTILINE):
            assert re.search(rf"^{ahead} = function\(", text, re.MULTILINE), (name, ahead)
    for later in ASSIGNED_LATER.findall(text):
        assert re.search(rf"^local {later}\s*$", text, re.MULTILINE), (name, later)


def test_the_include_line_refuses_an_unknown_file():
    with pytest.raises(ValueError, match="unknown Lua include"):
        scripts.includes("-- x\n-- include: base, nosuch\n")


def test_a_planted_missing_include_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: ack.lua without the notices file it needs."""
    body = (LUA / "ack.lua").read_text()
    line = next(ln for ln in body.splitlines() if ln.startswith("-- include:"))
    planted = body.replace(line, line.replace(", notices", ""))
    included = scripts.includes(planted)
    used = used_in(planted)
    assert "notices" not in included and defined_in(lib_text("notices")) & used


def test_no_script_or_helper_is_too_long():
    too_long = []
    for path in [*LUA.glob("*.lua"), *(LUA / "lib").glob("*.lua")]:
        lines = path.read_text().splitlines()
        if path.parent == LUA and len(lines) > MAX_SCRIPT_LINES:
            too_long.append(f"{path.name}: {len(lines)} lines")
        starts = [
            i for i, ln in enumerate(lines) if re.match(r"(local function|\w+ = function)", ln)
        ]
        for start in starts:
            end = next((i for i in range(start, len(lines)) if re.match(r"end\b", lines[i])), start)
            if end - start + 1 > MAX_HELPER_LINES:
                too_long.append(f"{path.name}:{start + 1}: helper of {end - start + 1} lines")
    assert too_long == []
