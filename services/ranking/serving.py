"""The serving object behind both protocols: fetch -> assemble -> model, timed per stage.

Per request: one round trip to the store for the user's newest at most L instances strictly
before ``request_time_ms - history_delay_ms`` with their records; the candidates featurized
exactly as in training; the history encoded once and every candidate scored against it.

Two caches keep per-request work off the event loop's thread, both exact by construction:
- item encodings (``ItemEncodings``, per model version): a candidate's encoding is a function
  of its item id and features, so it is looked up by them, and only a miss runs Python for it
  (validation included: a candidate seen before passed it);
- histories (``history_cache``): the records the store's read returned determine the history
  the model reads, so the prepared history, and its encoded user state, are looked up by
  (model, version, limit, those records). The read is still one round trip per Score.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from contract.history import History
from contract.layout import RecordLayout
from contract.validation import InvalidField
from models.runtime.featurizer import FeatureError, ItemEncodings
from models.runtime.loader import RankingModel
from services import metrics
from services.config import Settings
from services.health import StoreGuard
from services.ranking.batching import ScoreBatcher
from services.ranking.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    StoreUnavailable,
)
from services.ranking.history_cache import CachedHistory, HistoryCache, history_key
from services.ranking.protocol import (
    ScoreQuery,
    ScoreResult,
    candidate_from_key,
    check_candidate,
    validate_header,
    validate_query,
)
from services.ranking.registry import ModelRegistry
from services.stores import async_instance_store
from storage.errors import STORE_ERRORS, describe
from storage.instance_store import (
    INCOMPATIBLE,
    MISSING,
    VERSION_MISMATCH,
    AsyncInstanceStore,
)

log = logging.getLogger(__name__)


class RankingServing:
    def __init__(self, settings: Settings, registry: ModelRegistry, client) -> None:
        self.settings = settings
        self.registry = registry
        self.client = client  # redis.asyncio client (or cluster)
        self.store_guard = StoreGuard(client, settings.allow_evicting_redis)
        self._stores: dict[RecordLayout, AsyncInstanceStore] = {}
        self._layouts: dict[tuple[str, str], RecordLayout] = {}
        self._items: dict[tuple[str, str], ItemEncodings] = {}
        self.histories = HistoryCache(int(settings.history_cache_mb * 2**20))
        # Torch releases the GIL in kernels: a small pool overlaps one request's forward with
        # another's fetch and featurization without oversubscribing the cores.
        self.executor = ThreadPoolExecutor(max_workers=settings.model_threads, thread_name_prefix="model")
        self.batcher = ScoreBatcher(self.executor, settings.model_threads, settings.score_batch_wait_ms,
                                    settings.score_batch_max_candidates)

    def store_for(self, model: RankingModel) -> AsyncInstanceStore:
        """A store decoding records the way this model's source model wrote them (one per layout)."""
        layout = self._layouts.get((model.name, model.version))
        if layout is None:
            layout = self._layouts[(model.name, model.version)] = self.registry.record_layout(model)
        store = self._stores.get(layout)
        if store is None:
            store = self._stores[layout] = async_instance_store(self.client, self.settings, layout)
        return store

    def items_for(self, model: RankingModel) -> ItemEncodings:
        """The item-encoding cache of this model version (a reload starts a new one)."""
        key = (model.name, model.version)
        items = self._items.get(key)
        if items is None:
            served = {(m.name, m.version) for m in self.registry.models.values()}
            self._items = {k: v for k, v in self._items.items() if k in served}
            items = self._items[key] = ItemEncodings(model.featurizer, self.settings.item_cache_size,
                                                     decode=candidate_from_key, check=check_candidate)
        return items

    @staticmethod
    def _count_skipped(missing: int, version_mismatch: int, incompatible: int) -> None:
        for reason, count in ((MISSING, missing), (VERSION_MISMATCH, version_mismatch),
                              (INCOMPATIBLE, incompatible)):
            if count:
                metrics.HISTORY_SKIPPED.labels(reason).inc(count)
        if missing:
            metrics.MISSING_RECORDS.inc(missing)

    async def read_history(self, model: RankingModel, user_id: str, before_ms: int, limit: int,
                           explain: bool = False) -> History:
        """THE history read of this service (the history endpoint; Score reads the same reply
        undecoded, ``_fetch``): the newest at most ``limit`` instances strictly before
        ``before_ms`` usable by ``model`` (its source lineage from its oldest accepted ordinal on, or
        its exact source version for an artifact without lineage), each skipped member counted by
        reason; labels as of ``before_ms``."""
        history = await self.store_for(model).read_history(
            user_id, before_ms, limit, expected_source_version=model.manifest.accepted_sources(), explain=explain)
        self._count_skipped(history.missing, history.version_mismatch, history.incompatible)
        return history

    async def _fetch(self, model: RankingModel, user_id: str, before_ms: int, timeout_s: float | None) -> list | None:
        """The store's reply ``[found, missing, version mismatches, joined records]`` of the same
        read as ``read_history`` (one round trip, not decoded yet), or None when degraded;
        raises StoreUnavailable / DeadlineExceeded."""
        store = self.store_for(model)
        read = store.read_history_raw(user_id, before_ms, model.max_history,
                                      expected_source_version=model.manifest.accepted_sources())
        try:
            async with asyncio.timeout(timeout_s):  # no task of its own, unlike wait_for
                return await read
        except TimeoutError:
            if self.settings.degrade_on_store_error:
                return None
            raise DeadlineExceeded("deadline passed while reading the history from the store")
        except STORE_ERRORS as exc:
            if self.settings.degrade_on_store_error:
                log.warning("store unavailable, scoring with an empty history: %s", exc)
                return None
            raise StoreUnavailable(f"the store cannot be reached: {describe(exc)}")

    def _prepared(self, model: RankingModel, reply: list, before_ms: int,
                  request_time_ms: int) -> tuple[CachedHistory, tuple | None, bool]:
        """(prepared history, its cache key or None when the cache is off, whether it was a hit)
        of a store reply.

        Labels are shown as of ``before_ms`` (a label that arrived later is unknown), so the same
        records read at two times may carry different labels: the key holds the labels as the
        store's decoding gives them beside the records' bytes. On a hit only those are decoded
        (``labels_of``); the rest of the decoding, the preparing and the encoding are what the
        cache saves.
        """
        found, missing, mismatch, records = int(reply[0]), int(reply[1]), int(reply[2]), bytes(reply[3])
        store = self.store_for(model)
        history, key, entry = None, None, None
        if self.histories.enabled:
            labels = store.layout.labels_of(records, found, before_ms)
            if labels is None:  # records of another layout among them: decoded in full below
                history = store._history([found, missing, mismatch, records], before_ms)
                labels = history.labels
            key = history_key(model, model.max_history, found, records, labels.tobytes())
            entry = self.histories.get(key)
        hit = entry is not None
        if entry is None:
            if history is None:
                history = store._history([found, missing, mismatch, records], before_ms)
            entry = CachedHistory(model.prepare(history, request_time_ms), history.incompatible)
        self._count_skipped(missing, mismatch, entry.incompatible)
        return entry, key, hit

    def _featurize(self, model: RankingModel, query: ScoreQuery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = self.items_for(model)
        before = items.info()
        rows = items.rows(query.candidate_keys)
        after = items.info()
        metrics.ITEM_CACHE.labels("hit").inc(after.hits - before.hits)
        metrics.ITEM_CACHE.labels("miss").inc(after.misses - before.misses)
        return model.featurizer.assemble(query.user_id, query.request_time_ms, query.context.categorical,
                                         query.context.numeric, rows)

    def _named_error(self, model: RankingModel, query: ScoreQuery, cause: Exception) -> InvalidRequest:
        """The error every candidate checked in order gives (the fast path only knows that one
        failed): a value error is raised now, as before any store read; a feature-name error
        is returned, to be raised after the read, where the featurizer has always raised it."""
        validate_query(query, max_candidates=self.settings.max_candidates)
        try:
            model.featurizer.encode(
                query.user_id, query.request_time_ms, query.item_ids,
                query.context.categorical, query.context.numeric,
                [f.categorical for f in query.candidate_features],
                [f.numeric for f in query.candidate_features],
            )
        except FeatureError as err:
            return InvalidRequest(err.message, err.field)
        log.error("featurization failed but the checks in order pass: %r", cause)
        return InvalidRequest(str(cause), getattr(cause, "field", None))

    async def score(self, query: ScoreQuery, timeout_s: float | None) -> ScoreResult:
        start = time.perf_counter()
        deadline = None if timeout_s is None else start + timeout_s
        validate_header(query, max_candidates=self.settings.max_candidates)
        try:
            model = self.registry.get(query.model)
        except ModelNotFound:
            validate_query(query, max_candidates=self.settings.max_candidates)  # a bad request first
            raise
        metrics.CANDIDATES.observe(query.num_candidates)

        pending = None
        try:
            cat, multi, num = self._featurize(model, query)
        except (FeatureError, InvalidField) as exc:
            pending = self._named_error(model, query, exc)
        t_assemble = time.perf_counter()

        # The request's own instance and anything later are never history.
        before_ms = query.request_time_ms - self.settings.history_delay_ms
        fetch_timeout = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        reply = await self._fetch(model, query.user_id, before_ms, fetch_timeout) if before_ms > 0 else None
        if pending is not None:
            raise pending
        key, outcome = None, "none"
        if reply is None:
            if before_ms > 0:
                metrics.DEGRADED.inc()
            prepared = model.prepare(History.empty(model.embedding_dim, len(model.tasks), model.code_length),
                                     query.request_time_ms)
        else:
            entry, key, hit = self._prepared(model, reply, before_ms, query.request_time_ms)
            outcome = "hit" if hit else ("miss" if key is not None else "none")
            prepared = entry.prepared
        n_hist = prepared.length
        metrics.HISTORY_LENGTH.observe(n_hist)
        t_fetch = time.perf_counter()

        if deadline is not None and t_fetch >= deadline:
            raise DeadlineExceeded("deadline passed before the model ran")
        if query.num_candidates:
            if self.batcher.enabled and model.batches_requests:
                scores = await self.batcher.score(model, prepared, query.request_time_ms, cat, multi, num)
            else:
                loop = asyncio.get_running_loop()
                scores = await loop.run_in_executor(
                    self.executor, model.score_prepared, prepared, query.request_time_ms, cat, multi, num
                )
            if key is not None:
                self.histories.put(key, entry)  # after the model: its encoded user state is counted
        else:
            scores = np.zeros((0, len(model.tasks)), dtype=np.float32)
        t_model = time.perf_counter()

        metrics.SCORE_STAGE_LATENCY.labels("assemble").observe(t_assemble - start)
        metrics.SCORE_STAGE_LATENCY.labels("fetch").observe(t_fetch - t_assemble)
        metrics.SCORE_STAGE_LATENCY.labels("model").observe(t_model - t_fetch)
        metrics.SCORE_STAGE_LATENCY.labels("total").observe(t_model - start)
        metrics.SCORE_BY_HISTORY_CACHE.labels(outcome).observe(t_model - start)
        return ScoreResult(
            request_id=query.request_id, model=model.name, model_version=model.version,
            history_length=n_hist, tasks=list(model.tasks), scores=np.asarray(scores, dtype=np.float32),
        )

    async def history(self, user_id: str, before_ms: int, limit: int | None = None, model_name: str = "") -> dict:
        """What Score with ``model_name`` (default: the default model) would use as history for a
        request whose history bound is ``before_ms`` (= request_time_ms - IAT_HISTORY_DELAY_MS):
        the same read, version filter and limit (``limit``, capped at the model's max_history).
        ``instances`` is exactly that history; ``skipped`` lists the members the read examined and
        did not use, with the reason (missing: record gone, now removed from the sequence;
        version_mismatch; incompatible)."""
        if not user_id:
            raise InvalidRequest("must not be empty", "user_id")
        model = self.registry.get(model_name)
        limit = model.max_history if limit is None else min(limit, model.max_history)
        try:
            h = await self.read_history(model, user_id, before_ms, limit, explain=True)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"the store cannot be reached: {describe(exc)}")
        tasks = list(model.tasks)
        return {
            "user_id": user_id, "before_ms": before_ms, "limit": limit, "count": len(h),
            "model": model.name, "model_version": model.version, "source_version": model.source_version,
            "missing": h.missing, "version_mismatch": h.version_mismatch, "incompatible": h.incompatible,
            "instances": [
                {
                    "ins_id": str(int(h.ins_ids[i])), "timestamp_ms": int(h.timestamps_ms[i]),
                    "item_hash": int(h.item_hashes[i]),
                    "labels": {t: int(h.labels[i, j]) for j, t in enumerate(tasks) if h.labels[i, j] >= 0},
                }
                for i in range(len(h))
            ],
            "skipped": [
                {"ins_id": str(s.ins_id), "timestamp_ms": s.timestamp_ms, "reason": s.reason}
                for s in h.skipped or ()
            ],
        }

    def readiness_checks(self):
        async def models_ok() -> tuple[bool, str]:
            models = self.registry.models
            return bool(models), ", ".join(f"{n}={m.version}" for n, m in models.items()) or "no model loaded"

        return {"models": models_ok}
