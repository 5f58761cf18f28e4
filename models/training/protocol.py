"""The paper's training protocol for a source model: one time-ordered pass that stores every
instance's InsEmb BEFORE the model trains on that instance (IAT Sect. 3.4, App. A.2-A.3).

The pass goes over the training instances sorted by timestamp (ties by InsID). The early part
(``batch_fraction`` of them, by time) is trained in batch user-order form (Eq. 6: windows of a
user's instances in time order, the SIT over fresh InsEmbs); the rest streams in time order
(Eq. 7-8: each instance's history FETCHED from the store, stop-gradient, only ``e_current``
written). In both phases a batch is handled as ingest and training would handle it online:

1. (streaming) fetch each instance's history from the provider: only instances stored by
   earlier batches, strictly earlier in time, of the same user;
2. embed the batch with the current weights in eval mode (what the source service computes)
   and WRITE those InsEmbs to the provider;
3. then, and only then, one optimiser step on the batch.

So no stored InsEmb was computed by a model that had already seen its instance's label, nor
any later instance's: the downstream model trains on InsEmbs exactly as serving would read
them from the store. Validation and test instances come after the training period (the split
is by global time), so they are embedded by the final source model, frozen after the pass: the
model that is exported and that the source service runs when those instances are ingested.

What the downstream reads is the InsEmb from BEFORE the SIT (``ProtocolConfig.insemb``
"before_sit", the paper's). The "after_sit" ablation (IAT Tab. 4 "w/ InsEmb stored after SIT")
also records, when each instance is written, the SIT's output at that instance over its user's
stored history (Eq. 8 form, eval mode, before the step: as ingest would compute it) and gives
the downstream those; the SIT itself keeps reading pre-SIT InsEmbs from the provider (its input
space), so the source model trains exactly as in the default pass.

``SourcePass`` is the state (model, optimiser, provider) and ``step(batch)`` one batch of the
pass; the online learning loop drives it one streaming batch at a time, and ``run_pass`` (the
offline experiment, ``iat train``) is a loop over ``plan_pass``. A streaming batch's training
forward is ``SourcePass.stream_loss`` (a ``StreamLoss`` module), which the online loop wraps in
``DistributedDataParallel`` to train across processes (models.training.online).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.nn.base import FeatureShape, ModelConfig
from models.nn.source import TemporalOrderSource, UserOrderSource
from models.training.batches import feature_batch
from models.training.loop import bce, predict, set_seed
from models.training.source import (
    history_predict,
    labelled_batch,
    sequence_batch,
    user_sequences,
)
from models.training.streaming import (
    HistoryProvider,
    InMemoryHistoryProvider,
    streaming_forward,
    streaming_sit,
)


@dataclass
class ProtocolConfig:
    batch_fraction: float = 0.5  # the earliest training instances (by time) trained in batch form
    window: int = 128            # SIT length of batch user-order training (Eq. 6)
    history_limit: int = 127     # streaming: past InsEmbs fetched per instance (Eq. 8: L - 1)
    batch_size: int = 512        # instances per optimiser step, both phases
    lr: float = 2e-3
    insemb: str = "before_sit"   # what the downstream reads: "before_sit" (paper) or "after_sit"
    # Steps over which the learning rate rises linearly to ``lr``. Without it the user-order
    # source's SIT collapses at the experiments' rates (2e-3, 3e-3): within a few Adam steps
    # its LayerNorms squash every InsEmb to one direction and the loss stays at ln 2 for the
    # whole pass (measured on the synthetic positive control, models/RESULTS.md).
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.batch_fraction <= 1.0:
            raise ValueError(f"batch_fraction: must lie in [0, 1], got {self.batch_fraction}")
        if self.insemb not in ("before_sit", "after_sit"):
            raise ValueError(f"insemb: must be 'before_sit' or 'after_sit', got {self.insemb!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        for name in ("window", "history_limit", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class PassBatch:
    """One optimiser step of the pass. ``"batch"``: user-order windows ``seqs`` (each a user's
    instances in time order); ``"stream"``: ``rows`` in time order (possibly none: a process
    of a distributed step with nothing to train, models.training.online). ``scale`` multiplies
    a stream batch's mean loss (its share of a step across processes; None: 1)."""
    kind: str
    rows: np.ndarray
    seqs: list[np.ndarray] = field(default_factory=list)
    scale: float | None = None


