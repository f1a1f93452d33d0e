"""RedisPoolConfig: how each process connects to Redis (pool, timeouts, retries, breaker, TLS).

Fields and defaults are the pool manager's contract (PoolSize 25, MinIdleConns 5, ...), with
the unit in every name. Validation runs on construction, so a config built by hand is
checked the same way as one loaded from a file. The `check_*` helpers (checks.py) make
every message one line, "name = value: what is allowed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

from handoff.config.checks import check_bool, check_int, check_seconds, fail, show
from handoff.config.defaults import default_redis_url
from handoff.config.errors import ConfigError
from handoff.config.redact import MASK, redact_url

URL_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
SECRET_FIELDS = frozenset({"password", "sentinel_password"})


def check_optional_str(name: str, value: Any, *, secret: bool = False) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if secret:  # never echo what might be a password, even a mistyped one
        raise ConfigError(f"{name}: must be a string, not {type(value).__name__}")
    fail(name, value, "must be a string")


def check_url(name: str, url: Any) -> str:
    """Reject what redis-py would misread later: bad scheme, no host, bad port or db path."""
    if not isinstance(url, str):
        raise ConfigError(f"{name}: must be a string, not {type(url).__name__}")

    def bad(why: str) -> NoReturn:
        # `from None`: urllib's own messages can quote the netloc, password included.
        raise ConfigError(f"{name} = {redact_url(url)!r}: {why}") from None

    try:
        parts = urlsplit(url)
    except ValueError:
        bad("is not a valid URL")
    _check_query(name, parts.query)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        bad(f"scheme must be one of {', '.join(URL_SCHEMES)}")
    if scheme == "unix":
        if not parts.path.startswith("/"):
            bad("must name an absolute socket path (unix:///path/to/redis.sock)")
        return url
    if scheme in ("redis+sentinel", "redis+cluster"):
        # Several seed hosts: redis+sentinel://[user:pass@]h1:26379,h2:26379/service
        for host in parts.netloc.rpartition("@")[2].split(","):
            _check_host_port(urlsplit(f"//{host}"), bad)
        path = parts.path.strip("/")
        if scheme == "redis+sentinel" and not path:
            bad("must name the Sentinel service (redis+sentinel://h1:26379,h2:26379/mymaster)")
        if scheme == "redis+cluster" and path not in ("", "0"):
            bad("a cluster has only db 0 (redis+cluster://h1:7000,h2:7001)")
        return url
    _check_host_port(parts, bad)
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if db and not (db.isascii() and db.isdigit()):
        bad("db path must be a number (redis://host:6379/0)")
    return url


def _whole(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _number(value: str) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


def _flag(value: str) -> bool:
    return value.lower() in ("", "0", "1", "true", "false", "yes", "no", "on", "off")


# What redis-py reads from a URL's query string, and what each must be: it would fail
# on anything else only when connecting (a traceback, or "unreachable"), and pass an
# unknown name to the connection as a keyword argument.
_QUERY: dict[str, tuple[Any, str]] = {
    "db": (_whole, "a whole number"),
    "socket_timeout": (_number, "a number of seconds > 0"),
    "socket_connect_timeout": (_number, "a number of seconds > 0"),
    "timeout": (_number, "a number of seconds > 0"),
    "socket_read_size": (_whole, "a whole number"),
    "max_connections": (_whole, "a whole number"),
    "health_check_interval": (_whole, "a whole number of seconds"),
    "socket_keepalive": (_flag, "true or false"),
    "retry_on_timeout": (_flag, "true or false"),
    "ssl_check_hostname": (_flag, "true or false"),
    "protocol": (lambda v: v in ("2", "3"), "2 or 3"),
    "client_name": (lambda v: True, ""),
    "username": (lambda v: True, ""),
    "password": (lambda v: True, ""),
}


def _check_query(name: str, query: str) -> None:
    """The message names the parameter, not the URL: a misspelt `password` would not be
    masked."""
    for key, _, value in (item.partition("=") for item in query.split("&") if item):
        check = _QUERY.get(key)
        if check is None:
            known = ", ".join(sorted(_QUERY))
            raise ConfigError(f"{name}: unknown query parameter {key[:40]!r} (known: {known})")
        if not check[0](value):
            raise ConfigError(f"{name}: query parameter {key}={value[:40]!r}: must be {check[1]}")


def _check_host_port(parts: SplitResult, bad) -> None:
    if not parts.hostname:
        bad("must include a host (redis://host:6379/0)")
    try:
        port = parts.port
    except ValueError:
        bad("port must be a number between 1 and 65535")
    if port == 0:
        bad("port must be a number between 1 and 65535")


@dataclass(frozen=True, repr=False)
class RedisPoolConfig:
    """Connection settings for one process's pool. Runs in: every process (built before fork)."""

    url: str = field(default_factory=default_redis_url)
    password: str | None = None  # overrides a password in the URL when set
    username: str | None = None  # ACL user
    db: int = 0
    pool_size: int = 25
    min_idle_conns: int = 5
    max_conn_age_s: float = 300.0  # 0 = never rotate
    pool_timeout_s: float = 4.0
    idle_timeout_s: float = 600.0  # 0 = never close idle connections
    idle_check_freq_s: float = 60.0
    dial_timeout_s: float = 5.0
    read_timeout_s: float = 3.0
    write_timeout_s: float = 3.0
    health_check_interval_s: float = 30.0
    max_retries: int = 3
    min_retry_backoff_ms: float = 8.0
    max_retry_backoff_ms: float = 512.0
    breaker_failure_threshold: int = 5  # consecutive failures that open the breaker
    breaker_cooldown_s: float = 5.0  # time open before a half-open probe
    tls: bool = False  # also implied by a rediss:// URL: see use_tls
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    memory_optimization: bool = False  # opt-in server memory settings
    # Deployment: a redis+cluster:// or redis+sentinel:// URL says it; cluster = true makes
    # a plain redis:// URL a cluster seed. The URL's user/password are the data nodes';
    # sentinels that require a password of their own get sentinel_password.
    cluster: bool = False
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        for name, value in _normalized(self).items():
            object.__setattr__(self, name, value)

    @property
    def use_tls(self) -> bool:
        return self.tls or self.url.lower().startswith("rediss://")

    @property
    def mode(self) -> str:
        """ "server", "sentinel" or "cluster": which deployment this config talks to."""
        scheme = self.url.partition(":")[0].lower()
        if scheme == "redis+sentinel":
            return "sentinel"
        return "cluster" if self.cluster or scheme == "redis+cluster" else "server"

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "url":
                value = redact_url(value)
            elif f.name in SECRET_FIELDS and value is not None:
                value = MASK
            shown.append(f"{f.name}={value!r}")
        return f"RedisPoolConfig({', '.join(shown)})"


