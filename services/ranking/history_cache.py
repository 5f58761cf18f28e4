"""Prepared histories reused across Scores of the same stored history.

Key (``history_key``): (model name, model version, the read's limit, the usable records the
store's one-round-trip read returned, joined, as bytes, and their labels as that read decodes
them). It is exact by construction:

- The model's history input is a function of those records, their labels as of T and the
  model version alone. The read returns the newest at most ``limit`` usable records strictly
  before T, newest first, and the record layout that decodes them comes from the model
  version; the model's own truncation (strictly before the request time, at most
  ``max_history``) keeps all of them, since T = request time - delay <= request time. Equal
  keys therefore give equal arrays, and a dict lookup compares the bytes themselves, so no hash
  collision can give a wrong hit.
- Whenever the usable history before T changes, the bytes change: a new instance before T
  (it is the newest, or is now among the newest L), an older instance arriving late (which
  leaves the newest InsID as it was), a record rewritten (a backfill, labels), a record expiring or a
  skipped record (another source version, gone) so that the read reaches further back. A key of
  (version, newest usable InsID, limit) alone would miss all but the first of these.
- What the read counts but the model does not read (members skipped as missing or of another
  version) is left out of the key, so the read that removes a dangling member does not miss.
- The request time enters the model beyond the truncation only through the history's age
  buckets: ``RankingModel.score_prepared`` re-encodes a cached user state when they moved.

The read still happens on every Score (it is what says whether the history changed); a hit
skips decoding all but the labels, truncating and padding, and where the runtime has the
user-state half (eager, TorchScript; not AOTI), the history encoding. Nothing is ever
invalidated: a changed history has another key, and the stale entry ages out of the LRU.
Bounded in bytes (key, arrays and any encoded state counted). Used from the event loop's thread
only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from models.runtime.loader import PreparedHistory, RankingModel
from services import metrics

ENTRY_OVERHEAD_BYTES = 512  # key tuple, entry object and dict slot: small next to the arrays


def history_key(model: RankingModel, limit: int, found: int, records: bytes, labels: bytes) -> tuple:
    """``labels``: the records' labels as the read decodes them (as of its bound), as bytes."""
    return (model.name, model.version, int(limit), int(found), records, labels)


@dataclass(eq=False)
class CachedHistory:
    prepared: PreparedHistory
    incompatible: int  # records present and accepted but not decodable here (counted per Score)
    nbytes: int = 0


class HistoryCache:
    """LRU of ``CachedHistory`` by ``history_key``, at most ``max_bytes`` (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries: OrderedDict[tuple, CachedHistory] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> CachedHistory | None:
        entry = self._entries.get(key)
        metrics.HISTORY_CACHE.labels("miss" if entry is None else "hit").inc()
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: CachedHistory) -> None:
        """Insert, or measure again (an encoded user state may have been added since)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        entry.nbytes = len(key[-2]) + len(key[-1]) + entry.prepared.nbytes + ENTRY_OVERHEAD_BYTES
        if entry.nbytes <= self.max_bytes:
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
        metrics.HISTORY_CACHE_BYTES.set(self.nbytes)
