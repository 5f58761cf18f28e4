"""The online learning loop: instance stream -> label join -> one optimiser step per batch of
both models (models.training.online, the offline code) -> checkpoint -> publish.

One pass (``run_once``):
1. read instance entries from the owned partitions through the trainer's own consumer group
   (first, once, the entries this consumer left pending: it restarted), and label updates from
   the labels stream (its ``trainer`` group); queue them in the ``LabelJoiner``;
2. move the ready instances to the batch buffer; while it holds ``batch_size`` (or it is not
   empty and the stream has been idle ``flush_s``): sort a batch by (timestamp, InsID), append
   it to the ``OnlineLog`` and step the learner;
3. every ``publish_every`` instances (or ``publish_interval_s``): publish a source + iat
   version with ``export_run`` (staged, renamed into place: whole or absent), then checkpoint;
4. every ``checkpoint_every`` instances (and after each publish): write the checkpoint, THEN
   ack what it covers.

Both are checked after every step, so versions come every ``publish_every`` instances exactly,
and the schedule is counted from the published record the checkpoint keeps.

Delivery is at least once and training exactly once per checkpointed state: an entry is acked
only after a checkpoint that includes its effect, and the checkpoint records, per partition,
the last entry trained (``trained_through``; a partition is trained in stream order, so that
is a prefix). After a SIGKILL the trainer loads its last checkpoint (weights, optimisers, RNG,
InsEmb store, waiting instances) and re-reads its pending entries: those up to
``trained_through`` are acked and skipped, the rest are trained again FROM THE CHECKPOINTED
STATE, so the resumed models equal an uninterrupted run's. What is trained twice is only work
the kill threw away (the steps after the last checkpoint); what can be published twice is a
version whose checkpoint was written but whose publish was interrupted (the same weights come
out again under a later version name after the replay). Label updates are idempotent (first
label wins), so a redelivered one changes nothing.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import torch

from contract.artifacts import CONFIG_FILE, RUN_FILE, WEIGHTS_FILE, latest_version, read_manifest
from models.export import export_run
from models.runtime.featurizer import FeatureSpec, unpack_features
from models.runtime.modules import build_module
from models.training.online import OnlineLearner, OnlineLog, empty_data, load_state, save_state
from models.training.protocol import ProtocolConfig
from services import metrics
from services.config import Settings
from services.trainer.archive import write_segment
from services.trainer.joiner import LabelJoiner, Ready, entry_after
from storage.late_labels import LABELS_GROUP, LABELS_STREAM
from storage.stream import InstanceStream, PartitionedStream

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
ARCHIVE = "archive"  # every trained instance, for offline training and backfill (archive.py)
SOURCE, IAT = "source", "iat"


class TrainerError(Exception):
    """The trainer cannot start: no model to start from, or a checkpoint of other models."""


@dataclass
class Published:
    versions: dict[str, str]
    instances: int
    ordinal: int
    at: float = field(default_factory=time.time)


def load_module(version_dir: Path):
    config = json.loads((version_dir / CONFIG_FILE).read_text())
    module = build_module(config)
    module.load_state_dict(torch.load(version_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return module, config


def starting_versions(model_dir: Path) -> tuple[Path, Path]:
    """The newest source version and the newest iat version reading its lineage (or, for
    artifacts without lineages, exactly its version)."""
    source = latest_version(model_dir, SOURCE)
    if source is None:
        raise TrainerError(f"no source model under {model_dir}/{SOURCE}: run `iat train` and `iat export` first")
    sm = read_manifest(source)
    root = model_dir / IAT
    candidates = sorted((p for p in root.iterdir() if (p / "manifest.json").is_file()), reverse=True) if root.is_dir() else []
    for path in candidates:
        m = read_manifest(path)
        if (sm.lineage and m.source_lineage == sm.lineage) or m.source_version == sm.version:
            return source, path
    raise TrainerError(f"no iat model under {root} reads source {sm.version} (lineage {sm.lineage})")


class Trainer:
    def __init__(self, settings: Settings, client, consumer: str | None = None) -> None:
        self.settings = s = settings
        self.client = client
        self.dir = Path(s.trainer_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = Path(s.model_dir)
        self.consumer = consumer or s.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.stream = PartitionedStream(client, partitions=s.stream_partitions, prefix=s.key_prefix,
                                        group="trainer", max_backlog=s.stream_max_backlog)
        self.owned = [self.stream.partitions[p] for p in s.trainer_owned_partitions]
        self.owned_ids = {p.partition for p in self.owned}
        # Labels are not partitioned: every trainer reads all of them and keeps its partitions'
        # users', so trainers owning different partitions need groups of their own (a shared
        # group would hand each label to one of them only).
        owned_all = sorted(self.owned_ids) == list(range(s.stream_partitions))
        labels_group = LABELS_GROUP if owned_all else f"{LABELS_GROUP}-p{'.'.join(map(str, sorted(self.owned_ids)))}"
        self.labels_stream = InstanceStream(client, prefix=s.key_prefix, name=LABELS_STREAM, group=labels_group)
        self.pcfg = ProtocolConfig(batch_fraction=0.0, history_limit=s.trainer_history_limit,
                                   batch_size=s.trainer_batch_size, lr=s.trainer_lr)
        checkpoint = self.dir / CHECKPOINT
        state = load_state(checkpoint.read_bytes()) if checkpoint.is_file() else None
        if state is None:
            source_dir, iat_dir = starting_versions(self.model_dir)
            self.start = {SOURCE: source_dir.name, IAT: iat_dir.name}
        else:
            self.start = state["start"]
            source_dir, iat_dir = self.model_dir / SOURCE / self.start[SOURCE], self.model_dir / IAT / self.start[IAT]
        self.source_module, self.source_config = load_module(source_dir)
        self.iat_module, self.iat_config = load_module(iat_dir)
        sm, im = read_manifest(source_dir), read_manifest(iat_dir)
        self.spec = FeatureSpec.from_json(sm.schema_)
        self.tasks = list(sm.tasks)
        if list(im.tasks) != self.tasks:
            raise TrainerError(f"tasks: source {self.tasks} and iat {list(im.tasks)} differ")
        self.lineage = sm.lineage
        self.min_ordinal = im.source_min_ordinal if im.source_min_ordinal is not None else (sm.ordinal or 0)
        like = empty_data(self.spec, self.tasks)
        self.learner = OnlineLearner(self.source_module.source, self.iat_module.model, like, self.pcfg,
                                     seed=s.trainer_seed, window=s.trainer_window)
        self.log = OnlineLog(like)
        self.joiner = LabelJoiner(self.tasks, round(s.label_window_s * 1000))
        self.buffer: list[Ready] = []
        self.trained_through: dict[int, str] = {}
        self.unacked: dict[int, list[str]] = {}      # partition -> trained entry ids not acked yet
        self.unacked_labels: list[str] = []
        self.published: list[Published] = []
        self.archived = 0  # rows of the log written to the archive
        self.last_ordinal = 0
        self.last_version_time: datetime | None = None
        self.since_checkpoint = 0
        self.last_publish_at = time.monotonic()
        self.last_read_at = time.monotonic()
        self._own_pending_done = False
        self._groups_ready = False
        if state is not None:
            self._restore(state)
            log.info("trainer: resumed from %s at %d instances (%d waiting)", checkpoint,
                     self.learner.instances, self.joiner.waiting)
        else:
            log.info("trainer: starting from source %s and iat %s", self.start[SOURCE], self.start[IAT])
        self._snapshot()

    # ------------------------------------------------------------------ reading
    def _ensure_groups(self) -> None:
        if not self._groups_ready:
            for p in self.owned:
                p.ensure_group()
            self.labels_stream.ensure_group()
            self._groups_ready = True

    def _take_instances(self, partition: int, events) -> int:
        n = 0
        # a restored checkpoint's ready-but-untrained instances are redelivered as pending too
        buffered = {r.event.entry_id for r in self.buffer if r.partition == partition} if self.buffer else set()
        for e in events:
            if e.entry_id in buffered:
                continue
            if not entry_after(e.entry_id, self.trained_through.get(partition)):
                self.unacked.setdefault(partition, []).append(e.entry_id)  # trained before a restart
                metrics.TRAINER_SKIPPED.labels("trained_already").inc()
                continue
            if e.features is None:
                self.unacked.setdefault(partition, []).append(e.entry_id)
                metrics.TRAINER_SKIPPED.labels("no_features").inc()
                continue
            self.joiner.add_instance(partition, e)
            n += 1
        return n

    def _read(self, block: bool) -> int:
        self._ensure_groups()
        count = self.settings.trainer_batch_size * 4
        n = 0
        if not self._own_pending_done:
            # pending entries stay pending until the next checkpoint: page through them by id
            for p in self.owned:
                after = "0"
                while events := p.read_own_pending(self.consumer, count, after=after):
                    n += self._take_instances(p.partition, events)
                    after = events[-1].entry_id
            after = "0"
            while labels := self.labels_stream.read_own_pending(self.consumer, count, after=after):
                self._take_labels(labels)
                after = labels[-1].entry_id
            self._own_pending_done = True
        for i, p in enumerate(self.owned):
            wait = 200 if block and i == len(self.owned) - 1 and n == 0 else None
            n += self._take_instances(p.partition, p.read(self.consumer, count, wait))
        self._take_labels(self.labels_stream.read(self.consumer, count, None))
        if n:
            self.last_read_at = time.monotonic()
        return n

    def _take_labels(self, events) -> None:
        for e in events:
            if self.stream.partition_of(e.user_id) in self.owned_ids:
                self.joiner.add_labels(e.ins_id, e.labels)
            self.unacked_labels.append(e.entry_id)

    # ------------------------------------------------------------------ training
    def _step(self, items: list[Ready]) -> None:
        items = sorted(items, key=lambda r: (r.event.timestamp_ms, r.event.ins_id))
        spec = self.spec
        feats = [unpack_features(spec, r.event.features) for r in items]
        rows = self.log.append(
            [r.event.user_id for r in items], [r.event.ins_id for r in items],
            [r.event.timestamp_ms for r in items], [r.event.item_hash for r in items],
            np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats]), np.stack([f[2] for f in feats]),
            np.array([[r.labels[t] for t in self.tasks] for r in items], dtype=np.float32))
        t0 = time.perf_counter()
        self.learner.step(self.log.view(), rows)
        metrics.TRAINER_STEP_SECONDS.observe(time.perf_counter() - t0)
        for r in items:
            for task in r.defaulted:
                metrics.TRAINER_DEFAULTED_LABELS.labels(task).inc()
            metrics.TRAINER_INSTANCES.labels(str(r.partition)).inc()
            self.unacked.setdefault(r.partition, []).append(r.event.entry_id)
            if entry_after(r.event.entry_id, self.trained_through.get(r.partition)):
                self.trained_through[r.partition] = r.event.entry_id
        self.since_checkpoint += len(items)
        for model, tasks in self.learner.progressive.metrics().items():
            for task, m in tasks.items():
                if np.isfinite(m["auc"]):
                    metrics.PROGRESSIVE_AUC.labels(model, task).set(m["auc"])
                metrics.PROGRESSIVE_LOGLOSS.labels(model, task).set(m["logloss"])

    def _next_batch(self) -> list[Ready] | None:
        """A full batch from the buffer, or a partial one after ``flush_s`` without new entries."""
        size = self.settings.trainer_batch_size
        if len(self.buffer) >= size:
            batch, self.buffer = self.buffer[:size], self.buffer[size:]
            return batch
        flush = self.settings.trainer_flush_s
        if self.buffer and flush > 0 and time.monotonic() - self.last_read_at >= flush:
            batch, self.buffer = self.buffer, []
            return batch
        return None

    def train_ready(self) -> int:
        """Step batch by batch, checkpointing and publishing when due after each step (so a
        version holds exactly ``publish_every`` more instances than the last one)."""
        self.buffer.extend(self.joiner.pop_ready())
        metrics.TRAINER_WAITING.set(self.joiner.waiting)
        done = 0
        while (batch := self._next_batch()) is not None:
            self._step(batch)
            done += len(batch)
            self._publish_and_checkpoint_when_due()
            self._snapshot()
        return done

    def _publish_and_checkpoint_when_due(self) -> None:
        # publish first: the checkpoint then records it, so a resumed trainer keeps the
        # schedule (a kill in between publishes those weights again after the replay)
        publish, checkpoint = self._due()
        if publish:
            self.publish()
        if checkpoint:
            self.checkpoint()

    # ------------------------------------------------------------------ checkpoint and publish
    def _state(self) -> dict:
        return {"start": self.start, "learner": self.learner.state(), "log": self.log.state(),
                "joiner": self.joiner.state(), "buffer": self.buffer, "trained_through": dict(self.trained_through),
                "last_ordinal": self.last_ordinal, "last_version_time": self.last_version_time,
                "published": self.published, "archived": self.archived}

    def _restore(self, state: dict) -> None:
        self.learner.load(state["learner"])
        self.log.load(state["log"])
        self.joiner.load(state["joiner"])
        self.buffer = list(state["buffer"])
        self.trained_through = dict(state["trained_through"])
        self.last_ordinal = state["last_ordinal"]
        self.last_version_time = state["last_version_time"]
        self.published = list(state["published"])
        self.archived = state["archived"]
        self.source_module.eval()
        self.iat_module.eval()

    def _archive(self) -> None:
        """The rows trained since the last checkpoint, as one archive segment (archive.py)."""
        first, end = self.archived, self.log.n
        cols = self.log.cols
        write_segment(self.dir / ARCHIVE, first, {
            "user_id": np.array([self.log.user_ids[u] for u in cols["user_index"][first:end]], dtype=str),
            **{k: cols[k][first:end] for k in ("ins_id", "ts_ms", "item_hash", "cat", "multi", "num", "labels")},
        }, self.tasks)
        self.archived = end

    def checkpoint(self) -> Path:
        """Archive what was trained since the last one, write the checkpoint atomically (temp
        file, fsync, rename), then ack what it covers."""
        self._archive()
        path = self.dir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(save_state(self._state()))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        metrics.TRAINER_CHECKPOINTS.inc()
        for p in self.owned:
            ids = self.unacked.pop(p.partition, [])
            if ids:
                p.ack(ids)
        if self.unacked_labels:
            self.labels_stream.ack(self.unacked_labels)
            self.unacked_labels = []
            self.labels_stream.trim_acknowledged()
        self.since_checkpoint = 0
        return path

    def publish(self) -> Published:
        """A source + iat version from the current weights (``export_run``: staged, renamed)."""
        now = datetime.now(timezone.utc).replace(microsecond=0)
        if self.last_version_time is not None and now <= self.last_version_time:
            now = self.last_version_time + timedelta(seconds=1)  # version names must increase
        ordinal = max(int(now.timestamp()), self.last_ordinal + 1)
        run = self.dir / "staging"
        shutil.rmtree(run, ignore_errors=True)
        for name, module, config in ((SOURCE, self.source_module, self.source_config),
                                     (IAT, self.iat_module, self.iat_config)):
            (run / name).mkdir(parents=True)
            torch.save(module.state_dict(), run / name / WEIGHTS_FILE)
            (run / name / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        progressive = self.learner.progressive.metrics()
        first = self.tasks[0]
        (run / RUN_FILE).write_text(json.dumps({
            "created": now.isoformat(), "dataset": "instance stream (online)", "tasks": self.tasks,
            "feature_spec": self.spec.to_json(), "trained_instances": self.learner.instances,
            "metrics": {m: {"best_val_auc": progressive.get(m, {}).get(first, {}).get("auc")} for m in (SOURCE, IAT)},
        }, default=float))
        # export_run builds fresh modules (random init): the training RNG must not see them, or
        # every step after a publish would draw other dropout masks than an unpublished run
        with torch.random.fork_rng(devices=[]):
            out = export_run(run, self.model_dir, aoti=False, progress=log.debug, names=(SOURCE, IAT), now=now,
                             ordinal=ordinal, lineage=self.lineage, source_min_ordinal=self.min_ordinal)
        self.source_module.eval()
        self.iat_module.eval()
        self.last_version_time, self.last_ordinal = now, ordinal
        published = Published({k: v.name for k, v in out.items()}, self.learner.instances, ordinal)
        self.published.append(published)
        self.last_publish_at = time.monotonic()
        metrics.TRAINER_PUBLISHED.inc()
        log.info("trainer: published %s after %d instances", published.versions, published.instances)
        return published

    @property
    def since_publish(self) -> int:
        """Instances trained since the last published version (from the record, which the
        checkpoint keeps: a resumed trainer publishes at the same counts)."""
        return self.learner.instances - (self.published[-1].instances if self.published else 0)

    def _due(self) -> tuple[bool, bool]:
        s = self.settings
        publish = self.since_publish >= s.trainer_publish_every or (
            self.since_publish > 0 and s.trainer_publish_interval_s > 0
            and time.monotonic() - self.last_publish_at >= s.trainer_publish_interval_s)
        every = s.trainer_checkpoint_every or s.trainer_publish_every
        return publish, publish or self.since_checkpoint >= every

    def run_once(self, block: bool = True) -> int:
        """One pass (module docstring); returns the instances trained."""
        self._read(block)
        done = self.train_ready()
        self._publish_and_checkpoint_when_due()  # the interval may be due with nothing new to step
        self._snapshot()
        return done

    def after_error(self, exc: Exception) -> None:
        self._own_pending_done = False  # re-read this consumer's pending entries
        self._groups_ready = False

    def _snapshot(self) -> None:
        """What ``stats`` answers, replaced whole by the loop (one assignment): the endpoint
        never waits for a step or a publish."""
        self._stats = {
            "instances": self.learner.instances, "steps": self.learner.steps,
            "waiting": self.joiner.waiting, "buffered": len(self.buffer),
            "trained_through": dict(self.trained_through), "partitions": sorted(self.owned_ids),
            "progressive": self.learner.progressive.metrics(),
            "published": [dict(vars(p)) for p in self.published[-20:]],
            "start": dict(self.start),
        }

    def stats(self) -> dict:
        return self._stats
