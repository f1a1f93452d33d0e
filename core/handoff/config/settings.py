"""Settings: everything a supervisor and its workers need, checked once on construction.

Units live in the names (`lease_s`, `max_rss_mb`). Built before fork and shared by
every child, so it is immutable; `agents` is a plain dict copied on construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from handoff.config.autoscale_spec import parse_autoscale
from handoff.config.checks import check_int, check_seconds, fail
from handoff.config.errors import ConfigError
from handoff.config.names import AGENT_NAME_RE, KEY_PREFIX_RE
from handoff.config.pool_settings import SECRET_FIELDS, RedisPoolConfig
from handoff.config.redact import MASK, redact_url
from handoff.config.schedule_spec import schedules_from_tables

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODULE_PATH_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?")  # "" = none
MAX_PAYLOAD_LIMIT = 512 * 1024 * 1024
MAX_AGENT_PROCESSES = 1000
MIN_STALL_S, MAX_STALL_S = 1, 86_400
MAX_SIGNAL_TTL_S = 30 * 86_400
BASE_URL_RE = re.compile(
    r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?"
)  # a worker's pulse beats 4 times in the bound, at most 1/s


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Runs in: supervisor, workers, monitor, client."""

    redis: RedisPoolConfig = field(default_factory=RedisPoolConfig)
    key_prefix: str = "handoff"
    heartbeat_interval_s: float = 1.0
    lease_s: float = 30.0
    result_ttl_s: float = 3600.0  # 0 = do not keep results
    # How long after a task with a key or a parent finishes an enqueue of the same id (the
    # same key, or the child a rerun parent makes again) is still refused; 0 = only while
    # the task exists. Costs about 100 bytes per such task for the window.
    dedupe_window_s: float = 3600.0
    # How long a finished task's record (status, times, attempts, edges, result) stays
    # readable in its run's tree (`handoff inspect tree`); 0 = keep no tree (joins and
    # result(follow=True) still work). Results stay at least result_ttl_s.
    run_ttl_s: float = 3600.0
    max_join_branches: int = 10_000  # branches one Join may start
    # How long a signalled event stays signalled: a Wait on it registered within this time
    # after client.signal resumes at once with its data; 0 = only waits already registered.
    signal_ttl_s: float = 3600.0
    # Signal links (client.signal_url): the HMAC secret the links are signed with and the
    # monitor checks them with ("" = off; at least 16 characters; not the dashboard's
    # token), and the monitor's web address the links point at.
    signal_secret: str = ""
    signal_base_url: str = ""
    max_ends_per_branch: int = 1000  # ends of one branch (or run) kept for its join/waiter
    tree_result_bytes: int = 200  # result bytes kept in the tree when results are not
    # A finished task's payload (for an LLM pipeline, the prompt) kept in its record for
    # run_ttl_s when its JSON is at most this long (larger: its size only); 0 = none.
    kept_payload_bytes: int = 4096
    max_event_bytes: int = 65_536  # one task.emit()'s JSON at most (a larger one raises)
    stream_max_len: int = 10_000  # events a run's stream keeps (the oldest go first)
    log_level: str = "INFO"
    app: str = ""  # module where agents are defined; "" = none given (--app names it)
    # agent name -> process count. hash=False keeps Settings hashable despite the dict.
    agents: dict[str, int] = field(default_factory=dict, hash=False)
    # schedule name -> ScheduleSpec: the file's [schedules.<name>] tables (config/schedules.py;
    # schedules declared in code live with the app). Read by supervisors and `handoff
    # schedules`; the environment cannot set them.
    schedules: dict[str, Any] = field(default_factory=dict, hash=False)
    max_payload_bytes: int = 1_048_576
    max_result_bytes: int = 1_048_576  # a larger result fails its task (kept in Redis)
    prefetch: int = 2  # extra tasks claimed beyond free slots
    claim_batch_max: int = 100
    graceful_timeout_s: float = 4.0  # fits inside honcho's 5 s SIGKILL window
    # A sync handler still running this long after its task was cancelled is stopped the
    # way a timeout stops one: its worker process is replaced (nothing else in it is lost).
    cancel_grace_s: float = 5.0
    reaper_interval_s: float = 1.0
    max_deliveries: int = 10  # deliveries before a task is dead-lettered (poison limit)
    max_hops: int = 32  # handoff chain length limit
    max_tasks_per_worker: int = 0  # recycle a worker after N tasks; 0 = unlimited
    max_rss_mb: float = 0.0  # 0 = unlimited
    max_worker_age_s: float = 0.0  # 0 = unlimited
    # A worker whose pulse (written by a thread of its own into memory shared with its
    # supervisor, 4 times in this bound, at least once a second) is older than this is
    # killed (SIGKILL) and replaced: wedged in C code holding the GIL, or deadlocked, it
    # would keep its process and slots forever while its leases expired. 0 = never.
    worker_stall_s: float = 10.0
    # A crashed worker is restarted after 0.1 s doubling per crash in the last minute, up
    # to this: a crash loop costs the host little, a one-off crash is replaced at once.
    crash_backoff_max_s: float = 30.0
    # The most processes a control message (`handoff scale`) or SIGTTIN may ask a
    # supervisor for, per agent type: a bound on what anyone who can write a control
    # message can make a host run.
    max_processes_per_agent: int = 100
    # Autoscaling (handoff supervise --autoscale, or here): "coder=1:8,reviewer=0:4[:2.5]"
    # is MIN:MAX processes per agent type on this host, and optionally its target wait.
    autoscale: str = ""
    autoscale_target_wait_s: float = 5.0  # aim: a queued task waits at most this long
    autoscale_cooldown_s: float = 30.0  # mostly idle this long before removing a process
    max_processes: int = 64  # this supervisor's cap on processes, all agent types together
    min_free_memory_mb: float = 256.0  # no process is added below this available memory
    monitor_interval_s: float = 1.0
    # WAIT for n replicas after each enqueue (on the same connection), so a failover cannot
    # lose an enqueue the producer was told about; 0 = off (asynchronous replication).
    enqueue_wait_replicas: int = 0
    enqueue_wait_timeout_ms: int = 1000  # past this, enqueue raises NotReplicated
    # When the server's maxmemory-policy may evict keys (it would silently delete tasks):
    # "refuse" = workers and supervisors do not start; "warn" = start and log loudly.
    eviction_policy: str = "refuse"

    def __post_init__(self) -> None:
        for name, value in _normalized(self).items():
            object.__setattr__(self, name, value)


