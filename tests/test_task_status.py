"""A task's status is named in one place (protocol/task_status.py): no Redis needed."""

import pytest

from handoff.protocol.task_status import finished_status, task_status

NONE = {"dead": False, "running": False, "delayed": False, "queued": False}


@pytest.mark.parametrize(
    ("record", "status"),
    [
        (b'{"status":"done","finished_at":1,"result":{"status":"expired"}}', "done"),
        (b'{"status":"expired","finished_at":1}', "expired"),
        (b'{"status":"cancelled","finished_at":1}', "cancelled"),
    ],
)
def test_a_finished_record_names_its_status_from_its_first_field(record, status):
    assert finished_status(record) == status
    assert task_status(record, **{**NONE, "dead": True, "queued": True}) == status


def test_the_sets_decide_in_one_order_dead_running_delayed_queued():
    assert task_status(None, **{**NONE, "dead": True, "running": True}) == "dead"
    assert task_status(None, **{**NONE, "running": True, "delayed": True}) == "running"
    assert task_status(None, **{**NONE, "delayed": True, "queued": True}) == "delayed"
    assert task_status(None, **{**NONE, "queued": True}) == "queued"
    assert task_status(None, **NONE) == "unknown"
