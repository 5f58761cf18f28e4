"""Ranking models by name, the newest version of each, swapped in atomically on reload.

A new version found in the model directory is loaded (the loader checks every file's sha256
against the manifest first), checked against the source models available, warmed up, and only
then replaces the old one in a single dict assignment, so a request in flight keeps the
object it started with and no request ever sees a half-loaded model. A bad artifact is refused,
counted and logged, and the old version keeps serving. At start-up (nothing of that name loaded
yet) a refused newest version falls back to the newest older version that verifies, so one
corrupted export does not take a model out of service after a restart.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from contract.artifacts import MANIFEST, is_version, read_manifest
from contract.layout import RecordLayout
from models.runtime.loader import (
    ArtifactError,
    RankingModel,
    latest_version,
    load_ranking_model,
)
from services import metrics
from services.ranking.errors import ModelNotFound

log = logging.getLogger(__name__)
SOURCE_MODEL_NAME = "source"


class ModelRegistry:
    def __init__(self, model_dir: Path, runtime: str = "torchscript", device: str = "auto",
                 default: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.runtime = runtime
        self.device = device
        self.default_name = default
        self._models: dict[str, RankingModel] = {}
        self._paths: dict[str, Path] = {}
        self._refused: dict[str, Path] = {}  # a refused version is not retried until it changes
        self._lock = threading.Lock()  # one reload at a time; readers never take it

    @property
    def models(self) -> dict[str, RankingModel]:
        return self._models

    def get(self, name: str) -> RankingModel:
        models = self._models  # one read of the reference: a consistent snapshot
        key = name or self.default_name or (next(iter(models)) if models else "")
        model = models.get(key)
        if model is None:
            known = ", ".join(sorted(models)) or "none loaded"
            raise ModelNotFound(f"unknown model {key!r} (serving: {known})", "model")
        return model

    def record_layout(self, model: RankingModel) -> RecordLayout:
        """The layout of the records this model reads: its source model's (they were written by
        it), else its own manifest's when that source version is not in the model directory."""
        path = self.model_dir / SOURCE_MODEL_NAME / model.source_version
        manifest = read_manifest(path) if model.source_version and (path / MANIFEST).is_file() else model.manifest
        return RecordLayout.from_manifest(manifest)

    def ranking_names(self) -> list[str]:
        """Folders of the model directory holding at least one exported version (a volume's
        lost+found or a half-copied folder is not a model)."""
        if not self.model_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.model_dir.iterdir()
            if p.is_dir() and p.name != SOURCE_MODEL_NAME and latest_version(self.model_dir, p.name) is not None
        )

    def _check_source(self, model: RankingModel) -> None:
        source_dir = self.model_dir / SOURCE_MODEL_NAME
        if model.source_version and source_dir.is_dir() and not (source_dir / model.source_version).is_dir():
            raise ArtifactError(
                f"{model.name} {model.version} reads embeddings of source model version "
                f"{model.source_version!r}, which is not in {source_dir}"
            )

    def _versions_newest_first(self, name: str) -> list[Path]:
        root = self.model_dir / name
        return sorted((p for p in root.iterdir() if p.is_dir() and is_version(p.name) and (p / MANIFEST).is_file()),
                      reverse=True)

    def refresh(self) -> dict[str, str]:
        """Load every name's newest version that is not loaded yet; returns name -> outcome."""
        outcomes: dict[str, str] = {}
        with self._lock:
            for name in self.ranking_names():
                path = latest_version(self.model_dir, name)
                if path is None or self._paths.get(name) == path or self._refused.get(name) == path:
                    continue
                # Loaded already: only the newest may replace it. Nothing loaded: newest that verifies.
                candidates = [path] if name in self._models else self._versions_newest_first(name)
                model, refusals = None, []
                for path in candidates:
                    try:
                        model = load_ranking_model(path, runtime=self.runtime, device=self.device)
                        self._check_source(model)
                        model.warmup()
                        break
                    except (ArtifactError, OSError, RuntimeError, ValueError) as exc:
                        model = None
                        self._refused[name] = max(self._refused.get(name, path), path)
                        metrics.MODEL_RELOADS.labels(name, "refused").inc()
                        log.error("model %s: refused %s: %s (still serving %s)", name, path.name, exc,
                                  self._paths.get(name, Path("nothing")).name)
                        refusals.append(f"refused {path.name}: {exc}")
                if model is None:
                    outcomes[name] = "; ".join(refusals)
                    continue
                old = self._models.get(name)
                self._models = {**self._models, name: model}  # atomic swap of the whole mapping
                self._paths[name] = path
                metrics.MODEL_RELOADS.labels(name, "loaded").inc()
                if old is not None:
                    metrics.MODEL_INFO.remove(old.name, old.version, old.source_version, old.runtime, str(old.device))
                metrics.MODEL_INFO.labels(model.name, model.version, model.source_version, model.runtime,
                                          str(model.device)).set(1)
                log.info("model %s: serving %s (%s on %s)", name, model.version, model.runtime, model.device)
                outcomes[name] = "; ".join([*refusals, f"loaded {path.name}"])
        return outcomes
