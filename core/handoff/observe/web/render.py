"""Templates: one Jinja environment with autoescape on, and the filters the pages share.

Runs in: the dashboard. Everything from Redis (agent names are checked, but payloads,
results, reasons and tracebacks are whatever a producer or a handler wrote) reaches the
page through a template, so through the escaper: nothing is marked safe but the regions
these same templates rendered.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

PREVIEW_CHARS = 160  # a payload in a table row
FULL_CHARS = 20_000  # a payload, result or traceback on a task's page


def age(seconds: Any) -> str:
    """1.5 -> '1.5s', 125 -> '2m 5s', 7300 -> '2h 1m'; None or junk -> '-'."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if s < 0:
        s = 0.0
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60)}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"


def duration_ms(ms: Any) -> str:
    """A handler's run time: '38 ms', '1.24 s', '2m 5s'."""
    try:
        value = float(ms)
    except (TypeError, ValueError):
        return "-"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 60_000:
        return f"{value / 1000:.2f} s"
    return age(value / 1000)


def clock(epoch_ms: Any) -> str:
    """A stored time (ms since the epoch) as the server's local date and time."""
    try:
        seconds = float(epoch_ms) / 1000
    except (TypeError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def since_ms(epoch_ms: Any) -> str:
    """How long ago a stored time was: '3.2s' (for ages of queued tasks)."""
    try:
        return age(time.time() - float(epoch_ms) / 1000)
    except (TypeError, ValueError):
        return "-"


def as_json(value: Any, limit: int = FULL_CHARS) -> str:
    """Pretty JSON text, cut at limit characters (escaped later, like any text)."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more)"


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """One-line JSON for a table cell, cut at limit characters."""
    if value is None:
        return ""
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: Any, limit: int = FULL_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more)"


def make_environment() -> Environment:
    env = Environment(
        loader=PackageLoader("handoff.observe.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        age=age,
        duration_ms=duration_ms,
        clock=clock,
        since_ms=since_ms,
        as_json=as_json,
        preview=preview,
        cut=cut,
    )
    return env


class Renderer:
    """Renders a page or a region; a region comes back as Markup, to be placed as is."""

    def __init__(self) -> None:
        self.env = make_environment()

    def region(self, name: str, **context: Any) -> Markup:
        return Markup(self.env.get_template(f"{name}.html").render(**context))

    def page(self, name: str, **context: Any) -> str:
        return self.env.get_template(f"{name}.html").render(**context)
