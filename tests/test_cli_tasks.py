"""`handoff enqueue`, `handoff inspect` and `handoff dead` against a real server.

Success paths go through click's CliRunner; error paths through the real entry point
(core.cli.run), which turns handoff errors into one line on stderr and a non-zero status.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from handoff.cli import main, run
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Failure, TaskQueue

# Every test here runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

ROOT = Path(__file__).resolve().parent.parent
AGENT = "probe"  # defined by the test app, tests/apps/probe.py
APP = ("--app", "apps.probe")
KEYS = Keys().agent(AGENT)


def cli(url: str, *args: str, stdin: str | None = None):
    result = CliRunner().invoke(main, ["--redis-url", url, *APP, *args], input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def failing_cli(monkeypatch, capsys, url: str, *args: str, stdin: str = "") -> tuple[int, str]:
    """Run the real entry point; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["handoff", "--redis-url", url, *APP, *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as e:
        run()
    return e.value.code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("handoff: error: ")
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_one_task_prints_its_id(redis_url, raw_redis):
    result = cli(redis_url, "enqueue", AGENT, '{"goal": "ship it"}', "--priority", "-5")
    assert result.exit_code == 0
    task_id = result.output.strip()
    stored = orjson.loads(raw_redis.hget(KEYS.tasks, task_id))
    assert stored["payload"] == {"goal": "ship it"} and stored["priority"] == -5


def test_enqueue_with_a_key_twice_stores_one_task(redis_url, raw_redis):
    first = cli(redis_url, "enqueue", AGENT, "1", "--key", "k-1").output
    again = cli(redis_url, "enqueue", AGENT, "2", "--key", "k-1").output
    assert first == again
    assert raw_redis.zcard(KEYS.queue) == 1


def test_enqueue_json_lines_from_stdin(redis_url, raw_redis):
    lines = "\n".join(orjson.dumps({"n": i}).decode() for i in range(2500)) + "\n\n"
    result = cli(redis_url, "enqueue", AGENT, "-", stdin=lines)
    assert result.exit_code == 0 and "enqueued 2500 task(s)" in result.output
    assert raw_redis.zcard(KEYS.queue) == 2500


def test_malformed_json_is_a_one_line_error(redis_url, raw_redis, monkeypatch, capsys):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", AGENT, '{"goal": ')
    assert code != 0
    assert_one_line_error(err, "PAYLOAD: invalid JSON")
    assert raw_redis.dbsize() == 0


def test_a_bad_stdin_line_is_named_and_its_batch_not_written(
    redis_url, raw_redis, monkeypatch, capsys
):
    lines = '{"n": 1}\n{"n": 2}\n{"n": oops}\n{"n": 4}\n'
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", AGENT, "-", stdin=lines)
    assert code != 0
    assert_one_line_error(err, "stdin line 3", "invalid JSON", "nothing of its batch")
    assert raw_redis.dbsize() == 0


def test_an_oversized_stdin_line_is_named_and_its_batch_not_written(
    redis_url, raw_redis, monkeypatch, capsys
):
    monkeypatch.setenv("HANDOFF_MAX_PAYLOAD_BYTES", "1000")
    lines = '{"n": 1}\n\n' + orjson.dumps({"big": "x" * 2000}).decode() + '\n{"n": 4}\n'
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", AGENT, "-", stdin=lines)
    assert code != 0
    assert_one_line_error(err, "stdin line 3", "over the max_payload_bytes limit of 1000")
    assert raw_redis.dbsize() == 0


def test_a_bad_line_in_a_later_batch_says_what_was_already_enqueued(
    redis_url, raw_redis, monkeypatch, capsys
):
    good = [f'{{"n": {i}}}' for i in range(1500)]
    lines = "\n".join([*good[:1200], "[1,", *good[1200:]]) + "\n"
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", AGENT, "-", stdin=lines)
    assert code != 0
    assert_one_line_error(err, "stdin line 1201", "1000 task(s) from earlier batches")
    assert raw_redis.zcard(KEYS.queue) == 1000


@pytest.mark.parametrize("name", ["{x}", "a b", "a:b", "a*", "x" * 300, "Caps"])
def test_an_invalid_agent_name_is_a_one_line_error(redis_url, raw_redis, monkeypatch, capsys, name):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", name, "{}")
    assert code != 0
    assert_one_line_error(err, "invalid agent name")
    assert raw_redis.dbsize() == 0


def test_an_agent_name_with_a_newline_is_a_one_line_error(
    redis_url, raw_redis, monkeypatch, capsys
):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", "a\nb", "{}")
    assert code != 0
    assert err.startswith("handoff: error: invalid agent name") and "\\n" in err
    assert err.count("\n") == 1
    assert raw_redis.dbsize() == 0


def test_an_unknown_agent_is_refused_naming_the_defined_ones(
    redis_url, raw_redis, monkeypatch, capsys
):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", "nosuch", "{}")
    assert code != 0
    assert_one_line_error(err, "unknown agent 'nosuch'", "probe", "--app")
    assert raw_redis.dbsize() == 0


def test_without_an_app_an_agent_the_server_has_not_seen_is_refused(
    redis_url, raw_redis, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["handoff", "--redis-url", redis_url, "enqueue", "x", "{}"])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code != 0
    assert_one_line_error(capsys.readouterr().err, "unknown agent 'x'", "known: none", "--app")
    assert raw_redis.dbsize() == 0
    with Client(redis_url) as client:
        client.enqueue("x", {})  # now the server has seen it: no app needed
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "enqueue", "x", "{}"])
    assert result.exit_code == 0 and result.output.startswith("x."), result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--priority", "5000"], "priority = 5000"),
        (["--delay-s", "-3"], "delay_s = -3: must be between 0 and"),
        (["--delay-s", "nan"], "delay_s = nan"),
    ],
)
def test_bad_options_are_one_line_errors(redis_url, raw_redis, monkeypatch, capsys, args, fragment):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "enqueue", AGENT, "{}", *args)
    assert code != 0
    assert_one_line_error(err, fragment)
    assert raw_redis.dbsize() == 0


