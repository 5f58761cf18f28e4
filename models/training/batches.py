"""Feature tensors of dataset rows, as every trainer batches them."""
from __future__ import annotations

import numpy as np
import torch

from models.data.prepared import PreparedData


def feature_batch(data: PreparedData, rows: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    """Tensors of the features of ``rows``: cat, multi, num, item (target item id), seq_items
    (item ids of the hand-crafted behaviour sequence: strictly earlier instances of the same
    user, newest first, -1 padded) and seq_labels (those instances' labels [B, S, T]: 1, 0, -1
    unknown or padding)."""
    rows = np.asarray(rows, dtype=np.int64)
    batch = {
        "cat": torch.from_numpy(data.cat[rows]),
        "multi": torch.from_numpy(data.multi[rows]),
        "num": torch.from_numpy(data.num[rows]),
        "item": torch.from_numpy(data.item_hash[rows]),
    }
    if seq_len > 0:
        hist = data.history_index(seq_len)[rows]
        batch["seq_items"] = torch.from_numpy(np.where(hist >= 0, data.item_hash[np.clip(hist, 0, None)], -1))
        batch["seq_labels"] = torch.from_numpy(history_labels(data, hist))
    else:
        batch["seq_items"] = torch.full((len(rows), 1), -1, dtype=torch.int64)
        batch["seq_labels"] = torch.full((len(rows), 1, len(data.tasks)), -1, dtype=torch.int64)
    return batch


def history_labels(data: PreparedData, hist: np.ndarray) -> np.ndarray:
    """int64 [..., T]: labels of the history rows ``hist`` (-1 padded), -1 where a slot is
    empty; a label the data does not know stays -1 (unknown), as the store keeps it."""
    labels = data.labels[np.clip(hist, 0, None)].astype(np.int64)
    return np.where((hist >= 0)[..., None], labels, -1)
