"""Value checks shared by every setting and by a task's fields: each failure is one line,
"name = value: what is allowed", raised as a ConfigError unless the caller names another
error type."""

from __future__ import annotations

import math
from typing import Any, NoReturn

from handoff.config.errors import ConfigError


def show(value: object) -> str:
    """Format a value for an error message (floats without a trailing noise of digits)."""
    if isinstance(value, float):
        return format(value, "g")
    return repr(value)


def _bound(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else show(limit)


def fail(name: str, value: object, rule: str) -> NoReturn:
    raise ConfigError(f"{name} = {show(value)}: {rule}")


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    integer: bool = False,
    error: type[Exception] = ConfigError,
) -> Any:
    """The one range check: a number (an integer when asked) in [low, high], else one
    line "name = value: must be ..." raised as `error` (a ConfigError for settings, an
    InvalidPayload for a task's fields)."""
    kind = type(value)  # the common case first: an exact int (not a bool) or float in range
    if (kind is int or (kind is float and not integer)) and low <= value <= high:
        return value
    # bool is an int subclass; `pool_size = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise error(f"{name} = {show(value)}: must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:  # NaN fails this too
        raise error(f"{name} = {show(value)}: must be between {_bound(low)} and {_bound(high)}")
    return value


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if hi is not None:
        return check_range(name, value, lo, hi, integer=True)
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, value, "must be an integer")
    if value < lo:
        fail(name, value, f"must be >= {lo}")
    return value


def check_seconds(name: str, value: Any, *, zero_ok: bool) -> float:
    """A duration or size as a float; `zero_ok` for fields where 0 means "off"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(name, value, "must be a number")
    if not math.isfinite(value):
        fail(name, value, "must be a finite number")
    if zero_ok and value < 0:
        fail(name, value, "must be >= 0")
    if not zero_ok and value <= 0:
        fail(name, value, "must be > 0")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(name, value, "must be true or false")
    return value
