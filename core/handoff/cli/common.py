"""State shared by every command: the global options, and settings loaded once on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from handoff.config import Settings, load_settings


@dataclass
class CliState:
    redis_url: str | None = None
    config_file: str | None = None
    preset: str | None = None
    app: str | None = None
    log_level: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    def overrides(self) -> dict[str, object]:
        values = {"redis.url": self.redis_url, "app": self.app, "log_level": self.log_level}
        return {k: v for k, v in values.items() if v is not None}

    def reload_settings(self) -> Settings:
        """Read the settings again (SIGHUP)."""
        self._settings = None
        return self.settings

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(
                preset=self.preset, config_file=self.config_file, overrides=self.overrides()
            )
            setup_logging(self._settings.log_level)
        return self._settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def parse_counts(text: str) -> dict[str, int]:
    """'a=2,b=1' -> {'a': 2, 'b': 1}, or a usage error naming the bad part."""
    import click

    from handoff.config.settings import parse_agent_counts

    try:
        return parse_agent_counts(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def print_json(value: object) -> None:
    import click
    import orjson

    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A plain left-aligned table that fits narrow terminals."""
    import click

    from handoff.observe.view import table_lines

    click.echo("\n".join(table_lines(headers, rows)))
