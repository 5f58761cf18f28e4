"""The trainer's label join (services/trainer/joiner.py): an instance is trained once every task
has a label or its window has closed (then missing labels are the policy's 0), each partition
in stream order, a redelivery queued once, a label before its instance kept until it comes."""
from __future__ import annotations

from storage.stream import InstanceEvent
from services.trainer.joiner import LabelJoiner, entry_after

TASKS = ["click", "like"]
WINDOW_MS = 1_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def event(ins: int, ts: int, labels=None, user="u") -> InstanceEvent:
    return InstanceEvent(user_id=user, ins_id=ins, timestamp_ms=ts, labels=labels or {}, entry_id=f"{ts}-{ins}")


def test_an_instance_waits_until_every_task_has_a_label():
    joiner = LabelJoiner(TASKS, WINDOW_MS, Clock())
    joiner.add_instance(0, event(1, 100, {"click": 1}))
    assert joiner.pop_ready() == []
    joiner.add_labels(1, {"like": 0, "unknown_task": 1})
    [ready] = joiner.pop_ready()
    assert ready.labels == {"click": 1, "like": 0} and ready.defaulted == []
    assert joiner.waiting == 0


def test_a_closed_window_trains_missing_labels_as_zero_in_event_time_and_in_wall_time():
    clock = Clock()
    joiner = LabelJoiner(TASKS, WINDOW_MS, clock)
    joiner.add_instance(0, event(1, 100))
    joiner.add_instance(0, event(2, 100 + WINDOW_MS - 1))
    assert joiner.pop_ready() == []
    joiner.add_instance(0, event(3, 100 + WINDOW_MS))  # the watermark passes the first one's window
    [first] = joiner.pop_ready()
    assert first.event.ins_id == 1 and first.labels == {"click": 0, "like": 0} and first.defaulted == TASKS
    clock.now = WINDOW_MS / 1000.0  # a quiet stream: the wall clock closes the rest
    assert [r.event.ins_id for r in joiner.pop_ready()] == [2, 3]


def test_a_partition_leaves_in_stream_order_even_when_a_later_instance_is_complete():
    joiner = LabelJoiner(TASKS, WINDOW_MS, Clock())
    joiner.add_instance(0, event(1, 100))
    joiner.add_instance(0, event(2, 101, {"click": 1, "like": 1}))
    joiner.add_instance(1, event(3, 102, {"click": 0, "like": 0}))
    assert [r.event.ins_id for r in joiner.pop_ready()] == [3]  # partition 1 does not wait for 0
    joiner.add_labels(1, {"click": 1, "like": 1})
    assert [r.event.ins_id for r in joiner.pop_ready()] == [1, 2]


def test_a_redelivered_instance_is_queued_once_and_the_first_label_wins():
    joiner = LabelJoiner(TASKS, WINDOW_MS, Clock())
    assert joiner.add_instance(0, event(1, 100, {"click": 1}))
    assert not joiner.add_instance(0, event(1, 100, {"click": 1}))
    joiner.add_labels(1, {"click": 0, "like": 1})  # click: the ingest's label stays
    [ready] = joiner.pop_ready()
    assert ready.labels == {"click": 1, "like": 1}


def test_a_label_before_its_instance_waits_for_it_and_expires_after_the_window():
    clock = Clock()
    joiner = LabelJoiner(TASKS, WINDOW_MS, clock)
    joiner.add_labels(7, {"click": 1, "like": 0})
    joiner.add_labels(8, {"click": 1})
    assert joiner.pop_ready() == []
    joiner.add_instance(0, event(7, 100))
    [ready] = joiner.pop_ready()
    assert ready.labels == {"click": 1, "like": 0} and ready.defaulted == []
    clock.now = 2 * WINDOW_MS / 1000.0
    joiner.pop_ready()
    assert joiner.orphans == {} and joiner.dropped_orphans == 1


def test_the_state_survives_a_checkpoint():
    joiner = LabelJoiner(TASKS, WINDOW_MS, Clock())
    joiner.add_instance(0, event(1, 100, {"click": 1}))
    joiner.add_labels(9, {"like": 1})
    again = LabelJoiner(TASKS, WINDOW_MS, Clock())
    again.load(joiner.state())
    assert again.waiting == 1 and not again.add_instance(0, event(1, 100))
    again.add_labels(1, {"like": 0})
    assert again.pop_ready()[0].labels == {"click": 1, "like": 0}
    assert 9 in again.orphans


def test_stream_ids_compare_as_numbers():
    assert entry_after("10-0", "9-5") and entry_after("9-10", "9-9") and not entry_after("9-9", "9-9")
    assert entry_after("0-1", None)
