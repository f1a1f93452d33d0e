"""What `pip install .` puts on a user's machine: one package, `handoff`, and nothing that
shadows or is shadowed by an application's own `config` or `core`.

The wheel is built from a copy of the checkout (the build leaves nothing in the tree) and
installed into a fresh virtual environment; the application runs a task through a real
worker process of that environment against this test's server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from harness.procs import wait_until

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".venv", ".git", ".run", "build", "*.egg-info", "__pycache__")
WARNINGS = ("Warning", "deprecated", "Deprecat")


def build_wheel(source: Path, out: Path) -> tuple[Path, str]:
    """The wheel pip builds from `source`, and what the build printed."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--verbose", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("handoff-*.whl")
    return wheel, done.stdout + done.stderr


def foreign_entries(wheel: Path) -> list[str]:
    """Wheel entries outside handoff/ and its .dist-info."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    return [n for n in names if not n.startswith(("handoff/", "handoff-"))]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=SKIP)
    return build_wheel(tmp / "src", tmp / "dist")


@pytest.fixture(scope="module")
def fresh_env(built, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel (and its dependencies) installed."""
    wheel, _ = built
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env_dir, with_pip=True)
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


def test_the_wheel_holds_only_the_handoff_package(built):
    wheel, _ = built
    assert foreign_entries(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"handoff/__init__.py", "handoff/config/__init__.py", "handoff/cli/__init__.py"} <= names
    assert "handoff/protocol/lua/claim.lua" in names and "handoff/config/settings.py" in names
    web = "handoff/observe/web/"  # the dashboard's templates and static files ship with it
    assert {web + "templates/page.html", web + "static/dashboard.js"} <= names
    assert web + "static/dashboard.css" in names
    assert not any(n.startswith(("handoff/bench/peers", "benchmarks/", "workers/")) for n in names)


def test_the_build_prints_no_packaging_warning(built):
    _, output = built
    flagged = [line for line in output.splitlines() if any(w in line for w in WARNINGS)]
    assert flagged == []


def test_a_planted_top_level_package_is_caught(tmp_path):
    """The wheel check itself can fail: a second package beside handoff/ in the source root,
    with the include filter gone, shows up in it."""
    shutil.copytree(ROOT, tmp_path / "src", ignore=SKIP)
    stray = tmp_path / "src" / "core" / "stray"
    stray.mkdir()
    (stray / "__init__.py").write_text("")
    pyproject = tmp_path / "src" / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('include = ["handoff*"]\n', ""))
    wheel, _ = build_wheel(tmp_path / "src", tmp_path / "dist")
    assert "stray/__init__.py" in foreign_entries(wheel)