_DURATIONS_ZERO_OK = ("max_conn_age_s", "idle_timeout_s", "min_retry_backoff_ms")
_DURATIONS_POSITIVE = (
    "pool_timeout_s",
    "idle_check_freq_s",
    "dial_timeout_s",
    "read_timeout_s",
    "write_timeout_s",
    "health_check_interval_s",
    "breaker_cooldown_s",
)
_FLAGS = ("tls", "tls_check_hostname", "memory_optimization", "cluster")
_PATHS = ("username", "tls_ca_file", "tls_cert_file", "tls_key_file")


def _normalized(c: RedisPoolConfig) -> dict[str, Any]:
    """Check every field in declaration order; return the normalized values (ints -> floats)."""
    p = "redis."
    out: dict[str, Any] = {
        "url": check_url(p + "url", c.url),
        "password": check_optional_str(p + "password", c.password, secret=True),
        "db": check_int(p + "db", c.db, 0, 10_000),
        "pool_size": check_int(p + "pool_size", c.pool_size, 1, 10_000),
        "max_retries": check_int(p + "max_retries", c.max_retries, 0, 100),
        "breaker_failure_threshold": check_int(
            p + "breaker_failure_threshold", c.breaker_failure_threshold, 1, 10_000
        ),
    }
    out["min_idle_conns"] = check_int(p + "min_idle_conns", c.min_idle_conns, 0)
    if out["min_idle_conns"] > out["pool_size"]:
        fail(
            p + "min_idle_conns",
            c.min_idle_conns,
            f"must be between 0 and redis.pool_size ({c.pool_size})",
        )
    for name in _DURATIONS_ZERO_OK:
        out[name] = check_seconds(p + name, getattr(c, name), zero_ok=True)
    for name in _DURATIONS_POSITIVE:
        out[name] = check_seconds(p + name, getattr(c, name), zero_ok=False)
    out["max_retry_backoff_ms"] = check_seconds(
        p + "max_retry_backoff_ms", c.max_retry_backoff_ms, zero_ok=True
    )
    if out["max_retry_backoff_ms"] < out["min_retry_backoff_ms"]:
        fail(
            p + "max_retry_backoff_ms",
            c.max_retry_backoff_ms,
            f"must be >= redis.min_retry_backoff_ms ({show(c.min_retry_backoff_ms)})",
        )
    for name in _FLAGS:
        out[name] = check_bool(p + name, getattr(c, name))
    for name in _PATHS:
        out[name] = check_optional_str(p + name, getattr(c, name))
    out["sentinel_password"] = check_optional_str(
        p + "sentinel_password", c.sentinel_password, secret=True
    )
    scheme = out["url"].partition(":")[0].lower()
    if out["cluster"] or scheme == "redis+cluster":
        if scheme == "unix":
            fail(p + "cluster", True, "a cluster is reached over TCP, not a unix socket URL")
        if out["db"]:
            fail(p + "db", c.db, "must be 0 in cluster mode (a cluster has only db 0)")
    return out
