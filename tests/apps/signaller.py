"""A signalling process for the waits race test: `python -m apps.signaller NAME PLAN`,
PLAN a JSON list of [delay_s, event]. Once connected it says so (RPUSH signallers_ready)
and takes the start time (ns, time.time_ns) from go:NAME; it signals each event at start
+ delay, and records [name, event, resumed, at_ms] in the test's server's `signals` list
(TEST_REDIS_URL), outside handoff."""

from __future__ import annotations

import os
import sys
import time

import orjson

from handoff import Client
from harness.procs import plain_client


def main() -> None:
    name, plan = sys.argv[1], orjson.loads(sys.argv[2])
    record = plain_client(os.environ["TEST_REDIS_URL"])
    with Client() as client:
        client.signal("signaller.warm")  # connected, scripts loaded
        record.rpush("signallers_ready", name)
        start_ns = int(record.blpop([f"go:{name}"], 30)[1])
        for delay_s, event in sorted(plan):
            time.sleep(max(0.0, (start_ns + delay_s * 1e9 - time.time_ns()) / 1e9))
            resumed = client.signal(event, {"from": name})
            at_ms = time.time_ns() // 1_000_000
            record.rpush("signals", orjson.dumps([name, event, resumed, at_ms]))


if __name__ == "__main__":
    main()
