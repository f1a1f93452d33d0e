"""A supervisor whose Redis thread meets a bug once the test sets `break-supervisor`, for
the test that a side thread's failure stops the supervisor as a crash instead of leaving
it alive without the thread. The probe agent is the one of apps.probe."""

from __future__ import annotations

from handoff.runtime import upkeep as _upkeep

from apps.probe import client, probe  # noqa: F401 - the agent this app serves

_poll = _upkeep.Upkeep._heartbeat_and_poll


def _poll_with_a_bug(self, redis_client) -> list[bytes]:
    if client().delete("break-supervisor"):
        raise RuntimeError("a bug in the supervisor's Redis thread")
    return _poll(self, redis_client)


_upkeep.Upkeep._heartbeat_and_poll = _poll_with_a_bug
