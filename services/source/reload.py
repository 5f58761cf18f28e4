"""The source model the service runs, replaced by a newer published version of the same kind.

Every IAT_RELOAD_INTERVAL_S the newest version under MODEL_DIR/source is looked at. A new one
is loaded (the loader checks every file's sha256 first), checked against the records this
service writes, warmed up, and only then handed to ``swap``, which replaces one reference: the
ingest path reads that reference once per micro-batch, so a batch in flight finishes with the
model it started with and the next one runs the new version (and stamps its version, lineage and
ordinal on its records).

Compatible means the records stay readable by the same readers: the same record layout
(embedding dim, codec, code length and dtype, tasks: the store was built for it), the same
feature schema (requests are validated against it) and the same lineage, its ordinal not going
back (a downstream accepts its lineage from an oldest ordinal on, contract/lineage.py). A new
architecture is a new lineage: it needs a new deployment (backfill or cold start,
docs/source-versions.md), never a hot swap. A refused version is counted, logged with the
reason, and not tried again until a newer one appears; the old model keeps serving.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from contract.layout import RecordLayout
from models.runtime.loader import SourceModel, latest_version, load_source_model
from services import metrics

log = logging.getLogger(__name__)
SOURCE_MODEL_NAME = "source"


def incompatibility(current: SourceModel, new: SourceModel) -> str | None:
    """Why ``new`` cannot replace ``current`` while serving, or None when it can."""
    old_m, new_m = current.manifest, new.manifest
    if new_m.lineage != old_m.lineage:
        return f"lineage {new_m.lineage!r} differs from the served {old_m.lineage!r} (a new lineage needs a new deployment)"
    old_layout, new_layout = RecordLayout.from_manifest(old_m), RecordLayout.from_manifest(new_m)
    if new_layout != old_layout:
        return f"record layout {new_layout} differs from the served {old_layout}"
    if new.feature_spec != current.feature_spec:
        return "feature schema differs from the served model's"
    if (new_m.ordinal or 0) < (old_m.ordinal or 0):
        return f"ordinal {new_m.ordinal} is older than the served {old_m.ordinal}"
    return None


def publish_info(model: SourceModel, previous: SourceModel | None = None) -> None:
    """The MODEL_INFO gauge shows the served version only."""
    if previous is not None:
        metrics.MODEL_INFO.remove(previous.name, previous.version, previous.manifest.source_version or "",
                                  previous.runtime, str(previous.device))
    metrics.MODEL_INFO.labels(model.name, model.version, model.manifest.source_version or "", model.runtime,
                              str(model.device)).set(1)


class SourceReloader:
    def __init__(self, model_dir: Path, model: SourceModel, swap: Callable[[SourceModel], None],
                 runtime: str = "torchscript", device: str = "auto") -> None:
        self.model_dir = Path(model_dir)
        self.model = model
        self.swap = swap
        self.runtime = runtime
        self.device = device
        self._refused: Path | None = None  # not retried until a newer version appears

    def refresh(self) -> str | None:
        """Load the newest version if it is new; returns what happened (None: nothing new)."""
        path = latest_version(self.model_dir, SOURCE_MODEL_NAME)
        if path is None or path == self.model.path or path == self._refused:
            return None
        try:
            model = load_source_model(path, runtime=self.runtime, device=self.device)
            why = incompatibility(self.model, model)
            if why is None:
                model.warmup()
        # Whatever a bad artifact raises (sha mismatch, a truncated file torch cannot read, a
        # manifest that does not validate), the service keeps running the model it has.
        except Exception as exc:  # noqa: BLE001
            model, why = None, f"{type(exc).__name__}: {exc}"
        if why is not None:
            self._refused = path
            metrics.MODEL_RELOADS.labels(SOURCE_MODEL_NAME, "refused").inc()
            log.error("model source: refused %s: %s (still serving %s)", path.name, why, self.model.version)
            return f"refused {path.name}: {why}"
        previous, self.model = self.model, model
        self.swap(model)
        metrics.MODEL_RELOADS.labels(SOURCE_MODEL_NAME, "loaded").inc()
        publish_info(model, previous)
        log.info("model source: serving %s (lineage %s, ordinal %s)", model.version, model.manifest.lineage,
                 model.manifest.ordinal)
        return f"loaded {path.name}"
