"""Online learning: the time-ordered protocol's streaming step, driven one batch at a time, for
the source AND the downstream model, with predict-then-train (progressive) validation.

What a batch does (``OnlineLearner.step``), the same offline (``replay``) and in the trainer
service (services/trainer), so both produce the same weights from the same instances:

1. the source model: ``SourcePass.step`` of ``models.training.protocol`` with a "stream" batch
   (IAT Eq. 7-8: each instance's history fetched from the learner's InsEmb store, stop-gradient;
   the batch's InsEmbs embedded by the current weights and written BEFORE the step); its logits
   before the step are its progressive predictions;
2. the downstream model: predict the batch (eval mode, before training on it: the progressive
   prediction), then one optimiser step; its IAT sequence is the InsEmbs the source pass
   stored for the same user's strictly earlier instances (``iat_batch``), exactly the offline
   protocol's downstream input.

Rows are rows of a ``PreparedData``: offline the dataset itself, online an ``OnlineLog`` of the
instances trained so far (``OnlineLog.view``) whose history index equals the dataset's for the
same instances in the same order (both sorted by time, ties by InsID; history is the same
user's strictly earlier instances).

The learner's store of InsEmbs is its own (``InMemoryHistoryProvider``, the newest
``history_limit`` per user): the InsEmbs the models train on are the protocol's (computed by
the weights just before the step that trains on them); the serving store holds the InsEmbs the
source SERVICE computed at ingest with the version published at the time, as the offline
protocol embeds instances after the training period with the exported model.

Across processes (``distributed=True``, a ``torch.distributed`` process group initialised by
the caller): each process steps its own batch (its own instances, its own InsEmb store) and
the training forwards of both models go through ``DistributedDataParallel`` wrappers of the
loss modules (``StreamLoss``, ``DownstreamLoss``), whose backward all-reduces (averages) the
gradients; every process then takes the same optimiser step, so the weights stay equal (DDP
broadcasts process 0's at construction). ``step(..., scale=n * world / N)`` (n this process's
rows, N all processes') makes the averaged gradient the mean over all N instances, as one
learner would take on their union; a process with no rows still steps (zero loss): every
process must take part in every all-reduce.
"""
from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.runtime.featurizer import FeatureSpec
from models.nn.downstream import IATDownstream
from models.nn.source import UserOrderSource
from models.training.downstream import iat_batch
from models.training.loop import bce, set_seed
from models.training.metrics import auc, logloss
from models.training.protocol import PassBatch, ProtocolConfig, SourcePass, time_order, zero_loss
from models.training.streaming import InMemoryHistoryProvider

MODELS = ("source", "iat")


class ProgressiveValidation:
    """Predict-then-train metrics over a sliding window of the last ``window`` instances, per
    model and task: AUC (NaN while the window holds one class only) and LogLoss."""

    def __init__(self, tasks: list[str], window: int = 2048) -> None:
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.tasks, self.window = list(tasks), window
        self._labels: dict[str, deque] = {m: deque(maxlen=window) for m in MODELS}
        self._probs: dict[str, deque] = {m: deque(maxlen=window) for m in MODELS}
        self.seen = 0

    def add(self, model: str, labels: np.ndarray, probs: np.ndarray) -> None:
        self._labels[model].extend(np.asarray(labels, dtype=np.float32))
        self._probs[model].extend(np.asarray(probs, dtype=np.float32))
        if model == MODELS[-1]:
            self.seen += len(labels)

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """{model: {task: {"auc", "logloss", "n"}}} over the window."""
        out: dict = {}
        for model in MODELS:
            if not self._labels[model]:
                continue
            y, p = np.stack(self._labels[model]), np.stack(self._probs[model])
            out[model] = {task: {"auc": auc(y[:, t], p[:, t]), "logloss": logloss(y[:, t], p[:, t]), "n": len(y)}
                          for t, task in enumerate(self.tasks)}
        return out

    def state(self) -> dict:
        return {"labels": {m: list(q) for m, q in self._labels.items()},
                "probs": {m: list(q) for m, q in self._probs.items()}, "seen": self.seen}

    def load(self, state: dict) -> None:
        for m in MODELS:
            self._labels[m] = deque(state["labels"][m], maxlen=self.window)
            self._probs[m] = deque(state["probs"][m], maxlen=self.window)
        self.seen = state["seen"]


