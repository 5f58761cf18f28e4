"""Which read instances are ready to train on: labels joined, in stream order per partition.

An instance is read from its partition of the instance stream, often before its labels exist
(an exposure is ingested when it is served). Its labels come with the entry (ingested
labelled) or later from the labels stream (storage/late_labels.py: every label the store
accepted, published after the store's script; a retry may publish one twice). An instance is
READY when every task has a label, or when its label window has closed:

- in event time: the newest timestamp read from its partition is ``window_ms`` past its own
  (labels arriving later than that are refused by the store anyway);
- or in wall-clock time: it has waited ``window_ms`` since it was read (a quiet stream still
  closes its windows). After a restart the wall-clock wait starts again.

A closed window's missing labels are trained on as the policy says: **0** (an exposure without
a click within the window is a negative), counted per task in
``iat_trainer_defaulted_labels_total``.

Instances leave a partition's queue in stream order only (the head first), so what a trainer
has trained of a partition is always a prefix of it: one entry id, ``trained_through``, says
what a redelivered entry is (trained already: acked and skipped) after a restart.

A label for an instance not read yet waits as an orphan (the trainer lags the labels stream);
orphans older than the window are dropped (their instance was trained before the label came).
The first label of a task wins, as in the store.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from storage.stream import InstanceEvent


@dataclass
class Waiting:
    event: InstanceEvent
    partition: int
    read_at: float                     # monotonic seconds
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Ready:
    event: InstanceEvent
    partition: int
    labels: dict[str, int]             # every task
    defaulted: list[str]               # tasks set by the policy (window closed without a label)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_after(entry_id: str, bound: str | None) -> bool:
    """True when stream id ``entry_id`` comes after ``bound`` (None: nothing before)."""
    return bound is None or _id_key(entry_id) > _id_key(bound)


class LabelJoiner:
    def __init__(self, tasks: list[str], window_ms: int, clock=time.monotonic) -> None:
        self.tasks = list(tasks)
        self.window_ms = int(window_ms)
        self.clock = clock
        self.queues: dict[int, deque[Waiting]] = {}
        self.by_ins: dict[int, Waiting] = {}
        self.orphans: dict[int, tuple[dict[str, int], float]] = {}
        self.watermark_ms: dict[int, int] = {}
        self.dropped_orphans = 0

    @property
    def waiting(self) -> int:
        return len(self.by_ins)

    def add_instance(self, partition: int, event: InstanceEvent) -> bool:
        """Queue a read instance; False for an InsID already waiting (a redelivery)."""
        if event.ins_id in self.by_ins:
            return False
        w = Waiting(event, partition, self.clock(), {t: int(v) for t, v in event.labels.items() if t in self.tasks})
        orphan = self.orphans.pop(event.ins_id, None)
        if orphan is not None:
            for t, v in orphan[0].items():
                w.labels.setdefault(t, v)
        self.queues.setdefault(partition, deque()).append(w)
        self.by_ins[event.ins_id] = w
        self.watermark_ms[partition] = max(self.watermark_ms.get(partition, event.timestamp_ms), event.timestamp_ms)
        return True

    def add_labels(self, ins_id: int, labels: dict[str, int]) -> None:
        labels = {t: int(v) for t, v in labels.items() if t in self.tasks}
        w = self.by_ins.get(ins_id)
        if w is not None:
            for t, v in labels.items():
                w.labels.setdefault(t, v)
            return
        known, since = self.orphans.get(ins_id, ({}, self.clock()))
        for t, v in labels.items():
            known.setdefault(t, v)
        self.orphans[ins_id] = (known, since)

    def _closed(self, w: Waiting, now: float) -> bool:
        event_time = self.watermark_ms.get(w.partition, 0) - w.event.timestamp_ms >= self.window_ms
        return event_time or (now - w.read_at) * 1000.0 >= self.window_ms

    def pop_ready(self) -> list[Ready]:
        """The instances ready to train on, each partition's in stream order (module docstring)."""
        now = self.clock()
        out: list[Ready] = []
        for partition, queue in self.queues.items():
            while queue:
                w = queue[0]
                complete = all(t in w.labels for t in self.tasks)
                if not complete and not self._closed(w, now):
                    break
                queue.popleft()
                del self.by_ins[w.event.ins_id]
                missing = [t for t in self.tasks if t not in w.labels]
                out.append(Ready(w.event, partition, {t: w.labels.get(t, 0) for t in self.tasks}, missing))
        stale = [i for i, (_, since) in self.orphans.items() if (now - since) * 1000.0 >= self.window_ms]
        for ins_id in stale:
            del self.orphans[ins_id]
        self.dropped_orphans += len(stale)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"queues": {p: [(w.event, w.labels) for w in q] for p, q in self.queues.items()},
                "orphans": {i: labels for i, (labels, _) in self.orphans.items()},
                "watermark_ms": dict(self.watermark_ms)}

    def load(self, state: dict) -> None:
        now = self.clock()
        self.queues, self.by_ins = {}, {}
        for p, items in state["queues"].items():
            for event, labels in items:
                w = Waiting(event, p, now, dict(labels))
                self.queues.setdefault(p, deque()).append(w)
                self.by_ins[event.ins_id] = w
        self.orphans = {i: (dict(labels), now) for i, labels in state["orphans"].items()}
        self.watermark_ms = dict(state["watermark_ms"])
