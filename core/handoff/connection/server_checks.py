"""Checks of the server's own settings that decide whether tasks are safe on it.

Runs in: workers and supervisors at start.
"""

from __future__ import annotations

import logging

from handoff.config import Settings
from handoff.connection.manager import RedisManager
from handoff.errors import RedisCommandError, UnsafeServer

log = logging.getLogger(__name__)


def check_eviction_policy(manager: RedisManager, settings: Settings) -> str | None:
    """Refuse (or warn, per settings.eviction_policy) when the server may evict keys.

    Returns the policy, or None when the server does not let us read it (CONFIG GET
    forbidden by an ACL or a managed service): then it is logged, not enforced.
    """
    policy = ""
    for node in manager.node_clients():  # every primary of a cluster: any one may evict
        try:
            reply = manager.execute(lambda _c, node=node: node.config_get("maxmemory-policy"))
        except RedisCommandError:
            log.info("could not read maxmemory-policy (CONFIG GET not allowed); make sure it "
                     "is noeviction: eviction silently deletes tasks")  # fmt: skip
            return None
        found = reply.get(b"maxmemory-policy") or reply.get("maxmemory-policy") or b""
        policy = found.decode() if isinstance(found, bytes) else str(found)
        if policy != "noeviction":
            break
    if policy and policy != "noeviction":
        message = (
            f"the server's maxmemory-policy is {policy!r}, not 'noeviction': under memory "
            "pressure it silently deletes keys, tasks included"
        )
        if settings.eviction_policy == "refuse":
            raise UnsafeServer(
                f'{message}; set it to noeviction (or eviction_policy = "warn" to run anyway)'
            )
        log.warning("DANGER: %s", message)
    return policy