class OnlineLog:
    """The instances a learner has trained on, appended in time order, as a ``PreparedData``.

    ``like`` gives the schema (fields, buckets, tasks). Columns grow by doubling; ``view()`` is
    a ``PreparedData`` over the rows so far (history caches rebuilt per view: the history index
    of a prefix is the full log's restricted to it, since history looks strictly back)."""

    COLUMNS = ("user_index", "item_hash", "ts_ms", "ins_id", "cat", "multi", "num", "labels")

    def __init__(self, like: PreparedData, capacity: int = 1024) -> None:
        self.like = like
        self.n = 0
        self.user_ids: list[str] = []
        self._user_index: dict[str, int] = {}
        f_cat, (f_multi, m), f_num, t = like.cat.shape[1], like.multi.shape[1:], like.num.shape[1], len(like.tasks)
        self.cols = {
            "user_index": np.zeros(capacity, np.int64), "item_hash": np.zeros(capacity, np.int64),
            "ts_ms": np.zeros(capacity, np.int64), "ins_id": np.zeros(capacity, np.uint64),
            "cat": np.zeros((capacity, f_cat), np.int64), "multi": np.full((capacity, f_multi, m), -1, np.int64),
            "num": np.zeros((capacity, f_num), np.float32), "labels": np.zeros((capacity, t), np.float32),
        }

    def _grow(self, need: int) -> None:
        cap = len(self.cols["ts_ms"])
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for k, a in self.cols.items():
            b = np.zeros((new, *a.shape[1:]), a.dtype) if k != "multi" else np.full((new, *a.shape[1:]), -1, a.dtype)
            b[:self.n] = a[:self.n]
            self.cols[k] = b

    def append(self, user_ids, ins_ids, ts_ms, item_hash, cat, multi, num, labels) -> np.ndarray:
        """Append instances; their row indices. A row's history is the same user's rows with an
        earlier timestamp whenever they were appended (a time-ordered replay appends in time
        order, so each row is appended after its whole history, as offline)."""
        k = len(ts_ms)
        ts_ms = np.asarray(ts_ms, np.int64)
        self._grow(self.n + k)
        index = []
        for u in user_ids:
            u = str(u)
            if u not in self._user_index:
                self._user_index[u] = len(self.user_ids)
                self.user_ids.append(u)
            index.append(self._user_index[u])
        rows = np.arange(self.n, self.n + k)
        for name, value in (("user_index", index), ("item_hash", item_hash), ("ts_ms", ts_ms), ("ins_id", ins_ids),
                            ("cat", cat), ("multi", multi), ("num", num), ("labels", labels)):
            self.cols[name][rows] = np.asarray(value, dtype=self.cols[name].dtype).reshape(
                (k, *self.cols[name].shape[1:]))
        self.n += k
        return rows

    def append_rows(self, data: PreparedData, rows: np.ndarray) -> np.ndarray:
        """Append ``data``'s ``rows`` (time order): what the trainer does with stream entries."""
        return self.append([str(u) for u in data.user_ids[data.user_index[rows]]], data.ins_id[rows],
                           data.ts_ms[rows], data.item_hash[rows], data.cat[rows], data.multi[rows],
                           data.num[rows], data.labels[rows])

    def view(self) -> PreparedData:
        n, c, like = self.n, self.cols, self.like
        return PreparedData(
            name=like.name, tasks=list(like.tasks), user_ids=np.array(self.user_ids, dtype=object),
            user_index=c["user_index"][:n], item_ids=np.array([""] * n, dtype=object), item_hash=c["item_hash"][:n],
            ts_ms=c["ts_ms"][:n], ins_id=c["ins_id"][:n], cat=c["cat"][:n], multi=c["multi"][:n], num=c["num"][:n],
            labels=c["labels"][:n], split=np.zeros(n, np.int8), cat_fields=list(like.cat_fields),
            multi_fields=list(like.multi_fields), num_fields=list(like.num_fields), field_groups=like.field_groups,
            n_buckets=like.n_buckets, item_field=like.item_field, user_field=like.user_field,
            num_stats=like.num_stats, label_delay_ms=like.label_delay_ms)

    def state(self) -> dict:
        return {"n": self.n, "user_ids": list(self.user_ids), "cols": {k: a[:self.n].copy() for k, a in self.cols.items()}}

    def load(self, state: dict) -> None:
        self.n = 0
        self._grow(state["n"])
        for k, a in state["cols"].items():
            self.cols[k][:state["n"]] = a
        self.n = state["n"]
        self.user_ids = list(state["user_ids"])
        self._user_index = {u: i for i, u in enumerate(self.user_ids)}


