"""`handoff config show`: print the effective configuration, secrets redacted.

Runs in: the CLI process. The text form is valid TOML (unset values are comments),
so its output can be saved and passed back with --config.
"""

from __future__ import annotations

import json
from typing import Any

import click

from handoff.cli.common import CliState
from handoff.config import ConfigError, settings_to_dict


class ConfigFailure(click.ClickException):
    """A bad setting: one line on stderr and exit status 2, like the other handoff errors."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"handoff: error: {self.message}", err=True)


@click.group("config")
def config_group() -> None:
    """Inspect the effective configuration (defaults < preset < file < env < flags)."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@click.pass_obj
def show(state: CliState, as_json: bool) -> None:
    """Print every setting with its effective value; passwords are shown as ***."""
    try:
        data = settings_to_dict(state.settings, redact=True)
    except ConfigError as e:
        raise ConfigFailure(str(e)) from None
    mode = state.settings.redis.mode
    click.echo(json.dumps(data, indent=2) if as_json else to_toml(data, mode))


def to_toml(data: dict[str, Any], mode: str = "server") -> str:
    """Top-level keys first, then [redis], [agents] and [schedules.<name>] (TOML requires
    tables last)."""
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [
        "# effective handoff configuration (secrets redacted)",
        f"# deployment: {mode} (from redis.url and redis.cluster; docs/operations/scaling.md)",
    ]
    lines += _lines({k: v for k, v in data.items() if k not in tables})
    for name in ("redis", *sorted(set(tables) - {"redis", "schedules"})):
        if name in tables:
            lines += ["", f"[{name}]", *_lines(tables[name])]
    for name, table in tables.get("schedules", {}).items():  # names are bare keys too
        lines += ["", f"[schedules.{name}]", *_lines(table)]
    return "\n".join(lines)


def _lines(values: dict[str, Any]) -> list[str]:
    return [_line(key, value) for key, value in values.items()]


def _line(key: str, value: Any) -> str:
    # Field and agent names are validated to [A-Za-z0-9_-], so every key is a bare TOML key.
    if value is None:
        return f"# {key} is not set"
    return f"{key} = {_value(value)}"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):  # a schedule's payload, as an inline table (quoted keys)
        items = (f"{_value(str(k))} = {_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    # JSON's string escapes are valid TOML; TOML also forbids a raw DEL.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