def zero_loss(module: torch.nn.Module) -> torch.Tensor:
    """0, as a function of every parameter: the loss of an empty batch, so that the backward
    still gives every parameter a (zero) gradient, as a gradient all-reduce needs."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


class StreamLoss(torch.nn.Module):
    """A streaming batch's loss as a module (Eq. 8 over the fetched history, BCE), so that the
    training forward can go through ``DistributedDataParallel``, whose backward all-reduces the
    gradients of what its forward returned. ``batch`` None: ``zero_loss``. Returns (loss,
    logits)."""

    def __init__(self, model: UserOrderSource) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict | None, hist: torch.Tensor | None, mask: torch.Tensor | None,
                labels: torch.Tensor | None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if batch is None:
            return zero_loss(self.model), torch.zeros(0)
        logits, _ = streaming_forward(self.model, batch, hist, mask)
        loss = bce(logits, labels)
        return (loss if scale is None else loss * scale), logits


def time_order(data: PreparedData, rows: np.ndarray) -> np.ndarray:
    """``rows`` sorted by timestamp, ties by InsID: the order instances are ingested."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[np.lexsort((data.ins_id[rows], data.ts_ms[rows]))]


def plan_pass(data: PreparedData, rows: np.ndarray, cfg: ProtocolConfig, rng: np.random.Generator,
              user_order: np.ndarray | None = None, user_windows: bool = True) -> list[PassBatch]:
    """The batches of one pass over ``rows``: the earliest ``batch_fraction`` by time in batch
    form (user-order windows visited in ``user_order`` of user indices, else shuffled; with
    ``user_windows=False``, for the temporal-order source, shuffled instances), then the rest
    streaming in time order."""
    rows = time_order(data, rows)
    cut = round(len(rows) * cfg.batch_fraction)
    early, late = rows[:cut], rows[cut:]
    out: list[PassBatch] = []
    if user_windows:
        seqs = user_sequences(data, early, cfg.window)
        if user_order is None:
            seqs = [seqs[i] for i in rng.permutation(len(seqs))]
        else:
            rank = np.full(data.n_users, len(user_order), dtype=np.int64)
            rank[user_order] = np.arange(len(user_order))
            seqs = sorted(seqs, key=lambda q: (rank[data.user_index[q[0]]], data.ts_ms[q[0]]))
        group: list[np.ndarray] = []
        count = 0
        for q in seqs:
            group.append(q)
            count += len(q)
            if count >= cfg.batch_size:
                out.append(PassBatch("batch", np.concatenate(group), group))
                group, count = [], 0
        if group:
            out.append(PassBatch("batch", np.concatenate(group), group))
    else:
        shuffled = rng.permutation(early)
        out += [PassBatch("batch", shuffled[i:i + cfg.batch_size])
                for i in range(0, len(shuffled), cfg.batch_size)]
    out += [PassBatch("stream", late[i:i + cfg.batch_size]) for i in range(0, len(late), cfg.batch_size)]
    return out


