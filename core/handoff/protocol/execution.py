"""Blocking execution of the protocol's requests: plans, and script calls in one round trip.

Runs in: every process that holds a TaskQueue (producers, workers, the supervisor, admin
commands). The operation modules build script calls (name, KEYS, ARGV); this sends them,
one EVALSHA alone when that is all there is (the claim's hot path), a pipeline otherwise,
loading the scripts on NOSCRIPT; on a cluster, connection/cluster_calls.py routes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from handoff.connection.cluster_calls import check_replicated, run_script_calls
from handoff.connection.manager import RedisManager
from handoff.protocol import plan, scripts
from handoff.protocol.plan import Call, Pause, Plan, Scripts

T = TypeVar("T")
ScriptCall = tuple[str, list[str], list[Any]]  # script name, KEYS, ARGV


class BlockingExecution:
    """TaskQueue's driver half: perform requests blocking, over self.manager (and
    self._waiting() for blocking waits, when set)."""

    manager: RedisManager
    settings: Any
    _waiting: Callable[[], RedisManager] | None

    def run(self, operation: Plan[T]) -> T:
        """Perform a plan's requests one by one, blocking; its return value."""
        return plan.run(self.perform, operation)

    def iterate(self, operation: Plan[None]) -> Iterator[Any]:
        return plan.iterate(self.perform, operation)

    def perform(self, request: Any) -> Any:
        kind = type(request)
        if kind is Scripts:
            return self.run_scripts(
                request.calls, request.extra, wait_replicas=request.wait_replicas
            )
        if kind is Call:
            if request.blocking:
                manager = self._waiting() if self._waiting is not None else self.manager
                return manager.execute(request.fn, retry=False)
            if request.n_operations:
                return self.manager.execute_pipelined(request.fn, request.n_operations)
            return self.manager.execute(request.fn)
        if kind is Pause:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"not a protocol request: {request!r}")

    def run_scripts(
        self,
        calls: Sequence[ScriptCall],
        extra=(),
        *,
        wait_replicas: int = 0,
        before: tuple | None = None,
    ) -> list:
        """Run script calls (plus extra pipeline operations) in one round trip per node.

        A NOSCRIPT reply loads the scripts and repeats the whole batch: every operation
        is idempotent (see scripts.py), so the repeat cannot double anything. With
        wait_replicas, WAIT follows on the same connection (NotReplicated if short).
        before: one command sent ahead of the calls on the same connection, its reply
        dropped (a blocking pop: the server runs the calls the moment it returns); it is
        sent once, a repeat sends the calls alone. On a cluster,
        handoff/connection/cluster_calls.py groups the calls per node instead.
        """
        timeout_ms = self.settings.enqueue_wait_timeout_ms
        if self.manager.is_cluster:
            return self._run_on_cluster(calls, extra, wait_replicas, timeout_ms, before)
        operations = [
            (lambda p, n=name, k=keys, a=args: p.evalsha(scripts.sha(n), len(k), *k, *a))
            for name, keys, args in calls
        ]
        operations.extend(extra)
        if wait_replicas:
            operations.append(lambda p: p.execute_command("WAIT", wait_replicas, timeout_ms))
        attempt = _attempt(self.manager, calls, operations, before)

        def run(client) -> list:
            replies = scripts.with_scripts(client, attempt)
            if wait_replicas:
                check_replicated(replies.pop(), wait_replicas, timeout_ms, "the primary")
            return replies

        if len(operations) == 1:
            return self.manager.execute(run)
        return self.manager.execute_pipelined(run, len(operations))

    def _run_on_cluster(
        self, calls, extra, wait_replicas: int, timeout_ms: int, before: tuple | None
    ) -> list:
        ahead = [before]  # sent with the first attempt only

        def run(cluster) -> list:
            first, ahead[0] = ahead[0], None
            replies = run_script_calls(
                cluster,
                [(scripts.sha(name), keys, args) for name, keys, args in calls],
                load_scripts=scripts.load_all,
                wait_replicas=wait_replicas,
                wait_timeout_ms=timeout_ms,
                before=first,
            )
            if extra:  # plain commands: the cluster pipeline routes them per slot
                pipe = cluster.pipeline()
                for operation in extra:
                    operation(pipe)
                replies += pipe.execute()
            return replies

        return self.manager.execute_pipelined(run, len(calls) + len(extra))


def _attempt(
    manager: RedisManager, calls: Sequence[ScriptCall], operations: list, before: tuple | None
) -> Callable[[Any], list]:
    """One try at sending the calls on one server: a lone script call as a bare EVALSHA
    (no pipeline object: the claim's hot path), a pop and scripts as raw commands, else a
    pipeline. The `before` command goes with the first try only (a repeat must not pop)."""
    ahead = [before]

    def attempt(client) -> list:
        first, ahead[0] = ahead[0], None
        if len(operations) == 1 and calls and first is None:
            name, keys, args = calls[0]
            sha = scripts.sha(name)
            return [manager.send(client, "EVALSHA", sha, len(keys), *keys, *args)]
        if first is not None and len(operations) == len(calls):  # a pop, then scripts
            commands = [("EVALSHA", scripts.sha(n), len(k), *k, *a) for n, k, a in calls]
            return manager.send_all(client, [first, *commands])[1:]
        pipe = client.pipeline(transaction=False)
        if first is not None:
            pipe.execute_command(*first)
        for operation in operations:
            operation(pipe)
        replies = pipe.execute()
        return replies[1:] if first is not None else replies

    return attempt