def test_the_installed_command_reports_malformed_json_in_one_line(redis_url, raw_redis):
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "handoff"), "--redis-url", redis_url, *APP,
         "enqueue", AGENT, "{nope"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT / 'core'}:{ROOT}:{ROOT / 'tests'}"},
    )  # fmt: skip
    assert done.returncode != 0
    assert_one_line_error(done.stderr, "invalid JSON")
    assert done.stdout == "" and raw_redis.dbsize() == 0


# -- inspect and dead ------------------------------------------------------------------------


@pytest.fixture
def worker_queue(redis_url):
    settings = Settings(redis=RedisPoolConfig(url=redis_url))
    q = TaskQueue(RedisManager(settings.redis, background=False), settings)
    yield q
    q.manager.close()


def bury(q: TaskQueue, n: int) -> list[str]:
    tasks = q.claim([ClaimRequest(AGENT, n, 30_000)])[AGENT]
    q.nack(
        [Failure(t, f"boom {i}", traceback="Traceback", dead_now=True) for i, t in enumerate(tasks)]
    )
    return [t.id for t in tasks]


def test_inspect_queues_and_task(redis_url, worker_queue):
    with Client(settings=Settings(redis=RedisPoolConfig(url=redis_url))) as client:
        ids = client.enqueue_many(AGENT, [{"n": i} for i in range(4)])
        client.enqueue("flaky", {}, delay_s=600)
        client.cancel(ids[3])
    bury(worker_queue, 1)

    table = cli(redis_url, "inspect", "queues").output.splitlines()
    assert table[0].split()[:7] == [
        "agent",
        "queued",
        "running",
        "delayed",
        "dead",
        "done",
        "cancelled",
    ]
    rows = {line.split()[0]: line.split()[1:7] for line in table[1:]}
    assert rows == {
        "flaky": ["0", "0", "1", "0", "0", "0"],
        "probe": ["2", "0", "0", "1", "0", "1"],
    }

    stats = orjson.loads(cli(redis_url, "inspect", "queues", "--json").output)
    assert stats[AGENT]["queued"] == 2 and stats[AGENT]["dead"] == 1

    info = orjson.loads(cli(redis_url, "inspect", "task", ids[1]).output)
    assert info["status"] == "queued" and info["task"]["payload"] == {"n": 1}
    dead = orjson.loads(cli(redis_url, "inspect", "task", ids[0]).output)
    assert dead["status"] == "dead" and dead["dead"]["reason"] == "boom 0"


