"""`handoff demo`: feed the demo agents (workers/demo.py) at a steady rate."""

from __future__ import annotations

import logging
import signal
import time

import click

from core.errors import RedisUnavailable

log = logging.getLogger(__name__)


@click.command()
@click.option("--rate", type=click.FloatRange(0.01, 100_000), default=2.0, help="Tasks a second.")
@click.option("--count", type=click.IntRange(1), default=None, help="Stop after this many.")
@click.pass_obj
def demo(state, rate: float, count: int | None) -> None:
    """Feed the demo planner with feature requests (waits for the server to come up)."""
    from core.client import Client
    from workers.demo import produce

    settings = state.settings
    client = Client(settings=settings)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.queue.manager.execute(lambda c: c.ping())
            break
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    click.echo(f"demo producer: {rate:g} feature request(s)/s to planner")
    signal.signal(signal.SIGTERM, _stop)
    try:
        sent = produce(client, rate_per_s=rate, count=count)
    except KeyboardInterrupt:
        sent = None
    click.echo("demo producer: stopped" if sent is None else f"demo producer: sent {sent}")


def _stop(_signum, _frame) -> None:
    raise KeyboardInterrupt
