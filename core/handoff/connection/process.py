"""This process's id, kept without a system call.

os.getpid() is a system call on every use (glibc stopped caching it), and each call
through the client asks "am I still in the process that opened these sockets?" (a pool
used after fork must not share the parent's sockets). On a cold single enqueue the two
asks were two of its six system calls. The id is read once and again in a child after
os.fork (multiprocessing and the supervisor fork through it).
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """os.getpid(), as of the last fork."""
    return _pid
