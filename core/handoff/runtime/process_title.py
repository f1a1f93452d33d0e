"""What `ps` and `top` call a worker process: `handoff worker AGENT #N`.

A forked worker keeps its supervisor's command line, so without this every process of a
supervisor looks the same in `ps`, and an operator cannot tell which one to look at.
setproctitle rewrites the process's argv area (and its 15-character comm name), the
way gunicorn and Celery name their workers.
"""

from __future__ import annotations

from setproctitle import setproctitle


def name_worker(agent: str, number: int) -> None:
    """Name this (forked) process for its agent type and its place among that type's
    processes in its supervisor."""
    setproctitle(f"handoff worker {agent} #{number}")


def free_number(taken: set[int]) -> int:
    """The smallest worker number from 1 not held by a live process of the same type:
    a replaced worker takes the number of the one it replaces."""
    number = 1
    while number in taken:
        number += 1
    return number
