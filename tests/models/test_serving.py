"""Serving interface and runtimes on a small serving set trained once per session on real data
(the first 150 users of MovieLens-100K when IAT_DATA_DIR / ../shared/data has it, else the
synthetic generator): every runtime equals eager, the service path equals the offline training
path (no skew), truncation, input errors, sha256 checks. The AOTInductor parity test uses the
three packages the session compiles once (tests/models/conftest.py) and is marked slow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contract.history import History
from models.runtime.loader import SourceModel

HISTORY_LEN = 32   # the IAT model's L in the serving_run fixture (tests/models/conftest.py)


def features(data, rows):
    rows = np.asarray(rows)
    return data.cat[rows], data.multi[rows], data.num[rows]


def user_timeline(data, user: int) -> np.ndarray:
    """All rows of one user, newest first (ties: later row first), as a store would return
    them before truncation."""
    rows = np.flatnonzero(data.user_index == user)
    return rows[np.lexsort((-rows, -data.ts_ms[rows]))]


def store_history(data, rows: np.ndarray, embeddings: dict[int, np.ndarray],
                  codes: dict[int, np.ndarray] | None = None) -> History:
    """The arrays the instance store keeps for ``rows`` (newest first)."""
    rows = np.asarray(rows, dtype=np.int64)
    emb = np.stack([embeddings[r] for r in rows]) if len(rows) else np.zeros((0, 64), np.float32)
    code = None
    if codes is not None:
        m = len(next(iter(codes.values())))
        code = np.stack([codes[r] for r in rows]) if len(rows) else np.zeros((0, m), np.uint8)
    return History(emb.astype(np.float32), data.labels[rows].astype(np.int8), data.item_hash[rows],
                         data.ts_ms[rows], code)


def source_outputs(source: SourceModel, data, rows) -> tuple[dict, dict]:
    """InsEmb and codes of each row as the source service would compute them (its behaviour
    sequence from the store's history: the user's earlier instances)."""
    rows = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
    histories = []
    for r in rows:
        timeline = user_timeline(data, data.user_index[r])
        histories.append(History(np.zeros((len(timeline), 0), np.float32),
                                       np.zeros((len(timeline), len(data.tasks)), np.int8),
                                       data.item_hash[timeline], data.ts_ms[timeline], None))
    cat, multi, num = features(data, rows)
    emb, codes = source.embed(cat, multi, num, data.item_hash[rows], data.ts_ms[rows], histories)
    return dict(zip(rows.tolist(), emb)), dict(zip(rows.tolist(), codes))


RUNTIMES_FAST = ("eager", "torchscript")


@pytest.fixture(scope="session")
def loaded(serving_run):
    from models.runtime.loader import load_ranking_model, load_source_model
    data, run_dir, model_dir, versions = serving_run
    return {rt: {"iat": load_ranking_model(versions["iat"], rt, "cpu"),
                 "sif": load_ranking_model(versions["sif"], rt, "cpu"),
                 "source": load_source_model(versions["source"], rt, "cpu")} for rt in RUNTIMES_FAST}


def pick_requests(data, max_history):
    """Test-split rows whose user has 0, 1 and >= max_history earlier instances."""
    counts = data.history_length()
    test = data.split_indices(2)
    out = {}
    for label, cond in (("empty", counts == 0), ("one", counts == 1), ("full", counts >= max_history + 3)):
        hits = np.flatnonzero(cond)
        pref = np.intersect1d(hits, test)
        out[label] = int((pref if len(pref) else hits)[0])
    return out


def service_inputs(data, source, request_row, n_candidates):
    """What the ranking service would hand the model: the user's stored timeline (all of it,
    later instances included; the model truncates) and the candidates' features."""
    timeline = user_timeline(data, data.user_index[request_row])
    emb, codes = source_outputs(source, data, timeline)
    history = store_history(data, timeline, emb, codes)
    cand = np.arange(n_candidates) % data.n
    cand[0] = request_row
    cat, multi, num = features(data, cand)
    cat = cat.copy()
    user_col = data.cat_fields.index(data.user_field)
    cat[:, user_col] = data.cat[request_row, user_col]
    return history, cat, multi, num


