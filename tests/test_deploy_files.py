"""The deployment files cannot drift from the code they run.

Every file under config/deploy/ and docs/operations/deploy.md is read as text and
checked against the code: each `handoff` command line resolves through the click root
group (commands, subcommands, options, and the values click checks itself), each
HANDOFF_* variable is one the settings loader or a command reads (and a service's
variables load into valid Settings), each backquoted setting name in the doc is a
setting, each metric a KEDA query names is one the monitor's Prometheus collector
yields (with the label the query uses), the YAML parses, and each stop timer (Compose's
stop_grace_period, Kubernetes' terminationGracePeriodSeconds, systemd's TimeoutStopSec)
outlasts the supervisor's drain (graceful_timeout_s, its default when a file sets none)
by MARGIN_S, and the agents a supervisor runs are the demo app's with timeouts inside
that drain. No container engine runs here: the Containerfile is checked as text, and the
wheel is built from exactly what its build stage copies.

The YAML is read by a small strict parser of the subset the files use (block mappings
and sequences, quoted and plain scalars, flow lists, `{}`), since PyYAML is not a
dependency; when PyYAML is installed the files must also load the same with it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import fields
from pathlib import Path

import click
import pytest

from handoff import agent
from handoff.cli import main
from handoff.config.errors import ConfigError
from handoff.config.loader import CONFIG_ENV, KEY_TYPES, PRESET_ENV, load_settings
from handoff.config.pool_settings import RedisPoolConfig
from handoff.config.presets import PRESETS
from handoff.config.settings import Settings, parse_agent_counts
from handoff.observe.metrics_export import SnapshotCollector

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "config" / "deploy"
DOC = ROOT / "docs" / "operations" / "deploy.md"
CONTAINERFILE = DEPLOY / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
PROBE = DEPLOY / "handoff-local-health"
IMAGE = "handoff-app"  # the image the Containerfile builds, as compose and k8s name it
# A stop timer must pass graceful_timeout_s by this much: the supervisor kills an
# overstaying worker 0.5 s past the grace, then the give-backs and the exit (the doc says 5 s).
MARGIN_S = 5.0
LONGEST_TIMEOUT = "handoff.example.com/longest-timeout-s"
DEFAULT_GRACE_S = Settings().graceful_timeout_s


# ---- a strict parser of the YAML subset the files use ------------------------------------


class YamlSubsetError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and (i == 0 or line[i - 1] in " [,:-"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def _split_flow(text: str) -> list[str]:
    items, buf, quote = [], "", None
    for ch in text:
        if quote:
            buf += ch
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            buf += ch
        elif ch == ",":
            items.append(buf.strip())
            buf = ""
        else:
            buf += ch
    if quote:
        raise YamlSubsetError(f"unclosed quote in [{text}]")
    if buf.strip():
        items.append(buf.strip())
    return items


def _scalar(text: str, where: str):
    text = text.strip()
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise YamlSubsetError(f"{where}: bad double-quoted scalar {text!r}")
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise YamlSubsetError(f"{where}: bad single-quoted scalar {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise YamlSubsetError(f"{where}: flow list not closed on its line")
        return [_scalar(item, where) for item in _split_flow(text[1:-1])]
    if text == "{}":
        return {}
    if text[:1] in set("&*!|>{%@`,]}?") or ": " in text or text.endswith(":"):
        raise YamlSubsetError(f"{where}: outside the subset: {text!r}")
    return text


_KEY = re.compile(
    r"""^("[^"]*"|'[^']*'|[^\s"'#&*!|>{}\[\],%@`-][^:]*?|-[^\s:][^:]*?):(?: (.*))?$"""
)


def _parse_block(lines: list[tuple[int, str, int]], i: int, indent: int):
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return _parse_seq(lines, i, indent)
    return _parse_map(lines, i, indent)


def _nested(lines, i: int, parent_indent: int, where: str):
    """The value of `key:` / `-` with nothing after it: the deeper block, or None."""
    if i < len(lines) and lines[i][0] > parent_indent:
        return _parse_block(lines, i, lines[i][0])
    return None, i


