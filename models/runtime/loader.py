"""Loading exported models and the serving interface the ranking and source services call.

    model = load_ranking_model(latest_version(model_dir, "iat"), runtime="torchscript")
    probs = model.score(history, request_time_ms, cat, multi, num)     # [C, T], history encoded once
    prepared = model.prepare(history, request_time_ms)                 # or in two steps, the first
    probs = model.score_prepared(prepared, request_time_ms, cat, multi, num)  # reusable (history cache)

    source = load_source_model(latest_version(model_dir, "source"))
    insemb, codes = source.embed(cat, multi, num, item_hashes, timestamps_ms, histories)

Runtimes: ``torchscript`` (model.pt), ``aoti`` (model.pt2, AOTInductor) and ``eager``
(config.json + weights.pt, ``torch.load(weights_only=True)``); all run the same serving module of
``models.runtime.modules`` and agree within 1e-5. Every file a runtime reads is sha256-checked against
manifest.json BEFORE it is deserialised. Device: CUDA when present, else CPU (``auto``).
TorchScript and eager load on any device (the exported graphs hold no device); an AOTInductor
package runs only on the device type, and GPU architecture, it was compiled for.

``models.training.offline.offline_scores`` is what the trained eager model predicts for dataset rows with histories built
offline (``PreparedData.history_index``); the ranking service, fed the same instances through the
store, must reproduce it (the no-skew test). Histories are ``contract.history.History``, the type the store returns.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.artifacts import (
    AOTI_FILE,
    CONFIG_FILE,
    MANIFEST,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    Manifest,
    latest_version,
    read_json,
    verify,
)
from contract.history import History
from contract.inputs import MIN_DYNAMIC
from models.nn.downstream import N_GAP_BUCKETS
from models.runtime.device import cuda_arch, resolve_device
from models.runtime.featurizer import FeatureSpec, Featurizer
from models.runtime.modules import build_module, stack_user_states

# TorchScript is deprecated in torch 2.13 and says so on every trace/save/load; the path is kept
# on purpose (the design card's format), so exactly those messages are silenced, once, wherever
# artifacts are exported (models.export) or loaded (here).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

RUNTIMES = ("torchscript", "aoti", "eager")
RUNTIME_FILES = {"torchscript": [TORCHSCRIPT_FILE], "aoti": [AOTI_FILE], "eager": [CONFIG_FILE, WEIGHTS_FILE]}

__all__ = [
    "RUNTIMES",
    "ArtifactError",
    "History",
    "PreparedHistory",
    "RankingModel",
    "SourceModel",
    "latest_version",
    "load_ranking_model",
    "load_source_model",
]


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
    if manifest.kind not in kinds:
        raise ArtifactError(f"{version_dir / MANIFEST}: key 'kind' is {manifest.kind!r}, expected one of {kinds}")
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


def _held_in_cpp(tensors) -> "torch.ScriptList":
    """A C++ list holding one more reference to each tensor, kept alive across a forward.

    torch keeps a tensor's Python object alive while C++ code holds the tensor too (in
    c10/util/intrusive_ptr.h the count's 1 <-> 2 transitions incref and decref the PyObject),
    and that decref takes the GIL. So every tensor passed from Python into a TorchScript call
    took the GIL once more when the interpreter let go of it, inside the call, where the GIL had
    been released: in the ranking service the event loop's thread holds it most of the time,
    and a forward waited for it once per input. With this second reference, held outside the
    call, the count never falls to 1 in there."""
    return torch.jit.script(list(tensors))


def _call_held(fn, *tensors):
    """``fn(*tensors)`` (a TorchScript runner or method) with the tensors held in C++ for the call."""
    held = _held_in_cpp(tensors)  # noqa: F841 - alive until fn returns
    return fn(*tensors)


def _age_buckets(request: np.ndarray, ts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The age buckets a user state was encoded at (its reuse key): ``gap_bucket``'s arithmetic
    in numpy, so that the key takes no GIL round trip (see _held_in_cpp: every torch op called
    from Python lets go of the GIL and takes it back). The same float64 steps give the same
    buckets: with integer-ms times 1 + hours is a power of two exactly (log2 exact in both) or
    at least 1 ms (2.8e-7 hours) away from one, which leaves log2 at least 13 last-bit steps from
    the integer even at the top bucket (2^23 hours), beyond either log2's error (tested at every edge)."""
    hist = np.where(mask, ts, request)
    hours = np.maximum(request[:, None] - hist, 0).astype(np.float64) / 3.6e6
    return np.clip(np.floor(np.log2(1.0 + hours)).astype(np.int64), 0, N_GAP_BUCKETS - 1)


