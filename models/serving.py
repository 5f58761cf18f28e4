"""Loading exported models and the serving interface the ranking and source services call.

    model = load_ranking_model(latest_version(model_dir, "iat"), runtime="torchscript")
    probs = model.score(history, request_time_ms, cat, multi, num)     # [C, T], history encoded once

    source = load_source_model(latest_version(model_dir, "source"))
    insemb, codes = source.embed(cat, multi, num, item_hashes, timestamps_ms, histories)

Runtimes: ``torchscript`` (model.pt), ``aoti`` (model.pt2, AOTInductor) and ``eager``
(config.json + weights.pt, ``torch.load(weights_only=True)``); all run the same serving module of
``models.export`` and agree within 1e-5. Every file a runtime reads is sha256-checked against
manifest.json BEFORE it is deserialised. Device: CUDA when present, else CPU (``auto``).
TorchScript and eager load on any device (the exported graphs hold no device); an AOTInductor
package runs only on the device type, and GPU architecture, it was compiled for.

``offline_scores`` is what the trained eager model predicts for dataset rows with histories built
offline (``PreparedData.history_index``); the ranking service, fed the same instances through the
store, must reproduce it (the no-skew test). ``models/`` does not import ``storage/``:
``HistoryInputs`` holds the same arrays as ``storage.instance_store.History``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.artifacts import (AOTI_FILE, CONFIG_FILE, MANIFEST, RUN_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE,
                              ArtifactError, latest_version, read_json, verify)
from models.export import MIN_DYNAMIC, build_module, cuda_arch, resolve_device
from models.featurizer import Featurizer, FeatureSpec

RUNTIMES = ("torchscript", "aoti", "eager")
RUNTIME_FILES = {"torchscript": [TORCHSCRIPT_FILE], "aoti": [AOTI_FILE], "eager": [CONFIG_FILE, WEIGHTS_FILE]}

__all__ = ["ArtifactError", "HistoryInputs", "RankingModel", "SourceModel", "RUNTIMES",
           "latest_version", "load_ranking_model", "load_source_model", "offline_scores"]


@dataclass
class HistoryInputs:
    """One user's history, newest first: exactly the arrays ``storage.History`` holds."""

    embeddings: np.ndarray      # float32 [n, d]
    labels: np.ndarray          # int8 [n, T], -1 = unknown
    item_hashes: np.ndarray     # int64 [n]
    timestamps_ms: np.ndarray   # int64 [n]
    codes: np.ndarray | None    # uint8/uint16 [n, m]

    @classmethod
    def empty(cls, d: int, n_tasks: int, code_length: int = 0) -> "HistoryInputs":
        return cls(np.zeros((0, d), np.float32), np.zeros((0, n_tasks), np.int8), np.zeros(0, np.int64),
                   np.zeros(0, np.int64), np.zeros((0, code_length), np.uint8) if code_length else None)

    def __len__(self) -> int:
        return int(self.timestamps_ms.shape[0])


def aoti_mismatch(manifest: dict, device: torch.device, arch: str | None) -> str | None:
    """Why an AOTInductor package cannot run on ``device`` (a GPU of compute capability
    ``arch``), or None when it can: a package holds compiled kernels for one device type and,
    on CUDA, one GPU architecture."""
    built_for = manifest.get("aoti_device", "cpu")
    if built_for != device.type:
        return f"compiled for {built_for}, cannot run on {device.type}"
    built_arch = manifest.get("aoti_cuda_arch")
    if device.type == "cuda" and built_arch and arch and built_arch != arch:
        return (f"compiled for a {built_arch} GPU ({manifest.get('aoti_gpu', '?')}), "
                f"this GPU is {arch}")
    return None


def _load_runner(version_dir: Path, runtime: str, device: torch.device, manifest: dict):
    """The callable of one runtime; files were sha-checked by the caller."""
    if runtime == "eager":
        config = read_json(version_dir / CONFIG_FILE, "config.json")
        module = build_module(config)
        state = torch.load(version_dir / WEIGHTS_FILE, map_location=device, weights_only=True)
        module.load_state_dict(state)
        return module.to(device).eval()
    if runtime == "torchscript":
        return torch.jit.load(str(version_dir / TORCHSCRIPT_FILE), map_location=device).eval()
    why = aoti_mismatch(manifest, device, cuda_arch(device) if device.type == "cuda" else None)
    if why:
        raise ArtifactError(f"{version_dir / AOTI_FILE}: {why} (export again where it will run: "
                            f"`iat export --device {device.type}`, or use runtime torchscript/eager)")
    return torch._inductor.aoti_load_package(str(version_dir / AOTI_FILE),
                                             device_index=device.index if device.index is not None else -1)


