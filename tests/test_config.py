"""Configuration: defaults, presets, precedence, validation, redaction and `config show`.

Pure Python: no Redis server is needed.
"""

from __future__ import annotations

import json
import os
import tomllib
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from handoff.config import (
    PRESETS,
    ConfigError,
    RedisPoolConfig,
    Settings,
    default_redis_url,
    load_settings,
    redact_url,
    settings_to_dict,
)
from handoff.config.defaults import default_run_dir, default_socket_path

SECRET_URL = "redis://user:s3cr3t-pass@host:6379/0"
SECRET_PASSWORD = "hunter2-secret"
SECRETS = ("s3cr3t-pass", SECRET_PASSWORD)
EXAMPLE_TOML = Path(__file__).resolve().parent.parent / "config" / "handoff.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """The environment is a config layer: start every test from an empty one."""
    for name in list(os.environ):
        if name.startswith("HANDOFF_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HANDOFF_RUN_DIR", str(tmp_path / "run"))


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handoff.toml"
    path.write_text(text)
    return path


def config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


# --- defaults and presets -------------------------------------------------------------


def test_pool_defaults_are_the_pool_managers_contract():
    pool = RedisPoolConfig()
    assert (pool.pool_size, pool.min_idle_conns) == (25, 5)
    assert pool.max_conn_age_s == 300.0
    assert pool.pool_timeout_s == 4.0
    assert pool.idle_timeout_s == 600.0
    assert pool.idle_check_freq_s == 60.0
    assert pool.dial_timeout_s == 5.0
    assert (pool.read_timeout_s, pool.write_timeout_s) == (3.0, 3.0)
    assert pool.health_check_interval_s == 30.0
    assert pool.max_retries == 3
    assert (pool.min_retry_backoff_ms, pool.max_retry_backoff_ms) == (8.0, 512.0)
    assert pool.password is None and pool.username is None and pool.db == 0
    assert not pool.use_tls


def test_default_url_is_the_socket_in_the_run_dir(tmp_path):
    assert default_run_dir() == (tmp_path / "run").resolve()
    assert default_socket_path() == default_run_dir() / "redis.sock"
    assert default_redis_url() == f"unix://{tmp_path / 'run' / 'redis.sock'}"
    assert RedisPoolConfig().url == default_redis_url()


def test_default_run_dir_is_dot_run_in_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("HANDOFF_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_redis_url() == f"unix://{tmp_path.resolve() / '.run' / 'redis.sock'}"


def test_load_with_nothing_set_gives_the_dataclass_defaults():
    assert load_settings(env={}) == Settings()
    assert Settings().graceful_timeout_s < 5.0  # inside honcho's SIGKILL window


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("development", {"pool_size": 10, "min_idle_conns": 2, "max_conn_age_s": 120.0}),
        ("production", {"pool_size": 50, "min_idle_conns": 10, "max_conn_age_s": 600.0}),
        (
            "high_availability",
            {
                "pool_size": 30,
                "min_idle_conns": 8,
                "health_check_interval_s": 15.0,
                "max_retries": 10,
                "breaker_cooldown_s": 1.0,
            },
        ),
    ],
)
def test_each_preset_sets_its_pool_values_and_nothing_else(name, expected):
    settings = load_settings(preset=name, env={})
    for key, value in expected.items():
        assert getattr(settings.redis, key) == value
    untouched = {k: v for k, v in vars(RedisPoolConfig()).items() if k not in expected}
    assert {k: getattr(settings.redis, k) for k in untouched} == untouched
    assert set(PRESETS[name]) == {f"redis.{key}" for key in expected}


def test_preset_can_come_from_the_environment_and_the_argument_wins():
    assert load_settings(env={"HANDOFF_PRESET": "production"}).redis.pool_size == 50
    settings = load_settings(preset="development", env={"HANDOFF_PRESET": "production"})
    assert settings.redis.pool_size == 10


# --- precedence -----------------------------------------------------------------------


def test_each_layer_overrides_the_one_before(tmp_path):
    toml = write_toml(tmp_path, "lease_s = 40\n[redis]\npool_size = 40\n")
    env = {"HANDOFF_REDIS_POOL_SIZE": "30", "HANDOFF_LEASE_S": "50"}
    overrides = {"redis.pool_size": 20, "lease_s": "60"}

    layers = [
        ({}, 25, 30.0),  # dataclass defaults
        ({"preset": "production"}, 50, 30.0),
        ({"preset": "production", "config_file": toml}, 40, 40.0),
        ({"preset": "production", "config_file": toml, "env": env}, 30, 50.0),
        (
            {"preset": "production", "config_file": toml, "env": env, "overrides": overrides},
            20,
            60.0,
        ),
    ]
    for kwargs, pool_size, lease_s in layers:
        settings = load_settings(**{"env": {}, **kwargs})
        assert (settings.redis.pool_size, settings.lease_s) == (pool_size, lease_s), kwargs


def test_config_file_can_come_from_the_environment_and_the_argument_wins(tmp_path):
    from_env = write_toml(tmp_path, "app = 'from_env'\n")
    from_arg = tmp_path / "arg.toml"
    from_arg.write_text("app = 'from_arg'\n")
    assert load_settings(env={"HANDOFF_CONFIG": str(from_env)}).app == "from_env"
    settings = load_settings(config_file=from_arg, env={"HANDOFF_CONFIG": str(from_env)})
    assert settings.app == "from_arg"


def test_redis_url_sources_in_order():
    env = {"REDIS_URL": "redis://a:6379/0"}
    assert load_settings(env=env).redis.url == "redis://a:6379/0"
    env["HANDOFF_REDIS_URL"] = "redis://b:6379/0"  # the handoff-specific name is more specific
    assert load_settings(env=env).redis.url == "redis://b:6379/0"
    settings = load_settings(env=env, overrides={"redis.url": "redis://c:6379/0"})
    assert settings.redis.url == "redis://c:6379/0"


def test_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("HANDOFF_MAX_HOPS", "7")
    assert load_settings().max_hops == 7


def test_environment_strings_are_coerced_to_each_fields_type():
    env = {
        "HANDOFF_REDIS_TLS": "yes",
        "HANDOFF_REDIS_TLS_CHECK_HOSTNAME": "off",
        "HANDOFF_REDIS_MEMORY_OPTIMIZATION": "1",
        "HANDOFF_REDIS_USERNAME": "svc",
        "HANDOFF_REDIS_TLS_CA_FILE": "",  # empty means unset
        "HANDOFF_REDIS_MAX_CONN_AGE_S": "0",
        "HANDOFF_MAX_RSS_MB": "256.5",
        "HANDOFF_LOG_LEVEL": "debug",
        "HANDOFF_AGENTS": "golang-expert=2, reviewer=1",
        "HANDOFF_WORKER_ID": "w-17",  # not a setting: the environment is shared, so ignored
        "HANDOFF_SERVER_BIN": "/nonexistent",
        "UNRELATED": "x",
    }
    settings = load_settings(env=env)
    assert settings.redis.use_tls and settings.redis.tls
    assert settings.redis.tls_check_hostname is False
    assert settings.redis.memory_optimization is True
    assert settings.redis.username == "svc"
    assert settings.redis.tls_ca_file is None
    assert settings.redis.max_conn_age_s == 0.0
    assert settings.max_rss_mb == 256.5
    assert settings.log_level == "DEBUG"
    assert settings.agents == {"golang-expert": 2, "reviewer": 1}


def test_toml_tables_and_typed_overrides(tmp_path):
    toml = write_toml(
        tmp_path,
        "key_prefix = 'hx'\n[agents]\nreviewer = 3\n[redis]\ntls = true\ndb = 2\n",
    )
    settings = load_settings(
        config_file=toml, env={}, overrides={"redis.db": "3", "agents": "a=1", "app": None}
    )
    assert settings.key_prefix == "hx"
    assert settings.redis.tls and settings.redis.db == 3
    assert settings.agents == {"a": 1}  # agents is one setting: a later layer replaces it
    assert settings.app == ""  # None means "flag not given"; no app by default


def test_the_example_file_documents_the_defaults():
    assert load_settings(config_file=EXAMPLE_TOML, env={}) == Settings()


def test_rediss_url_implies_tls():
    assert RedisPoolConfig(url="rediss://host:6380/1").use_tls
    assert RedisPoolConfig(url="redis://host:6379/1", tls=True).use_tls
    assert not RedisPoolConfig(url="redis://host:6379/1").use_tls


def test_whole_numbers_are_accepted_for_durations_and_stored_as_floats():
    pool = RedisPoolConfig(pool_timeout_s=4)
    assert pool.pool_timeout_s == 4.0 and isinstance(pool.pool_timeout_s, float)


def test_settings_are_immutable_hashable_and_copy_agents():
    agents = {"reviewer": 1}
    settings = Settings(agents=agents)
    agents["reviewer"] = 99
    assert settings.agents == {"reviewer": 1}
    assert hash(settings) == hash(Settings(agents={"reviewer": 1}))
    with pytest.raises(AttributeError):
        settings.lease_s = 1.0  # type: ignore[misc]


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"pool_size": 0}, "redis.pool_size = 0: must be between 1 and 10000"),
        ({"pool_size": 10_001}, "redis.pool_size = 10001: must be between 1 and 10000"),
        ({"pool_size": True}, "redis.pool_size = True: must be an integer"),
        ({"pool_size": 2.5}, "redis.pool_size = 2.5: must be an integer"),
        (
            {"min_idle_conns": 30},
            "redis.min_idle_conns = 30: must be between 0 and redis.pool_size (25)",
        ),
        ({"min_idle_conns": -1}, "redis.min_idle_conns = -1: must be >= 0"),
        ({"max_conn_age_s": -1}, "redis.max_conn_age_s = -1: must be >= 0"),
        ({"pool_timeout_s": 0}, "redis.pool_timeout_s = 0: must be > 0"),
        ({"idle_timeout_s": -0.5}, "redis.idle_timeout_s = -0.5: must be >= 0"),
        ({"idle_check_freq_s": -1}, "redis.idle_check_freq_s = -1: must be > 0"),
        ({"dial_timeout_s": -1}, "redis.dial_timeout_s = -1: must be > 0"),
        ({"read_timeout_s": float("nan")}, "redis.read_timeout_s = nan: must be a finite"),
        ({"write_timeout_s": "3"}, "redis.write_timeout_s = '3': must be a number"),
        ({"health_check_interval_s": 0}, "redis.health_check_interval_s = 0: must be > 0"),
        ({"max_retries": 101}, "redis.max_retries = 101: must be between 0 and 100"),
        ({"min_retry_backoff_ms": -8}, "redis.min_retry_backoff_ms = -8: must be >= 0"),
        (
            {"max_retry_backoff_ms": 4},
            "redis.max_retry_backoff_ms = 4: must be >= redis.min_retry_backoff_ms (8)",
        ),
        ({"breaker_failure_threshold": 0}, "redis.breaker_failure_threshold = 0: must be"),
        ({"breaker_cooldown_s": 0}, "redis.breaker_cooldown_s = 0: must be > 0"),
        ({"db": -1}, "redis.db = -1: must be between 0 and 10000"),
        ({"tls": "yes"}, "redis.tls = 'yes': must be true or false"),
        ({"tls_ca_file": 3}, "redis.tls_ca_file = 3: must be a string"),
        ({"cluster": "yes"}, "redis.cluster = 'yes': must be true or false"),
        ({"cluster": True, "url": "redis://h", "db": 3}, "redis.db = 3: must be 0 in cluster"),
        (
            {"cluster": True, "url": "unix:///tmp/r.sock"},
            "redis.cluster = True: a cluster is reached over TCP",
        ),
        ({"sentinel_password": 5}, "redis.sentinel_password: must be a string, not int"),
    ],
)
def test_bad_pool_values_fail_with_one_line_naming_the_field(kwargs, expected):
    assert config_error(RedisPoolConfig, **kwargs).startswith(expected)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"lease_s": -1}, "lease_s = -1: must be > 0"),
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s = 0: must be > 0"),
        ({"result_ttl_s": -1}, "result_ttl_s = -1: must be >= 0"),
        ({"graceful_timeout_s": -4}, "graceful_timeout_s = -4: must be >= 0"),
        ({"reaper_interval_s": 0}, "reaper_interval_s = 0: must be > 0"),
        ({"monitor_interval_s": -1}, "monitor_interval_s = -1: must be > 0"),
        ({"max_rss_mb": -1}, "max_rss_mb = -1: must be >= 0"),
        ({"max_worker_age_s": float("inf")}, "max_worker_age_s = inf: must be a finite"),
        ({"worker_stall_s": -1}, "worker_stall_s = -1: must be >= 0"),
        ({"worker_stall_s": 0.5}, "worker_stall_s = 0.5: must be 0 (never) or between 1 and"),
        ({"worker_stall_s": 1e6}, "worker_stall_s = 1e+06: must be 0 (never) or between 1 and"),
        ({"key_prefix": "has space"}, "key_prefix = 'has space': must match"),
        ({"key_prefix": "x" * 33}, "key_prefix = 'xxx"),
        ({"log_level": "LOUD"}, "log_level = 'LOUD': must be one of DEBUG, INFO, WARNING"),
        ({"app": "not a module"}, "app = 'not a module': must be a dotted module path"),
        ({"agents": {"Bad Name": 1}}, "agents = 'Bad Name': agent names must match"),
        ({"agents": {"reviewer": 1001}}, "agents.reviewer = 1001: must be between 0 and 1000"),
        ({"agents": {"reviewer": True}}, "agents.reviewer = True: must be an integer"),
        ({"max_payload_bytes": 0}, "max_payload_bytes = 0: must be between 1 and 536870912"),
        ({"prefetch": -1}, "prefetch = -1: must be between 0 and 10000"),
        ({"claim_batch_max": 0}, "claim_batch_max = 0: must be between 1 and 10000"),
        ({"max_deliveries": 1001}, "max_deliveries = 1001: must be between 1 and 1000"),
        ({"max_hops": 0}, "max_hops = 0: must be between 1 and 10000"),
        ({"max_tasks_per_worker": -1}, "max_tasks_per_worker = -1: must be >= 0"),
        ({"enqueue_wait_replicas": -1}, "enqueue_wait_replicas = -1: must be between 0 and 100"),
        ({"redis": {"pool_size": 3}}, "redis: must be a RedisPoolConfig"),
    ],
)
def test_bad_settings_values_fail_with_one_line_naming_the_field(kwargs, expected):
    assert config_error(Settings, **kwargs).startswith(expected)


def test_loaded_values_are_validated_too(tmp_path):
    toml = write_toml(tmp_path, "[redis]\npool_size = 0\n")
    message = config_error(load_settings, config_file=toml, env={})
    assert message == "redis.pool_size = 0: must be between 1 and 10000"
    message = config_error(load_settings, env={}, overrides={"redis.min_idle_conns": 30})
    assert message == "redis.min_idle_conns = 30: must be between 0 and redis.pool_size (25)"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://x", "scheme must be one of redis, rediss, unix, redis+sentinel, redis+cluster"),
        ("localhost:6379", "scheme must be one of"),
        ("", "scheme must be one of"),
        ("redis://", "must include a host"),
        ("redis://:6379/0", "must include a host"),
        ("redis://host:port/0", "port must be a number"),
        ("redis://host:70000/0", "port must be a number"),
        ("redis://host:0", "port must be a number"),
        ("redis://host:6379/zero", "db path must be a number"),
        ("redis://host:6379/0/1", "db path must be a number"),
        ("redis://[::1/0", "is not a valid URL"),
        ("unix://relative.sock", "must name an absolute socket path"),
        ("redis+sentinel://h1:26379,:26379/mymaster", "must include a host"),
        ("redis+cluster://h1:x", "port must be a number"),
        ("redis+sentinel://h1:26379,h2:26379", "must name the Sentinel service"),
        ("redis+cluster://h1:7000/2", "a cluster has only db 0"),
    ],
)
def test_malformed_urls_fail_naming_redis_url(url, expected):
    message = config_error(RedisPoolConfig, url=url)
    assert message.startswith(f"redis.url = {redact_url(url)!r}: "), message
    assert expected in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379/15",
        "rediss://user:pw@redis.example.com:6380/0",
        "redis://[::1]:6379",
        "unix:///tmp/redis.sock",
        "unix://user:pw@/tmp/redis.sock?db=2",
        "redis+sentinel://:pw@h1:26379,h2:26379/mymaster",
        "redis+cluster://h1:7000,h2:7001",
    ],
)
def test_well_formed_urls_are_accepted(url):
    assert RedisPoolConfig(url=url).url == url


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("db=x", "query parameter db='x': must be a whole number"),
        ("socket_timeout=abc", "query parameter socket_timeout='abc': must be a number"),
        ("socket_timeout=nan", "query parameter socket_timeout='nan': must be a number"),
        ("protocol=9", "query parameter protocol='9': must be 2 or 3"),
        ("health_check_interval=1.5", "health_check_interval='1.5': must be a whole number"),
        ("retry_on_timeout=maybe", "retry_on_timeout='maybe': must be true or false"),
        ("nonsense=1", "unknown query parameter 'nonsense' (known: client_name, db, "),
        ("pasword=s3cret-pw", "unknown query parameter 'pasword'"),
        ("password=s3cret-pw&db=x", "query parameter db='x'"),
    ],
)
def test_bad_query_parameters_in_the_url_are_one_line_errors(query, expected):
    """Before: a 50-line traceback when connecting, or "unreachable" for protocol=9."""
    message = config_error(RedisPoolConfig, url=f"redis://:s3cret-pw@h:6379/0?{query}")
    assert message.startswith("redis.url: ") and expected in message, message
    assert "\n" not in message and "s3cret-pw" not in message


def test_good_query_parameters_are_accepted():
    url = "redis://h:6379/0?db=2&socket_timeout=1.5&protocol=3&retry_on_timeout=yes"
    assert RedisPoolConfig(url=url).url == url


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        ({"url": "redis://h:6379/0"}, "server"),
        ({"url": "unix:///tmp/r.sock"}, "server"),
        ({"url": "redis+sentinel://h1,h2/mymaster"}, "sentinel"),
        ({"url": "redis+cluster://h1:7000,h2:7001"}, "cluster"),
        ({"url": "redis://h:7000", "cluster": True}, "cluster"),
    ],
)
def test_the_url_and_the_cluster_flag_say_the_deployment(fields, mode):
    assert RedisPoolConfig(**fields).mode == mode


def test_the_sentinel_password_is_a_secret_like_the_password():
    config = RedisPoolConfig(url="redis+sentinel://h1/m", sentinel_password="s3cret-pw")
    assert "s3cret-pw" not in repr(config)
    assert "s3cret-pw" not in str(settings_to_dict(Settings(redis=config)))


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[redis]\npool_sise = 10\n",
            "unknown setting 'redis.pool_sise' (did you mean 'redis.pool_size'?)",
        ),
        ("leas_s = 3\n", "unknown setting 'leas_s' (did you mean 'lease_s'?)"),
        ("zzzz = 1\n", "unknown setting 'zzzz'"),
        ("redis = 'redis://x'\n", "redis must be a table ([redis])"),
    ],
)
def test_unknown_keys_in_a_config_file_are_errors(tmp_path, toml, expected):
    path = write_toml(tmp_path, toml)
    message = config_error(load_settings, config_file=path, env={})
    assert message.startswith(f"config file {path}: ")
    assert message.endswith(expected)


def test_unknown_override_keys_are_errors():
    message = config_error(load_settings, env={}, overrides={"redis.pool_sise": 10})
    assert message == "unknown setting 'redis.pool_sise' (did you mean 'redis.pool_size'?)"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"HANDOFF_REDIS_POOL_SIZE": "many"},
            "HANDOFF_REDIS_POOL_SIZE = 'many': must be an integer (redis.pool_size)",
        ),
        ({"HANDOFF_LEASE_S": "30s"}, "HANDOFF_LEASE_S = '30s': must be a number (lease_s)"),
        ({"HANDOFF_REDIS_TLS": "maybe"}, "HANDOFF_REDIS_TLS = 'maybe': must be one of 1/0"),
        ({"HANDOFF_AGENTS": "a:2"}, "HANDOFF_AGENTS = 'a:2': 'a:2': expected AGENT=N"),
        ({"HANDOFF_AGENTS": "a=two"}, "HANDOFF_AGENTS = 'a=two': 'a=two': expected AGENT=N"),
        ({"HANDOFF_AGENTS": "a=1,a=2"}, "HANDOFF_AGENTS = 'a=1,a=2': 'a=2': agent 'a' is named"),
        ({"HANDOFF_PRESET": "prod"}, "preset = 'prod': must be one of"),
    ],
)
def test_bad_environment_values_name_the_variable(env, expected):
    assert config_error(load_settings, env=env).startswith(expected)


def test_bad_override_string_names_the_setting():
    message = config_error(load_settings, env={}, overrides={"redis.pool_size": "ten"})
    assert message == "redis.pool_size = 'ten': must be an integer (redis.pool_size)"


def test_unknown_preset():
    message = config_error(load_settings, preset="x", env={})
    assert message == "preset = 'x': must be one of development, production, high_availability"


def test_missing_config_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    message = config_error(load_settings, config_file=missing, env={})
    assert message.startswith(f"config file {missing}: cannot read it")


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    path = write_toml(tmp_path, "app = 'workers'\nlease_s = = 3\n")
    message = config_error(load_settings, config_file=path, env={})
    assert message.startswith(f"config file {path}: invalid TOML: ")
    assert "line 2" in message


@given(st.integers())
def test_pool_size_outside_its_range_always_fails_naming_the_field(size):
    if 1 <= size <= 10_000:
        assert RedisPoolConfig(pool_size=size, min_idle_conns=0).pool_size == size
    else:
        with pytest.raises(ConfigError, match=r"redis\.pool_size"):
            RedisPoolConfig(pool_size=size, min_idle_conns=0)


@given(st.integers(min_value=1, max_value=10_000), st.integers(min_value=0, max_value=10_000))
def test_min_idle_conns_is_bounded_by_pool_size(size, idle):
    if idle <= size:
        assert RedisPoolConfig(pool_size=size, min_idle_conns=idle).min_idle_conns == idle
    else:
        with pytest.raises(ConfigError, match=r"redis\.min_idle_conns"):
            RedisPoolConfig(pool_size=size, min_idle_conns=idle)


# --- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (SECRET_URL, "redis://user:***@host:6379/0"),
        ("redis://:pw@host", "redis://:***@host"),
        ("redis://user@host:6379", "redis://user@host:6379"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("rediss://u:p@ss/w@rd@host:6380", "rediss://u:***@host:6380"),
        (
            "unix:///tmp/redis.sock?db=1&password=pw&x=1",
            "unix:///tmp/redis.sock?db=1&password=***&x=1",
        ),
        ("redis://:hunter2", "redis://:***"),  # host forgotten: the "port" is a password
        ("redis://host:pw/0", "redis://host:***"),
        ("redis://[::1]:6379", "redis://[::1]:6379"),
        ("redis+cluster://h1:7000,h2:7001/0", "redis+cluster://h1:7000,h2:7001/0"),
        ("redis+sentinel://h1:26379,h2:pw", "redis+sentinel://h1:26379,h2:***"),
        ("user:pw@host", "user:***@host"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("", ""),
    ],
)
def test_redact_url_replaces_only_the_password(url, expected):
    assert redact_url(url) == expected


@given(st.text(min_size=0, max_size=20), st.sampled_from(["redis", "rediss", "unix", "http", ""]))
def test_redact_url_never_echoes_a_password(suffix, scheme):
    password = "Pw9" + suffix
    prefix = f"{scheme}://" if scheme else ""
    for url in (f"{prefix}user:{password}@host:6379/0", f"{prefix}:{password}"):
        assert password not in redact_url(url)


def test_repr_never_shows_a_password():
    pool = RedisPoolConfig(url=SECRET_URL, password=SECRET_PASSWORD)
    for text in (repr(pool), str(pool), repr(Settings(redis=pool)), str(Settings(redis=pool))):
        assert_no_secret(text)
        assert "password='***'" in text and "user:***@host" in text
    assert pool.redacted_url == "redis://user:***@host:6379/0"
    assert pool.url == SECRET_URL and pool.password == SECRET_PASSWORD  # still usable


@pytest.mark.parametrize(
    "overrides",
    [
        {"redis.url": SECRET_URL, "redis.password": SECRET_PASSWORD, "redis.pool_size": 0},
        {"redis.url": "http://user:s3cr3t-pass@host:6379/0", "redis.password": SECRET_PASSWORD},
        {"redis.url": "redis://user:s3cr3t-pass@[host:6379/0"},
        {"redis.url": "redis://:s3cr3t-pass"},
        {"redis.url": "redis://user:s3cr3t-pass/x@host:99999/0"},
        {"redis.url": SECRET_URL, "redis.password": 12345},
    ],
)
def test_config_errors_never_show_a_password(overrides):
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides=overrides)
    assert_no_secret("".join(traceback.format_exception(info.value)))
    assert "12345" not in str(info.value)


def test_settings_to_dict_redacts_unless_asked_not_to():
    settings = Settings(redis=RedisPoolConfig(url=SECRET_URL, password=SECRET_PASSWORD))
    data = settings_to_dict(settings)
    assert_no_secret(json.dumps(data))
    assert data["redis"]["url"] == "redis://user:***@host:6379/0"
    assert data["redis"]["password"] == "***"
    assert data["lease_s"] == 30.0 and data["agents"] == {}
    raw = settings_to_dict(settings, redact=False)
    assert (raw["redis"]["url"], raw["redis"]["password"]) == (SECRET_URL, SECRET_PASSWORD)
    assert settings_to_dict(Settings())["redis"]["password"] is None


# --- handoff config show ----------------------------------------------------------------


@pytest.fixture
def cli():
    from handoff.cli import main
    from handoff.cli.config_commands import config_group

    if "config" not in main.commands:
        main.add_command(config_group)

    def invoke(*args: str, env: dict[str, str] | None = None):
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    return invoke


def test_config_show_prints_readable_toml_with_secrets_redacted(cli, tmp_path):
    result = cli(
        "--redis-url", SECRET_URL, "--preset", "production", "config", "show",
        env={"HANDOFF_REDIS_PASSWORD": SECRET_PASSWORD, "HANDOFF_AGENTS": "reviewer=2"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    assert 'url = "redis://user:***@host:6379/0"' in result.output
    assert 'password = "***"' in result.output
    assert "pool_size = 50" in result.output
    parsed = tomllib.loads(result.output)  # the text form is valid TOML
    assert parsed["agents"] == {"reviewer": 2} and parsed["lease_s"] == 30.0
    # ... so it can be saved and loaded back as a config file.
    saved = write_toml(tmp_path, result.output)
    reloaded = load_settings(config_file=saved, env={})
    assert reloaded.redis.pool_size == 50 and reloaded.agents == {"reviewer": 2}


def test_config_show_json(cli):
    result = cli(
        "--redis-url", SECRET_URL, "--app", "my.agents", "--log-level", "warning",
        "config", "show", "--json",
        env={"HANDOFF_REDIS_PASSWORD": SECRET_PASSWORD},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    data = json.loads(result.output)
    assert data["redis"]["url"] == "redis://user:***@host:6379/0"
    assert data["redis"]["password"] == "***"
    assert (data["app"], data["log_level"]) == ("my.agents", "WARNING")
    assert data["redis"]["pool_size"] == 25


def test_config_show_reports_a_bad_setting_in_one_line(cli):
    result = cli("--preset", "nope", "config", "show")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "handoff: error: preset = 'nope': must be one of development, production, high_availability"
    ]


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        ("redis://h:6379/0", "server"),
        ("redis+sentinel://:pw@s1:26379,s2:26379/mymaster", "sentinel"),
        ("redis+cluster://n1:7000,n2:7001", "cluster"),
    ],
)
def test_config_show_says_which_deployment_the_url_names(cli, url, mode):
    result = cli("--redis-url", url, "config", "show")
    assert result.exit_code == 0
    assert f"# deployment: {mode} " in result.output
    assert ":pw@" not in result.output