def _to_numpy(probs: torch.Tensor) -> np.ndarray:
    """float32 numpy of a result, without ``.float().cpu()`` (two more GIL round trips) when it
    is float32 on the CPU already."""
    if probs.dtype != torch.float32 or probs.device.type != "cpu":
        probs = probs.float().cpu()
    return probs.numpy()


class _Loaded:
    name: str
    version: str
    runtime: str
    device: torch.device
    manifest: Manifest
    featurizer: Featurizer

    def _init_common(self, version_dir, manifest, device, runner, runtime):
        self.path = version_dir
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.runtime, self.device, self._runner = runtime, device, runner
        self.tasks = list(manifest.tasks)
        self.embedding_dim = manifest.embedding_dim
        self.code_length = manifest.code_length
        self.feature_spec = FeatureSpec.from_json(manifest.schema_)
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
            return _call_held(self._runner, *(self._tensor(a) for a in arrays))


@dataclass(eq=False)
class PreparedHistory:
    """One user's history as the model reads it (``RankingModel.prepare``): truncated, capped
    and padded arrays, kept so that a request for the same stored history can skip that work.

    ``state`` holds the last user state encoded from it (runtimes with ``user_state``): the
    age buckets it was encoded at, and its tensors. A later request time reuses it while the
    buckets are the same, and replaces it when they moved."""

    arrays: tuple[np.ndarray, ...]
    length: int
    request_time_ms: int
    state: tuple[bytes, tuple[torch.Tensor, ...]] | None = None

    @property
    def nbytes(self) -> int:
        state = self.state[1] if self.state is not None else ()
        return sum(a.nbytes for a in self.arrays) + sum(t.element_size() * t.nelement() for t in state)


