"""The serving object behind both protocols: fetch -> assemble -> model, timed per stage.

Per request: one round trip to the store for the user's newest at most L instances strictly
before ``request_time_ms - history_delay_ms`` with their records; the candidates featurized
exactly as in training; the history encoded once and every candidate scored against it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from contract.history import History
from contract.layout import RecordLayout
from models.runtime.featurizer import FeatureError
from models.runtime.loader import RankingModel
from services import metrics
from services.config import Settings
from services.health import StoreGuard
from services.ranking.errors import DeadlineExceeded, InvalidRequest, StoreUnavailable
from services.ranking.protocol import ScoreQuery, ScoreResult, validate_query
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
        # Torch releases the GIL in kernels: a small pool overlaps one request's forward with
        # another's fetch and featurization without oversubscribing the cores.
        self.executor = ThreadPoolExecutor(max_workers=settings.model_threads, thread_name_prefix="model")

    def store_for(self, model: RankingModel) -> AsyncInstanceStore:
        """A store decoding records the way this model's source model wrote them (one per layout)."""
        layout = self._layouts.get((model.name, model.version))
        if layout is None:
            layout = self._layouts[(model.name, model.version)] = self.registry.record_layout(model)
        store = self._stores.get(layout)
        if store is None:
            store = self._stores[layout] = async_instance_store(self.client, self.settings, layout)
        return store

    async def read_history(self, model: RankingModel, user_id: str, before_ms: int, limit: int,
                           explain: bool = False) -> History:
        """THE history read of this service (Score and the history endpoint): the newest at most
        ``limit`` instances strictly before ``before_ms`` usable by ``model`` (its source lineage
        from its oldest accepted ordinal on, or its exact source version for an artifact without
        lineage), each skipped member counted by reason."""
        history = await self.store_for(model).read_history(
            user_id, before_ms, limit, expected_source_version=model.manifest.accepted_sources(), explain=explain)
        for reason, count in ((MISSING, history.missing), (VERSION_MISMATCH, history.version_mismatch),
                              (INCOMPATIBLE, history.incompatible)):
            if count:
                metrics.HISTORY_SKIPPED.labels(reason).inc(count)
        if history.missing:
            metrics.MISSING_RECORDS.inc(history.missing)
        return history

    async def _fetch(self, model: RankingModel, user_id: str, before_ms: int, timeout_s: float | None) -> History | None:
        """The history, or None when degraded; raises StoreUnavailable / DeadlineExceeded."""
        try:
            return await asyncio.wait_for(self.read_history(model, user_id, before_ms, model.max_history), timeout_s)
        except asyncio.TimeoutError:
            if self.settings.degrade_on_store_error:
                return None
            raise DeadlineExceeded("deadline passed while reading the history from the store")
        except STORE_ERRORS as exc:
            if self.settings.degrade_on_store_error:
                log.warning("store unavailable, scoring with an empty history: %s", exc)
                return None
            raise StoreUnavailable(f"the store cannot be reached: {describe(exc)}")

    async def score(self, query: ScoreQuery, timeout_s: float | None) -> ScoreResult:
        start = time.perf_counter()
        deadline = None if timeout_s is None else start + timeout_s
        validate_query(query, max_candidates=self.settings.max_candidates)
        model = self.registry.get(query.model)
        metrics.CANDIDATES.observe(query.num_candidates)

        # The request's own instance and anything later are never history.
        before_ms = query.request_time_ms - self.settings.history_delay_ms
        fetch_timeout = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        history = await self._fetch(model, query.user_id, before_ms, fetch_timeout) if before_ms > 0 else None
        t_fetch = time.perf_counter()
        if history is None:
            if before_ms > 0:
                metrics.DEGRADED.inc()
            inputs = History.empty(model.embedding_dim, len(model.tasks), model.code_length)
        else:
            inputs = history
        n_hist = int(inputs.embeddings.shape[0])
        metrics.HISTORY_LENGTH.observe(n_hist)

        try:
            cat, multi, num = model.featurizer.encode(
                query.user_id, query.request_time_ms, query.item_ids,
                query.context.categorical, query.context.numeric,
                [f.categorical for f in query.candidate_features],
                [f.numeric for f in query.candidate_features],
            )
        except FeatureError as err:
            raise InvalidRequest(err.message, err.field) from None
        t_assemble = time.perf_counter()

        if deadline is not None and t_assemble >= deadline:
            raise DeadlineExceeded("deadline passed before the model ran")
        if query.num_candidates:
            loop = asyncio.get_running_loop()
            scores = await loop.run_in_executor(
                self.executor, model.score, inputs, query.request_time_ms, cat, multi, num
            )
        else:
            scores = np.zeros((0, len(model.tasks)), dtype=np.float32)
        t_model = time.perf_counter()

        metrics.SCORE_STAGE_LATENCY.labels("fetch").observe(t_fetch - start)
        metrics.SCORE_STAGE_LATENCY.labels("assemble").observe(t_assemble - t_fetch)
        metrics.SCORE_STAGE_LATENCY.labels("model").observe(t_model - t_assemble)
        metrics.SCORE_STAGE_LATENCY.labels("total").observe(t_model - start)
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
