"""Export pieces that need no trained model: SIF id compaction equals the training encoding,
manifests and sha256 checks, version ordering, and `iat bench model` end to end on a tiny grid."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from contract.artifacts import (
    ArtifactError,
    latest_version,
    new_version,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from models.data.synthetic import synthetic_data
    return synthetic_data(tmp_path_factory.mktemp("syn"), n_users=40, events_per_user=30)


def test_vocab_compaction_equals_sif_training_inputs(synthetic):
    from models.runtime.modules import SIFInputsEncoder, VocabCompactor
    from models.training.serving_set import sif_vocabularies
    from models.training.sif.rows import prepare_inputs
    data = synthetic
    vocab = sif_vocabularies(data)
    enc = SIFInputsEncoder(sum(map(len, vocab)), data.cat.shape[1], data.multi.shape[1], data.n_buckets)
    enc.compactor.load_state_dict(VocabCompactor.build(vocab, data.n_buckets).state_dict())
    want = prepare_inputs(data).inputs
    got = enc(torch.from_numpy(data.cat), torch.from_numpy(data.multi), torch.from_numpy(data.num))
    assert torch.equal(got.categorical, want.categorical)
    assert torch.equal(got.multi, want.multi)
    # every id seen MIN_COUNT times in train has its own row; rarer ones share row 0 with the
    # unseen ones (so row 0 is trained)
    from models.training.sif.rows import MIN_COUNT
    train_cat = data.cat[data.split_indices(0)]
    for j in range(train_cat.shape[1]):
        ids, counts = np.unique(train_cat[:, j], return_counts=True)
        frequent = np.isin(train_cat[:, j], ids[counts >= MIN_COUNT])
        assert (got.categorical[data.split_indices(0)][frequent, j] > 0).all()
        assert (got.categorical[data.split_indices(0)][~frequent, j] == 0).all()
    unseen = enc(torch.full((1, data.cat.shape[1]), data.n_buckets - 1), torch.from_numpy(data.multi[:1]),
                 torch.from_numpy(data.num[:1])).categorical
    assert (unseen <= 1).all()


def test_manifest_sha256_and_versions(tmp_path):
    version = tmp_path / "iat" / "20260101T000000-aaaaaaaa"
    version.mkdir(parents=True)
    (version / "weights.pt").write_bytes(b"abc")
    (version / "config.json").write_text("{}")
    keys = dict(name="iat", kind="iat", version=version.name, created="x", schema={}, embedding_dim=64,
                max_history=8, codec="fp32", tasks=["like"], source_version="s", inputs=[], outputs=[])
    write_manifest(version, keys)
    manifest = verify(version, ["weights.pt", "config.json"])
    assert manifest["files"]["weights.pt"] == sha256_file(version / "weights.pt")
    with pytest.raises(ArtifactError, match="does not list model.pt"):
        verify(version, ["model.pt"])
    (version / "weights.pt").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match=r"weights\.pt: sha256 mismatch"):
        verify(version, ["weights.pt"])
    with pytest.raises(ArtifactError, match="missing keys"):
        write_manifest(version, {"name": "iat"})
    (version / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(version)
    # versions sort by time; partial (staging) and manifest-less directories are never served
    newer = tmp_path / "iat" / new_version([version / "config.json"])
    newer.mkdir()
    (tmp_path / "iat" / ".29990101T000000-bbbbbbbb.partial").mkdir()
    assert latest_version(tmp_path, "iat") == version
    write_manifest(newer, {**keys, "version": newer.name})
    assert latest_version(tmp_path, "iat") == newer


def test_bench_model_runs_and_reports(tmp_path):
    from cli import main
    out = tmp_path / "model.json"
    rc = main(["bench", "model", "--json", str(out), "--runtimes", "eager,torchscript", "--candidates", "1,20",
               "--history", "0,16", "--budget", "0.02", "--max-reps", "10", "--work-dir", str(tmp_path / "w")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["max_abs_diff_between_runtimes"] < 1e-5   # shared == naive, eager == torchscript
    cells = {(r["model"], r["runtime"], r["candidates"], r["history"]) for r in res["results"]}
    assert ("shared", "torchscript", 20, 16) in cells and ("naive", "eager", 1, 0) in cells
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in res["results"])
    assert {s["runtime"] for s in res["speedups"]} == {"eager", "torchscript"}