def empty_like(data: PreparedData) -> PreparedData:
    """A zero-row ``PreparedData`` with ``data``'s schema (what an ``OnlineLog`` needs)."""
    return OnlineLog(data, capacity=1).view()


def empty_data(spec: FeatureSpec, tasks: list[str], name: str = "stream") -> PreparedData:
    """A zero-row ``PreparedData`` for a model's feature spec (the manifest's ``schema``): the
    schema of the instances the trainer reads from the stream."""
    f_cat, f_multi, f_num = len(spec.cat_fields), len(spec.multi_fields), len(spec.num_fields)
    return PreparedData(
        name=name, tasks=list(tasks), user_ids=np.array([], dtype=object), user_index=np.zeros(0, np.int64),
        item_ids=np.array([], dtype=object), item_hash=np.zeros(0, np.int64), ts_ms=np.zeros(0, np.int64),
        ins_id=np.zeros(0, np.uint64), cat=np.zeros((0, f_cat), np.int64),
        multi=np.zeros((0, f_multi, spec.max_multi), np.int64), num=np.zeros((0, f_num), np.float32),
        labels=np.zeros((0, len(tasks)), np.float32), split=np.zeros(0, np.int8), cat_fields=list(spec.cat_fields),
        multi_fields=list(spec.multi_fields), num_fields=list(spec.num_fields),
        field_groups={k: list(v) for k, v in spec.field_groups.items()}, n_buckets=spec.n_buckets,
        item_field=spec.item_field, user_field=spec.user_field, num_stats=dict(spec.num_stats))


class DownstreamLoss(torch.nn.Module):
    """The downstream model's training loss of a batch as a module (so that a DDP wrapper's
    forward computes it); ``batch`` None: ``zero_loss``."""

    def __init__(self, model: IATDownstream) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict | None, labels: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
        if batch is None:
            return zero_loss(self.model)
        loss = bce(self.model(batch), labels)
        return loss if scale is None else loss * scale


