"""load_settings: merge defaults < preset < TOML file < environment < overrides, then validate.

Every layer is a flat mapping of dotted keys ("redis.pool_size", "lease_s", "agents"),
so precedence is a plain dict update and one key means the same thing in every layer.
Unknown keys in a file or in overrides are errors (a typo must not silently fall back
to a default); unknown HANDOFF_* environment variables are ignored, since the
environment is shared with other tools and with handoff's own process plumbing.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from handoff.config.errors import ConfigError
from handoff.config.pool_settings import SECRET_FIELDS, RedisPoolConfig
from handoff.config.presets import PRESETS
from handoff.config.settings import Settings, parse_agent_counts

PRESET_ENV = "HANDOFF_PRESET"
CONFIG_ENV = "HANDOFF_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _key_types() -> dict[str, Any]:
    pool = typing.get_type_hints(RedisPoolConfig)
    settings = typing.get_type_hints(Settings)
    types_ = {f"redis.{f.name}": pool[f.name] for f in fields(RedisPoolConfig)}
    types_.update({f.name: settings[f.name] for f in fields(Settings) if f.name != "redis"})
    return types_


KEY_TYPES = _key_types()


def load_settings(
    *,
    preset: str | None = None,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build the effective Settings; raise ConfigError (one line) on any bad input."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    preset = preset or env.get(PRESET_ENV) or None
    if preset is not None:
        values.update(preset_values(preset))
    config_file = config_file or env.get(CONFIG_ENV) or None
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(env_values(env))
    values.update(override_values(overrides or {}))
    return build_settings(values)


def preset_values(name: str) -> dict[str, Any]:
    key = name.strip().lower().replace("-", "_")
    if key not in PRESETS:
        raise ConfigError(f"preset = {name!r}: must be one of {', '.join(PRESETS)}")
    return dict(PRESETS[key])


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Flatten a TOML file: top-level Settings keys, a [redis] table, an [agents] table."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"config file {where}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:  # its message ends "(at line N, column M)"
        raise ConfigError(f"config file {where}: invalid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "redis" and isinstance(value, dict):
            flat.update({f"redis.{k}": v for k, v in value.items()})
        elif key == "redis":
            raise ConfigError(f"config file {where}: redis must be a table ([redis])")
        else:
            flat[key] = value
    for key in flat:
        check_known(key, where=f"config file {where}: ")
    return flat


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """REDIS_URL, HANDOFF_REDIS_<FIELD>, HANDOFF_<FIELD> and HANDOFF_AGENTS; others ignored."""
    out: dict[str, Any] = {}
    if env.get("REDIS_URL"):
        out["redis.url"] = env["REDIS_URL"]
    for var, text in env.items():
        if not var.startswith("HANDOFF_") or text == "":  # empty means unset
            continue
        name = var[len("HANDOFF_") :].lower()
        if name.startswith("redis_") and f"redis.{name[6:]}" in KEY_TYPES:
            name = f"redis.{name[6:]}"
        if name in KEY_TYPES:  # HANDOFF_REDIS_URL is more specific, so it beats REDIS_URL
            out[name] = coerce(name, text, source=var)
    return out


def override_values(overrides: Mapping[str, object]) -> dict[str, Any]:
    """Command-line flags: typed values or strings; None means "flag not given"."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        check_known(key)
        if value is not None:
            out[key] = coerce(key, value, source=key) if isinstance(value, str) else value
    return out


def build_settings(values: Mapping[str, Any]) -> Settings:
    pool = {k[len("redis.") :]: v for k, v in values.items() if k.startswith("redis.")}
    rest = {k: v for k, v in values.items() if not k.startswith("redis.")}
    return Settings(redis=RedisPoolConfig(**pool), **rest)


def check_known(key: str, *, where: str = "") -> None:
    if key in KEY_TYPES:
        return
    close = difflib.get_close_matches(str(key), list(KEY_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}unknown setting {key!r}{hint}")


def coerce(key: str, text: str, *, source: str) -> Any:
    """Turn an environment/flag string into the field's type; errors name `source`."""
    kind = KEY_TYPES[key]
    parse = _PARSERS.get(kind)
    if parse is None and isinstance(kind, types.UnionType):  # str | None
        parse = _optional_str
    try:
        return parse(text) if parse else text
    except ValueError as e:
        shown = "'***'" if key.removeprefix("redis.") in SECRET_FIELDS else repr(text)
        raise ConfigError(f"{source} = {shown}: {e} ({key})") from None


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be an integer") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError("must be a number") from None


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _optional_str(text: str) -> str | None:
    return text or None  # an empty variable means "not set"


_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: _int,
    float: _float,
    bool: _bool,
    dict[str, int]: lambda text: parse_agent_counts(text) if text.strip() else {},
}
