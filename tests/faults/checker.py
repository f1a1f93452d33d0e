"""The Jepsen-style set check: every enqueued id against what ran and what finished."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class SetCheck:
    enqueued: set[str]
    executed: Counter
    done: set[str]

    @property
    def lost(self) -> set[str]:
        """Enqueued but neither done nor (for a test that stops early) still pending."""
        return self.enqueued - self.done

    @property
    def duplicated(self) -> dict[str, int]:
        return {task_id: n for task_id, n in self.executed.items() if n > 1}

    @property
    def unexpected(self) -> set[str]:
        return (set(self.executed) | self.done) - self.enqueued

    def report(self) -> str:
        return (
            f"enqueued={len(self.enqueued)} done={len(self.done)} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)}"
        )


def check(client, enqueued: Iterable[str], executions: Iterable[tuple[int, str]]) -> SetCheck:
    """Build the check from the ids a test enqueued and the (pid, id) executions recorded."""
    enqueued = set(enqueued)
    executed = Counter(task_id for _, task_id in executions)
    done = {task_id for task_id in enqueued if client.status(task_id) == "done"}
    return SetCheck(enqueued, executed, done)
