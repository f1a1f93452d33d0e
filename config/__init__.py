"""handoff configuration: typed, validated settings loaded from presets, TOML, env and flags."""

from config.defaults import default_redis_url, default_run_dir, default_socket_path
from config.errors import ConfigError
from config.loader import load_settings
from config.pool import RedisPoolConfig
from config.presets import PRESETS
from config.redact import redact_url
from config.settings import Settings, settings_to_dict

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