def test_installed_outside_the_checkout_only_handoff_imports(fresh_env, tmp_path):
    python = str(fresh_env / "bin" / "python")
    ok = subprocess.run(
        [python, "-c", "import handoff; from handoff import agent, Handoff, Client; "
         "print(handoff.__file__)"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert str(fresh_env) in ok.stdout
    for generic in ("core", "config", "workers"):
        gone = subprocess.run(
            [python, "-c", f"import {generic}"], cwd=tmp_path, capture_output=True
        )
        assert gone.returncode != 0, generic
    cli = subprocess.run([python, "-m", "handoff", "--help"], capture_output=True, text=True)
    assert cli.returncode == 0 and "supervise" in cli.stdout


APP_AGENTS = """
import config
import core
from handoff import agent


@agent("echo")
def echo(task):
    return {"config": config.NAME, "core": core.NAME, "got": task.payload}
"""

APP_PRODUCER = """
import sys

import config
import core
from handoff import Client

with Client(sys.argv[1]) as client:
    tid = client.enqueue("echo", {"n": 1})
    print(config.NAME, core.NAME, client.result(tid, wait_s=30))
"""


def test_an_app_with_its_own_config_and_core_runs_a_task(fresh_env, tmp_path, redis_url):
    """The user's `config` package and `core` module, and handoff's, side by side."""
    app = tmp_path / "app"
    (app / "config").mkdir(parents=True)
    (app / "config" / "__init__.py").write_text('NAME = "app-config"\n')
    (app / "core.py").write_text('NAME = "app-core"\n')
    (app / "myagents.py").write_text(APP_AGENTS)
    (app / "produce.py").write_text(APP_PRODUCER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDIS_URL")}
    env = {k: v for k, v in env.items() if not k.startswith("HANDOFF_")}
    bin_dir = fresh_env / "bin"
    worker = subprocess.Popen(
        [str(bin_dir / "handoff"), "--redis-url", redis_url, "--app", "myagents", "worker", "echo"],
        cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        done = subprocess.run(
            [str(bin_dir / "python"), "produce.py", redis_url],
            cwd=app, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.split(" ", 2)[:2] == ["app-config", "app-core"]
        assert "'config': 'app-config', 'core': 'app-core', 'got': {'n': 1}" in done.stdout
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        wait_until(lambda: worker.poll() is not None, 15, "the worker to stop")
    assert worker.returncode == 0, worker.stdout.read()


SAMPLE_PYPROJECT = """
[project]
name = "sample-agents"
version = "0.0.1"

[tool.pytest.ini_options]
pythonpath = ["."]
"""

SAMPLE_AGENTS = """
from pydantic import BaseModel

from handoff import Handoff, agent


class Draft(BaseModel):
    topic: str
    words: int = 0


@agent("intake", payload=Draft)
def intake(task):
    return Handoff("writer", Draft(topic=task.payload.topic.strip()))


@agent("writer", payload=Draft, max_attempts=3, retry_delay_s=30)
def writer(task):
    if task.payload.topic == "flaky" and task.attempt == 1:
        raise TimeoutError("the model did not answer")
    words = 100 * len(task.payload.topic.split())
    return Handoff("editor", Draft(topic=task.payload.topic, words=words))


@agent("editor", payload=Draft)
def editor(task):
    return {"topic": task.payload.topic, "words": task.payload.words, "edited": True}
"""

SAMPLE_TESTS = """
import pytest

from handoff import InvalidPayload


def test_the_chain_ends_with_an_edit(handoff_app):
    app = handoff_app("agents")
    root = app.enqueue("intake", {"topic": " release notes "})
    runs = app.run_until_idle()
    assert runs.result(root) == {"topic": "release notes", "words": 200, "edited": True}
    assert [runs[t].agent for t in runs] == ["intake", "writer", "editor"]


def test_a_flaky_writer_is_retried_without_waiting_its_delay(handoff_app):
    app = handoff_app("agents")
    root = app.enqueue("intake", {"topic": "flaky"})
    runs = app.run_until_idle()
    (writer,) = runs[root].children
    assert runs[writer].attempts == 2 and runs.result(root)["edited"] is True


def test_a_bad_payload_is_one_line_naming_the_field(handoff_app):
    app = handoff_app("agents")
    with pytest.raises(InvalidPayload, match="field 'topic'"):
        app.enqueue("intake", {"topic": 5})


def test_one_agent_alone_leaves_the_next_one_queued(handoff_app):
    app = handoff_app("agents", agents=["intake"])
    root = app.enqueue("intake", {"topic": "a b c"})
    (writer,) = app.run_until_idle()[root].children
    assert app.client.status(writer) == "queued"
"""


def test_a_user_project_tests_its_agents_with_the_plugin(
    fresh_env, built, tmp_path, record_property
):
    """A project of its own (pyproject, agents, tests using only the plugin's fixtures),
    against the installed package with its testing and pydantic extras, under xdist."""
    wheel, _ = built
    python = str(fresh_env / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"handoff[testing,pydantic] @ {wheel.as_uri()}", "pytest", "pytest-xdist"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    project = tmp_path / "sample"
    project.mkdir()
    (project / "pyproject.toml").write_text(SAMPLE_PYPROJECT)
    (project / "agents.py").write_text(SAMPLE_AGENTS)
    (project / "test_agents.py").write_text(SAMPLE_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDIS_URL")}
    env = {k: v for k, v in env.items() if not k.startswith(("HANDOFF_", "PYTEST_"))}
    run = subprocess.run(
        [python, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
         "--junitxml", str(tmp_path / "junit.xml")],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "4 passed" in run.stdout
    junit = (tmp_path / "junit.xml").read_text()
    seconds = sum(float(s) for s in re.findall(r'<testcase [^>]*time="([0-9.]+)"', junit))
    record_property("sample_tests_total_s", round(seconds, 3))