def _open(path: str | Path, runtime: str, device: str, kinds: tuple[str, ...]):
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: must be one of {RUNTIMES}, got {runtime!r}")
    version_dir = Path(path)
    if not version_dir.is_dir():
        raise ArtifactError(f"{version_dir}: model version directory not found")
    manifest = verify(version_dir, RUNTIME_FILES[runtime])  # sha256 BEFORE any load
    if manifest["kind"] not in kinds:
        raise ArtifactError(f"{version_dir / MANIFEST}: key 'kind' is {manifest['kind']!r}, expected one of {kinds}")
    dev = resolve_device(device)
    return version_dir, manifest, dev, _load_runner(version_dir, runtime, dev, manifest)


def _array(value, name: str, dtype, ndim: int, width: int | None = None, rows: int | None = None) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{name}: expected {width} columns, got shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got {arr.shape[0]}")
    if np.dtype(dtype).kind in "iu" and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got {arr.dtype}")
    if np.dtype(dtype).kind == "f" and arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected numbers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _pad_rows(arr: np.ndarray, n: int) -> np.ndarray:
    """Repeat the first row up to n rows (runtimes need at least MIN_DYNAMIC rows)."""
    if arr.shape[0] >= n:
        return arr
    return np.concatenate([arr, np.repeat(arr[:1], n - arr.shape[0], axis=0)])


class _Loaded:
    name: str
    version: str
    runtime: str
    device: torch.device
    manifest: dict
    featurizer: Featurizer

    def _init_common(self, version_dir, manifest, device, runner, runtime):
        self.path = version_dir
        self.manifest = manifest
        self.name, self.version = manifest["name"], manifest["version"]
        self.runtime, self.device, self._runner = runtime, device, runner
        self.tasks = list(manifest["tasks"])
        self.embedding_dim = int(manifest["embedding_dim"])
        self.code_length = int(manifest.get("code_length", 0))
        self.feature_spec = FeatureSpec.from_json(manifest["schema"])
        self.featurizer = Featurizer(self.feature_spec)
        spec = self.feature_spec
        self._widths = (len(spec.cat_fields), len(spec.multi_fields), spec.max_multi, len(spec.num_fields))

    def _features(self, cat, multi, num, rows: int | None = None):
        n_cat, n_multi, m, n_num = self._widths
        cat = _array(cat, "cat", np.int64, 2, n_cat, rows)
        multi = _array(multi, "multi", np.int64, 3, n_multi, cat.shape[0])
        if multi.shape[2] != m:
            raise ValueError(f"multi: expected {m} values per field, got shape {multi.shape}")
        num = _array(num, "num", np.float32, 2, n_num, cat.shape[0])
        return cat, multi, num

    def _tensor(self, arr: np.ndarray) -> torch.Tensor:
        """Once per array per request. On CUDA from pinned memory, without blocking, so the
        copies of a request's arrays overlap; on CPU the array itself, no copy."""
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _run(self, *arrays):
        with torch.inference_mode():
            return self._runner(*(self._tensor(a) for a in arrays))


class RankingModel(_Loaded):
    """A loaded, sha-checked ranking model (``iat`` or ``sif``)."""

    def __init__(self, version_dir, manifest, device, runner, runtime):
        self._init_common(version_dir, manifest, device, runner, runtime)
        self.kind = manifest["kind"]
        self.max_history = int(manifest["max_history"])
        self.source_version = manifest["source_version"]

    def _history(self, history: HistoryInputs, request_time_ms: int) -> tuple[np.ndarray, ...]:
        """Truncation: strictly before the request, newest first, at most max_history; padded
        to MIN_DYNAMIC slots (mask False)."""
        ts = _array(history.timestamps_ms, "history.timestamps_ms", np.int64, 1)
        n_all = ts.shape[0]
        labels = _array(history.labels, "history.labels", np.int64, 2, len(self.tasks), n_all)
        keep = np.flatnonzero(ts < request_time_ms)[: self.max_history]
        n = len(keep)
        width = max(n, MIN_DYNAMIC)
        mask = np.zeros(width, dtype=bool)
        mask[:n] = True

        def padded(arr: np.ndarray, fill=0) -> np.ndarray:
            out = np.full((width, *arr.shape[1:]), fill, dtype=arr.dtype)
            out[:n] = arr[keep]
            return out

        if self.kind == "iat":
            emb = _array(history.embeddings, "history.embeddings", np.float32, 2, self.embedding_dim, n_all)
            items = _array(history.item_hashes, "history.item_hashes", np.int64, 1, None, n_all)
            return (padded(emb), padded(labels, -1), padded(ts, request_time_ms), padded(items, -1), mask)
        if history.codes is None:
            if n_all:
                raise ValueError("history.codes: this SIF model needs the stored codes, got None")
            codes = np.zeros((0, self.code_length), dtype=np.int64)
        else:
            codes = _array(history.codes, "history.codes", np.int64, 2, self.code_length, n_all)
        if codes.size and (codes.min() < 0 or codes.max() >= self._codebook_size):
            raise ValueError(f"history.codes: indices must lie in [0, {self._codebook_size})")
        return (padded(codes), padded(labels, -1), padded(ts, request_time_ms), mask)

    @property
    def _codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    def score(self, history: HistoryInputs, request_time_ms: int, cat: np.ndarray, multi: np.ndarray,
              num: np.ndarray) -> np.ndarray:
        """float32 probabilities [C, T]; the history is encoded once for all C candidates."""
        cat, multi, num = self._features(cat, multi, num)
        c = cat.shape[0]
        if c == 0:
            return np.zeros((0, len(self.tasks)), dtype=np.float32)
        hist = self._history(history, int(request_time_ms))
        request = np.array([request_time_ms], dtype=np.int64)
        cands = [_pad_rows(a, MIN_DYNAMIC) for a in (cat, multi, num)]
        probs = self._run(*hist, request, *cands)
        return probs[:c].float().cpu().numpy()

    def warmup(self, rounds: int = 3) -> None:
        """A few calls at typical shapes (first calls allocate and, for TorchScript, optimise)."""
        rng = np.random.default_rng(0)
        n_cat, n_multi, m, n_num = self._widths
        buckets = self.feature_spec.n_buckets
        for n, c in ((0, 1), (min(self.max_history, 64), 100), (self.max_history, 500)):
            hist = HistoryInputs(
                rng.standard_normal((n, self.embedding_dim)).astype(np.float32),
                rng.integers(-1, 2, (n, len(self.tasks))).astype(np.int8),
                rng.integers(0, buckets, n), np.arange(n, dtype=np.int64)[::-1] + 1_000,
                rng.integers(0, self._codebook_size if self.kind == "sif" else 1, (n, self.code_length))
                .astype(np.uint16) if self.kind == "sif" else None)
            for _ in range(rounds):
                self.score(hist, 10_000_000, rng.integers(0, buckets, (c, n_cat)),
                           np.full((c, n_multi, m), -1), np.zeros((c, n_num), np.float32))


