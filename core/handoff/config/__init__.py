"""handoff configuration: typed, validated settings loaded from presets, TOML, env and flags."""

from handoff.config.defaults import default_redis_url, default_run_dir, default_socket_path
from handoff.config.errors import ConfigError
from handoff.config.loader import load_settings
from handoff.config.pool_settings import RedisPoolConfig
from handoff.config.presets import PRESETS
from handoff.config.redact import redact_url
from handoff.config.settings import Settings, settings_to_dict

__all__ = [
    "PRESETS",
    "ConfigError",
    "RedisPoolConfig",
    "Settings",
    "default_redis_url",
    "default_run_dir",
    "default_socket_path",
    "load_settings",
    "redact_url",
    "settings_to_dict",
]
