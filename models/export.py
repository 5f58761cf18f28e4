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

Shape rules the runtimes rely on (``models.runtime.loader`` enforces them): histories are padded to at
least ``MIN_DYNAMIC`` slots with mask False, candidate/instance batches to at least
``MIN_DYNAMIC`` rows; padding never changes a real row's output (masked keys get zero weight,
rows are independent).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from contract.inputs import CONTRACTS, MAX_CANDIDATES, MIN_DYNAMIC
from models.runtime.device import aoti_target, resolve_device
from models.runtime.modules import build_module, stack_user_states

# TorchScript is deprecated in torch 2.13 and says so on every trace/save/load; the path is kept
# on purpose (the design card's format), so exactly those messages are silenced, once.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)


# ---------------------------------------------------------------- SIF id compaction


# ---------------------------------------------------------------- ranking modules


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
        inputs = example_inputs(module)
        if hasattr(module, "user_state"):
            # the user/candidate halves beside forward: the runtime then encodes a user state
            # once per history and reuses it across requests (the history cache)
            state = module.user_state(*inputs[:6])
            methods = {"forward": inputs, "user_state": inputs[:6], "score_user": (*state, *inputs[6:])}
            if hasattr(module, "score_users"):
                # and the candidates of several requests in one batch (cross-request batching),
                # traced on two requests of different history lengths and candidate counts
                other = module.user_state(*(a[:3] for a in inputs[:5]), inputs[5])
                stacked, slots, pad_index = stack_user_states([state, other], [2, 1])
                methods["score_users"] = (*stacked, slots, pad_index, *inputs[6:])
            traced = torch.jit.trace_module(module, methods, check_trace=False)
        else:
            traced = torch.jit.trace(module, inputs, check_trace=False)
    traced.save(str(path))
    return path


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

def manifest_for(name: str, version: str, created: str, config: dict, run: dict, source_version: str,
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
# What makes a source model's InsEmbs mean what they mean: a retrained model that keeps these
# keeps its lineage; a change of any starts a new one (docs/source-versions.md).
ARCHITECTURE_KEYS = ("kind", "shape", "model_config", "history_length", "code_length", "code_dtype")


def architecture_lineage(config: dict, feature_spec: dict) -> str:
    """The lineage name of a source model: ``source-`` + a hash of its architecture and features."""
    import hashlib
    import json

    arch = {k: config.get(k) for k in ARCHITECTURE_KEYS}
    arch["feature_spec"] = feature_spec
    return "source-" + hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:12]


def export_run(run_dir: str | Path, model_dir: str | Path, aoti: bool = True,
               progress=print, device: str | torch.device = "cpu", lineage: str | None = None,
               names: tuple[str, ...] = ("source", "iat", "sif"), now=None, ordinal: int | None = None,
               source_min_ordinal: int | None = None) -> dict[str, Path]:
    """For each model of a training run: MODEL_DIR/<name>/<version>/ with weights.pt, config.json,
    model.pt (TorchScript, device-free: it loads on any device), model.pt2 (AOTInductor for
    ``device``, unless ``aoti`` is False) and manifest.json.
    The source is exported first: the rankers' ``source_version`` is its version. The source's
    manifest gets its ``lineage`` (``lineage``, else ``architecture_lineage``) and ``ordinal``
    (publish time in seconds); the rankers' declare they read that lineage from that ordinal on.

    The trainer (services/trainer) publishes ``names=("source", "iat")`` with its own ``now``
    (version names must increase), ``ordinal`` and ``source_min_ordinal`` (the oldest source
    version whose stored InsEmbs the published ranker still accepts)."""
    import json
    import shutil
    import time
    from datetime import datetime, timezone

    from contract.artifacts import (
        CONFIG_FILE,
        MODEL_NAMES,
        RUN_FILE,
        WEIGHTS_FILE,
        ArtifactError,
        new_version,
        read_json,
        write_manifest,
    )

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    run = read_json(run_dir / RUN_FILE, "run.json (is --from a directory written by `iat train`?)")
    now = now or datetime.now(timezone.utc)
    created = now.isoformat(timespec="seconds")
    device = resolve_device(device)
    out: dict[str, Path] = {}
    source_version = ""
    ordinal = int(now.timestamp()) if ordinal is None else ordinal
    min_ordinal = ordinal if source_min_ordinal is None else source_min_ordinal
    if "source" not in names:
        raise ValueError(f"names: the source model is published with its rankers, got {names}")
    for name in ("source", "iat", "sif"):
        if name not in names:
            continue
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
        manifest = manifest_for(name, version, created, config, run, source_version,
                                aoti_target(device) if aoti else None)
        if name == "source":
            lineage = lineage or architecture_lineage(config, run["feature_spec"])
            manifest.update(lineage=lineage, ordinal=ordinal)
        else:
            manifest.update(source_lineage=lineage, source_min_ordinal=min_ordinal)
        write_manifest(staging, manifest)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)  # a version directory appears complete or not at all
        out[name] = final
        progress(f"{name}: {final}")
    return out
