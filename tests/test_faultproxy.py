"""The fault proxy against a real server, driven by redis-py with its retries disabled."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness.faultproxy import FaultProxy


@pytest.fixture
def proxy(redis_tcp_addr) -> Iterator[FaultProxy]:
    with FaultProxy(redis_tcp_addr) as p:
        yield p


@pytest.fixture
def connect(proxy) -> Iterator[Callable[..., redis.Redis]]:
    """Clients through the proxy that fail on the first error.

    redis-py >= 6 retries 3 times by default; an explicit zero-retry policy (and no
    retry_on_error list) turns that off on every version (retry_on_timeout is deprecated in 8).
    """
    made: list[redis.Redis] = []

    def make(**kwargs) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 2)
        client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0), **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_clean_forwarding(proxy, connect, raw_redis):
    client = connect()
    assert client.ping() is True
    assert client.set("greeting", "hello") is True
    assert client.get("greeting") == b"hello"
    assert raw_redis.get("greeting") == b"hello"
    assert proxy.connections_accepted == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"


def test_retries_are_really_off(connect):
    client = connect(single_connection_client=True)
    assert client.connection.retry.get_retries() == 0


def test_delay_applies_to_an_existing_connection(proxy, connect):
    client = connect()
    client.set("k", "v")
    proxy.delay(200)
    started = time.monotonic()
    assert client.get("k") == b"v"
    assert time.monotonic() - started >= 0.18
    proxy.heal()
    started = time.monotonic()
    assert client.get("k") == b"v"
    assert time.monotonic() - started < 0.18


def test_jitter_keeps_order_within_a_connection(proxy, redis_tcp_addr):
    proxy.delay(3, jitter_ms=3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(200):
            sock.sendall(f"ECHO {i}\r\n".encode())
        expected = b"".join(f"${len(str(i))}\r\n{i}\r\n".encode() for i in range(200))
        received = b""
        while len(received) < len(expected):
            chunk = sock.recv(65536)
            assert chunk, "proxy closed the connection"
            received += chunk
    assert received == expected


def test_blackhole_times_out_existing_and_new_connections(proxy, connect):
    existing = connect(socket_timeout=0.3)
    assert existing.ping()
    proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        existing.ping()
    with pytest.raises(redis.TimeoutError):
        connect(socket_timeout=0.3).ping()
    assert proxy.connections_accepted == 2  # accepted, then swallowed
    proxy.heal()
    assert connect(socket_timeout=0.3).ping()


def test_reset_all_breaks_the_existing_connection_then_a_new_one_works(proxy, connect):
    # A pooled client would notice the dead idle socket when taking it from the pool and
    # silently reconnect; a single-connection client keeps using the socket that was reset.
    client = connect(single_connection_client=True)
    assert client.ping()
    assert proxy.active_connections == 1
    proxy.reset_all()
    assert proxy.active_connections == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()
    proxy.heal()
    assert client.ping()  # reconnects: a new connection through the proxy
    assert proxy.connections_accepted == 2


def test_refuse_and_accept_again(proxy, connect):
    existing = connect()
    assert existing.ping()
    port = proxy.port
    proxy.refuse()
    with pytest.raises(redis.ConnectionError):
        connect().ping()
    assert existing.ping()  # established connections are untouched
    proxy.accept_again()
    assert proxy.port == port
    assert connect().ping()


def test_heal_reopens_a_refusing_proxy(proxy, connect):
    proxy.refuse()
    proxy.heal()
    assert connect().ping()


def test_reply_lost_after_the_command_ran(proxy, connect, raw_redis):
    client = connect()
    assert client.ping()  # handshake replies would count too: arm after connecting
    proxy.reset_after_upstream_reply()
    with pytest.raises(redis.ConnectionError):
        client.incr("k")
    assert raw_redis.get("k") == b"1"  # checked directly, not through the proxy
    assert client.incr("k") == 2  # only one reply was dropped
    proxy.drop_next_reply()
    with pytest.raises(redis.ConnectionError):
        client.incr("k")
    assert raw_redis.get("k") == b"3"


@pytest.mark.parametrize("fault", ["reset_all", "drop_next_reply"])
def test_resets_are_rsts_not_fins(proxy, fault):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
        getattr(proxy, fault)()
        if fault == "drop_next_reply":
            sock.sendall(b"PING\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_close_is_deterministic(redis_tcp_addr):
    fds = _open_fds()
    proxy = FaultProxy(redis_tcp_addr)
    thread = proxy._thread
    client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    proxy.delay(50)
    client.close()
    proxy.close()
    assert not thread.is_alive()
    assert _open_fds() == fds
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    proxy.close()  # idempotent
    with pytest.raises(RuntimeError):
        proxy.blackhole()
