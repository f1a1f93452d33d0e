"""The documentation cannot rot: the first-app guide runs as written, and every link lands.

docs/guide/first-app.md is run the way a reader follows it: each ```python block whose
first line is `# NAME.py` is saved under that name in a fresh folder; the guide's
`handoff ... supervise ...` line starts a real supervisor on the test's server; a
producer block (`produce.py`) runs as a script that must exit 0; a `test_*.py` block runs
under pytest in a subprocess, with the plugin's fixtures, as in the reader's project.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.procs import HandoffProcess, handoff_env

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide" / "first-app.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_LINE = re.compile(r"# ([\w.]+\.py)\n")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def python_files(path: Path) -> list[tuple[str, str]]:
    """(file name, source) of every python block; each must say where it is saved."""
    files = []
    for lang, body in blocks(path):
        if lang == "python":
            named = FILE_LINE.match(body)
            assert named, f"{path.name}: a python block does not start with '# NAME.py':\n{body}"
            files.append((named.group(1), body))
    return files


def supervise_args(path: Path) -> list[str]:
    """The guide's `handoff ... supervise ...` command, without `handoff`."""
    for lang, body in blocks(path):
        for line in body.splitlines() if lang == "bash" else ():
            words = shlex.split(line, comments=True)
            if words[:1] == ["handoff"] and "supervise" in words:
                return words[1:]
    raise AssertionError(f"{path.name} has no `handoff ... supervise` command")


def reader_env(redis_url: str, folder: Path) -> dict[str, str]:
    """A reader's shell: REDIS_URL points at the server, the app folder is importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")}
    env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "core"), str(folder)])
    return env


def run(args: list[str], folder: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        args, cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def test_the_first_app_guide_runs_as_written(redis_url, tmp_path):
    files = python_files(GUIDE)
    for name, source in files:
        (tmp_path / name).write_text(source)
    args = supervise_args(GUIDE)
    app_file = args[args.index("--app") + 1] + ".py"  # imported by the workers, not run
    env = handoff_env(redis_url)
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    supervisor = HandoffProcess(args, env, tmp_path / "supervisor.log")
    try:
        for name, _ in files:
            if name.startswith("test_"):
                pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
                run([sys.executable, *pytest_args, name], tmp_path, reader_env(redis_url, tmp_path))
            elif name != app_file:
                run([sys.executable, name], tmp_path, reader_env(redis_url, tmp_path))
    except AssertionError:
        print(supervisor.output())
        raise
    finally:
        supervisor.stop()


def test_the_readmes_first_app_is_the_guides_block_for_block():
    """README.md shows the guide's files verbatim, so they are run above too."""
    readme = python_files(ROOT / "README.md")
    guide = dict(python_files(GUIDE))
    assert readme, "README.md shows no first app"
    for name, source in readme:
        assert source == guide.get(name), f"README.md's {name} is not the guide's"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