@pytest.mark.parametrize("name", ["iat", "sif"])
def test_runtimes_equal_eager_on_real_batches(serving_run, loaded, name):
    data = serving_run[0]
    eager = loaded["eager"][name]
    source = loaded["eager"]["source"]
    for label, row in pick_requests(data, eager.max_history).items():
        for n_cand in (1, 1000):
            history, cat, multi, num = service_inputs(data, source, row, n_cand)
            ref = eager.score(history, int(data.ts_ms[row]), cat, multi, num)
            assert ref.shape == (n_cand, len(data.tasks)) and ref.dtype == np.float32
            assert np.isfinite(ref).all() and (ref > 0).all() and (ref < 1).all()
            for rt in RUNTIMES_FAST[1:]:
                got = loaded[rt][name].score(history, int(data.ts_ms[row]), cat, multi, num)
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{name} {rt} {label} C={n_cand}")


def test_source_runtimes_equal_eager(serving_run, loaded):
    data = serving_run[0]
    rows = np.arange(0, data.n, max(1, data.n // 300))
    e_ref, c_ref = source_outputs(loaded["eager"]["source"], data, rows)
    e_ts, c_ts = source_outputs(loaded["torchscript"]["source"], data, rows)
    for r in e_ref:
        np.testing.assert_allclose(e_ts[r], e_ref[r], atol=1e-5, rtol=0)
        assert np.array_equal(c_ts[r], c_ref[r])
    src = loaded["eager"]["source"]
    assert c_ref[rows[0]].dtype == src.code_dtype and len(c_ref[rows[0]]) == src.code_length


@pytest.mark.parametrize("name", ["iat", "sif"])
def test_service_path_reproduces_offline_scores(serving_run, loaded, name):
    """No skew: InsEmbs/codes from the source model, histories as the store keeps them,
    truncated by the model -> the offline (training code path) predictions within 1e-5."""
    from models.training.offline import offline_scores
    data, run_dir, model_dir = serving_run[:3]
    rows = data.split_indices(2)[:40]
    rows = np.unique(np.concatenate([rows, list(pick_requests(data, 32).values())]))
    want = offline_scores(run_dir, data, rows, name=name)
    assert np.array_equal(want, offline_scores(model_dir, data, rows, name=name))  # run dir == exported
    for rt in RUNTIMES_FAST:
        got = np.concatenate([loaded[rt][name].score(*service_inputs(data, loaded[rt]["source"], r, 1)[:1],
                                                     int(data.ts_ms[r]), *features(data, [r]))
                              for r in rows])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{name} {rt}")


def test_history_changes_the_score_and_only_the_past_counts(serving_run, loaded):
    data = serving_run[0]
    model, source = loaded["torchscript"]["iat"], loaded["torchscript"]["source"]
    row = pick_requests(data, model.max_history)["full"]
    history, cat, multi, num = service_inputs(data, source, row, 5)
    t = int(data.ts_ms[row])
    with_hist = model.score(history, t, cat, multi, num)
    empty = History.empty(model.embedding_dim, len(model.tasks))
    assert np.abs(model.score(empty, t, cat, multi, num) - with_hist).max() > 1e-4
    past = history.timestamps_ms < t
    only_past = History(history.embeddings[past], history.labels[past], history.item_hashes[past],
                              history.timestamps_ms[past], None)
    assert np.array_equal(model.score(only_past, t, cat, multi, num), with_hist)
    capped = History(*(a[:model.max_history] for a in (only_past.embeddings, only_past.labels,
                                                             only_past.item_hashes, only_past.timestamps_ms)), None)
    assert np.array_equal(model.score(capped, t, cat, multi, num), with_hist)
    # candidates are independent of each other: one alone scores as in a batch
    np.testing.assert_allclose(model.score(history, t, cat[2:3], multi[2:3], num[2:3]), with_hist[2:3], atol=1e-6)
    assert model.score(history, t, cat[:0], multi[:0], num[:0]).shape == (0, len(model.tasks))


def test_shared_history_equals_naive_reencoding(serving_run):
    from harness.naive import IATNaive
    from models.export import example_inputs
    from models.training.offline import _eager_module
    shared = _eager_module(serving_run[1], "iat")
    naive = IATNaive(shared.config).eval()
    naive.load_state_dict(shared.state_dict())
    inputs = example_inputs(shared, n_history=9, n_candidates=17)
    with torch.no_grad():
        torch.testing.assert_close(naive(*inputs), shared(*inputs), atol=1e-5, rtol=0)


def test_bad_inputs_name_the_field(serving_run, loaded):
    data = serving_run[0]
    model = loaded["eager"]["iat"]
    history, cat, multi, num = service_inputs(data, loaded["eager"]["source"], 0, 3)
    with pytest.raises(ValueError, match="cat"):
        model.score(history, 0, cat[:, :-1], multi, num)
    with pytest.raises(ValueError, match="history.embeddings"):
        bad = History(history.embeddings[:, :5], history.labels, history.item_hashes, history.timestamps_ms, None)
        model.score(bad, int(data.ts_ms[-1]) + 1, cat, multi, num)
    with pytest.raises(ValueError, match="history.codes"):
        loaded["eager"]["sif"].score(History(history.embeddings, history.labels, history.item_hashes,
                                                   history.timestamps_ms, None), int(data.ts_ms[-1]) + 1, cat, multi, num)
    src = loaded["eager"]["source"]
    with pytest.raises(ValueError, match="item_hashes"):
        src.embed(cat, multi, num, data.item_hash[:3] + 1, data.ts_ms[:3])


def test_manifest_contract(serving_run):
    from contract.artifacts import REQUIRED_KEYS, read_manifest, sha256_file
    data, run_dir, model_dir, versions = serving_run
    manifests = {n: read_manifest(p) for n, p in versions.items()}
    for name, m in manifests.items():
        assert set(REQUIRED_KEYS) <= set(m.to_json()) and m["name"] == name and m["version"] == versions[name].name
        assert m["files"] == {f: sha256_file(versions[name] / f) for f in m["files"]}
        assert {"model.pt", "weights.pt", "config.json"} <= set(m["files"])
        assert m["schema"]["cat_fields"] == data.cat_fields and m["tasks"] == data.tasks
        assert [i["name"] for i in m["inputs"]][-3:] == (["cat", "multi", "num"] if name != "source"
                                                         else ["multi", "num", "seq_items"])
    assert manifests["iat"]["source_version"] == manifests["source"]["version"]
    assert manifests["sif"]["source_version"] == manifests["source"]["version"]
    assert manifests["iat"]["max_history"] == HISTORY_LEN and manifests["iat"]["embedding_dim"] == 64
    assert manifests["sif"]["code_length"] == manifests["source"]["code_length"] > 0


def test_sha256_checked_before_loading(serving_run, tmp_path):
    import shutil

    from models.runtime.loader import ArtifactError, load_ranking_model
    src = serving_run[3]["iat"]
    copy = tmp_path / "iat" / src.name
    shutil.copytree(src, copy)
    with (copy / "model.pt").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model\.pt: sha256 mismatch"):
        load_ranking_model(copy, "torchscript")
    load_ranking_model(copy, "eager", "cpu")  # its own files are intact
    (copy / "weights.pt").write_bytes(b"not a state dict")
    with pytest.raises(ArtifactError, match=r"weights\.pt: sha256 mismatch"):
        load_ranking_model(copy, "eager")
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        load_ranking_model(copy, "eager")
    with pytest.raises(ValueError, match="runtime"):
        load_ranking_model(src, "onnx")


def test_export_cli_and_latest_version(serving_run, tmp_path):
    from cli import main
    from models.runtime.loader import latest_version
    run_dir = serving_run[1]
    assert main(["export", "--from", str(run_dir), "--out", str(tmp_path), "--no-aoti"]) == 0
    first = latest_version(tmp_path, "iat")
    assert first is not None and (first / "model.pt").is_file() and not (first / "model.pt2").exists()
    newer = first.parent / "29991231T000000-abcdef12"
    import shutil
    shutil.copytree(first, newer)
    assert latest_version(tmp_path, "iat") == newer
    assert latest_version(tmp_path, "nope") is None
    assert main(["export", "--from", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_export_for_cuda_without_a_gpu_is_refused_by_name(serving_run, tmp_path, capsys):
    from cli import main
    assert main(["export", "--from", str(serving_run[1]), "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "sees no CUDA device" in err
    assert main(["export", "--from", str(serving_run[1]), "--out", str(tmp_path), "--device", "tpu"]) == 2
    assert "expected cpu, cuda" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_aoti_package_for_another_device_is_refused_at_load(serving_run, tmp_path):
    """A package compiled for CUDA (or another GPU architecture) is refused by name before it is
    deserialised; the check itself needs no GPU."""
    import shutil

    from contract.artifacts import read_manifest, write_manifest
    from models.runtime.loader import ArtifactError, aoti_mismatch, load_ranking_model
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert aoti_mismatch({"aoti_device": "cpu"}, cpu, None) is None
    assert aoti_mismatch({"aoti_device": "cpu"}, cuda, "sm_90") == "compiled for cpu, cannot run on cuda"
    built = {"aoti_device": "cuda", "aoti_cuda_arch": "sm_80", "aoti_gpu": "NVIDIA A100"}
    assert aoti_mismatch(built, cuda, "sm_80") is None
    assert "sm_80 GPU (NVIDIA A100), this GPU is sm_90" in aoti_mismatch(built, cuda, "sm_90")
    copy = tmp_path / "iat" / serving_run[3]["iat"].name
    shutil.copytree(serving_run[3]["iat"], copy)
    (copy / "model.pt2").write_bytes(b"a package compiled elsewhere")
    manifest = read_manifest(copy)
    raw = manifest.to_json()
    write_manifest(copy, {**raw, **built, "runtimes": {**raw["runtimes"], "aoti": "model.pt2"}})
    with pytest.raises(ArtifactError, match=r"model\.pt2: compiled for cuda, cannot run on cpu .*--device cpu"):
        load_ranking_model(copy, "aoti", "cpu")


def test_torchscript_deprecation_warnings_are_filtered(serving_run):
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('default');"
            "from models.runtime.loader import load_ranking_model;"
            f"load_ranking_model({str(serving_run[3]['iat'])!r}, 'torchscript', 'cpu')")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr, out.stderr


@pytest.mark.slow
def test_aoti_equals_eager_on_real_batches(serving_run, loaded, aoti_versions):
    """The three AOTInductor packages are compiled once per session (the aoti_versions fixture)."""
    from contract.artifacts import read_manifest
    from models.runtime.loader import load_ranking_model, load_source_model
    data = serving_run[0]
    versions = aoti_versions
    assert all(read_manifest(v)["aoti_device"] == "cpu" for v in versions.values())
    aoti = {"iat": load_ranking_model(versions["iat"], "aoti", "cpu"),
            "sif": load_ranking_model(versions["sif"], "aoti", "cpu"),
            "source": load_source_model(versions["source"], "aoti", "cpu")}
    source = loaded["eager"]["source"]
    for name in ("iat", "sif"):
        eager = loaded["eager"][name]
        for label, row in pick_requests(data, eager.max_history).items():
            for n_cand in (1, 1000):
                history, cat, multi, num = service_inputs(data, source, row, n_cand)
                ref = eager.score(history, int(data.ts_ms[row]), cat, multi, num)
                got = aoti[name].score(history, int(data.ts_ms[row]), cat, multi, num)
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{name} aoti {label} C={n_cand}")
    rows = np.arange(0, data.n, max(1, data.n // 200))
    e_ref, c_ref = source_outputs(source, data, rows)
    e_got, c_got = source_outputs(aoti["source"], data, rows)
    for r in e_ref:
        np.testing.assert_allclose(e_got[r], e_ref[r], atol=1e-5, rtol=0)
        assert np.array_equal(c_got[r], c_ref[r])


@pytest.mark.parametrize("name", ["iat", "sif"])
def test_unknown_labels_served_equal_offline(serving_run, loaded, name):
    """History labels of -1 (ingest had none yet) are their own value, the same in training
    code and in the served module: on requests whose histories miss labels (whole instances
    and single tasks) the served scores equal the offline ones within 1e-5, and differ from
    what the model gives when those labels are read as negatives."""
    from models.training.offline import offline_scores
    data, run_dir = serving_run[:2]
    rng = np.random.default_rng(3)
    labels = data.labels.copy()
    hidden = rng.random(data.n) < 0.3
    labels[hidden] = -1
    labels[(rng.random(data.n) < 0.3) & ~hidden, 0] = -1
    missing = data.with_arrays(labels=labels)
    hist = missing.history_index(HISTORY_LEN)
    has_unknown = ((hist >= 0) & (labels[np.clip(hist, 0, None)] < 0).any(-1)).any(1)
    rows = np.intersect1d(np.flatnonzero(has_unknown), data.split_indices(2))[:40]
    assert len(rows) >= 10
    want = offline_scores(run_dir, missing, rows, name=name)
    for rt in RUNTIMES_FAST:
        got = np.concatenate([loaded[rt][name].score(*service_inputs(missing, loaded[rt]["source"], r, 1)[:1],
                                                     int(data.ts_ms[r]), *features(data, [r]))
                              for r in rows])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{name} {rt}")
    as_negative = offline_scores(run_dir, data.with_arrays(labels=np.clip(labels, 0, None)), rows, name=name)
    assert np.abs(as_negative - want).max() > 1e-4