def distributed_wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under DistributedDataParallel (the process group is the caller's; on CPU no
    device ids). A forward may leave parameters unused (the source model's batch user-order
    parts in a streaming step; the downstream's history parts in a batch without history),
    hence ``find_unused_parameters``: DDP then leaves the gradients of parameters no rank used
    None, as a single process's backward does (and zero-fills those some rank used)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


@dataclass
class StepResult:
    source_loss: float
    iat_loss: float
    source_probs: np.ndarray   # [B, T] before the step
    iat_probs: np.ndarray      # [B, T] before the step


class OnlineLearner:
    """A source model and a downstream model trained together, one time-ordered batch at a
    time (module docstring). ``seed`` seeds torch once, at construction."""

    def __init__(self, source: UserOrderSource, downstream: IATDownstream, like: PreparedData,
                 pcfg: ProtocolConfig, seed: int = 0, window: int = 2048, distributed: bool = False) -> None:
        if not isinstance(source, UserOrderSource):
            raise TypeError("source: the online loop trains a user-order source model (Eq. 7-8)")
        set_seed(seed)
        self.pcfg = pcfg
        provider = InMemoryHistoryProvider(source.cfg.insemb_dim, keep=pcfg.history_limit)
        self.source = SourcePass(source, like, provider, pcfg)
        self.downstream = downstream
        self.opt = torch.optim.Adam(downstream.parameters(), lr=pcfg.lr)
        self.downstream_loss: torch.nn.Module = DownstreamLoss(downstream)
        if distributed:
            self.source.stream_loss = distributed_wrap(self.source.stream_loss)
            self.downstream_loss = distributed_wrap(self.downstream_loss)
        self.progressive = ProgressiveValidation(like.tasks, window)
        self.steps = 0
        self.instances = 0

    @torch.no_grad()
    def _predict(self, data: PreparedData, rows: np.ndarray) -> np.ndarray:
        self.downstream.eval()
        batch = iat_batch(data, rows, self.source.stored, self.downstream.cfg)
        return torch.sigmoid(self.downstream(batch)).numpy()

    def step(self, data: PreparedData, rows: np.ndarray, scale: float | None = None) -> StepResult:
        """Train both models on ``rows`` of ``data`` (a time-ordered batch after every row
        trained so far); progressive metrics are updated with the predictions made before.
        ``scale`` multiplies both mean losses (module docstring); no rows: a zero-loss step."""
        rows = np.asarray(rows, dtype=np.int64)
        self.source.data = data
        labels = data.labels[rows]
        source_loss = self.source.step(PassBatch("stream", rows, scale=scale))
        if len(rows):
            source_probs = torch.sigmoid(self.source.last_logits).numpy()
            iat_probs = self._predict(data, rows)
            self.downstream.train()
            loss = self.downstream_loss(iat_batch(data, rows, self.source.stored, self.downstream.cfg),
                                        torch.from_numpy(labels), scale)
        else:
            source_probs = iat_probs = np.zeros((0, len(data.tasks)), np.float32)
            loss = self.downstream_loss(None, None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.downstream.eval()
        if len(rows):
            self.progressive.add("source", labels, source_probs)
            self.progressive.add("iat", labels, iat_probs)
        self.steps += 1
        self.instances += len(rows)
        return StepResult(source_loss, float(loss.detach()), source_probs, iat_probs)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """Everything ``load`` needs to continue exactly (weights, optimisers, InsEmb store,
        stored InsEmbs, progressive window, RNG)."""
        src = self.source
        provider = src.provider
        return {
            "source": src.model.state_dict(), "source_opt": src.opt.state_dict(),
            "iat": self.downstream.state_dict(), "iat_opt": self.opt.state_dict(),
            "provider": provider.state(),
            "stored": src.stored.copy(), "written": src.written.copy(),
            "losses": list(src.losses), "progressive": self.progressive.state(),
            "steps": self.steps, "instances": self.instances, "torch_rng": torch.get_rng_state(),
        }

    def load(self, state: dict) -> None:
        src = self.source
        src.model.load_state_dict(state["source"])
        src.opt.load_state_dict(state["source_opt"])
        self.downstream.load_state_dict(state["iat"])
        self.opt.load_state_dict(state["iat_opt"])
        src.provider.load(state["provider"])
        src.stored, src.written = state["stored"].copy(), state["written"].copy()
        src.losses = list(state["losses"])
        self.progressive.load(state["progressive"])
        self.steps, self.instances = state["steps"], state["instances"]
        torch.set_rng_state(state["torch_rng"])


def save_state(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_state(raw: bytes) -> dict:
    # our own checkpoint (numpy arrays, dicts): not a weights-only file
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


def replay(learner: OnlineLearner, data: PreparedData, rows: np.ndarray, batch_size: int,
           on_step=None) -> OnlineLearner:
    """The offline reference of the online loop: ``rows`` of ``data`` in time order, in
    consecutive batches of ``batch_size``, each appended to an ``OnlineLog`` and stepped, as
    the trainer service does with stream entries. ``on_step(learner, result)`` after each."""
    rows = time_order(data, rows)
    log = OnlineLog(data)
    for start in range(0, len(rows), batch_size):
        new = log.append_rows(data, rows[start:start + batch_size])
        result = learner.step(log.view(), new)
        if on_step is not None:
            on_step(learner, result)
    return learner
