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
from services.ranking.errors import DeadlineExceeded, InvalidRequest, StoreUnavailable
from services.ranking.protocol import ScoreQuery, ScoreResult, validate_query
from services.ranking.registry import ModelRegistry
from services.stores import async_instance_store
from storage.errors import STORE_ERRORS, describe
from storage.instance_store import AsyncInstanceStore

log = logging.getLogger(__name__)


class RankingServing:
    def __init__(self, settings: Settings, registry: ModelRegistry, client) -> None:
        self.settings = settings
        self.registry = registry
        self.client = client  # redis.asyncio client (or cluster)
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

    async def _fetch(self, model: RankingModel, user_id: str, before_ms: int, timeout_s: float | None) -> History | None:
        """The history, or None when degraded; raises StoreUnavailable / DeadlineExceeded."""
        store = self.store_for(model)
        try:
            return await asyncio.wait_for(
                store.read_history(user_id, before_ms, model.max_history, expected_source_version=model.source_version),
                timeout_s,
            )
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
            if history.missing:
                metrics.MISSING_RECORDS.inc(history.missing)
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

    async def history(self, user_id: str, before_ms: int, limit: int) -> dict:
        """The truncated sequence as the default model would read it (debugging view)."""
        if not user_id:
            raise InvalidRequest("must not be empty", "user_id")
        model = self.registry.get("")
        try:
            h = await self.store_for(model).read_history(user_id, before_ms, limit)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"the store cannot be reached: {describe(exc)}")
        tasks = list(model.tasks)
        return {
            "user_id": user_id, "before_ms": before_ms, "limit": limit, "count": len(h),
            "missing": h.missing, "version_mismatch": h.version_mismatch,
            "instances": [
                {
                    "ins_id": str(int(h.ins_ids[i])), "timestamp_ms": int(h.timestamps_ms[i]),
                    "item_hash": int(h.item_hashes[i]),
                    "labels": {t: int(h.labels[i, j]) for j, t in enumerate(tasks) if h.labels[i, j] >= 0},
                }
                for i in range(len(h))
            ],
        }

    def readiness_checks(self):
        async def store_ok() -> tuple[bool, str]:
            await self.client.ping()
            return True, "ping ok"

        async def models_ok() -> tuple[bool, str]:
            models = self.registry.models
            return bool(models), ", ".join(f"{n}={m.version}" for n, m in models.items()) or "no model loaded"

        return {"store": store_ok, "models": models_ok}
