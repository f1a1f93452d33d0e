"""Named exit statuses of worker processes; the supervisor's policy keys off them."""

from __future__ import annotations

import os

EXIT_OK = 0  # asked to stop, drained, gave everything back
EXIT_CRASH = 1  # an unexpected exception escaped the worker: restart with backoff
EXIT_BOOT_ERROR = 3  # cannot start at all (app import error, unknown agent): halt
EXIT_RECYCLE = 4  # reached max tasks / RSS / age, or a handler is stuck: replace now
EXIT_PARENT_GONE = 5  # the supervisor died: nothing to replace us

NAMES = {
    EXIT_OK: "ok",
    EXIT_CRASH: "crash",
    EXIT_BOOT_ERROR: "boot-error",
    EXIT_RECYCLE: "recycle",
    EXIT_PARENT_GONE: "parent-gone",
}


def describe(status: int) -> str:
    """Decode an os.waitpid status: 'exit 4 (recycle)' or 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        import signal

        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    code = os.waitstatus_to_exitcode(status)
    return f"exit {code} ({NAMES.get(code, 'unknown')})"