def _parse_map(lines, i: int, indent: int):
    out: dict = {}
    while i < len(lines) and lines[i][0] == indent:
        _, text, number = lines[i]
        where = f"line {number}"
        m = _KEY.match(text)
        if not m:
            raise YamlSubsetError(f"{where}: expected `key: value`, got {text!r}")
        key = _scalar(m.group(1), where)
        if key in out:
            raise YamlSubsetError(f"{where}: duplicate key {key!r}")
        rest = (m.group(2) or "").strip()
        if rest:
            out[key], i = _scalar(rest, where), i + 1
        else:
            out[key], i = _nested(lines, i + 1, indent, where)
    if i < len(lines) and lines[i][0] > indent:
        raise YamlSubsetError(f"line {lines[i][2]}: unexpected indentation")
    return out, i


def _parse_seq(lines, i: int, indent: int):
    out: list = []
    while (
        i < len(lines)
        and lines[i][0] == indent
        and (lines[i][1].startswith("- ") or lines[i][1] == "-")
    ):
        _, text, number = lines[i]
        rest = text[1:].strip()
        if not rest:
            value, i = _nested(lines, i + 1, indent, f"line {number}")
        elif _KEY.match(rest) and not rest.startswith(("'", '"', "[")):
            # "- key: value" opens a mapping whose keys sit where `key` starts
            column = indent + len(text) - len(text[1:].lstrip())
            value, i = _parse_map([*lines[:i], (column, rest, number), *lines[i + 1 :]], i, column)
        else:
            value, i = _scalar(rest, f"line {number}"), i + 1
        out.append(value)
    if i < len(lines) and lines[i][0] > indent:
        raise YamlSubsetError(f"line {lines[i][2]}: unexpected indentation")
    return out, i


def parse_yaml(text: str) -> list:
    """Every document of a file in the subset; YamlSubsetError for anything else."""
    docs, current = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.rstrip() == "---":
            docs.append(current)
            current = []
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"line {number}: a tab in the indentation")
        line = _strip_comment(raw)
        if line.strip():
            current.append((len(line) - len(line.lstrip(" ")), line.strip(), number))
    docs.append(current)
    parsed = []
    for lines in docs:
        if not lines:
            continue
        value, end = _parse_block(lines, 0, lines[0][0])
        if end != len(lines):
            raise YamlSubsetError(f"line {lines[end][2]}: not part of the document")
        parsed.append(value)
    return parsed


