"""Labels that arrive late: joined to stored records by a server-side script, within a window.

An exposure is ingested when it is served, often without labels; its labels (click, long view,
like...) arrive later as updates ``(user_id, ins_id, {task: 0|1}, arrival_ms)``. One script call
per user (storage/update_labels.lua, the user's hash tag: one shard) sets, per task, the known
and label bits and when the label arrived (ms after the instance's timestamp), atomically:

- the same update twice stores once ("duplicate": the first arrival time stays), so at-least-once
  delivery and client retries are safe;
- a different label for a task that has one is refused ("conflict"): the first one wins;
- a label arriving more than the window after its instance is refused ("window_closed"), one
  arriving before its instance ("early") too; an InsID with no stored record is "unknown".

Reads then show a label only as of when it arrived (storage.records: a label that arrived at or
after T is unknown at T). Every stored label, and every duplicate (a retry after a crash between
the script and the publish must not lose it), is published on the labels stream for the trainer,
which therefore joins by (InsID, task) idempotently. The record keeps its TTL.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.instance_store import InstanceStore, _member
from storage.records import (
    ARRIVAL_MAX_MS,
    InvalidRecord,
    validate_ins_id,
    validate_timestamp,
    validate_user_id,
)
from storage.stream import InstanceEvent, InstanceStream

UPDATE_LABELS_LUA = Path(__file__).with_name("update_labels.lua").read_text()

STORED = "stored"
DUPLICATE = "duplicate"
CONFLICT = "conflict"
UNKNOWN = "unknown"
WINDOW_CLOSED = "window_closed"
EARLY = "early"
INCOMPATIBLE = "incompatible"
OUTCOMES = (STORED, DUPLICATE, CONFLICT, UNKNOWN, WINDOW_CLOSED, EARLY, INCOMPATIBLE)
LABELS_STREAM = "labels"  # {prefix}:stream:{labels}
LABELS_GROUP = "trainer"


@dataclass(frozen=True)
class LabelUpdate:
    user_id: str
    ins_id: int
    labels: dict[str, int]
    arrival_ms: int


@dataclass
class LabelResult:
    """What happened to one update: per task an outcome (OUTCOMES)."""

    ins_id: int
    timestamp_ms: int  # the instance's, from its record; 0 when unknown
    tasks: dict[str, str] = field(default_factory=dict)


def check_window_ms(window_ms: object) -> int:
    if isinstance(window_ms, bool) or not isinstance(window_ms, (int, np.integer)) or not 0 <= window_ms <= ARRIVAL_MAX_MS:
        raise ValueError(f"label window: must be an int of ms in [0, {ARRIVAL_MAX_MS}] (49.7 days), got {window_ms!r}")
    return int(window_ms)


class LateLabels:
    """Joins label updates to one store's records and publishes them on the labels stream."""

    def __init__(self, store: InstanceStore, window_ms: int, stream: InstanceStream | None = None) -> None:
        self.store = store
        self.window_ms = check_window_ms(window_ms)
        self.stream = stream
        self._task_index = {task: i for i, task in enumerate(store.layout.tasks)}

    def validate(self, updates: Sequence[LabelUpdate]) -> None:
        """Every update checked before anything is written; InvalidRecord names the field and item."""
        tasks = self.store.layout.tasks
        for i, update in enumerate(updates):
            if not isinstance(update, LabelUpdate):
                raise InvalidRecord("update", f"expected LabelUpdate, got {type(update).__name__}", i)
            validate_user_id(update.user_id, i)
            validate_ins_id(update.ins_id, i)
            validate_timestamp(update.arrival_ms, i, name="arrival_ms")
            if not isinstance(update.labels, dict) or not update.labels:
                raise InvalidRecord("labels", "must be a non-empty dict task -> 0/1", i)
            for task, value in update.labels.items():
                if task not in self._task_index:
                    raise InvalidRecord(f"labels[{task}]", f"unknown task; this store's tasks are {list(tasks)}", i)
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (0, 1):
                    raise InvalidRecord(f"labels[{task}]", f"must be 0 or 1, got {value!r}", i)

    def apply(self, updates: Sequence[LabelUpdate]) -> list[LabelResult]:
        """Join the updates (one script call per user), publish what was stored; results in order."""
        self.validate(updates)
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, update in enumerate(updates):
            by_user[update.user_id].append(i)
        calls, plan = [], []
        for user_id, indices in by_user.items():
            keys: dict[str, int] = {}
            args: list = [self.window_ms]
            order = []
            for i in indices:
                update = updates[i]
                key = self.store.record_key_prefix(user_id) + _member(int(update.ins_id))
                k = keys.setdefault(key, len(keys) + 1)
                for task, value in update.labels.items():
                    args += [k, self._task_index[task], int(value), int(update.arrival_ms)]
                    order.append((i, task))
            calls.append((len(keys), *keys, *args))
            plan.append(order)
        replies = self.store._evalsha_many(UPDATE_LABELS_LUA, calls)
        self.store._raise_first_error(replies)
        results = [LabelResult(int(u.ins_id), 0) for u in updates]
        for order, reply in zip(plan, replies):
            for (i, task), status, ts in zip(order, reply[::2], reply[1::2]):
                results[i].tasks[task] = status.decode() if isinstance(status, bytes) else str(status)
                results[i].timestamp_ms = max(results[i].timestamp_ms, int(ts))
        if self.stream is not None:
            self._publish(updates, results)
        return results

    def _publish(self, updates: Sequence[LabelUpdate], results: list[LabelResult]) -> None:
        events = []
        for update, result in zip(updates, results):
            joined = {t: update.labels[t] for t, s in result.tasks.items() if s in (STORED, DUPLICATE)}
            if joined:
                events.append(InstanceEvent(user_id=update.user_id, ins_id=int(update.ins_id),
                                            timestamp_ms=result.timestamp_ms, labels=joined))
        if events:
            self.stream.publish(events)