def settings_to_dict(settings: Settings, *, redact: bool = True) -> dict[str, Any]:
    """Nested plain data for `config show` and logs; secrets masked unless redact=False."""
    data = asdict(settings)
    data["schedules"] = {name: spec.to_table() for name, spec in settings.schedules.items()}
    if redact:
        if data["signal_secret"]:
            data["signal_secret"] = MASK
        pool = data["redis"]
        pool["url"] = redact_url(pool["url"])
        for name in SECRET_FIELDS:
            if pool[name] is not None:
                pool[name] = MASK
    return data


_POSITIVE_S = (
    "cancel_grace_s",
    "crash_backoff_max_s",
    "heartbeat_interval_s",
    "lease_s",
    "reaper_interval_s",
    "monitor_interval_s",
    "autoscale_target_wait_s",
)
_ZERO_OK_S = (
    "autoscale_cooldown_s",
    "min_free_memory_mb",
    "result_ttl_s",
    "run_ttl_s",
    "dedupe_window_s",
    "signal_ttl_s",
    "graceful_timeout_s",
    "max_rss_mb",
    "max_worker_age_s",
    "worker_stall_s",
)
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "max_payload_bytes": (1, MAX_PAYLOAD_LIMIT),
    "max_result_bytes": (1, MAX_PAYLOAD_LIMIT),
    "prefetch": (0, 10_000),
    "claim_batch_max": (1, 10_000),
    "max_deliveries": (1, 1000),
    "max_hops": (1, 10_000),
    "max_join_branches": (1, 1_000_000),
    "max_ends_per_branch": (1, 1_000_000),
    "tree_result_bytes": (0, 65_536),
    "kept_payload_bytes": (0, 1_048_576),
    "max_event_bytes": (16, 16_777_216),
    "stream_max_len": (10, 10_000_000),
    "max_tasks_per_worker": (0, None),
    "enqueue_wait_replicas": (0, 100),
    "enqueue_wait_timeout_ms": (1, 600_000),
    "max_processes_per_agent": (1, MAX_AGENT_PROCESSES),
    "max_processes": (1, MAX_AGENT_PROCESSES),
}


