"""Coalesce concurrent requests into one model forward.

Each request submits its items and awaits a future; one worker task takes whatever is queued
(up to ``max_batch`` items, waiting at most ``max_wait_s`` for more once it has some), runs the
batch function once in the executor, and hands every request its own slice of the results.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor


class MicroBatcher:
    def __init__(self, fn: Callable[[list], list], executor: Executor, max_batch: int = 512,
                 max_wait_s: float = 0.002, on_batch: Callable[[int], None] | None = None) -> None:
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[list, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        """The worker task is started and has not ended (what the source's /healthz checks)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, items: list) -> list:
        self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((items, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0][0])
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    nxt = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                group.append(nxt)
                size += len(nxt[0])
            items = [item for request_items, _ in group for item in request_items]
            if self.on_batch:
                self.on_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as exc:  # every request of the group gets the error
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            offset = 0
            for request_items, future in group:
                n = len(request_items)
                if not future.done():
                    future.set_result(results[offset:offset + n])
                offset += n
