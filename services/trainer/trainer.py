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

Several trainer processes (DDP: ``IAT_TRAINER_WORLD_SIZE`` > 1, ``IAT_TRAINER_RANK``,
``IAT_TRAINER_DIST_URL``; services/trainer/lockstep.py). Each rank owns a share of the
partitions (by default p % world == rank; a user lives in one partition, so a user's history
and InsEmbs are on one rank), with its own consumer name (``<name>-rank<r>``), label group
(``trainer-rank<r>``: every rank sees every label update and keeps its own users'), joiner,
``OnlineLog``, InsEmb store and checkpoint directory (``<IAT_TRAINER_DIR>/rank-<r>``). The
gradients of both models are all-reduced by ``DistributedDataParallel`` (models.training.online):
the weights are equal on every rank at every step.

Lockstep: every rank takes the same steps. Before each step the ranks exchange their buffered
instance counts and how long their partitions have been quiet (``Lockstep.exchange``); all
compute the same ``plan_step``: a full batch each when every rank has one; else, once every
rank short of a batch has been quiet ``IAT_TRAINER_FLUSH_S``, what each has (a partial batch,
or an EMPTY one for a rank with nothing: a zero loss, it still takes part in the all-reduce).
So a quiet rank holds the others back at most ``flush_s`` after its partitions went quiet, and
never forever. A step's loss on rank r is its batch mean times n_r * world / N (N the step's
instances on all ranks): the averaged gradient is the mean over the N instances, exactly one
trainer's step on their union. A partial or one-sided step is thus a smaller global batch at
the same learning rate (a noisier gradient, not a larger step: nothing is rescaled by Adam's
normalisation either way); while one rank is quiet its users' data simply do not appear in
the global batch. Counts are global: ``publish_every`` and ``checkpoint_every`` count the
instances of all ranks, so every rank checkpoints at the same step; the wall-clock publish
interval is rank 0's clock (it travels in the exchange). Rank 0 alone publishes.

