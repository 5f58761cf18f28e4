"""Model artifacts on disk: layout, versions, manifest and sha256 checks.

Layout (DESIGN.md section 6/7)::

    MODEL_DIR/<name>/<version>/
        manifest.json   name, version, created, files {file: sha256}, schema (FeatureSpec json),
                        embedding_dim, max_history, codec, tasks, source_version, inputs, outputs;
                        optional: lineage + ordinal (a source model), source_lineage +
                        source_min_ordinal (a downstream; contract/lineage.py)
        model.pt        TorchScript
        model.pt2       AOTInductor package
        weights.pt      state dict of the serving module (eager runtime), torch.save
        config.json     what rebuilds the serving module before weights.pt is loaded

A training run (``iat train``) writes ``RUN_DIR/<name>/{weights.pt, config.json}`` plus
``RUN_DIR/run.json``; ``iat export`` adds the compiled files and the manifest.

Versions are sortable strings ``YYYYMMDDTHHMMSS-<short sha>``: the newest (largest) is served.
Every file listed in the manifest is hashed BEFORE anything is deserialised, so a truncated or
swapped file is refused with its name instead of being half-loaded.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.lineage import ORDINAL_MAX, SourceLineage

MODEL_NAMES = ("iat", "sif", "source")
MANIFEST = "manifest.json"
TORCHSCRIPT_FILE = "model.pt"
AOTI_FILE = "model.pt2"
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
REQUIRED_KEYS = ("name", "version", "created", "files", "schema", "embedding_dim", "max_history",
                 "codec", "tasks", "source_version", "kind", "inputs", "outputs")
_VERSION = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6,40}$")


class ArtifactError(Exception):
    """A model artifact that cannot be served: missing/bad file, sha256 mismatch, manifest problem.
    The message names the file or manifest key."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_version(files: list[Path], now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSS-<first 8 hex of the sha256 over the files' hashes>``."""
    now = now or datetime.now(timezone.utc)
    digest = hashlib.sha256("".join(sha256_file(p) for p in sorted(files)).encode()).hexdigest()
    return f"{now.strftime('%Y%m%dT%H%M%S')}-{digest[:8]}"


def is_version(name: str) -> bool:
    return bool(_VERSION.match(name))


def latest_version(model_dir: str | Path, name: str) -> Path | None:
    """The newest version directory of model ``name`` holding a manifest, or None."""
    root = Path(model_dir) / name
    if not root.is_dir():
        return None
    versions = sorted(p for p in root.iterdir()
                      if p.is_dir() and is_version(p.name) and (p / MANIFEST).is_file())
    return versions[-1] if versions else None


def write_manifest(version_dir: Path, manifest: dict) -> Path:
    """Hash every file of ``version_dir`` (but the manifest) into ``manifest['files']``, write it."""
    files = {p.name: sha256_file(p) for p in sorted(version_dir.iterdir())
             if p.is_file() and p.name != MANIFEST}
    manifest = {**manifest, "files": files}
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest.json: missing keys {missing}")
    path = version_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


class Manifest(BaseModel):
    """``manifest.json``: validated on read, so a loader never meets a missing or mistyped key.
    Keys this version does not know are kept (``extra``), so older code reads newer manifests."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    name: str
    kind: Literal["iat", "sif", "source"]
    version: str
    created: str
    files: dict[str, str] = Field(min_length=1)   # file name -> sha256
    schema_: dict[str, Any] = Field(alias="schema")  # FeatureSpec JSON: features and hashing
    embedding_dim: int = Field(ge=0)
    max_history: int = Field(ge=0)
    codec: str
    tasks: list[str] = Field(min_length=1)
    source_version: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    code_length: int = Field(default=0, ge=0)
    code_dtype: str = "uint8"
    codebook_size: int | None = None
    aoti_device: str | None = None
    # Source lineage (contract/lineage.py, docs/source-versions.md); optional: artifacts exported
    # before lineages have none, and a downstream without them reads its exact source_version.
    lineage: str | None = Field(default=None, min_length=1)        # a source model's lineage
    ordinal: int | None = Field(default=None, ge=0, le=ORDINAL_MAX)  # its place in the lineage
    source_lineage: str | None = Field(default=None, min_length=1)  # the lineage a downstream reads
    source_min_ordinal: int | None = Field(default=None, ge=0, le=ORDINAL_MAX)  # the oldest it accepts

    @model_validator(mode="after")
    def _lineage_pairs(self) -> "Manifest":
        for name, ordinal in (("lineage", "ordinal"), ("source_lineage", "source_min_ordinal")):
            if (getattr(self, name) is None) != (getattr(self, ordinal) is None):
                missing = ordinal if getattr(self, ordinal) is None else name
                raise ValueError(f"{missing} is required with {name if missing == ordinal else ordinal}")
        return self

    def accepted_sources(self) -> SourceLineage | str:
        """What a downstream reads: its declared lineage from its oldest ordinal on, else (an
        artifact without lineage fields) exactly the source version it names."""
        if self.source_lineage is not None:
            return SourceLineage(self.source_lineage, self.source_min_ordinal)
        return self.source_version

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read of any key, known or extra (``schema`` included)."""
        if key == "schema":
            return self.schema_
        value = getattr(self, key, None)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        if key == "schema":
            return self.schema_
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(key)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def read_manifest(version_dir: str | Path) -> Manifest:
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest.json not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise ArtifactError(f"{path}: key {key!r}: {first['msg']}") from None


def verify(version_dir: str | Path, needed: list[str]) -> Manifest:
    """Read the manifest and check the sha256 of every file in ``needed`` (and that each is
    listed). Returns the manifest; raises ArtifactError naming the first bad file."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    for name in needed:
        expected = manifest.files.get(name)
        if expected is None:
            raise ArtifactError(f"{version_dir / MANIFEST}: key 'files' does not list {name}")
        path = version_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...)")
    return manifest


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
