"""Groups: fair sharing between customers (or models, or tenants) of one agent type.

Runs in: producers (a group name is checked at enqueue), workers (the agent's group
limits go with each claim). Pure: no Redis here; the rotation lives in the claim script
(see "Groups" in lib/groups.lua and pick_fairly in lib/fairness.lua).

The picture. A task enqueued with group="customer-42" waits in that group's own ready set,
not in the agent's queue. The claim takes tasks one at a time from a rotation of the
groups with ready tasks (the ungrouped queue takes its turn there too), ranked by their
head's priority, then by when each was last served: a group with one ready task waits at
most one turn of each other group of its priority, whatever their backlog. A group may
have its own start rate (group_rate, GCRA as the agent's) and a cap on how many of its
tasks run at once (group_concurrency); a group over either waits aside (parked until its
rate allows, or until one of its tasks ends) and the rotation goes on without it. A
handler's RateLimited pauses its task's group only. A group's keys go when it is idle:
its ready set empties away, its limiter hash expires.
"""

from __future__ import annotations

import re

from handoff.errors import InvalidPayload

# Letters, digits and . _ - : @ / (no key syntax: braces, spaces, control characters).
GROUP_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


def check_group(group: object, what: str = "group") -> str:
    """Return group if it is a valid group name, else raise a one-line InvalidPayload."""
    if not isinstance(group, str) or GROUP_NAME.fullmatch(group) is None:
        shown = repr(group)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise InvalidPayload(
            f"invalid {what} {shown}: 1 to 128 of A-Z a-z 0-9 . _ : @ / - (no braces, "
            "spaces or control characters)"
        )
    return group