Checkpoints and restarts under DDP: a rank writes ``checkpoint-<steps>.pt``, waits at a barrier
until every rank has written the same step, and only then acks its entries and deletes its
older checkpoints, so every rank always holds the newest step that ALL ranks hold. A failed
pass (a peer gone: a collective fails after ``IAT_TRAINER_DIST_TIMEOUT_S`` at worst, at once
when the peer's socket closes; a store error) ends the process (exit code 75), as its peers'
collectives then fail too: the JOB restarts as a whole (all ranks, as under torchrun or a
Kubernetes job), never one rank alone. At start the ranks agree on the newest checkpoint step
they all hold, each loads its own at that step (a newer one of its own is deleted), and
re-reads its pending entries, which cover everything after that step (nothing was acked past
it). What is trained twice and published twice is as for one trainer, per rank.
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
from services.trainer.lockstep import Lockstep, backend_for, plan_step
from storage.late_labels import LABELS_GROUP, LABELS_STREAM
from storage.stream import InstanceStream, PartitionedStream

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
ARCHIVE = "archive"  # every trained instance, for offline training and backfill (archive.py)
DDP_CHECKPOINT = "checkpoint-{:09d}.pt"   # a rank's, by step count
JOB_RESTART_EXIT = 75                     # a DDP rank's pass failed: the job restarts as a whole
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
        self.world, self.rank = s.trainer_world_size, s.trainer_rank
        # the rendezvous first: which checkpoint to load is agreed by all ranks
        self.lockstep = Lockstep(self.world, self.rank, s.trainer_dist_url, backend_for(torch.device("cpu")),
                                 s.trainer_dist_timeout_s) if self.world > 1 else None
        self.dir = Path(s.trainer_dir) / f"rank-{self.rank}" if self.lockstep else Path(s.trainer_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model_dir = Path(s.model_dir)
        self.consumer = consumer or s.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        labels_group = LABELS_GROUP
        if self.lockstep:
            self.consumer, labels_group = f"{self.consumer}-rank{self.rank}", f"{LABELS_GROUP}-rank{self.rank}"
        self.stream = PartitionedStream(client, partitions=s.stream_partitions, prefix=s.key_prefix,
                                        group="trainer", max_backlog=s.stream_max_backlog)
        self.owned = [self.stream.partitions[p] for p in s.trainer_owned_partitions]
        self.owned_ids = {p.partition for p in self.owned}
        if self.lockstep is None and sorted(self.owned_ids) != list(range(s.stream_partitions)):
            # Labels are not partitioned: every trainer reads all of them and keeps its
            # partitions' users, so trainers owning different partitions need groups of their
            # own (a shared group would hand each label to one of them only).
            labels_group = f"{LABELS_GROUP}-p{'.'.join(map(str, sorted(self.owned_ids)))}"
        self.labels_stream = InstanceStream(client, prefix=s.key_prefix, name=LABELS_STREAM, group=labels_group)
        self.pcfg = ProtocolConfig(batch_fraction=0.0, history_limit=s.trainer_history_limit,
                                   batch_size=s.trainer_batch_size, lr=s.trainer_lr)
        checkpoint = self._checkpoint_to_load()
        state = load_state(checkpoint.read_bytes()) if checkpoint is not None else None
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
                                     seed=s.trainer_seed + self.rank, window=s.trainer_window,
                                     distributed=self.lockstep is not None)
        self.log = OnlineLog(like)
        self.joiner = LabelJoiner(self.tasks, round(s.label_window_s * 1000))
        self.buffer: list[Ready] = []
        self.trained_through: dict[int, str] = {}
        self.unacked: dict[int, list[str]] = {}      # partition -> trained entry ids not acked yet
        self.unacked_labels: list[str] = []
        self.published: list[Published] = []
        self.archived = 0  # rows of the log written to the archive
        self.trained = 0                              # instances trained, all ranks together
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

    def _checkpoint_to_load(self) -> Path | None:
        """One trainer: its checkpoint, if any. DDP: the newest step every rank holds (module
        docstring); this rank's newer ones are deleted."""
        if self.lockstep is None:
            path = self.dir / CHECKPOINT
            return path if path.is_file() else None
        mine = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("checkpoint-*.pt"))
        held = self.lockstep.gather_ints(mine[-2:], 2)
        common = set(held[0]).intersection(*held[1:])
        if not common:
            if any(held):
                raise TrainerError(f"the ranks hold checkpoints of no common step ({held}): restore them, "
                                   f"or clear every rank's directory and the trainer groups to start over")
            return None
        step = max(common)
        for s in mine:
            if s > step:
                (self.dir / DDP_CHECKPOINT.format(s)).unlink()
        return self.dir / DDP_CHECKPOINT.format(step)

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
    def _step(self, items: list[Ready], scale: float | None = None, total: int | None = None) -> None:
        """One step on ``items`` (DDP: this rank's share, possibly none, of ``total`` instances,
        its loss times ``scale``)."""
        items = sorted(items, key=lambda r: (r.event.timestamp_ms, r.event.ins_id))
        spec = self.spec
        if items:
            feats = [unpack_features(spec, r.event.features) for r in items]
            rows = self.log.append(
                [r.event.user_id for r in items], [r.event.ins_id for r in items],
                [r.event.timestamp_ms for r in items], [r.event.item_hash for r in items],
                np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats]), np.stack([f[2] for f in feats]),
                np.array([[r.labels[t] for t in self.tasks] for r in items], dtype=np.float32))
        else:
            rows = np.zeros(0, np.int64)
        t0 = time.perf_counter()
        self.learner.step(self.log.view(), rows, scale)
        metrics.TRAINER_STEP_SECONDS.observe(time.perf_counter() - t0)
        for r in items:
            for task in r.defaulted:
                metrics.TRAINER_DEFAULTED_LABELS.labels(task).inc()
            metrics.TRAINER_INSTANCES.labels(str(r.partition)).inc()
            self.unacked.setdefault(r.partition, []).append(r.event.entry_id)
            if entry_after(r.event.entry_id, self.trained_through.get(r.partition)):
                self.trained_through[r.partition] = r.event.entry_id
        counted = len(items) if total is None else total
        self.trained += counted
        self.since_checkpoint += counted
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
        if self.lockstep is not None:
            return self._train_lockstep()
        done = 0
        while (batch := self._next_batch()) is not None:
            self._step(batch)
            done += len(batch)
            self._publish_and_checkpoint_when_due()
            self._snapshot()
        return done

    def _train_lockstep(self) -> int:
        """DDP: exchange, plan, step, until the plan says no step (module docstring)."""
        size, world = self.settings.trainer_batch_size, self.world
        done = 0
        while True:
            t0 = time.perf_counter()
            ex = self.lockstep.exchange(len(self.buffer), time.monotonic() - self.last_read_at,
                                        self.rank == 0 and self._interval_due())
            metrics.TRAINER_LOCKSTEP_WAIT_SECONDS.observe(time.perf_counter() - t0)
            sizes = plan_step(ex.buffered, ex.idle_s, size, self.settings.trainer_flush_s)
            if sizes is not None:
                mine, total = sizes[self.rank], sum(sizes)
                batch, self.buffer = self.buffer[:mine], self.buffer[mine:]
                self._step(batch, mine * world / total, total)
                metrics.TRAINER_LOCKSTEP_STEPS.labels("full" if mine == size else "partial" if mine else "empty").inc()
                done += mine
            self._publish_and_checkpoint_when_due(ex.publish_due)
            self._snapshot()
            if sizes is None:
                return done

    def _publish_and_checkpoint_when_due(self, interval_due: bool | None = None) -> None:
        # publish first: the checkpoint then records it, so a resumed trainer keeps the
        # schedule (a kill in between publishes those weights again after the replay)
        publish, checkpoint = self._due(interval_due)
        if publish:
            self.publish()
        if checkpoint:
            self.checkpoint()

    # ------------------------------------------------------------------ checkpoint and publish
    def _state(self) -> dict:
        return {"start": self.start, "learner": self.learner.state(), "log": self.log.state(),
                "joiner": self.joiner.state(), "buffer": self.buffer, "trained_through": dict(self.trained_through),
                "last_ordinal": self.last_ordinal, "last_version_time": self.last_version_time,
                "published": self.published, "archived": self.archived, "trained": self.trained}

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
        self.trained = state.get("trained", self.learner.instances)  # older checkpoints: one trainer's
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
        file, fsync, rename), then ack what it covers (DDP: once every rank has written its
        checkpoint of this step; module docstring)."""
        self._archive()
        path = self.dir / (CHECKPOINT if self.lockstep is None else DDP_CHECKPOINT.format(self.learner.steps))
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(save_state(self._state()))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        metrics.TRAINER_CHECKPOINTS.inc()
        if self.lockstep is not None:
            self.lockstep.barrier()
            for old in self.dir.glob("checkpoint-*.pt"):
                if old != path:
                    old.unlink()
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
        """A source + iat version from the current weights (``export_run``: staged, renamed).
        DDP: rank 0 exports; the others only record the schedule."""
        if self.rank != 0:
            published = Published({}, self.trained, 0)
            self.published.append(published)
            self.last_publish_at = time.monotonic()
            return published
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
            "feature_spec": self.spec.to_json(), "trained_instances": self.trained,
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
        published = Published({k: v.name for k, v in out.items()}, self.trained, ordinal)
        self.published.append(published)
        self.last_publish_at = time.monotonic()
        metrics.TRAINER_PUBLISHED.inc()
        log.info("trainer: published %s after %d instances", published.versions, published.instances)
        return published

    @property
    def since_publish(self) -> int:
        """Instances trained (by all ranks) since the last published version (from the record,
        which the checkpoint keeps: a resumed trainer publishes at the same counts)."""
        return self.trained - (self.published[-1].instances if self.published else 0)

    def _interval_due(self) -> bool:
        s = self.settings
        return (self.since_publish > 0 and s.trainer_publish_interval_s > 0
                and time.monotonic() - self.last_publish_at >= s.trainer_publish_interval_s)

    def _due(self, interval_due: bool | None = None) -> tuple[bool, bool]:
        """(publish, checkpoint) now; ``interval_due``: DDP, rank 0's answer for all ranks."""
        s = self.settings
        interval = self._interval_due() if interval_due is None else interval_due and self.since_publish > 0
        publish = self.since_publish >= s.trainer_publish_every or interval
        every = s.trainer_checkpoint_every or s.trainer_publish_every
        return publish, publish or self.since_checkpoint >= every

    def run_once(self, block: bool = True) -> int:
        """One pass (module docstring); returns the instances trained."""
        self._read(block)
        done = self.train_ready()
        if self.lockstep is None:  # DDP: checked at each exchange
            self._publish_and_checkpoint_when_due()  # the interval may be due with nothing new to step
        self._snapshot()
        return done

    def after_error(self, exc: Exception) -> None:
        if self.lockstep is not None:
            # the ranks' collectives are out of step now: the job restarts as a whole (docstring)
            log.critical("trainer: rank %d of %d failed (%s): exiting so that the job restarts", self.rank,
                         self.world, exc)
            logging.shutdown()
            os._exit(JOB_RESTART_EXIT)
        self._own_pending_done = False  # re-read this consumer's pending entries
        self._groups_ready = False

    def _snapshot(self) -> None:
        """What ``stats`` answers, replaced whole by the loop (one assignment): the endpoint
        never waits for a step or a publish."""
        self._stats = {
            "instances": self.learner.instances, "steps": self.learner.steps, "trained": self.trained,
            "rank": self.rank, "world": self.world, "users": len(self.log.user_ids),
            "waiting": self.joiner.waiting, "buffered": len(self.buffer),
            "trained_through": dict(self.trained_through), "partitions": sorted(self.owned_ids),
            "progressive": self.learner.progressive.metrics(),
            "published": [dict(vars(p)) for p in self.published[-20:]],
            "start": dict(self.start),
        }

    def stats(self) -> dict:
        return self._stats