class SourcePass:
    """A source model being trained by the protocol: its optimiser, the history provider it
    writes to and reads from, and what it stored (``stored[row]``, ``written[row]``; with
    ``cfg.insemb == "after_sit"`` also ``stored_after_sit[row]``, the SIT output at the row).

    ``on_train(state, rows)`` is called after a batch's InsEmbs are written and before the
    model trains on it (a test checks the store at that moment)."""

    def __init__(self, model: TemporalOrderSource, data: PreparedData, provider: HistoryProvider,
                 cfg: ProtocolConfig, on_train: Callable[[SourcePass, np.ndarray], None] | None = None):
        self.model, self.data, self.provider, self.cfg = model, data, provider, cfg
        self.on_train = on_train
        self.user_order = isinstance(model, UserOrderSource)
        self.after_sit = cfg.insemb == "after_sit"
        if self.after_sit and not self.user_order:
            raise ValueError("insemb: 'after_sit' needs a user-order source (only it has a SIT)")
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.stored = np.zeros((data.n, model.cfg.insemb_dim), dtype=np.float32)
        self.written = np.zeros(data.n, dtype=bool)
        self.stored_after_sit = np.zeros_like(self.stored) if self.after_sit else None
        self.losses: list[float] = []
        self.last_logits: torch.Tensor | None = None  # a stream batch's logits, before its step
        # the training forward of a stream batch; the online loop may wrap it (DDP)
        self.stream_loss: torch.nn.Module | None = StreamLoss(model) if self.user_order else None

    def _reserve(self, n: int) -> None:
        """Room for rows < ``n`` (the online loop's data grows: models.training.online)."""
        if n > len(self.stored):
            size = max(n, 2 * len(self.stored))
            stored = np.zeros((size, self.stored.shape[1]), dtype=np.float32)
            stored[:len(self.stored)] = self.stored
            written = np.zeros(size, dtype=bool)
            written[:len(self.written)] = self.written
            self.stored, self.written = stored, written
            if self.stored_after_sit is not None:
                after = np.zeros_like(stored)
                after[:len(self.stored_after_sit)] = self.stored_after_sit
                self.stored_after_sit = after

    def _users(self, rows: np.ndarray) -> list[str]:
        return [str(u) for u in self.data.user_ids[self.data.user_index[rows]]]

    @torch.no_grad()
    def embed(self, rows: np.ndarray) -> np.ndarray:
        """InsEmbs of ``rows`` as the source service computes them (eval mode, current weights)."""
        self.model.eval()
        return self.model.embed(feature_batch(self.data, rows, self.model.cfg.seq_len)).numpy()

    def write(self, rows: np.ndarray) -> None:
        e = self.embed(rows)
        self._reserve(int(rows.max()) + 1 if len(rows) else 0)
        self.provider.write(self.data.ins_id[rows], self._users(rows), self.data.ts_ms[rows], e)
        self.stored[rows] = e
        self.written[rows] = True
        if self.after_sit:
            self.stored_after_sit[rows] = self.sit_outputs(rows)

    @torch.no_grad()
    def sit_outputs(self, rows: np.ndarray) -> np.ndarray:
        """The SIT's output at each of ``rows`` over its user's InsEmbs in the provider strictly
        before it (Eq. 8 form; current weights, eval mode)."""
        self.model.eval()
        hist, mask = self.provider.fetch(self._users(rows), self.data.ts_ms[rows], self.cfg.history_limit)
        z, _ = streaming_sit(self.model, labelled_batch(self.data, rows, self.model.cfg),
                             torch.from_numpy(hist), torch.from_numpy(mask))
        return z.numpy()

    def step(self, batch: PassBatch) -> float:
        """Fetch (streaming), write, then train on ``batch``; returns its loss."""
        data, rows = self.data, batch.rows
        if batch.kind == "stream" and self.user_order and len(rows) == 0:
            return self._step_loss(self.stream_loss(None, None, None, None)[0])
        if batch.kind == "stream" and self.user_order:
            # fetched before this batch is written: instances of one batch never see each other
            hist, mask = self.provider.fetch(self._users(rows), data.ts_ms[rows], self.cfg.history_limit)
        elif batch.kind not in ("batch", "stream"):
            raise ValueError(f"kind: must be 'batch' or 'stream', got {batch.kind!r}")
        self.write(rows)
        if self.on_train is not None:
            self.on_train(self, rows)
        self.model.train()
        if not self.user_order:
            loss = bce(self.model(feature_batch(data, rows, self.model.cfg.seq_len)),
                       torch.from_numpy(data.labels[rows]))
        elif batch.kind == "batch":
            seq_batch, labels, weight = sequence_batch(data, batch.seqs, self.model.cfg)
            loss = bce(self.model.forward_sequence(seq_batch), labels, weight)
        else:
            loss, logits = self.stream_loss(labelled_batch(data, rows, self.model.cfg), torch.from_numpy(hist),
                                            torch.from_numpy(mask), torch.from_numpy(data.labels[rows]), batch.scale)
            self.last_logits = logits.detach()
        return self._step_loss(loss)

    def _step_loss(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.warmup_steps:  # the step count is len(losses), which checkpoints keep
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.lr * min(1.0, (len(self.losses) + 1) / self.cfg.warmup_steps)
        self.opt.step()
        self.model.eval()
        self.losses.append(float(loss.detach()))
        return self.losses[-1]


@dataclass
class ProtocolResult:
    model: TemporalOrderSource
    insembs: np.ndarray   # float32 [N, d]: train rows as stored during the pass, others by the final model
    info: dict


def pass_insembs(source: SourcePass, rows_after: np.ndarray) -> np.ndarray:
    """The (pre-SIT) InsEmbs of the pass: those stored, and for ``rows_after`` (validation /
    test, after the training period) those of the final, frozen source model."""
    e = source.stored.copy()
    if len(rows_after):
        e[rows_after] = source.embed(rows_after)
    return e


@torch.no_grad()
def downstream_insembs(source: SourcePass, rows_after: np.ndarray) -> np.ndarray:
    """What the downstream model reads: ``pass_insembs``; in the "after_sit" ablation the SIT
    outputs recorded during the pass, and for ``rows_after`` those of the final source model
    over each row's user history of ``pass_insembs`` (strictly earlier, newest first)."""
    e = pass_insembs(source, rows_after)
    if not source.after_sit:
        return e
    data, model = source.data, source.model
    z = source.stored_after_sit[:data.n].copy()
    hist_index = data.history_index(source.cfg.history_limit)
    model.eval()
    for i in range(0, len(rows_after), 1024):
        chunk = rows_after[i:i + 1024]
        hist = hist_index[chunk]
        mask = hist >= 0
        hist_e = e[np.clip(hist, 0, None)] * mask[..., None]
        out, _ = streaming_sit(model, labelled_batch(data, chunk, model.cfg),
                               torch.from_numpy(hist_e), torch.from_numpy(mask))
        z[chunk] = out.numpy()
    return z


def new_source(kind: str, data: PreparedData, cfg: ModelConfig) -> TemporalOrderSource:
    if kind == "user":
        return UserOrderSource(cfg, FeatureShape.of(data))
    if kind == "temporal":
        return TemporalOrderSource(cfg, FeatureShape.of(data))
    raise ValueError(f"kind: must be 'user' or 'temporal', got {kind!r}")


def run_pass(kind: str, data: PreparedData, mcfg: ModelConfig, pcfg: ProtocolConfig, seed: int,
             provider: HistoryProvider | None = None, user_order: np.ndarray | None = None,
             on_train: Callable[[SourcePass, np.ndarray], None] | None = None) -> tuple[SourcePass, list[PassBatch]]:
    """A fresh ``kind`` source model (seeded) trained by one pass over the training split."""
    set_seed(seed)
    model = new_source(kind, data, mcfg)
    provider = provider if provider is not None else InMemoryHistoryProvider(mcfg.insemb_dim)
    state = SourcePass(model, data, provider, pcfg, on_train=on_train)
    plan = plan_pass(data, data.split_indices(0), pcfg, np.random.default_rng(seed), user_order,
                     user_windows=kind == "user")
    for batch in plan:
        state.step(batch)
    return state, plan


def _val_metrics(state: SourcePass, e_all: np.ndarray, window: int) -> dict:
    from models.training.metrics import auc

    data, model = state.data, state.model
    val = data.split_indices(1)
    if isinstance(model, UserOrderSource):
        probs = history_predict(model, data, val, e_all, window)
    else:
        probs = predict(lambda r: model(feature_batch(data, r, model.cfg.seq_len)), val)
    return {"val_auc": auc(data.labels[val][:, 0], probs[:, 0])}


def protocol_insembs(kind: str, data: PreparedData, mcfg: ModelConfig, pcfg: ProtocolConfig, seed: int,
                     provider: HistoryProvider | None = None,
                     on_train: Callable[[SourcePass, np.ndarray], None] | None = None) -> ProtocolResult:
    """One pass (``run_pass``) and the InsEmbs the downstream model trains, validates and tests
    on (``downstream_insembs``)."""
    state, plan = run_pass(kind, data, mcfg, pcfg, seed, provider, on_train=on_train)
    after = np.flatnonzero(data.split != 0)
    e_all = downstream_insembs(state, after)
    info = {"protocol": "time_ordered", "kind": kind, "batch_fraction": pcfg.batch_fraction,
            "batches": {k: sum(b.kind == k for b in plan) for k in ("batch", "stream")},
            "mean_loss_first_10": float(np.mean(state.losses[:10])) if state.losses else None,
            "mean_loss_last_10": float(np.mean(state.losses[-10:])) if state.losses else None,
            **_val_metrics(state, pass_insembs(state, after) if state.after_sit else e_all, pcfg.window)}
    if state.after_sit:
        info["insemb"] = pcfg.insemb
    return ProtocolResult(state.model, e_all, info)


def two_pass_insembs(data: PreparedData, mcfg: ModelConfig, pcfg: ProtocolConfig, seed: int) -> ProtocolResult:
    """IAT App. A.3, two-pass user order. One-pass user-order training is unfair to the users
    it visits first: their InsEmbs come from a model that has not converged. So two jobs run
    the protocol's pass with opposite user orders in the batch phase (a random permutation and
    its reverse), each over its own store; the InsEmbs stored for a user are the ones written
    by the job that visits that user LATE (the second half of its order), i.e. forward-job
    InsEmbs for the last half of the permutation and backward-job InsEmbs for the first half.
    The rule is per user for all of the user's instances (the streaming phase too, where both
    jobs have converged), so one user's history lies in one model's embedding space. Validation
    and test instances are embedded by the final model of the job that owns their user."""
    order = np.random.default_rng(seed).permutation(data.n_users)
    forward, _ = run_pass("user", data, mcfg, pcfg, seed, user_order=order)
    backward, _ = run_pass("user", data, mcfg, pcfg, seed + 1, user_order=order[::-1].copy())
    late_in_forward = np.zeros(data.n_users, dtype=bool)
    late_in_forward[order[len(order) // 2:]] = True
    keep_forward = late_in_forward[data.user_index][:, None]
    after = np.flatnonzero(data.split != 0)
    e_all = np.where(keep_forward, downstream_insembs(forward, after), downstream_insembs(backward, after))
    info = {"protocol": "two_pass", "users_from_forward": int(late_in_forward.sum()),
            **{f"forward_{k}": v for k, v in _val_metrics(forward, e_all, pcfg.window).items()}}
    return ProtocolResult(forward.model, e_all.astype(np.float32), info)
