"""The source service's reload rule, in process on a real exported model: a newer version is taken
only when its records would be the served model's kind (lineage, record layout, feature schema,
ordinal not going back); a refused one is counted and not tried again until a newer one appears.
Under load with real processes: tests/services/test_hot_reload.py."""
from __future__ import annotations

import json
import shutil

import pytest
from prometheus_client import REGISTRY

from models.runtime.loader import latest_version, load_source_model
from services.source.reload import SourceReloader

OLDER = "29990101T000000-aaaaaaaa"  # names sort after any real export
NEWER = "29990101T000001-bbbbbbbb"


def reloads(outcome: str) -> float:
    return REGISTRY.get_sample_value("iat_ranking_model_reloads_total", {"model": "source", "outcome": outcome}) or 0.0


@pytest.fixture
def served(movielens_models, tmp_path):
    """(model dir holding the served source version only, the loaded model)."""
    path = latest_version(movielens_models.model_dir, "source")
    shutil.copytree(path, tmp_path / "source" / path.name)
    return tmp_path, load_source_model(tmp_path / "source" / path.name)


def publish_like(model_dir, served_model, name: str, **changes) -> None:
    """A copy of the served version under ``name`` with manifest keys changed (files untouched:
    their sha256 still verify)."""
    dest = model_dir / "source" / name
    shutil.copytree(served_model.path, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(changes, version=name)
    (dest / "manifest.json").write_text(json.dumps(manifest))


def changed_schema(model):
    schema = json.loads(json.dumps(model.manifest.schema_))
    schema["n_buckets"] += 1
    return schema


@pytest.mark.parametrize("change, reason", [
    (lambda m: {"lineage": "another-lineage"}, "lineage"),
    (lambda m: {"codec": "fp16"}, "record layout"),
    (lambda m: {"tasks": list(reversed(m.tasks))}, "record layout"),
    (lambda m: {"code_length": m.code_length + 1}, "record layout"),
    (lambda m: {"schema": changed_schema(m)}, "feature schema"),
    (lambda m: {"ordinal": m.manifest.ordinal - 1}, "ordinal"),
], ids=["lineage", "codec", "tasks", "code_length", "schema", "older_ordinal"])
def test_an_incompatible_version_is_refused_once_and_a_newer_compatible_one_loads(served, change, reason):
    model_dir, model = served
    swapped = []
    reloader = SourceReloader(model_dir, model, swapped.append)
    assert reloader.refresh() is None  # nothing newer than the served version

    refused_before = reloads("refused")
    publish_like(model_dir, model, OLDER, **change(model))
    outcome = reloader.refresh()
    assert outcome.startswith(f"refused {OLDER}") and reason in outcome, outcome
    assert swapped == [] and reloader.model is model
    assert reloads("refused") == refused_before + 1
    assert reloader.refresh() is None and reloads("refused") == refused_before + 1  # not retried

    loaded_before = reloads("loaded")
    publish_like(model_dir, model, NEWER, ordinal=model.manifest.ordinal + 1)
    assert reloader.refresh() == f"loaded {NEWER}"
    assert [m.version for m in swapped] == [NEWER] and reloader.model is swapped[0]
    assert reloads("loaded") == loaded_before + 1


def test_a_corrupted_version_is_refused(served):
    model_dir, model = served
    swapped = []
    reloader = SourceReloader(model_dir, model, swapped.append)
    publish_like(model_dir, model, OLDER)
    with open(model_dir / "source" / OLDER / "model.pt", "r+b") as fh:
        fh.truncate(100)
    outcome = reloader.refresh()
    assert "sha256 mismatch" in outcome and swapped == []
    (model_dir / "source" / OLDER / "manifest.json").write_text("{not json")
    assert reloader.refresh() is None  # the same path: not retried
    publish_like(model_dir, model, NEWER, ordinal=model.manifest.ordinal + 1)
    (model_dir / "source" / NEWER / "manifest.json").write_text("{not json")
    assert "not valid JSON" in reloader.refresh() and swapped == []
