"""A worker whose inbox thread meets a bug once (the test sets `break-inbox`), for the
test that a helper thread's failure replaces the worker instead of leaving it without
the thread. The probe agent is the one of apps.probe."""

from __future__ import annotations

from handoff.runtime import inbox as _inbox

from apps.probe import client, probe  # noqa: F401 - the agent this app serves


def _inbox_with_a_bug(self) -> None:
    while not self.stop_event.wait(0.02):
        if client().delete("break-inbox"):  # once: the worker that replaces this one is fine
            raise RuntimeError("a bug in the inbox thread")


_inbox.Inbox.run = _inbox_with_a_bug
