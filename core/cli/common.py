"""State shared by every command: the global options, and settings loaded once on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from config import Settings, load_settings


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
