"""Serving modules around the trained models, and their TorchScript / AOTInductor export.

Each serving module is a plain ``nn.Module`` whose ``forward`` takes tensors only (the
exported contract, listed in ``CONTRACTS``) and wraps the trained modules of
``models/downstream.py``, ``models/source.py`` and ``models/sif`` unchanged, so what serving
runs is what training ran:

- ``IATRanking``: one request's history (InsEmbs, past labels, timestamps, item hashes) and C
  candidates -> probabilities [C, T]. The history is encoded ONCE (``encode_history``) and every
  candidate attends to it (``IATDownstream.score``). ``IATNaive`` is the same model with the
  history re-encoded per candidate: the baseline of ``iat bench model``.
- ``SIFRanking``: the same for the SIF-Mixer over stored Token Samples (codes).
- ``SourceEncoder``: B instances -> (InsEmb [B, d] of the user-order source model, the InsEmb
  from BEFORE the SIT as stored; SIF codes [B, N_s * R] of the Sample Tokenizer, float64
  quantization as in ``SampleTokenizer.quantize``).

Shape rules the runtimes rely on (``models.serving`` enforces them): histories are padded to at
least ``MIN_DYNAMIC`` slots with mask False, candidate/instance batches to at least
``MIN_DYNAMIC`` rows; padding never changes a real row's output (masked keys get zero weight,
rows are independent).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.base import FeatureShape, ModelConfig
from models.downstream import IATDownstream, gap_bucket
from models.sif.mixer import SIFMixer, recency_bucket
from models.sif.rvq import ResidualVQ
from models.sif.spec import CategoricalField, FeatureGroup, SampleInputs, SampleSchema
from models.sif.subtokens import SubTokenEncoder
from models.source import UserOrderSource

# TorchScript is deprecated in torch 2.13 and says so on every trace/save/load; the path is kept
# on purpose (the design card's format), so exactly those messages are silenced, once.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

MIN_DYNAMIC = 2      # dynamic dims start at 2: torch.export specialises sizes 0 and 1
MAX_CANDIDATES = 1 << 16

# Input/output contract of every exported forward (names, dtypes, shapes); goes into manifest.json.
CONTRACTS = {
    "iat": {
        "inputs": [
            {"name": "hist_emb", "dtype": "float32", "shape": ["n", "d"]},
            {"name": "hist_labels", "dtype": "int64", "shape": ["n", "T"], "note": "-1 = unknown"},
            {"name": "hist_ts", "dtype": "int64", "shape": ["n"], "note": "ms, newest first"},
            {"name": "hist_items", "dtype": "int64", "shape": ["n"], "note": "item hashes"},
            {"name": "hist_mask", "dtype": "bool", "shape": ["n"], "note": "False = padding"},
            {"name": "request_ms", "dtype": "int64", "shape": [1]},
            {"name": "cat", "dtype": "int64", "shape": ["C", "F_cat"]},
            {"name": "multi", "dtype": "int64", "shape": ["C", "F_multi", "M"]},
            {"name": "num", "dtype": "float32", "shape": ["C", "F_num"]},
        ],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": ["C", "T"]}],
        "dynamic": {"n": f"{MIN_DYNAMIC}..max_history", "C": f"{MIN_DYNAMIC}..{MAX_CANDIDATES}"},
    },
    "sif": {
        "inputs": [
            {"name": "hist_codes", "dtype": "int64", "shape": ["n", "m"], "note": "m = N_s * R"},
            {"name": "hist_labels", "dtype": "int64", "shape": ["n", "T"], "note": "-1 = unknown"},
            {"name": "hist_ts", "dtype": "int64", "shape": ["n"]},
            {"name": "hist_mask", "dtype": "bool", "shape": ["n"]},
            {"name": "request_ms", "dtype": "int64", "shape": [1]},
            {"name": "cat", "dtype": "int64", "shape": ["C", "F_cat"]},
            {"name": "multi", "dtype": "int64", "shape": ["C", "F_multi", "M"]},
            {"name": "num", "dtype": "float32", "shape": ["C", "F_num"]},
        ],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": ["C", "T"]}],
        "dynamic": {"n": f"{MIN_DYNAMIC}..max_history", "C": f"{MIN_DYNAMIC}..{MAX_CANDIDATES}"},
    },
    "source": {
        "inputs": [
            {"name": "cat", "dtype": "int64", "shape": ["B", "F_cat"]},
            {"name": "multi", "dtype": "int64", "shape": ["B", "F_multi", "M"]},
            {"name": "num", "dtype": "float32", "shape": ["B", "F_num"]},
            {"name": "seq_items", "dtype": "int64", "shape": ["B", "seq_len"],
             "note": "item hashes of the instance's strictly-earlier history, newest first, -1 pad"},
        ],
        "outputs": [{"name": "insemb", "dtype": "float32", "shape": ["B", "d"]},
                    {"name": "codes", "dtype": "int64", "shape": ["B", "m"]}],
        "dynamic": {"B": f"{MIN_DYNAMIC}..{MAX_CANDIDATES}"},
    },
}


# ---------------------------------------------------------------- SIF id compaction

class VocabCompactor(nn.Module):
    """Hashed ids -> the SIF models' compact ids (``models.sif.rows._compact``): 1..V by the
    train split's sorted vocabulary of each field, 0 = unseen in train, -1 stays -1.

    ``keys`` = sorted field_index * n_buckets + hash over every field's vocabulary; ``starts``
    [F] = where field f's keys begin; one searchsorted does every field."""

    def __init__(self, n_keys: int, n_fields: int, n_buckets: int):
        super().__init__()
        self.n_buckets = n_buckets
        self.register_buffer("keys", torch.zeros(max(1, n_keys), dtype=torch.long))
        self.register_buffer("starts", torch.zeros(n_fields, dtype=torch.long))

    @staticmethod
    def build(vocabularies: list, n_buckets: int) -> "VocabCompactor":
        import numpy as np
        keys = [f * n_buckets + np.asarray(v, dtype=np.int64) for f, v in enumerate(vocabularies)]
        starts = np.cumsum([0] + [len(v) for v in vocabularies[:-1]]).astype(np.int64)
        flat = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        out = VocabCompactor(len(flat), len(vocabularies), n_buckets)
        if len(flat):
            out.keys.copy_(torch.from_numpy(flat))
        out.starts.copy_(torch.from_numpy(starts))
        return out

    def forward(self, ids: torch.Tensor, field: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """ids int64 of any shape; field / start broadcastable to it (field index, its key start)."""
        key = ids + field * self.n_buckets
        pos = torch.searchsorted(self.keys, key)
        found = self.keys[pos.clamp(max=self.keys.shape[0] - 1)] == key
        out = torch.where(found, pos - start + 1, torch.zeros_like(pos))
        return torch.where(ids < 0, torch.full_like(ids, -1), out)


class SIFInputsEncoder(nn.Module):
    """cat [.., F_cat] / multi [.., F_multi, M] of hashed ids -> compact ``SampleInputs``."""

    def __init__(self, n_keys: int, n_cat: int, n_multi: int, n_buckets: int):
        super().__init__()
        self.n_cat, self.n_multi = n_cat, n_multi
        self.compactor = VocabCompactor(n_keys, n_cat + n_multi, n_buckets)
        self.register_buffer("cat_field", torch.arange(n_cat), persistent=False)
        self.register_buffer("multi_field", torch.arange(n_cat, n_cat + n_multi), persistent=False)

    def forward(self, cat: torch.Tensor, multi: torch.Tensor, num: torch.Tensor) -> SampleInputs:
        starts = self.compactor.starts
        cat_c = self.compactor(cat, self.cat_field, starts[: self.n_cat])
        if self.n_multi:
            multi_c = self.compactor(multi, self.multi_field[:, None], starts[self.n_cat:, None])
        else:
            multi_c = multi
        return SampleInputs(cat_c, num, multi_c)


def sample_schema_to_json(schema: SampleSchema) -> dict:
    return {"categorical": [[f.name, f.buckets] for f in schema.categorical],
            "multi": [[f.name, f.buckets] for f in schema.multi],
            "numeric": list(schema.numeric),
            "groups": [[g.name, list(g.fields)] for g in schema.groups],
            "item_id_field": schema.item_id_field}


def sample_schema_from_json(raw: dict) -> SampleSchema:
    return SampleSchema(tuple(CategoricalField(n, int(b)) for n, b in raw["categorical"]),
                        tuple(CategoricalField(n, int(b)) for n, b in raw["multi"]),
                        tuple(raw["numeric"]),
                        tuple(FeatureGroup(n, tuple(f)) for n, f in raw["groups"]),
                        item_id_field=raw["item_id_field"])


# ---------------------------------------------------------------- ranking modules

class IATRanking(nn.Module):
    """Shared-history IAT downstream model (``ModelConfig.attention == "shared"``)."""

    kind = "iat"

    def __init__(self, config: dict):
        super().__init__()
        mc = ModelConfig(**config["model_config"])
        if mc.attention != "shared":
            raise ValueError("serving needs attention='shared' (history encoded once per request)")
        if mc.seq_len > mc.history_len:
            raise ValueError(f"seq_len {mc.seq_len} must not exceed history_len {mc.history_len}")
        self.config = config
        self.model = IATDownstream(mc, FeatureShape(**config["shape"]))
        self.item_column = int(config["item_column"])
        self.seq_len = mc.seq_len
        self.n_tasks = int(config["shape"]["n_tasks"])
        self.register_buffer("label_bits", torch.arange(self.n_tasks), persistent=False)

    def history_inputs(self, hist_emb, hist_labels, hist_ts, hist_mask, request_ms):
        """(InsTokens [1, n, w], mask [1, n]) exactly as ``iat_batch`` builds them offline."""
        emb = hist_emb * hist_mask.unsqueeze(-1).to(hist_emb.dtype)
        combo = (hist_labels.clamp(min=0, max=1) << self.label_bits).sum(-1)  # unknown -> 0
        label_ids = torch.where(hist_mask, combo, torch.full_like(combo, -1))
        ts = torch.where(hist_mask, hist_ts, request_ms.expand_as(hist_ts))
        gaps = gap_bucket(request_ms, ts.unsqueeze(0))
        tokens = self.model.history_tokens(emb.unsqueeze(0), label_ids.unsqueeze(0), gaps)
        return tokens, hist_mask.unsqueeze(0)

    def candidates(self, hist_items, hist_mask, cat, multi, num) -> dict:
        items = torch.where(hist_mask, hist_items, torch.full_like(hist_items, -1))
        seq = F.pad(items, (0, self.seq_len), value=-1)[: self.seq_len]
        return {"cat": cat, "multi": multi, "num": num, "item": cat[:, self.item_column],
                "seq_items": seq.unsqueeze(0).expand(cat.shape[0], self.seq_len)}

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        memory = self.model.encode_history(tokens, mask)          # once per request
        batch = self.candidates(hist_items, hist_mask, cat, multi, num)
        return torch.sigmoid(self.model.score(memory, batch))


class IATNaive(IATRanking):
    """The same weights, the history re-encoded for every candidate (what shared attention
    saves); outputs equal ``IATRanking``'s."""

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        c = cat.shape[0]
        memory = self.model.encode_history(tokens.expand(c, -1, -1).contiguous(), mask.expand(c, -1))
        batch = self.candidates(hist_items, hist_mask, cat, multi, num)
        return torch.sigmoid(self.model.score(memory, batch))


class SIFRanking(nn.Module):
    """The SIF-Mixer over stored Token Samples; the history is encoded once per request."""

    kind = "sif"

    def __init__(self, config: dict):
        super().__init__()
        s = config["settings"]
        schema = sample_schema_from_json(config["sample_schema"])
        self.config = config
        self.n_subtokens, self.levels = int(config["n_subtokens"]), int(s["levels"])
        codebooks = torch.zeros(self.n_subtokens, self.levels, s["codebook_size"], s["d_s"])
        self.mixer = SIFMixer(schema, codebooks, k=s["k"], d_s=s["d_s"], n_blocks=s["n_blocks"],
                              n_heads=s["n_heads"], ffn_dim=s["ffn_dim"], field_dim=s["field_dim"],
                              n_tasks=int(config["n_tasks"]))
        self.inputs = SIFInputsEncoder(int(config["vocab_keys"]), int(config["n_cat"]),
                                       int(config["n_multi"]), int(config["n_buckets"]))
        self.register_buffer("sub", torch.arange(self.n_subtokens).view(-1, 1), persistent=False)
        self.register_buffer("lvl", torch.arange(self.levels).view(1, -1), persistent=False)

    def forward(self, hist_codes, hist_labels, hist_ts, hist_mask, request_ms, cat, multi, num):
        n = hist_codes.shape[0]
        codes = hist_codes.view(n, self.n_subtokens, self.levels)
        codes = torch.where(hist_mask.view(n, 1, 1), codes, torch.zeros_like(codes))
        # codebook lookup as one embedding over the flattened [N_s * R * K, d_s] books (the
        # advanced-indexing form miscompiled under AOTInductor with a dynamic history length)
        k, d_s = self.mixer.codebooks.shape[2], self.mixer.codebooks.shape[3]
        flat_index = (self.sub * self.levels + self.lvl) * k + codes
        rows = F.embedding(flat_index, self.mixer.codebooks.reshape(-1, d_s)).sum(-2)   # [n, N_s, d_s]
        delta = (request_ms.double() / 1000.0 - hist_ts.double() / 1000.0).clamp(min=0)
        recency = torch.where(hist_mask, recency_bucket(delta, self.mixer.recency_buckets),
                              torch.zeros_like(hist_ts))
        outcomes = torch.where(hist_mask.unsqueeze(-1), hist_labels, torch.zeros_like(hist_labels))
        memory = self.mixer.encode_history_rows(rows.unsqueeze(0), recency.unsqueeze(0),
                                                hist_mask.unsqueeze(0), outcomes.unsqueeze(0))
        logits = self.mixer.score(memory, self.inputs(cat, multi, num))
        return torch.sigmoid(logits)


class SourceEncoder(nn.Module):
    """User-order source model (InsEmb before the SIT) + the SIF Sample Tokenizer (codes)."""

    kind = "source"

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        mc = ModelConfig(**config["model_config"])
        self.source = UserOrderSource(mc, FeatureShape(**config["shape"]))
        self.item_column = int(config["item_column"])
        s = config["settings"]
        schema = sample_schema_from_json(config["sample_schema"])
        self.encoder64 = SubTokenEncoder(schema, k=s["k"], d_s=s["d_s"], field_dim=s["field_dim"]).double()
        self.quantizer64 = ResidualVQ(int(config["n_subtokens"]), s["d_s"], levels=s["levels"],
                                      codebook_size=s["codebook_size"], reseed_dead_codes=False).double()
        self.inputs = SIFInputsEncoder(int(config["vocab_keys"]), int(config["n_cat"]),
                                       int(config["n_multi"]), int(config["n_buckets"]))

    def forward(self, cat, multi, num, seq_items):
        batch = {"cat": cat, "multi": multi, "num": num, "item": cat[:, self.item_column],
                 "seq_items": seq_items}
        insemb = self.source.embed(batch)
        sample = self.inputs(cat, multi, num)
        z = self.encoder64(SampleInputs(sample.categorical, sample.numeric.double(), sample.multi))
        codes = self.quantizer64(z).codes
        return insemb, codes.reshape(codes.shape[0], -1)


MODULES = {"iat": IATRanking, "sif": SIFRanking, "source": SourceEncoder}


def build_module(config: dict) -> nn.Module:
    kind = config.get("kind")
    if kind not in MODULES:
        raise ValueError(f"config.json: key 'kind' must be one of {sorted(MODULES)}, got {kind!r}")
    return MODULES[kind](config).eval()


def common_config(kind: str, shape: FeatureShape, max_multi: int, item_column: int, tasks: list[str]) -> dict:
    """Keys every config.json holds (input widths, hashing, tasks)."""
    return {"kind": kind, "shape": asdict(shape), "n_cat": shape.n_cat, "n_multi": shape.n_multi,
            "n_num": shape.n_num, "n_tasks": shape.n_tasks, "n_buckets": shape.n_buckets,
            "max_multi": int(max_multi), "item_column": int(item_column), "tasks": list(tasks)}


# ---------------------------------------------------------------- example inputs and export

def example_inputs(module: nn.Module, n_history: int = 5, n_candidates: int = 3) -> tuple:
    """Tensors of the right dtypes and shapes for tracing/exporting ``module``."""
    cfg = module.config
    g = torch.Generator().manual_seed(0)
    n_cat, n_multi, n_num = int(cfg["n_cat"]), int(cfg["n_multi"]), int(cfg["n_num"])
    max_multi, buckets = int(cfg["max_multi"]), int(cfg["n_buckets"])
    c = n_candidates
    cat = torch.randint(0, buckets, (c, n_cat), generator=g)
    multi = torch.randint(-1, buckets, (c, n_multi, max_multi), generator=g)
    num = torch.randn(c, n_num, generator=g)
    if module.kind == "source":
        seq = torch.randint(-1, buckets, (c, module.source.cfg.seq_len), generator=g)
        return cat, multi, num, seq
    n, t = n_history, int(cfg["n_tasks"])
    labels = torch.randint(-1, 2, (n, t), generator=g)
    ts = torch.sort(torch.randint(1_600_000_000_000, 1_600_100_000_000, (n,), generator=g), descending=True).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[-1] = False
    request = torch.tensor([1_600_200_000_000])
    if module.kind == "iat":
        emb = torch.randn(n, module.model.cfg.insemb_dim, generator=g)
        items = torch.randint(0, buckets, (n,), generator=g)
        return emb, labels, ts, items, mask, request, cat, multi, num
    codes = torch.randint(0, int(cfg["settings"]["codebook_size"]), (n, module.n_subtokens * module.levels), generator=g)
    return codes, labels, ts, mask, request, cat, multi, num


def dynamic_shapes(module: nn.Module, max_history: int) -> tuple:
    from torch.export import Dim
    rows = Dim("rows", min=MIN_DYNAMIC, max=MAX_CANDIDATES)
    if module.kind == "source":
        return ({0: rows}, {0: rows}, {0: rows}, {0: rows})
    n = Dim("n", min=MIN_DYNAMIC, max=max(MIN_DYNAMIC + 1, max_history))
    hist = {0: n}
    if module.kind == "iat":
        return (hist, hist, hist, hist, hist, None, {0: rows}, {0: rows}, {0: rows})
    return (hist, hist, hist, hist, None, {0: rows}, {0: rows}, {0: rows})


def export_torchscript(module: nn.Module, path: Path) -> Path:
    """Trace (no scripting: the modules use Python control flow on static sizes only)."""
    with torch.no_grad(), warnings.catch_warnings():
        # the TracerWarnings here are all Python checks on sizes that are static per model
        # (field counts, heads, batch of one request); the parity tests vary every dynamic size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example_inputs(module), check_trace=False)
    traced.save(str(path))
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` / ``cuda:N``, or ``auto`` (CUDA when torch sees a GPU, else CPU). A CUDA
    device on a machine where torch sees none is refused here, by name, not at first use."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {str(device)!r}: torch {torch.__version__} ({build}) sees no CUDA device "
                         f"on this machine; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def cuda_arch(device: torch.device) -> str:
    """The GPU's compute capability as nvcc names it (``sm_90``): what AOTInductor compiles for."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def aoti_target(device: torch.device) -> dict:
    """Manifest keys saying what an AOTInductor package was compiled for (checked at load)."""
    if device.type != "cuda":
        return {"aoti_device": device.type}
    return {"aoti_device": "cuda", "aoti_cuda_arch": cuda_arch(device),
            "aoti_gpu": torch.cuda.get_device_name(device), "aoti_cuda_version": torch.version.cuda}


def export_aoti(module: nn.Module, path: Path, max_history: int, device: torch.device | None = None) -> Path:
    """torch.export with dynamic history length and candidate count, then AOTInductor, for
    ``device`` (default CPU): the module is moved there and traced on inputs there, so the
    package holds that device's kernels and runs only on it."""
    device = device or torch.device("cpu")
    module = module.to(device)
    inputs = tuple(t.to(device) for t in example_inputs(module))
    with torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes(module, max_history))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


# ---------------------------------------------------------------- a run dir -> versioned artifacts

def _manifest(name: str, version: str, created: str, config: dict, run: dict, source_version: str,
              aoti: dict | None) -> dict:
    mc = config.get("model_config", {})
    manifest = {
        "name": name, "kind": config["kind"], "version": version, "created": created,
        "schema": run["feature_spec"], "tasks": list(config["tasks"]),
        "embedding_dim": int(mc.get("insemb_dim", 0)),
        "max_history": int(config["history_length"]),
        "codec": "fp32", "source_version": source_version,
        "code_length": int(config.get("code_length", 0)),
        "code_dtype": config.get("code_dtype", "uint8"),
        "inputs": CONTRACTS[name]["inputs"], "outputs": CONTRACTS[name]["outputs"],
        "dynamic_dims": CONTRACTS[name]["dynamic"],
        "runtimes": {"torchscript": TORCHSCRIPT_NAME, "eager": ["config.json", "weights.pt"]},
        "torch_version": torch.__version__,
        "training": {"dataset": run.get("dataset"), "created": run.get("created"),
                     "best_val_auc": (run.get("metrics", {}).get(name) or {}).get("best_val_auc")},
    }
    if "settings" in config:
        manifest["codebook_size"] = int(config["settings"]["codebook_size"])
    if aoti:
        manifest["runtimes"]["aoti"] = AOTI_NAME
        manifest.update(aoti)
    return manifest


TORCHSCRIPT_NAME, AOTI_NAME = "model.pt", "model.pt2"


def export_run(run_dir: str | Path, model_dir: str | Path, aoti: bool = True,
               progress=print, device: str | torch.device = "cpu") -> dict[str, Path]:
    """For each model of a training run: MODEL_DIR/<name>/<version>/ with weights.pt, config.json,
    model.pt (TorchScript, device-free: it loads on any device), model.pt2 (AOTInductor for
    ``device``, unless ``aoti`` is False) and manifest.json.
    The source is exported first: the rankers' ``source_version`` is its version."""
    import json
    import shutil
    import time
    from datetime import datetime, timezone

    from models.artifacts import (CONFIG_FILE, MODEL_NAMES, RUN_FILE, WEIGHTS_FILE, ArtifactError,
                                  new_version, read_json, write_manifest)

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    run = read_json(run_dir / RUN_FILE, "run.json (is --from a directory written by `iat train`?)")
    now = datetime.now(timezone.utc)
    created = now.isoformat(timespec="seconds")
    device = resolve_device(device)
    out: dict[str, Path] = {}
    source_version = ""
    for name in ("source", "iat", "sif"):
        assert name in MODEL_NAMES
        src = run_dir / name
        inputs = [src / WEIGHTS_FILE, src / CONFIG_FILE]
        for path in inputs:
            if not path.is_file():
                raise ArtifactError(f"{path}: missing from the training run")
        version = new_version(inputs, now)
        source_version = source_version or version
        final = model_dir / name / version
        staging = model_dir / name / f".{version}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for path in inputs:
            shutil.copy2(path, staging / path.name)
        config = json.loads((src / CONFIG_FILE).read_text())
        module = build_module(config)
        module.load_state_dict(torch.load(src / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        t0 = time.perf_counter()
        export_torchscript(module, staging / TORCHSCRIPT_NAME)
        progress(f"{name}: TorchScript in {time.perf_counter() - t0:.1f}s")
        if aoti:
            t0 = time.perf_counter()
            export_aoti(module, staging / AOTI_NAME, int(config["history_length"]), device)
            progress(f"{name}: AOTInductor package for {device.type} in {time.perf_counter() - t0:.1f}s")
        write_manifest(staging, _manifest(name, version, created, config, run, source_version,
                                          aoti_target(device) if aoti else None))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)  # a version directory appears complete or not at all
        out[name] = final
        progress(f"{name}: {final}")
    return out
