"""The fused history read's latency baseline: two round trips (ZREVRANGEBYSCORE, then MGET).

Not a production path: the newest ``limit`` members and the usable ones among them. Unlike
``InstanceStore.read_history`` it neither reaches further back past skipped members nor removes
dangling ones, so the two agree only when every member is usable (the storage tests use it as
an independent oracle on such data; `iat bench store` times it against the fused read).
"""
from __future__ import annotations

from contract.history import History


def _range(store, user_id: str, before_ms: int, limit: int) -> tuple[str, dict]:
    return store.sequence_key(user_id), {"max": f"({before_ms}", "min": "-inf", "start": 0, "num": limit}


def read_history_two_trips(store, user_id: str, before_ms: int, limit: int,
                           expected_source_version: str | None = None) -> History:
    """``store``: a sync ``InstanceStore``."""
    store._read_args(user_id, before_ms, limit)  # the same argument checks as the fused read
    members = []
    if limit:
        key, window = _range(store, user_id, before_ms, limit)
        members = store.client.zrevrangebyscore(key, **window)
    prefix = store.record_key_prefix(user_id).encode()
    values = store.client.mget([prefix + m for m in members]) if members else []
    return store.history_from_records(members, values, expected_source_version)


async def aread_history_two_trips(store, user_id: str, before_ms: int, limit: int,
                                  expected_source_version: str | None = None) -> History:
    """``store``: an ``AsyncInstanceStore``."""
    store._read_args(user_id, before_ms, limit)
    members = []
    if limit:
        key, window = _range(store, user_id, before_ms, limit)
        members = await store.client.zrevrangebyscore(key, **window)
    prefix = store.record_key_prefix(user_id).encode()
    values = await store.client.mget([prefix + m for m in members]) if members else []
    return store.history_from_records(members, values, expected_source_version)
