"""The inbox: the ids of this worker's tasks that were cancelled while it held them.

Runs in: a worker process, its own thread (Inbox), and handler threads (lease_check, for
the start gate). cancel.lua pushes 'id|token|seq|answers list' to the inbox of the worker
whose lease token carries its claim tag; this thread blocks in Redis on it, closes the
start gate on those tasks at once (not after a hop through the main thread), answers
each cancel whether its handler had started, and tells the main thread (CancelRequested).
"""

from __future__ import annotations

from handoff.connection.manager import RedisManager
from handoff.errors import HandoffError
from handoff.protocol.keys import AgentKeys
from handoff.protocol.task import Task
from handoff.runtime.start_gate import Check, StartGate
from handoff.runtime.worker_events import CancelRequested, HelperThread, Shared


def lease_check(manager: RedisManager, agent_keys: AgentKeys, claim_tag: str) -> Check:
    """For the gate (a handler thread): the inbox's sequence number, and whether the
    task's lease is still this delivery's. One round trip."""
    seq_key, tokens = agent_keys.inbox_seq(claim_tag), agent_keys.tokens

    def check(task: Task) -> tuple[int, bool]:
        def read(client) -> list:
            pipe = client.pipeline(transaction=False)
            pipe.get(seq_key)
            pipe.hget(tokens, task.id)
            return pipe.execute()

        seq, holder = manager.execute(read)
        return int(seq or 0), holder is not None and holder.decode() == task.token

    return check


class Inbox(HelperThread):
    name = "inbox"

    def __init__(
        self, shared: Shared, gate: StartGate, inbox_key: str, socket_timeout_s: float
    ) -> None:
        super().__init__(shared)
        self.gate = gate
        self.inbox_key = inbox_key
        self.timeout_s = max(0.1, socket_timeout_s / 2)  # less than the read timeout

    def run(self) -> None:
        """Block in Redis on the inbox; pass what arrives on at once."""
        inbox, timeout_s = self.inbox_key, self.timeout_s

        def pop_all(client) -> list[bytes]:
            first = client.blpop([inbox], timeout=timeout_s)
            if first is None:
                return []
            return [first[1], *(client.lpop(inbox, 1000) or [])]

        while not self.stop_event.is_set():
            try:
                entries = self.manager.execute(pop_all, retry=False)
            except HandoffError as e:
                self.outage.failed("wait for cancels", e)
                self.stop_event.wait(max(0.1, self.backoff.current_s()))
                continue
            if entries:
                self.apply([e.decode() for e in entries])

    def apply(self, entries: list[str]) -> None:
        """The tasks never start from now on (the gate); each cancel hears whether its
        handler had started; then the main thread tells running handlers and forgets
        them all."""
        parsed: list[tuple[str, str, int]] = []
        answer_to: list[str] = []
        for entry in entries:  # 'id|token|seq|answers list' (cancel.lua)
            task_id, token, seq, answers = [*entry.split("|"), "", "", ""][:4]
            held = self.held.by_id.get(task_id)
            token = token or (held.token if held is not None else "")
            parsed.append((task_id, token, int(seq or 0)))
            answer_to.append(answers)
        started = self.gate.applied(parsed)
        self._answer(
            [
                (key, f"{tid}|{'started' if began else 'waiting'}")
                for (tid, _, _), key, began in zip(parsed, answer_to, started, strict=True)
                if key
            ]
        )
        self.events.put(CancelRequested([tid for tid, _, _ in parsed]))

    def _answer(self, answers: list[tuple[str, str]]) -> None:
        if not answers:
            return

        def send(client) -> None:
            pipe = client.pipeline(transaction=False)
            for key, answer in answers:
                pipe.rpush(key, answer)
                pipe.pexpire(key, 60_000)
            pipe.execute()

        try:
            self.manager.execute(send)
        except HandoffError as e:  # the cancel reports it unanswered: no harm
            self.outage.failed("answer a cancel", e)