def load_ranking_model(path: str | Path, runtime: str = "torchscript", device: str = "auto") -> RankingModel:
    """``path`` = a version dir (``MODEL_DIR/iat/<version>``); sha256 checked before any load."""
    return RankingModel(*_open(path, runtime, device, ("iat", "sif")), runtime)


class SourceModel(_Loaded):
    """Instances -> (InsEmb float32 [B, d], SIF codes [B, m])."""

    def __init__(self, version_dir, manifest, device, runner, runtime):
        self._init_common(version_dir, manifest, device, runner, runtime)
        self.code_dtype = np.dtype(manifest["code_dtype"])
        self.history_length = int(manifest["max_history"])
        self._item_column = self.feature_spec.cat_fields.index(self.feature_spec.item_field)

    def embed(self, cat, multi, num, item_hashes: np.ndarray, timestamps_ms: np.ndarray,
              history: list[HistoryInputs] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``history[i]``: instance i's user history (newest first; only item hashes and
        timestamps are read: the behaviour sequence = item hashes of the last ``history_length``
        instances strictly before ``timestamps_ms[i]``)."""
        cat, multi, num = self._features(cat, multi, num)
        b = cat.shape[0]
        items = _array(item_hashes, "item_hashes", np.int64, 1, None, b)
        ts = _array(timestamps_ms, "timestamps_ms", np.int64, 1, None, b)
        if b and not np.array_equal(items, cat[:, self._item_column]):
            raise ValueError(f"item_hashes: differ from cat column {self._item_column} "
                             f"({self.feature_spec.item_field}) of the same instances")
        if history is not None and len(history) != b:
            raise ValueError(f"history: expected {b} entries (one per instance), got {len(history)}")
        if b == 0:
            return np.zeros((0, self.embedding_dim), np.float32), np.zeros((0, self.code_length), self.code_dtype)
        seq = np.full((b, self.history_length), -1, dtype=np.int64)
        for i, h in enumerate(history or ()):
            h_ts = _array(h.timestamps_ms, f"history[{i}].timestamps_ms", np.int64, 1)
            h_items = _array(h.item_hashes, f"history[{i}].item_hashes", np.int64, 1, None, len(h_ts))
            earlier = h_items[h_ts < ts[i]][: self.history_length]
            seq[i, :len(earlier)] = earlier
        insemb, codes = self._run(*(_pad_rows(a, MIN_DYNAMIC) for a in (cat, multi, num, seq)))
        return insemb[:b].float().cpu().numpy(), codes[:b].cpu().numpy().astype(self.code_dtype)


def load_source_model(path: str | Path, runtime: str = "torchscript", device: str = "auto") -> SourceModel:
    return SourceModel(*_open(path, runtime, device, ("source",)), runtime)


# ---------------------------------------------------------------- offline reference

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
    from models.downstream import iat_batch
    from models.sif.history import gather_history
    from models.sif.rows import prepare_inputs
    from models.source import insembs

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
