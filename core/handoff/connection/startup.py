"""Wait for a server that is starting: not listening yet, or loading its data set.

Runs in: the supervisor, each worker and the monitor, once, before their loops. Under
honcho every process starts at once, so the server may not have made its socket yet,
and a second start of an append-only server spends seconds loading its file (every
command answers LOADING meanwhile). Neither is an outage: it is said once at INFO and
waited for, instead of an error line per failed call. A server still not ready after
`timeout_s` is left to the usual path (retries, the breaker, the outage log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from handoff.connection.manager import RedisManager
from handoff.connection.outage import not_ready_reason

# Long enough for a few hundred MB of append-only file to load; short enough that a
# misconfigured address is reported as an outage well within a minute.
STARTUP_WAIT_S = 30.0
_FIRST_DELAY_S, _MAX_DELAY_S = 0.02, 0.5


def wait_for_server(
    manager: RedisManager,
    log: logging.Logger,
    who: str,
    timeout_s: float = STARTUP_WAIT_S,
    stopping: Callable[[], bool] = lambda: False,
) -> bool:
    """PING until the server answers; True when it did within timeout_s. Says once at
    INFO that it waits and why, and once how long it took; any other error returns at
    once (False), for the caller's usual handling."""
    started = time.monotonic()
    delay, said = _FIRST_DELAY_S, False
    while True:
        try:
            _probe(manager.client)
        except (redis.RedisError, OSError) as e:
            reason = not_ready_reason(e)
            if reason is None:
                return False
            if not said:
                where = manager.config.redacted_url
                log.info("%s: waiting for Redis at %s (%s)", who, where, reason)
                said = True
            if stopping() or time.monotonic() - started + delay > timeout_s:
                return False
            time.sleep(delay)  # backoff between probes of a server that is starting
            delay = min(delay * 2, _MAX_DELAY_S)
            continue
        if said:
            log.info("%s: Redis ready after %.1fs", who, time.monotonic() - started)
        return True


def _probe(client: redis.Redis) -> None:
    """PING, then INFO's loading flag: both are answered while the server loads its data
    set, when every other command is refused with LOADING. A user the ACL denies INFO
    is taken at its PING."""
    client.ping()
    try:
        loading = client.info("persistence").get("loading")
    except redis.ResponseError:
        return
    if loading:
        raise redis.BusyLoadingError("the server is loading its data set")