def _normalized(s: Settings) -> dict[str, Any]:
    if not isinstance(s.redis, RedisPoolConfig):
        raise ConfigError(f"redis: must be a RedisPoolConfig, not {type(s.redis).__name__}")
    out: dict[str, Any] = {
        "key_prefix": _match("key_prefix", s.key_prefix, KEY_PREFIX_RE),
        "log_level": _log_level(s.log_level),
        "eviction_policy": _choice("eviction_policy", s.eviction_policy, ("refuse", "warn")),
        "app": _match("app", s.app, MODULE_PATH_RE, what="a dotted module path"),
        "agents": _agents(s.agents),
        "schedules": schedules_from_tables(s.schedules),
    }
    for name in _POSITIVE_S:
        out[name] = check_seconds(name, getattr(s, name), zero_ok=False)
    if s.autoscale:  # checked here so a bad value stops everything before it starts
        try:
            parse_autoscale(s.autoscale, s.max_processes)
        except ValueError as e:
            fail("autoscale", s.autoscale, str(e))
    for name in _ZERO_OK_S:
        out[name] = check_seconds(name, getattr(s, name), zero_ok=True)
    for name, (lo, hi) in _INT_RANGES.items():
        out[name] = check_int(name, getattr(s, name), lo, hi)
    if s.signal_secret and (not isinstance(s.signal_secret, str) or len(s.signal_secret) < 16):
        fail("signal_secret", MASK, "must be empty (off) or at least 16 characters")
    if s.signal_base_url:
        _match("signal_base_url", s.signal_base_url, BASE_URL_RE, what="an http(s):// address")
    if out["signal_ttl_s"] > MAX_SIGNAL_TTL_S:
        fail("signal_ttl_s", s.signal_ttl_s, f"must be between 0 and {MAX_SIGNAL_TTL_S} seconds")
    if out["worker_stall_s"] and not MIN_STALL_S <= out["worker_stall_s"] <= MAX_STALL_S:
        fail(
            "worker_stall_s", s.worker_stall_s,
            f"must be 0 (never) or between {MIN_STALL_S} and {MAX_STALL_S} seconds",
        )  # fmt: skip
    return out


def _match(name: str, value: Any, pattern: re.Pattern[str], what: str | None = None) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        fail(name, value, f"must be {what}" if what else f"must match ^{pattern.pattern}$")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        fail(name, value, f"must be one of {', '.join(allowed)}")
    return value


def _log_level(value: Any) -> str:
    level = value.upper() if isinstance(value, str) else value
    if level not in LOG_LEVELS:
        fail("log_level", value, f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def parse_agent_counts(text: str) -> dict[str, int]:
    """'a=2,b=1' -> {'a': 2, 'b': 1}: the one parser of process counts (--agents, scale,
    HANDOFF_AGENTS). ValueError, naming the bad part, for a malformed pair, a bad agent
    name, a count out of range, an agent named twice, or nothing at all."""
    counts: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, number = (s.strip() for s in part.partition("="))
        if not sep or not number.isdigit():
            raise ValueError(f"{part!r}: expected AGENT=N with N a whole number, like 'a=2,b=1'")
        if not AGENT_NAME_RE.fullmatch(name):
            raise ValueError(f"{part!r}: agent names must match ^{AGENT_NAME_RE.pattern}$")
        if name in counts:
            raise ValueError(f"{part!r}: agent {name!r} is named twice")
        if int(number) > MAX_AGENT_PROCESSES:
            raise ValueError(f"{part!r}: N must be between 0 and {MAX_AGENT_PROCESSES}")
        counts[name] = int(number)
    return counts


def _agents(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        fail("agents", value, "must be a table of agent name = process count")
    agents: dict[str, int] = {}
    for name, count in value.items():
        if not isinstance(name, str) or not AGENT_NAME_RE.fullmatch(name):
            fail("agents", name, f"agent names must match ^{AGENT_NAME_RE.pattern}$")
        agents[name] = check_int(f"agents.{name}", count, 0, MAX_AGENT_PROCESSES)
    return agents
