"""Model artifacts on disk: layout, versions, manifest and sha256 checks.

Layout (DESIGN.md section 6/7)::

    MODEL_DIR/<name>/<version>/
        manifest.json   name, version, created, files {file: sha256}, schema (FeatureSpec json),
                        embedding_dim, max_history, codec, tasks, source_version, inputs, outputs
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


def read_manifest(version_dir: str | Path) -> dict:
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest.json not found")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise ArtifactError(f"{path}: key 'files' must map file names to sha256")
    return manifest


def verify(version_dir: str | Path, needed: list[str]) -> dict:
    """Read the manifest and check the sha256 of every file in ``needed`` (and that each is
    listed). Returns the manifest; raises ArtifactError naming the first bad file."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    for name in needed:
        expected = manifest["files"].get(name)
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
