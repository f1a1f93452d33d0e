"""Agent definitions. The demo chain lives in workers.demo; add your own modules here
and import them below, or point --app at your own module."""

from workers import demo  # noqa: F401  (registers the demo agents)
