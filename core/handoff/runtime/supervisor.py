"""The supervisor: fork and keep N worker processes per agent type.

Runs in: `handoff supervise`. The prefork pattern of gunicorn's arbiter: signal handlers
only record the signal; one main loop reaps children (exit statuses decide policy),
spawns what is missing (with crash backoff), stops extras, rolls workers on SIGHUP, kills
the ones that overstay a stop, and replaces the ones whose pulse stopped (liveness.py).
Redis work (upkeep.py: the lease reaper, the autoscaler, `handoff scale` control messages,
the supervisor's heartbeat) runs in one side thread, so the main loop never blocks on the
network; schedules fire from a second one (schedules.py), which sleeps until the next tick
is due rather than for the reaper's interval. A side thread that fails on a bug stops the
supervisor as a crash. Children build their own pool after fork.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handoff.backoff import exponential_s
from handoff.config import Settings
from handoff.config.autoscale_spec import Bounds
from handoff.config.schedule_spec import ScheduleSpec
from handoff.connection.operations import apply_memory_settings
from handoff.connection.server_checks import check_eviction_policy
from handoff.connection.startup import wait_for_server
from handoff.errors import AppLoadError, ConfigError, HandoffError, UnsafeServer
from handoff.protocol.queue import TaskQueue
from handoff.runtime import exits, liveness
from handoff.runtime.agents import AgentSpec, load_app
from handoff.runtime.control import (
    Autoscaled,
    ScaleRequest,
    Signalled,
    ThreadFailed,
)
from handoff.runtime.liveness import Child, Pulse
from handoff.runtime.process_title import free_number, name_worker
from handoff.runtime.schedules import Scheduler, declared_schedules
from handoff.runtime.upkeep import Upkeep
from handoff.runtime.worker import Worker

log = logging.getLogger(__name__)

TICK_S = 0.2
CRASH_WINDOW_S = 60.0
FAST_AFTER_S = 1.0  # a second stop signal this long after the first means "fast"
HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)


@dataclass
class AgentState:
    target: int
    crashes: list[float] = field(default_factory=list)
    next_spawn_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        agents: dict[str, int],
        *,
        autoscale: dict[str, Bounds] | None = None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        self.states = {name: AgentState(count) for name, count in agents.items()}
        self._autoscale = dict(autoscale or {})
        for name, bounds in self._autoscale.items():
            self.states[name] = AgentState(bounds.min)
        self._live_pids: dict[str, list[int]] = {}
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.signals: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping: str | None = None  # None | "graceful" | "fast"
        self.stop_started = 0.0
        self.exit_code = exits.EXIT_OK
        self.specs: dict[str, AgentSpec] = {}
        self.schedules: list[ScheduleSpec] = []
        self._scheduler: Scheduler | None = None
        self.supervisor_id = f"{socket.gethostname()}-{os.getpid()}"

    # -- boot ------------------------------------------------------------------------------

    def load_specs(self) -> None:
        """Import the app before forking: an import error halts here, once, clearly; so
        does a schedule naming an agent the app does not define (ConfigError)."""
        specs = load_app(self.settings.app)
        unknown = [name for name in self.states if name not in specs]
        if unknown:
            known = ", ".join(sorted(specs)) or "none"
            raise AppLoadError(
                f"unknown agent(s) {', '.join(unknown)} in app {self.settings.app!r} "
                f"(defined: {known})"
            )
        self.specs = specs
        self.schedules = declared_schedules(self.settings, specs)

    def run(self) -> int:
        self.pid = os.getpid()
        self.load_specs()
        for sig in HANDLED:
            signal.signal(sig, self._on_signal)
        self._redis_stop = threading.Event()
        # The first Redis tick runs here, in the main thread, so every lazy import is done
        # before the side thread exists: a fork while another thread holds a module's
        # import lock leaves the child waiting on that lock forever.
        self.upkeep = Upkeep(self.settings, self.supervisor_id, self._autoscale, self.signals)
        self._manager = self.upkeep.manager
        wait_for_server(self._manager, log, "supervisor", stopping=lambda: self.stopping)
        try:
            check_eviction_policy(self._manager, self.settings)
            if self.settings.redis.memory_optimization:
                applied = apply_memory_settings(self._manager)
                log.info("supervisor: server memory settings: %s", applied or "none took")
        except UnsafeServer:
            raise
        except HandoffError as e:
            log.warning("supervisor: could not check the server: %s", e)
        self._redis_tick()
        self._start_thread("supervisor-redis", self._redis_loop)
        if self.schedules:
            self._start_schedules()
        log.info(
            "supervisor %s started: %s",
            self.supervisor_id,
            ", ".join(f"{a}={s.target}" for a, s in self.states.items()),
        )
        while True:
            self._reap_children()
            self._handle_signals()
            if self.stopping:
                if not self.children:
                    break
                self._kill_overstaying()
            else:
                self._manage()
            self._wait()
        self._redis_stop.set()
        try:
            self.upkeep.autoscaler.leave()
        except HandoffError:
            pass  # its parts expire on their own
        log.info("supervisor %s stopped (%s)", self.supervisor_id, exits.NAMES[self.exit_code])
        return self.exit_code

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        """A side thread handles Redis errors and bad data itself: anything else escaping
        it is a bug, and a supervisor without its Redis thread would look alive while it
        reaped, scaled and heartbeat no more. It says so and the supervisor stops as a
        crash (exit 1), so honcho or systemd restarts it, as a worker does (worker.py)."""

        def run() -> None:
            try:
                target()
            except BaseException:
                log.exception("supervisor: the %s thread failed; stopping as a crash", name)
                self.signals.put(ThreadFailed(name))

        threading.Thread(target=run, name=name, daemon=True).start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.put_nowait(Signalled(signum))

    def _wait(self) -> None:
        try:
            self.signals.put_nowait(self.signals.get(timeout=TICK_S))
        except queue.Empty:
            pass

    # -- signals ---------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while True:
            try:
                event = self.signals.get_nowait()
            except queue.Empty:
                return
            match event:
                case ScaleRequest(counts=counts):
                    for agent, count in counts.items():
                        self._pin(agent, count)
                case Autoscaled(agent=agent, count=count, reason=reason):
                    state = self.states[agent]
                    log.info(
                        "supervisor: autoscale %s %d -> %d: %s", agent, state.target, count, reason
                    )
                    state.target = count
                case ThreadFailed():
                    self.exit_code = exits.EXIT_CRASH
                    self.handle_sigterm()
                case Signalled(signum=signum):
                    name = signal.Signals(signum).name.lower()
                    handler = getattr(self, f"handle_{name}", None)
                    if handler is not None:
                        handler()
                case _:
                    raise TypeError(f"unknown supervisor event {event!r}")

    def handle_sigchld(self) -> None:
        pass  # _reap_children runs every tick

    def handle_sigterm(self) -> None:
        now = time.monotonic()
        if self.stopping is None:
            log.info("supervisor: stopping gracefully (again after %gs: fast)", FAST_AFTER_S)
            self.stopping, self.stop_started = "graceful", now
            self._signal_all(signal.SIGTERM)
        elif self.stopping == "graceful" and now - self.stop_started >= FAST_AFTER_S:
            log.info("supervisor: second stop signal, stopping fast")
            self.stopping = "fast"
            self._signal_all(signal.SIGQUIT)

    handle_sigint = handle_sigterm

    def handle_sigquit(self) -> None:
        self.stopping, self.stop_started = "fast", time.monotonic()
        self._signal_all(signal.SIGQUIT)

    def handle_sighup(self) -> None:
        if self.reload_settings is not None:
            try:
                self.settings = self.reload_settings()
            except ConfigError as e:
                log.error("supervisor: SIGHUP: config not reloaded: %s", e)
                return
            self._reload_schedules()
        self.generation += 1
        log.info("supervisor: SIGHUP: rolling workers to generation %d", self.generation)

    def _reload_schedules(self) -> None:
        """The config file's schedules may have changed (the app's cannot: it is not
        imported again). A bad one keeps the running set."""
        try:
            schedules = declared_schedules(self.settings, self.specs)
        except ConfigError as e:
            log.error("supervisor: SIGHUP: schedules not changed: %s", e)
            return
        if schedules == self.schedules:
            return
        self.schedules = schedules
        if self._scheduler is None:
            self._start_schedules()
        else:
            self._scheduler.replace(schedules)

    def handle_sigttin(self) -> None:
        for name, state in self.states.items():
            self._scale(name, min(state.target + 1, self.settings.max_processes_per_agent))

    def handle_sigttou(self) -> None:
        for name, state in self.states.items():
            self._scale(name, max(0, state.target - 1))

    def _pin(self, agent: str, count: int | None) -> None:
        """`handoff scale`: a count pins an autoscaled agent type; None resumes autoscaling."""
        self.upkeep.autoscaler.pin(agent, count)
        if count is not None:
            self._scale(agent, count)

    def _scale(self, agent: str, count: int) -> None:
        if agent not in self.states:
            log.warning("supervisor: scale: agent %r is not supervised here", agent)
            return
        log.info("supervisor: scale %s %d -> %d", agent, self.states[agent].target, count)
        self.states[agent].target = count

    # -- children --------------------------------------------------------------------------

    def _reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_exit(child, status)

    def _on_exit(self, child: Child, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        described = exits.describe(status)
        child.pulse.close()
        # A child killed for not answering (stalled) counts as a crash: backoff below.
        stopped = child.stop_sent_at is not None and not child.stalled
        if stopped or (code in (exits.EXIT_OK, exits.EXIT_RECYCLE) and not child.stalled):
            log.info("worker %d (%s) exited: %s", child.pid, child.agent, described)
            return
        if code == exits.EXIT_BOOT_ERROR:
            log.error("worker %d (%s) cannot boot: halting the supervisor", child.pid, child.agent)
            self.exit_code = exits.EXIT_BOOT_ERROR
            self.handle_sigterm()
            return
        state = self.states.get(child.agent)
        if state is None:
            return
        now = time.monotonic()
        state.crashes = [t for t in state.crashes if now - t < CRASH_WINDOW_S] + [now]
        delay = exponential_s(len(state.crashes), 0.1, self.settings.crash_backoff_max_s)
        state.next_spawn_at = now + delay
        log.warning(
            "worker %d (%s) crashed: %s; restarting in %.1fs (%d crash(es) in %ds)",
            child.pid, child.agent, described, delay, len(state.crashes), CRASH_WINDOW_S,
        )  # fmt: skip

    def _manage(self) -> None:
        now = time.monotonic()
        live: dict[str, list[int]] = {}
        for child in self.children.values():
            if child.stop_sent_at is None:
                live.setdefault(child.agent, []).append(child.pid)
        self._live_pids = live  # read by the Redis thread (autoscaling)
        for name, state in self.states.items():
            mine = [c for c in self.children.values() if c.agent == name and c.stop_sent_at is None]
            current = [c for c in mine if c.generation == self.generation]
            old = [c for c in mine if c.generation != self.generation]
            if len(mine) < state.target or (old and len(current) < state.target):
                if now >= state.next_spawn_at:
                    self._spawn(name)
                    continue
            if old and len(mine) > state.target:
                self._stop_child(old[0])  # roll one by one: a new one is up, retire an old one
            elif len(mine) > state.target:
                self._stop_child(max(mine, key=lambda c: c.started))
        self._check_children()

    def _spawn(self, agent: str) -> None:
        spec = self.specs[agent]
        pulse = Pulse()
        worker = Worker(spec, self.settings, parent_pid=self.pid, pulse=pulse)
        number = free_number({c.number for c in self.children.values() if c.agent == agent})
        # Signals wait while the child still has the supervisor's handlers: a stop sent
        # right after the fork (SIGTTOU, scale down) would otherwise land in a copy of the
        # supervisor's queue that nobody reads, and the worker would run on.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            raise
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if pid == 0:  # the child: never return into the supervisor's stack
            code = exits.EXIT_CRASH
            try:
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # a pending stop: exit
                name_worker(agent, number)
                code = worker.run()
            except BaseException:
                log.exception("worker for %s crashed", agent)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = Child(
            pid, agent, self.generation, time.monotonic(), pulse, number=number
        )
        log.info("supervisor: spawned worker %d for %s", pid, agent)

    def _stop_child(self, child: Child, sig: int = signal.SIGTERM) -> None:
        child.stop_sent_at = time.monotonic()
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.stop_sent_at is None:
                child.stop_sent_at = time.monotonic()
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                pass

    def _kill_overstaying(self) -> None:
        """Children still alive past the grace period (plus a margin) are killed."""
        limit = self.settings.graceful_timeout_s + 0.5 if self.stopping == "graceful" else 2.0
        now = time.monotonic()
        for child in liveness.overstaying(self.children.values(), limit, now):
            log.warning("worker %d (%s) overstayed the stop: SIGKILL", child.pid, child.agent)
            self._stop_child(child, signal.SIGKILL)
            child.stop_sent_at = now + 3600  # once

    def _check_children(self) -> None:
        """A worker whose pulse stopped (wedged in C, deadlocked) is killed and replaced:
        its tasks come back when their leases expire, as after any crash. One too busy to
        notice its own max_rss_mb is recycled (SIGTERM)."""
        for child, age in liveness.stalled(self.children.values(), self.settings.worker_stall_s):
            log.warning(
                "worker %d (%s) stalled: no heartbeat for %.1fs (worker_stall_s %g): SIGKILL, "
                "replacing it", child.pid, child.agent, age, self.settings.worker_stall_s,
            )  # fmt: skip
            child.stalled = True
            self._stop_child(child, signal.SIGKILL)
        for child, rss_mb in liveness.over_rss(
            self.children.values(), self.settings.max_rss_mb * 1.5
        ):
            log.warning("worker %d (%s) RSS %.0f MB: recycling", child.pid, child.agent, rss_mb)
            self._stop_child(child)

    # -- the Redis side thread -------------------------------------------------------------

    def _start_schedules(self) -> None:
        """The first step (catch-up) runs here, in the main thread, before any worker is
        forked (see run() on imports and threads); then the schedules' own thread."""
        scheduler = Scheduler(TaskQueue(self._manager, self.settings), self.schedules)
        try:
            scheduler.step()
        except HandoffError as e:  # Redis down: its thread keeps trying
            log.error("supervisor: schedules: Redis: %s", e)
        self._scheduler = scheduler
        log.info("supervisor: running schedules %s", ", ".join(scheduler.names))
        self._start_thread("supervisor-schedules", lambda: scheduler.run(self._redis_stop))

    def _redis_loop(self) -> None:
        """Reap expired leases, read control messages, heartbeat. Never blocks the loop."""
        while not self._redis_stop.wait(self.settings.reaper_interval_s):
            self._redis_tick()

    def _redis_tick(self) -> None:
        targets = {name: state.target for name, state in self.states.items()}
        slots = {name: self.specs[name].max_concurrent for name in self._autoscale}
        self.upkeep.tick(targets, self._live_pids, slots, lambda: bool(self.stopping))
