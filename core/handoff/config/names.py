"""The shapes of names every layer checks: agent types and the key prefix.

Its own module so the settings, the autoscale and schedule tables and the key schema
import one definition without importing each other.
"""

from __future__ import annotations

import re

KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
AGENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