def test_inspect_task_with_a_malformed_id_is_a_one_line_error(redis_url, monkeypatch, capsys):
    code, err = failing_cli(monkeypatch, capsys, redis_url, "inspect", "task", "no dot")
    assert code != 0
    assert_one_line_error(err, "invalid task id")


def test_dead_list_requeue_and_purge(redis_url, worker_queue, raw_redis):
    with Client(settings=Settings(redis=RedisPoolConfig(url=redis_url))) as client:
        client.enqueue_many(AGENT, [{"n": i} for i in range(5)])
    dead_ids = bury(worker_queue, 5)

    listed = orjson.loads(cli(redis_url, "dead", "list", AGENT, "--json").output)
    assert [e["id"] for e in listed] == dead_ids
    assert [e["reason"] for e in listed] == [f"boom {i}" for i in range(5)]
    table = cli(redis_url, "dead", "list", AGENT, "--limit", "2").output.splitlines()
    assert len(table) == 3 and "boom 0" in table[1]

    result = cli(redis_url, "dead", "requeue", AGENT, dead_ids[0], dead_ids[1])
    assert "requeued 2 task(s)" in result.output
    assert raw_redis.zcard(KEYS.queue) == 2 and raw_redis.zcard(KEYS.dead) == 3

    refused = cli(redis_url, "dead", "purge", AGENT, stdin="n\n")
    assert refused.exit_code != 0 and raw_redis.zcard(KEYS.dead) == 3
    assert "purged 3 task(s)" in cli(redis_url, "dead", "purge", AGENT, "--yes").output
    assert raw_redis.zcard(KEYS.dead) == 0 and raw_redis.hlen(KEYS.tasks) == 2
    assert "requeued 0 task(s)" in cli(redis_url, "dead", "requeue", AGENT).output


def test_dead_commands_reject_bad_agent_names(redis_url, monkeypatch, capsys):
    for command in (["list"], ["requeue"], ["purge", "--yes"]):
        code, err = failing_cli(monkeypatch, capsys, redis_url, "dead", *command, "{bad}")
        assert code != 0
        assert_one_line_error(err, "invalid agent name")


@pytest.mark.parametrize("command", [["supervise", "--agents", "probe=1"], ["worker", "probe"]])
def test_without_an_app_running_agents_is_a_one_line_error_naming_app(
    redis_url, monkeypatch, capsys, command
):
    monkeypatch.setattr(sys, "argv", ["handoff", "--redis-url", redis_url, *command])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code != 0
    assert_one_line_error(capsys.readouterr().err, "no app module", "--app MODULE")


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["supervise", "--agents", "probe=1,probe=2"], "agent 'probe' is named twice"),
        (["scale", ""], "'': expected AGENT=N"),
        (["scale", "probe=1,"], "'': expected AGENT=N"),
        (["scale", "probe=1001"], "N must be between 0 and 1000"),
    ],
)
def test_bad_process_counts_are_refused_naming_the_part(
    redis_url, monkeypatch, capsys, command, fragment
):
    code, err = failing_cli(monkeypatch, capsys, redis_url, *command)
    assert code == 2
    assert err.splitlines()[-1].startswith("Error: Invalid value: ") and fragment in err, err


def test_a_finished_tasks_payload_is_kept_in_its_record(start, redis_url, raw_redis):
    """`inspect task` showed no payload once a task finished (for an LLM pipeline, the
    prompt): it is kept in the record for run_ttl_s, up to kept_payload_bytes."""
    start(["supervise", "--agents", "probe=1"], kept_payload_bytes=64)
    with Client(redis_url) as client:
        small = client.enqueue("probe", {"n": 1, "prompt": "summarise the ticket"})
        large = client.enqueue("probe", {"n": 2, "prompt": "x" * 200})
        assert client.result(small, wait_s=20) and client.result(large, wait_s=20)
    shown = orjson.loads(cli(redis_url, "inspect", "task", small).output)
    assert shown["status"] == "done" and "task" not in shown
    assert shown["payload"] == {"n": 1, "prompt": "summarise the ticket"}
    cut = orjson.loads(cli(redis_url, "inspect", "task", large).output)
    assert "payload" not in cut and cut["result"]["payload_bytes"] == 219
