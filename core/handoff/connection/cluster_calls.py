"""Script calls on a Redis Cluster: one pipeline per node, redirections followed here.

Runs in: every process in cluster mode (TaskQueue.run_scripts). redis-py will not run
EVALSHA inside a cluster pipeline, and one call at a time would cost a round trip per
agent type. Every handoff script touches the keys of one agent only, all under the hash
tag {agent} and all declared in KEYS, so each call has one slot and one owner: calls are
grouped by owner and each owner gets one pipeline (and, when asked, a WAIT on that same
connection, which is what WAIT needs to mean anything).

While a slot moves (resharding) or a primary fails over, a call can come back MOVED,
ASK, TRYAGAIN or CLUSTERDOWN. Those calls, and only those, are sent again after the slot
map is refreshed (MOVED), with ASKING on the importing node (ASK), or after a short pause
(TRYAGAIN, CLUSTERDOWN). Repeating a call is safe because every handoff operation is
idempotent (see handoff/protocol/scripts.py). What is still redirected after MAX_ROUNDS is raised,
and the manager's retry policy takes it from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rex
from redis.cluster import RedisCluster, get_node_name

from handoff.errors import NotReplicated

Call = tuple[str, list[str], list[Any]]  # script SHA1, KEYS, ARGV

MAX_ROUNDS = 16
_PAUSE_S = 0.02
_PENDING = object()  # a reply not in yet (a script may legitimately return nil)


def run_script_calls(
    cluster: RedisCluster,
    calls: Sequence[Call],
    *,
    load_scripts: Callable[[Any], None],
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
    before: tuple | None = None,
) -> list:
    """Replies to calls, in order. A NOSCRIPT reply has load_scripts(node client) load
    them on that node (the protocol layer owns the scripts). With wait_replicas, each
    node's pipeline ends in WAIT; a node that got fewer acknowledgements raises
    NotReplicated (the writes stand). before: one command ahead of the first call, on
    its node's connection, in the first round only (its reply dropped)."""
    replies: list[Any] = [_PENDING] * len(calls)
    pending = list(range(len(calls)))
    asking: dict[int, str] = {}  # call index -> the node an ASK sent it to
    last_error: BaseException | None = None
    short: list[tuple[int, str]] = []  # (replicas that confirmed, node) below wait_replicas
    for round_number in range(MAX_ROUNDS):
        pause = False
        for node, indexes in _by_node(cluster, calls, pending, asking).items():
            items = [(calls[i], i in asking) for i in indexes]
            ahead = before if indexes[0] == 0 and round_number == 0 else None
            results, confirmed = _send(cluster, node, items, wait_replicas, wait_timeout_ms, ahead)
            if confirmed is not None and confirmed < wait_replicas:
                short.append((confirmed, node.name))
            for index, result in zip(indexes, results, strict=True):
                asking.pop(index, None)
                if not isinstance(result, Exception):
                    replies[index] = result
                    continue
                last_error = result
                if isinstance(result, rex.AskError):
                    asking[index] = get_node_name(result.host, result.port)
                elif isinstance(result, rex.MovedError):
                    _refresh(cluster, result)
                elif isinstance(result, rex.NoScriptError):
                    load_scripts(cluster.get_redis_connection(node))
                elif isinstance(result, rex.TryAgainError | rex.ClusterDownError):
                    pause = True
                else:
                    raise result
        pending = [i for i in pending if replies[i] is _PENDING]
        if not pending:
            if short:  # every node has its writes: only now say which were not confirmed
                confirmed, where = min(short)
                check_replicated(confirmed, wait_replicas, wait_timeout_ms, where)
            return replies
        if pause:
            time.sleep(_PAUSE_S * (round_number + 1))
    assert last_error is not None
    raise last_error


def _by_node(cluster: RedisCluster, calls, pending, asking) -> dict:
    groups: dict[Any, list[int]] = {}
    for index in pending:
        name = asking.get(index)
        node = cluster.get_node(node_name=name) if name else None
        if node is None:
            slot = cluster.keyslot(calls[index][1][0])
            node = cluster.nodes_manager.get_node_from_slot(slot)
        groups.setdefault(node, []).append(index)
    return groups


def _send(
    cluster: RedisCluster, node, items, wait_replicas: int, wait_timeout_ms: int, before=None
) -> tuple[list, int | None]:
    """One pipeline to one node: a reply or an exception per item, and how many replicas
    confirmed the node's writes (None without WAIT)."""
    client = cluster.get_redis_connection(node)
    if len(items) == 1 and not wait_replicas and not items[0][1] and before is None:
        return [_one_call(cluster, client, items[0][0])], None  # no pipeline to build
    pipe = client.pipeline(transaction=False)
    if before is not None:
        pipe.execute_command(*before)
    for (sha, keys, args), asking in items:
        if asking:
            pipe.execute_command("ASKING")
        pipe.evalsha(sha, len(keys), *keys, *args)
    if wait_replicas:
        pipe.execute_command("WAIT", wait_replicas, wait_timeout_ms)
    try:
        out = pipe.execute(raise_on_error=False)
    except (rex.ConnectionError, rex.TimeoutError):
        _refresh(cluster, None)  # the node may be gone (failover): look again next time
        raise
    confirmed = None
    if wait_replicas:
        confirmed = out.pop()
        if isinstance(confirmed, Exception):
            raise confirmed
        confirmed = int(confirmed)
    results, position = [], 0 if before is None else 1
    for _, asking in items:
        position += 1 if asking else 0  # skip ASKING's own reply
        results.append(out[position])
        position += 1
    return results, confirmed


def _one_call(cluster: RedisCluster, client, call: Call) -> Any:
    """One EVALSHA on one node: its reply, or the error reply as a value (like a pipeline)."""
    sha, keys, args = call
    try:
        return client.evalsha(sha, len(keys), *keys, *args)
    except rex.ResponseError as e:
        return e
    except (rex.ConnectionError, rex.TimeoutError):
        _refresh(cluster, None)
        raise


def check_replicated(acknowledged: Any, wanted: int, timeout_ms: int, where: str) -> None:
    """Raise NotReplicated when WAIT saw fewer replicas than asked for."""
    if isinstance(acknowledged, Exception):
        raise acknowledged
    if int(acknowledged) < wanted:
        raise NotReplicated(
            f"enqueue written on {where} but acknowledged by {int(acknowledged)} of "
            f"{wanted} replica(s) within {timeout_ms} ms (enqueue_wait_replicas): it may be "
            "lost if this primary fails now; enqueue it again with the same key= to make "
            "sure without running it twice (a keyed enqueue is idempotent)"
        )


def _refresh(cluster: RedisCluster, moved: rex.MovedError | None) -> None:
    """Update the slot map: from a MOVED reply when there is one, else ask the cluster."""
    try:
        if moved is not None:
            cluster.nodes_manager.move_slot(moved)
        else:
            cluster.nodes_manager.initialize()
    except (rex.RedisError, OSError, AttributeError):
        # No node reachable right now: the next attempt's error says so.
        pass
