"""What the trained eager models predict for dataset rows: the reference the served path must reproduce (the no-skew tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from contract.artifacts import (
    CONFIG_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    latest_version,
    read_json,
    verify,
)
from models.runtime.loader import RUNTIME_FILES
from models.runtime.modules import build_module


def _eager_module(root: Path, name: str):
    """Serving module ``name`` from a run dir, a version dir's parent model dir, or a version dir."""
    for folder in (root / name, root):
        cfg = folder / CONFIG_FILE
        if cfg.is_file() and json.loads(cfg.read_text()).get("kind") == name:
            break
    else:
        folder = latest_version(root, name)
        if folder is None:
            raise ArtifactError(f"{root}: no '{name}' model (neither a run dir nor a model dir)")
        verify(folder, RUNTIME_FILES["eager"])
    module = build_module(read_json(folder / CONFIG_FILE, "config.json"))
    module.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return module.eval()


@torch.no_grad()
def offline_scores(run_dir_or_model_dir: str | Path, data, rows, name: str = "iat",
                   batch_size: int = 1024) -> np.ndarray:
    """float32 [len(rows), T]: the trained eager model's predictions for dataset ``rows``, with
    histories from ``data.history_index`` and InsEmbs / codes from the trained source model -
    the training code path (``iat_batch`` / ``gather_history``), not the serving modules."""
    from models.training.downstream import iat_batch
    from models.training.sif.history import gather_history
    from models.training.sif.rows import prepare_inputs
    from models.training.source import insembs

    root = Path(run_dir_or_model_dir)
    rows = np.asarray(rows, dtype=np.int64)
    source = _eager_module(root, "source")
    model = _eager_module(root, name)
    out = []
    if name == "iat":
        e_all = insembs(source.source, data)
        ds = model.model
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            out.append(torch.sigmoid(ds(iat_batch(data, chunk, e_all, ds.cfg))).numpy())
    elif name == "sif":
        inputs = prepare_inputs(data).inputs
        codes = torch.cat([source.quantizer64(source.encoder64(
            inputs.index(slice(i, i + 4096))._replace(numeric=inputs.numeric[i:i + 4096].double()))).codes
            for i in range(0, data.n, 4096)])
        mixer = model.mixer
        hist_index = torch.from_numpy(data.history_index(int(model.config["history_length"])))
        ts = torch.from_numpy(data.ts_ms).to(torch.float64) / 1000.0
        labels = torch.from_numpy(data.labels)
        for i in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[i:i + batch_size])
            hist = gather_history(codes, hist_index[chunk], ts, ts[chunk], labels, mixer.recency_buckets)
            memory = mixer.encode_history(hist.rows, hist.recency, hist.mask, hist.outcomes)
            logits = mixer.score_rows(memory, mixer.project_target(inputs.index(chunk)).unsqueeze(1)).squeeze(1)
            out.append(torch.sigmoid(logits).numpy())
    else:
        raise ValueError(f"name: must be 'iat' or 'sif', got {name!r}")
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(data.tasks)), np.float32)


def run_info(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / RUN_FILE, "run.json")