def _plain(value):
    """PyYAML's typed scalars as the subset parser's strings, to compare the two."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if value is None else str(value)


def yaml_docs(path: Path) -> list:
    return parse_yaml(path.read_text())


YAML_FILES = [COMPOSE, *sorted(K8S.glob("*.yaml"))]


# ---- the command line ---------------------------------------------------------------------


def _option(command: click.Command, word: str) -> click.Parameter | None:
    if word in (main.context_settings or {}).get("help_option_names", []):
        return click.Option(["--help"], is_flag=True)
    for param in command.params:
        if isinstance(param, click.Option) and word in (*param.opts, *param.secondary_opts):
            return param
    return None


def check_words(words: list[str], *, complete: bool = True) -> list[str]:
    """Problems with `handoff WORDS...`: unknown commands and options, then (complete:
    a whole command line) what click itself refuses when it parses them."""
    problems, command, path, i = [], main, ["handoff"], 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            option = _option(command, name)
            if option is None:
                problems.append(f"{' '.join(path)}: no option {name}")
            elif not option.is_flag and "=" not in word and not option.count:
                i += 1  # its value
        elif isinstance(command, click.Group):
            sub = command.commands.get(word)
            if sub is None:
                problems.append(f"{' '.join(path)}: no command {word!r}")
                return problems
            command, path = sub, [*path, word]
        i += 1
    if isinstance(command, click.Group) and command is not main:
        problems.append(f"{' '.join(path)}: a group, not a command")
    if complete and not problems:
        problems += _click_parses(words)
    return problems


def _click_parses(words: list[str]) -> list[str]:
    """Let click parse the line (types, ranges, required arguments) without running it."""
    rest, command, ctx, name = list(words), main, None, "handoff"
    try:
        while True:
            ctx = command.make_context(name, rest, parent=ctx)
            if not isinstance(command, click.Group):
                return []
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            if not rest:
                return []
            name, command, rest = rest[0], command.commands[rest[0]], rest[1:]
    except click.exceptions.Exit as e:  # --help
        return [] if e.exit_code == 0 else [f"handoff {' '.join(words)}: exit {e.exit_code}"]
    except click.ClickException as e:
        return [f"handoff {' '.join(words)}: {e.format_message()}"]


def _all_commands(group: click.Group = main):
    yield group
    for command in group.commands.values():
        if isinstance(command, click.Group):
            yield from _all_commands(command)
        else:
            yield command


def _agents_value(words: list[str]) -> dict[str, int]:
    if "--agents" in words:
        return parse_agent_counts(words[words.index("--agents") + 1])
    return {}


SHELL_BREAKS = {";", "|", "||", "&&", "&", "(", ")", "exec", "sudo", "$", "then", "do"}


def handoff_lines(text: str) -> list[list[str]]:
    """Each `handoff ...` command in shell-like text: the words after `handoff`, up to a
    shell operator; `handoff` must start the line or follow an operator (so `-t handoff`
    is not a command)."""
    found = []
    for line in text.splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if (word == "handoff" or word.endswith("/bin/handoff")) and (
                i == 0 or words[i - 1] in SHELL_BREAKS or words[i - 1].endswith(":")
            ):
                args = []
                for w in words[i + 1 :]:
                    if w in SHELL_BREAKS or w[:1] in "<>":
                        break
                    args.append(w)
                found.append(args)
    return found


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


def doc_commands() -> tuple[list[list[str]], list[list[str]]]:
    """(whole command lines from the doc's code blocks, `handoff ...` spans in its prose)."""
    text = DOC.read_text()
    blocks = [body for _, body in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    lines = [args for body in blocks for args in handoff_lines(body)]
    spans = [shlex.split(s)[1:] for s in SPAN.findall(prose) if s.startswith("handoff ")]
    return lines, spans


# ---- what each file runs -----------------------------------------------------------------


def containerfile() -> dict[str, list]:
    """Instructions by name, each a list of (stage, argument text); continuations joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out: dict[str, list] = {}
    stage = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        out.setdefault(instruction, []).append((stage, rest.strip()))
    return out


def compose_services() -> dict[str, dict]:
    (doc,) = yaml_docs(COMPOSE)
    return doc["services"]


def k8s_objects() -> list[dict]:
    return [obj for path in sorted(K8S.glob("*.yaml")) for obj in yaml_docs(path)]


def deployments() -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Deployment"}


def unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings: name -> every value given (sections ignored)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not `Key=value`: {line!r}"
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_env(values: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for item in values.get("Environment", []):
        for pair in shlex.split(item):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def container_env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def go_duration_s(text: str) -> float:
    """Compose's durations: 1m30s, 25s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def systemd_seconds(text: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|sec|ms|s|m|h|)", text)
    assert parts, f"not a time span: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def grace_of(env: dict) -> float:
    value = env.get("HANDOFF_GRACEFUL_TIMEOUT_S")
    return float(value) if value else DEFAULT_GRACE_S


def load_probe():
    loader = importlib.machinery.SourceFileLoader("handoff_local_health", str(PROBE))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def every_command_line() -> list[tuple[str, list[str]]]:
    """(where, words after `handoff`) for every command a deployment file runs."""
    found: list[tuple[str, list[str]]] = []
    steps = containerfile()
    entry = json.loads(steps["ENTRYPOINT"][-1][1])
    cmd = json.loads(steps["CMD"][-1][1])
    found.append(("Containerfile ENTRYPOINT + CMD", [*entry[1:], *cmd]))
    for name, service in compose_services().items():
        if service.get("image") == f"{IMAGE}:latest":
            found.append((f"compose {name}", list(service["command"])))
        test = service.get("healthcheck", {}).get("test", [])
        if "handoff" in test:
            found.append((f"compose {name} healthcheck", test[test.index("handoff") + 1 :]))
    for obj in k8s_objects():
        for container in (
            obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            where = f"k8s {obj['metadata']['name']}/{container['name']}"
            if container["image"] == IMAGE:
                found.append((where, list(container["args"])))
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command", [])
                if command[:1] == ["handoff"]:
                    found.append((f"{where} {probe}", command[1:]))
    for path in sorted(SYSTEMD.glob("*.service")):
        for key, values in unit(path).items():
            if key.startswith("Exec"):
                for value in values:
                    found += [(f"{path.name} {key}", args) for args in handoff_lines(value)]
    return found


# ---- the tests ----------------------------------------------------------------------------


def test_the_checker_refuses_what_does_not_exist():
    assert check_words(["supervise", "--agents", "a=1"]) == []
    assert check_words(["supervise", "--agent", "a=1"])  # a wrong option
    assert check_words(["superviser"])  # a wrong command
    assert check_words(["inspect", "queue"])  # a wrong subcommand
    assert check_words(["monitor", "--metrics-port", "0"])  # out of click's range
    assert check_words(["--bogus", "health"])  # a wrong global option
    assert handoff_lines("docker build -t handoff . && exec handoff health") == [["health"]]
    with pytest.raises(YamlSubsetError):
        parse_yaml("a: 1\na: 2\n")
    with pytest.raises(YamlSubsetError):
        parse_yaml("a:\n  b: 1\n   c: 2\n")
    assert parse_yaml('a:\n  - x: "1"\n    y: [b, "c, d"]\n  - z\n') == [
        {"a": [{"x": "1", "y": ["b", "c, d"]}, "z"]}
    ]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_yaml_parses(path):
    docs = yaml_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    try:
        import yaml
    except ImportError:
        return
    assert [_plain(d) for d in yaml.safe_load_all(path.read_text())] == docs


def test_every_command_the_files_run_exists():
    found = every_command_line()
    assert len(found) >= 8, found
    problems = [f"{where}: {p}" for where, args in found for p in check_words(args)]
    assert not problems, "\n".join(problems)


def test_every_command_the_doc_names_exists():
    lines, spans = doc_commands()
    assert len(lines) >= 3 and len(spans) >= 5, (lines, spans)
    problems = [p for args in lines for p in check_words(args)]
    problems += [p for args in spans for p in check_words(args, complete=False)]
    assert not problems, "\n".join(problems)


def _known_env() -> set[str]:
    known = {f"HANDOFF_{key.upper().replace('.', '_')}" for key in KEY_TYPES}
    known |= {PRESET_ENV, CONFIG_ENV, "HANDOFF_RUN_DIR"}  # the run dir: config/defaults.py
    for command in _all_commands():
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            known |= {e for e in envvars if e}
    return known


DEPLOY_FILES = [CONTAINERFILE, PROBE, *YAML_FILES, *sorted(SYSTEMD.glob("*.service")), DOC]


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_handoff_variable_exists(path):
    named = set(re.findall(r"\bHANDOFF_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    unknown = sorted(named - _known_env())
    assert not unknown, f"{path.name}: no such variable: {unknown}"


def _service_envs() -> list[tuple[str, dict]]:
    envs = [(f"compose {n}", s.get("environment", {})) for n, s in compose_services().items()]
    for name, obj in deployments().items():
        for container in obj["spec"]["template"]["spec"]["containers"]:
            envs.append((f"k8s {name}", container_env(container)))
    for path in sorted(SYSTEMD.glob("*.service")):
        envs.append((path.name, unit_env(unit(path))))
    return envs


def test_each_service_environment_loads():
    """The values are valid too: load_settings reads them as a process would (the config
    file a unit names is not here: its HANDOFF_CONFIG is left out)."""
    envs = _service_envs()
    assert len(envs) >= 7, envs
    for where, env in envs:
        given = {k: v for k, v in env.items() if v is not None and k != CONFIG_ENV}
        try:
            load_settings(env=given)
        except ConfigError as e:
            pytest.fail(f"{where}: {e}")


def test_every_setting_the_doc_names_exists():
    settings = set(KEY_TYPES) | {f.name for f in fields(RedisPoolConfig)}
    agent_options = set(inspect.signature(agent).parameters)
    not_settings = {"stop_grace_period", *PRESETS}  # Compose's key; the presets' names
    words = set(SPAN.findall(FENCE.sub("", DOC.read_text())))
    names = {w for w in words if re.fullmatch(r"(redis\.)?[a-z][a-z0-9]*(_[a-z0-9]+)+", w)}
    names = {n for n in names if not n.startswith("handoff_")}  # metrics: checked below
    assert {"graceful_timeout_s", "lease_s", "worker_stall_s"} <= names
    unknown = sorted(names - settings - agent_options - not_settings)
    assert not unknown, f"deploy.md names no such setting or @agent option: {unknown}"


def _metrics() -> dict[str, set[str]]:
    """Every name the monitor's collector yields (counters with and without _total), with
    its labels: from a snapshot with one agent, group and worker."""
    snapshot = {
        "healthy": True,
        "agents": {"a": {"busiest_groups": [{"group": "g"}]}},
        "workers": [{"id": "w", "agent": "a", "pool": {}}],
    }
    names: dict[str, set[str]] = {}
    for family in SnapshotCollector(lambda: snapshot).collect():
        for sample in family.samples:
            for name in (family.name, sample.name):
                names.setdefault(name, set()).update(sample.labels)
    return names


METRIC = re.compile(r"\b(handoff_[a-z_]+)(\{[^}]*\})?")


def _scaled_objects() -> list[dict]:
    return [o for o in k8s_objects() if o["kind"] == "ScaledObject"]


def test_the_keda_queries_use_metrics_the_monitor_serves():
    metrics = _metrics()
    objects = _scaled_objects()
    assert {o["spec"]["scaleTargetRef"]["name"] for o in objects} == set(deployments()) - {
        "handoff-monitor"
    }
    problems = []
    for obj in objects:
        target = deployments()[obj["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        agents = _agents_value(container["args"])
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            float(trigger["metadata"]["threshold"])
            query = trigger["metadata"]["query"]
            for name, selector in METRIC.findall(query):
                if name not in metrics:
                    problems.append(f"{obj['metadata']['name']}: no metric {name}")
                    continue
                for label, value in re.findall(r'(\w+)=~?"([^"]*)"', selector):
                    if label not in metrics[name]:
                        problems.append(f"{name} has no label {label}")
                    elif label == "agent" and not set(value.split("|")) <= set(agents):
                        runs = f"{target['metadata']['name']} runs: {agents}"
                        problems.append(f"{query}: {value} is not what {runs}")
            if not METRIC.search(query):
                problems.append(f"{query}: names no handoff metric")
    assert not problems, "\n".join(problems)


def test_the_metrics_the_doc_names_exist():
    metrics = _metrics()
    named = {m for m, _ in METRIC.findall(DOC.read_text())}
    assert "handoff_queue_depth" in named
    assert not sorted(named - set(metrics)), f"no such metric: {sorted(named - set(metrics))}"


def _stop_timers() -> list[tuple[str, float, float, dict]]:
    """(where, the kill timer in s, graceful_timeout_s, env) of each supervisor."""
    timers = []
    for name, service in compose_services().items():
        if "supervise" in service.get("command", []):
            kill = go_duration_s(service.get("stop_grace_period", "10s"))  # Compose's default
            env = service.get("environment", {})
            timers.append((f"compose {name}", kill, grace_of(env), env))
    for name, obj in deployments().items():
        spec = obj["spec"]["template"]["spec"]
        for container in spec["containers"]:
            if "supervise" in container["args"]:
                kill = float(spec.get("terminationGracePeriodSeconds", 30))  # k8s' default
                env = container_env(container)
                timers.append((f"k8s {name}", kill, grace_of(env), env))
    for path in sorted(SYSTEMD.glob("*.service")):
        values = unit(path)
        if any("supervise" in v for v in values["ExecStart"]):
            env = unit_env(values)
            kill = systemd_seconds(values["TimeoutStopSec"][-1])
            timers.append((path.name, kill, grace_of(env), env))
    return timers


def test_each_stop_timer_outlasts_the_drain():
    timers = _stop_timers()
    assert {w.split()[0] for w, *_ in timers} >= {"compose", "k8s", "handoff-supervisor.service"}
    short = [
        f"{where}: kill after {kill:g}s, but graceful_timeout_s {grace:g}s + {MARGIN_S:g}s"
        for where, kill, grace, _ in timers
        if kill < grace + MARGIN_S
    ]
    assert not short, "\n".join(short)
    assert all(grace >= DEFAULT_GRACE_S for *_, grace, _ in timers)


def test_each_deployment_drains_its_longest_task_and_says_so_in_the_doc():
    doc = DOC.read_text()
    for name, obj in deployments().items():
        spec = obj["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        if "supervise" not in container["args"]:
            continue
        grace = grace_of(container_env(container))
        longest = float(obj["metadata"]["annotations"][LONGEST_TIMEOUT])
        assert grace >= longest, f"{name}: graceful_timeout_s {grace} < longest {longest}"
        row = f"`graceful_timeout_s` {grace:g}, `terminationGracePeriodSeconds` "
        row += f"{spec['terminationGracePeriodSeconds']}"
        assert row in doc, f"deploy.md does not give {name}'s figures: {row}"
        assert container["readinessProbe"]["exec"]["command"][0] == PROBE.name
        assert container["livenessProbe"]["exec"]["command"][0] == PROBE.name
        strategy = obj["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] in ("0", 0)


def test_the_image_is_multi_stage_non_root_and_holds_no_source():
    steps = containerfile()
    stages = [stage for stage, _ in steps["FROM"]]
    assert stages[:2] == ["build", "runtime"], stages
    assert all("python:${PYTHON_VERSION}-slim" in rest for _, rest in steps["FROM"][:2])
    assert any("pip wheel" in rest for stage, rest in steps["RUN"] if stage == "build")
    installs = [rest for stage, rest in steps["RUN"] if stage == "runtime"]
    assert any("--no-index" in r and "handoff[${EXTRAS}]" in r for r in installs)
    copied = [rest for stage, rest in steps.get("COPY", []) if stage != "build"]
    assert not [c for c in copied if re.search(r"\b(core|pyproject\.toml)\b", c)], copied
    user = steps["USER"][-1][1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(steps["ENTRYPOINT"][-1][1]) == ["handoff"]
    assert f"COPY --chmod=0755 config/deploy/{PROBE.name}" in " ".join(
        f"COPY {r}" for _, r in steps["COPY"]
    )


def test_compose_keeps_every_task():
    services = compose_services()
    command = " ".join(services["valkey"]["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in command
    assert services["supervisor"]["healthcheck"]["test"] == ["CMD", "handoff", "health"]


def test_the_systemd_units():
    for path in sorted(SYSTEMD.glob("*.service")):
        values = unit(path)
        assert values["Restart"] == ["on-failure"], path.name
        assert values["KillSignal"] == ["SIGTERM"], path.name
        assert values["EnvironmentFile"], path.name
        assert "TimeoutStopSec" in values, path.name
    assert unit(SYSTEMD / "handoff-supervisor.service")["KillMode"] == ["mixed"]


def test_the_pods_probe_narrows_handoff_health_to_their_own_workers():
    probe = load_probe()
    assert probe.COMMAND[0] == "handoff" and not check_words(probe.COMMAND[1:])
    here, there = {"id": "a", "host": "pod-1"}, {"id": "b", "host": "pod-2"}
    ok, bad = {"healthy": True}, {"healthy": False, "problems": ["not making progress"]}
    assert probe.verdict("ready", [here | ok, there | bad], "pod-1")[0] == 0
    assert probe.verdict("live", [here | ok, there | bad], "pod-1")[0] == 0
    assert probe.verdict("ready", [here | bad, there | ok], "pod-1")[0] == 1
    assert probe.verdict("live", [here | bad, there | ok], "pod-1")[0] == 1
    assert probe.verdict("ready", [there | ok], "pod-1")[0] == 1  # none of ours yet
    assert probe.verdict("live", [there | ok], "pod-1")[0] == 0
    assert probe.verdict("ready", None, "pod-1")[0] == 1  # the command failed
    assert probe.verdict("live", None, "pod-1")[0] == 0


def _copies(stage: str | None = None) -> list[tuple[str, list[str], str]]:
    """(stage, sources, destination) of each COPY from the build context."""
    out = []
    for where, rest in containerfile()["COPY"]:
        words = [w for w in rest.split() if not w.startswith("--")]
        if "--from=" not in rest and (stage is None or where == stage):
            out.append((where, words[:-1], words[-1]))
    return out


def test_what_the_image_copies_exists_and_is_in_the_build_context():
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore  # everything else stays out of the context
    for _, sources, _ in _copies():
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_the_build_stage_copies_enough_to_build_the_wheel(tmp_path):
    """`pip wheel` on exactly what the build stage copies (no container engine here: the
    wheel's own build is what can be run)."""
    src = tmp_path / "src"
    for _, sources, dest in _copies("build"):
        for source in sources:
            into_dir = dest.endswith("/") or dest == "." or len(sources) > 1
            target = src / dest / Path(source).name if into_dir else src / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("handoff-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "handoff/cli/__init__.py" in names and "handoff/protocol/lua/claim.lua" in names
    assert not [n for n in names if n.startswith(("workers/", "tests/", "config/"))]
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "Hand tasks between agents" in archive.read(metadata).decode()  # README.md came


def test_the_agents_the_files_run_are_the_apps_and_fit_their_grace():
    """Against the demo app the image carries: each agent a supervisor runs is defined,
    its timeout_s fits in graceful_timeout_s (and the annotation that records the longest),
    and the LLM group's KEDA threshold is one pod's slots, as the doc says."""
    pytest.importorskip("pydantic")  # the demo's payloads are typed
    from handoff.runtime.agents import load_app

    demo = containerfile()["ENV"][-1][1]
    assert "HANDOFF_APP=workers.demo" in demo
    specs = load_app("workers.demo")
    for where, _, grace, env in _stop_timers():
        if env.get("HANDOFF_APP", "workers.demo") != "workers.demo":
            continue  # the systemd unit's `myapp`: the reader's own
        if where.startswith("compose"):
            args = compose_services()[where.split()[1]]["command"]
        else:
            (container,) = deployments()[where.split()[1]]["spec"]["template"]["spec"]["containers"]
            args = container["args"]
        agents = _agents_value(args)
        assert set(agents) <= set(specs), f"{where}: {set(agents) - set(specs)} not in the app"
        longest = max(specs[a].timeout_s or 0 for a in agents)
        assert longest <= grace, f"{where}: a timeout_s of {longest}s > graceful {grace}s"
        if where.startswith("k8s"):
            annotations = deployments()[where.split()[1]]["metadata"]["annotations"]
            assert longest <= float(annotations[LONGEST_TIMEOUT]), where
    (llm,) = [o for o in _scaled_objects() if o["metadata"]["name"] == "handoff-llm"]
    (container,) = deployments()["handoff-llm"]["spec"]["template"]["spec"]["containers"]
    slots = sum(n * specs[a].max_concurrent for a, n in _agents_value(container["args"]).items())
    assert [float(t["metadata"]["threshold"]) for t in llm["spec"]["triggers"]] == [slots]


def _run_probe(mode: str, env: dict[str, str], bin_dir: Path) -> tuple[int, str]:
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(PROBE), mode], env=env, capture_output=True, text=True, timeout=30
    )
    return done.returncode, done.stdout.strip()


def test_the_probe_sees_its_own_supervisors_workers(start, redis_url, tmp_path):
    """End to end on a real server: not ready before this host has a worker, ready and
    live once the supervisor's worker heartbeats, still live when the server is gone."""
    from harness.procs import handoff_env

    bin_dir = tmp_path / "bin"  # `handoff` on PATH: this checkout's, as the image's is
    bin_dir.mkdir()
    shim = bin_dir / "handoff"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m handoff "$@"\n')
    shim.chmod(0o755)
    env = handoff_env(redis_url)
    assert _run_probe("ready", env, bin_dir)[0] == 1
    assert _run_probe("live", env, bin_dir)[0] == 0
    start(["supervise", "--agents", "probe=1"])
    deadline = time.monotonic() + 30
    while (status := _run_probe("ready", env, bin_dir))[0] != 0:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert "1 worker(s)" in status[1], status
    assert _run_probe("live", env, bin_dir) == (0, status[1].replace("ready:", "live:", 1))
    gone = {**env, "HANDOFF_REDIS_URL": "redis://127.0.0.1:1/0", "HANDOFF_REDIS_MAX_RETRIES": "0"}
    assert _run_probe("ready", gone, bin_dir)[0] == 1
    assert _run_probe("live", gone, bin_dir)[0] == 0
