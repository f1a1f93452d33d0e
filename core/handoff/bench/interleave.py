"""The run loop of a benchmark: configurations in turn, and stop signals that unwind.

Interleaving spreads the machine's noise (another process, a thermal step) over every
configuration instead of charging one of them with it. SIGTERM and SIGHUP raise
KeyboardInterrupt while a benchmark runs, so every `finally` stops the servers and
workers it started. Shared by `handoff bench e2e` and the scripts/bench-* benchmarks.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator


def raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt inside; SIGINT does too, even when the
    benchmark was started with it ignored. The previous handlers come back after."""
    previous = {
        sig: signal.signal(sig, handler)
        for sig, handler in (
            (signal.SIGTERM, raise_interrupt),
            (signal.SIGHUP, raise_interrupt),
            (signal.SIGINT, signal.default_int_handler),
        )
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def repeat_interleaved(
    entries: dict[str, dict],
    repeats: int,
    noun: str,
    measure: Callable[[str, int], dict],
    summary: Callable[[dict], str],
    failures: tuple[type[BaseException], ...],
    *,
    rotate: bool = False,
) -> None:
    """measure(key, i) for every key of `entries`, interleaved, `repeats` times: the figures
    go to entry[noun + "s"], a failure (one of `failures`) to entry["errors"]; a progress
    line on stderr for each. rotate: start each round one key later (a b c, b c a, ...),
    so no configuration always runs first on a cold machine."""
    keys = list(entries)
    for i in range(repeats):
        shift = i % len(keys) if rotate and keys else 0
        for key in keys[shift:] + keys[:shift]:
            entry = entries[key]
            t0 = time.monotonic()
            try:
                figures = measure(key, i)
                entry[f"{noun}s"].append(figures)
                status = summary(figures)
            except failures as e:
                entry["errors"].append(f"{noun} {i + 1}: {e}"[:600])
                status = f"FAILED: {e}"[:300]
            print(
                f"[{noun} {i + 1}/{repeats}] {key:12s} {time.monotonic() - t0:5.1f}s  {status}",
                file=sys.stderr,
                flush=True,
            )
