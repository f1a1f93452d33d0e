"""The list of command groups, in the order `handoff --help` shows them."""

from __future__ import annotations

from core.cli.config_cmd import config_group

ALL: list = [config_group]
