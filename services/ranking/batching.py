"""Cross-request micro-batching of Score's forward (``IAT_SCORE_BATCH_WAIT_MS`` > 0; 0 = off).

Concurrent Scores for the same loaded model meet here after their own fetch and featurization.
A request that finds a model thread free goes at once (with whoever arrived in the same turn of
the event loop): batching never delays a request on an idle service. While every model thread is
busy, requests collect into one batch, which goes when a thread frees up, when it holds
``IAT_SCORE_BATCH_MAX_CANDIDATES`` candidates, or ``IAT_SCORE_BATCH_WAIT_MS`` after it opened,
whichever comes first. A batch runs as one forward (``RankingModel.score_batch``): each request's
user side encoded once (or reused from the history cache) exactly as alone, the candidates of all
of them in one batch; each request gets its own rows back, in its own order, or its own error:
one bad request never fails the others. What it buys is fewer, larger forwards (per-call
overhead paid once; what a GPU needs); what it can cost on CPU is parallelism: one batch is one
forward on one model thread where the requests alone would have used several.
Used from the event loop's thread only.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from models.runtime.loader import PreparedHistory, RankingModel
from services import metrics


@dataclass(eq=False)
class _Batch:
    model: RankingModel
    items: list = field(default_factory=list)     # score_batch's (prepared, time, cat, multi, num)
    futures: list = field(default_factory=list)   # one per item, same order
    candidates: int = 0
    timer: asyncio.Handle | None = None


class ScoreBatcher:
    def __init__(self, executor: Executor, threads: int, wait_ms: float, max_candidates: int) -> None:
        self.executor = executor
        self.threads = int(threads)  # the executor's model threads
        self.running = 0  # batches handed to the executor and not done
        self.wait_s = float(wait_ms) / 1000.0
        self.max_candidates = int(max_candidates)
        self._open: dict[int, _Batch] = {}  # by id(model): a reloaded version batches apart
        self._running: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.wait_s > 0

    async def score(self, model: RankingModel, prepared: PreparedHistory, request_time_ms: int,
                    cat: np.ndarray, multi: np.ndarray, num: np.ndarray) -> np.ndarray:
        """This request's probabilities [C, T], scored in a batch with whoever else arrives
        within the wait; raises what scoring this request alone would raise."""
        loop = asyncio.get_running_loop()
        batch = self._open.get(id(model))
        if batch is None:
            batch = self._open[id(model)] = _Batch(model)
            if self.running < self.threads:
                batch.timer = loop.call_soon(self._flush, batch)  # a thread is free: this turn's arrivals only
            else:
                batch.timer = loop.call_later(self.wait_s, self._flush, batch)
        future = loop.create_future()
        batch.items.append((prepared, request_time_ms, cat, multi, num))
        batch.futures.append(future)
        batch.candidates += len(cat)
        if batch.candidates >= self.max_candidates:
            self._flush(batch)
        return await future

    def _flush(self, batch: _Batch) -> None:
        if self._open.get(id(batch.model)) is not batch:
            return  # already flushed (full before its timer fired)
        del self._open[id(batch.model)]
        batch.timer.cancel()
        self.running += 1
        metrics.SCORE_BATCH_REQUESTS.observe(len(batch.items))
        metrics.SCORE_BATCH_CANDIDATES.observe(batch.candidates)
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, batch.model.score_batch, batch.items)
        except Exception as exc:  # noqa: BLE001 - score_batch hands back errors per request; this is the pool itself
            results = [exc] * len(batch.items)
        finally:
            self.running -= 1
            if self._open:  # a thread is free: the oldest waiting batch goes now
                self._flush(next(iter(self._open.values())))
        for future, result in zip(batch.futures, results):
            if future.done():
                continue  # that request was cancelled (deadline, client gone)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
