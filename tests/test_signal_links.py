"""Signal links: client.signal_url makes a URL on the monitor's web server that resumes
the Waits on one event when a JSON body is POSTed to it, until it expires; forged,
expired and oversized requests are refused with a status and one line."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import orjson
import pytest

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")

from handoff import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.config.settings import settings_to_dict
from handoff.errors import ConfigError
from handoff.protocol import signals
from harness.procs import HandoffProcess, free_tcp_port, handoff_env, wait_until

SECRET = "signal-links-test-secret-0123456789"


def _post(url: str, body: bytes = b"{}") -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _up(base: str) -> bool:
    try:
        return urllib.request.urlopen(base + "/", timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture
def linked(redis_url, start, tmp_path):
    """A supervisor (asker, after) and a monitor serving signal links; a client that makes
    them."""
    start(["supervise", "--agents", "asker=1,after=1"], app="apps.waits")
    port = free_tcp_port()
    env = {**handoff_env(redis_url, app="apps.waits"), "HANDOFF_SIGNAL_SECRET": SECRET}
    monitor = HandoffProcess(
        ["monitor", "--web", f"127.0.0.1:{port}", "--interval-s", "0.25"], env,
        tmp_path / "monitor.log",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    settings = Settings(
        redis=RedisPoolConfig(url=redis_url), signal_secret=SECRET, signal_base_url=base
    )
    try:
        wait_until(lambda: _up(base), 30, "the monitor's web server")
        with Client(settings=settings) as client:
            yield client, base, monitor
    finally:
        monitor.stop()


def _waiting(client, event: str) -> str:
    root = client.enqueue("asker", {"i": 1, "event": event, "timeout_s": 60})
    wait_until(lambda: client.status(root) == "done", 20, "the asker's Wait")
    then = client.result(root)["wait"]["then"]
    wait_until(lambda: client.status(then) == "waiting", 20, "the wait to be parked")
    return root


def test_a_signal_link_resumes_the_wait_and_wrong_ones_are_refused(linked):
    client, base, monitor = linked
    root = _waiting(client, "order.42/paid")
    url = client.signal_url("order.42/paid", expires_in_s=60)
    assert url.startswith(base + "/signal/order.42%2Fpaid?exp=")
    head, sig = url.rsplit("&sig=", 1)
    other = client.signal_url("order.43/paid", expires_in_s=60)
    forged = [
        head + "&sig=" + ("0" if sig[0] != "0" else "1") + sig[1:],  # one digit changed
        url.replace("order.42%2Fpaid", "order.43%2Fpaid"),  # another event, same signature
        head.replace("exp=", "exp=9") + "&sig=" + sig,  # a later expiry
        other.replace("order.43", "order.42"),
        head,  # no signature
    ]
    for bad in forged:
        assert _post(bad) == (403, "403: not a valid signal link\n"), bad
    status, text = _post(url, b"x" * 9000)
    assert (status, text) == (413, "413: request body over 8192 bytes\n")
    status, text = _post(url, b"{nope")
    assert (
        status == 400
        and text.startswith("400: the body is not a JSON signal")
        and text.count("\n") == 1
    )
    assert client.status(client.result(root)["wait"]["then"]) == "waiting"  # none of it counted
    assert _post(url, orjson.dumps({"paid": 42})) == (200, '{"event":"order.42/paid","resumed":1}')
    assert client.result(root, 20, follow=True) == {"event": {"paid": 42}, "timed_out": False}
    assert _post(url)[0] == 200  # the link works until it expires (it resumes nothing more)
    assert "Traceback" not in monitor.output()


def test_an_expired_link_is_refused(linked):
    client, _, _ = linked
    url = client.signal_url("late", expires_in_s=0.5)
    time.sleep(1.6)
    assert _post(url) == (410, "410: this signal link has expired\n")


def test_links_need_a_secret_and_an_address():
    with pytest.raises(ConfigError, match="signal_url needs signal_secret"):
        Client(settings=Settings()).signal_url("x", expires_in_s=5)
    with pytest.raises(ConfigError, match="signal_secret") as caught:
        Settings(signal_secret="short-secret")
    assert "short-secret" not in str(caught.value)
    assert settings_to_dict(Settings(signal_secret=SECRET))["signal_secret"] == "***"


def test_a_monitor_without_a_secret_serves_no_links(redis_url, tmp_path):
    port = free_tcp_port()
    env = handoff_env(redis_url)
    args = ["monitor", "--web", f"127.0.0.1:{port}", "--interval-s", "0.25"]
    monitor = HandoffProcess(args, env, tmp_path / "monitor.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(base), 30, "the monitor's web server")
        link = signals.make_url(base, SECRET, "any", 60)
        assert _post(link) == (404, "404: signal links are off: the monitor has no signal_secret\n")
    finally:
        monitor.stop()