class RankingModel(_Loaded):
    """A loaded, sha-checked ranking model (``iat`` or ``sif``)."""

    def __init__(self, version_dir, manifest, device, runner, runtime):
        self._init_common(version_dir, manifest, device, runner, runtime)
        self.kind = manifest.kind
        self.max_history = manifest.max_history
        self.source_version = manifest.source_version
        # The runner's user/candidate halves when it has them (the eager module, and TorchScript
        # exported with those methods; not AOTI): then a user state is encoded once per
        # history and age buckets, not once per request.
        self._split = runner if (self.kind == "iat" and hasattr(runner, "user_state")
                                 and hasattr(runner, "score_user")) else None

    @property
    def reuses_user_state(self) -> bool:
        return self._split is not None

    def _history(self, history: History, request_time_ms: int) -> tuple[np.ndarray, ...]:
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
        return int(self.manifest.codebook_size or 0)

    def prepare(self, history: History, request_time_ms: int) -> PreparedHistory:
        """The history's model inputs (validated, truncated before the request, capped, padded)."""
        arrays = self._history(history, int(request_time_ms))
        return PreparedHistory(arrays, int(arrays[-1].sum()), int(request_time_ms))

    def score(self, history: History, request_time_ms: int, cat: np.ndarray, multi: np.ndarray,
              num: np.ndarray) -> np.ndarray:
        """float32 probabilities [C, T]; the history is encoded once for all C candidates."""
        cat, multi, num = self._features(cat, multi, num)
        if cat.shape[0] == 0:
            return np.zeros((0, len(self.tasks)), dtype=np.float32)
        return self.score_prepared(self.prepare(history, request_time_ms), request_time_ms, cat, multi, num)

    def score_prepared(self, prepared: PreparedHistory, request_time_ms: int, cat: np.ndarray,
                       multi: np.ndarray, num: np.ndarray) -> np.ndarray:
        """``score`` of a ``prepare``d history, for any request time whose history read returned
        the same records (all strictly earlier than both request times, so the truncation keeps
        them all); the age buckets are recomputed here for ``request_time_ms``."""
        cat, multi, num = self._features(cat, multi, num)
        c = cat.shape[0]
        if c == 0:
            return np.zeros((0, len(self.tasks)), dtype=np.float32)
        request = np.array([request_time_ms], dtype=np.int64)
        cands = [_pad_rows(a, MIN_DYNAMIC) for a in (cat, multi, num)]
        if self._split is None:
            probs = self._run(*prepared.arrays, request, *cands)
        else:
            with torch.inference_mode():
                state = self._user_state(prepared, request)
                probs = _call_held(self._split.score_user, *state, *(self._tensor(a) for a in cands))
        return _to_numpy(probs[:c])

    @property
    def batches_requests(self) -> bool:
        """Whether the runner scores several requests' candidates in one forward (``score_users``:
        the eager module, and TorchScript exported with it; older artifacts and AOTI do not)."""
        return self._split is not None and hasattr(self._split, "score_users")

    def score_batch(self, requests: list[tuple[PreparedHistory, int, np.ndarray, np.ndarray, np.ndarray]]
                    ) -> list[np.ndarray | Exception]:
        """``score_prepared`` of several requests (prepared history, request time, cat, multi, num),
        their candidates in one forward where the runner has ``score_users``, each request's
        user state encoded (or reused) as in ``score_prepared``. One entry per request, in order:
        its probabilities [C_i, T], or the exception that request alone raised: a bad request
        never fails the others (a failed batched forward is retried request by request)."""
        out: list = [None] * len(requests)
        ready = []  # (index, user state, cat, multi, num) of the requests that go in the batch
        with torch.inference_mode():
            for i, (prepared, t, cat, multi, num) in enumerate(requests):
                try:
                    cat, multi, num = self._features(cat, multi, num)
                    if cat.shape[0] == 0 or not self.batches_requests:
                        out[i] = self.score_prepared(prepared, t, cat, multi, num)
                    else:
                        state = self._user_state(prepared, np.array([t], dtype=np.int64))
                        ready.append((i, state, cat, multi, num))
                except Exception as exc:  # noqa: BLE001 - handed back to that request alone
                    out[i] = exc
            if len(ready) == 1:
                i = ready[0][0]
                out[i] = self._score_one(requests[i])
            elif ready:
                try:
                    counts = [r[2].shape[0] for r in ready]
                    stacked, slots, pad_index = stack_user_states([r[1] for r in ready], counts)
                    cands = [self._tensor(np.concatenate([r[k] for r in ready])) for k in (2, 3, 4)]
                    probs = _to_numpy(_call_held(self._split.score_users, *stacked, slots.to(self.device),
                                                 pad_index.to(self.device), *cands))
                    for (i, *_), start, c in zip(ready, np.cumsum([0, *counts[:-1]]), counts):
                        out[i] = probs[start:start + c]
                except Exception:  # noqa: BLE001 - the requests alone say which one fails
                    for i, *_ in ready:
                        out[i] = self._score_one(requests[i])
        return out

    def _score_one(self, request) -> np.ndarray | Exception:
        try:
            return self.score_prepared(*request)
        except Exception as exc:  # noqa: BLE001 - handed back to that request alone
            return exc

    def _user_state(self, prepared: PreparedHistory, request: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The encoded user side, reused while the history's age buckets stay the same (the only
        way the request time enters it)."""
        _, _, ts, _, mask = prepared.arrays
        buckets = _age_buckets(request, ts, mask).tobytes()
        cached = prepared.state
        if cached is not None and cached[0] == buckets:
            return cached[1]
        state = tuple(_call_held(self._split.user_state, *(self._tensor(a) for a in (*prepared.arrays, request))))
        prepared.state = (buckets, state)  # one tuple assignment: a concurrent reader sees old or new
        return state

    def warmup(self, rounds: int = 3) -> None:
        """A few calls at typical shapes (first calls allocate and, for TorchScript, optimise)."""
        rng = np.random.default_rng(0)
        n_cat, n_multi, m, n_num = self._widths
        buckets = self.feature_spec.n_buckets
        for n, c in ((0, 1), (min(self.max_history, 64), 100), (self.max_history, 500)):
            hist = History(
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
        self.code_dtype = np.dtype(manifest.code_dtype)
        self.history_length = manifest.max_history
        self._item_column = self.feature_spec.cat_fields.index(self.feature_spec.item_field)

    def embed(self, cat, multi, num, item_hashes: np.ndarray, timestamps_ms: np.ndarray,
              history: list[History] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
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

    def warmup(self, rounds: int = 3) -> None:
        """A few batches at typical sizes, full histories (first calls allocate and, for
        TorchScript, optimise): a version swapped in while serving starts warm."""
        rng = np.random.default_rng(0)
        n_cat, n_multi, m, n_num = self._widths
        for b in (1, 64, 512):
            cat = rng.integers(0, self.feature_spec.n_buckets, (b, n_cat))
            ts = np.full(b, 10_000_000, dtype=np.int64)
            history = [History.items_only(np.arange(self.history_length, dtype=np.int64)[::-1] + 1_000,
                                          rng.integers(0, self.feature_spec.n_buckets, self.history_length))] * b
            for _ in range(rounds):
                self.embed(cat, np.full((b, n_multi, m), -1), np.zeros((b, n_num), np.float32),
                           cat[:, self._item_column], ts, history if self.history_length else None)


def load_source_model(path: str | Path, runtime: str = "torchscript", device: str = "auto") -> SourceModel:
    return SourceModel(*_open(path, runtime, device, ("source",)), runtime)


# ---------------------------------------------------------------- offline reference


