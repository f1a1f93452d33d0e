"""The pulse: this worker's sign of life for its supervisor (liveness.py).

Runs in: a worker process, its own thread. It beats shared memory, not Redis, so a slow
or full server never makes a healthy worker look stalled; and it needs the GIL, so a
wedged interpreter stops beating.
"""

from __future__ import annotations

import time

from handoff.runtime.liveness import Pulse
from handoff.runtime.worker_events import HelperThread, Shared


class PulseBeat(HelperThread):
    name = "pulse"

    def __init__(self, shared: Shared, pulse: Pulse | None, every_s: float) -> None:
        super().__init__(shared)
        self.pulse = pulse
        self.every_s = every_s

    def run(self) -> None:
        while self.pulse is not None:
            self.pulse.beat()
            time.sleep(self.every_s)
