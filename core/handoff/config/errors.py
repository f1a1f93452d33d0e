"""Configuration errors: one line naming the field, the value and what is allowed."""


class ConfigError(ValueError):
    """A configuration value is out of range, malformed or unknown."""
