"""Where the development server lives, so every command in one folder finds the same one.

The socket sits in the project's run folder (not on TCP 6379), so `handoff monitor`
in another terminal talks to the server `./scripts/run` started and never to a
system Redis.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_run_dir() -> Path:
    """The project's run folder (socket, pid, data): $HANDOFF_RUN_DIR or ./.run."""
    return Path(os.environ.get("HANDOFF_RUN_DIR") or ".run").resolve()


def default_socket_path() -> Path:
    """The development server's unix socket inside the run folder."""
    return default_run_dir() / "redis.sock"


def default_redis_url() -> str:
    """The development server's one well-known address (read at call time, not import)."""
    return f"unix://{default_socket_path()}"
