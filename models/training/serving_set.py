"""Train the serving set (``iat train``): the user-order source model with the SIF Sample
Tokenizer, the IAT downstream ranking model over that source's InsEmbs, and the SIF-Mixer over
that tokenizer's codes; save each as the state dict of its serving module (``models.runtime.modules``)
plus a JSON config, into ``RUN_DIR/<name>/{weights.pt, config.json}`` and ``RUN_DIR/run.json``.

Settings are the experiment's defaults (``ExperimentConfig()`` / ``.quick()`` and
``models.training.sif.rows.SETTINGS``): the serving set is the ``user_iat`` and ``sif`` rows, one seed.

The InsEmbs the downstream model is trained on are ``insembs(source, data)``, i.e.
``source.embed`` in eval mode: the same function the source service runs before writing to the
store, so the ranking model reads at serving time exactly what it read in training.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contract.artifacts import CONFIG_FILE, RUN_FILE, WEIGHTS_FILE
from models.data.prepared import PreparedData
from models.nn.base import FeatureShape
from models.nn.sif.mixer import SIFMixer
from models.nn.sif.tokenizer import SampleTokenizer
from models.runtime.featurizer import FeatureSpec
from models.runtime.modules import (
    IATRanking,
    SIFRanking,
    SourceEncoder,
    common_config,
    sample_schema_to_json,
)
from models.training.downstream import train_downstream
from models.training.loop import set_seed, shuffled_batches
from models.training.metrics import auc
from models.training.registry import ExperimentConfig
from models.training.sif.history import gather_history
from models.training.sif.losses import (
    alignment_loss,
    auxiliary_pctr_loss,
    ranking_loss,
    total_loss,
)
from models.training.sif.rows import (
    SETTINGS,
    SIFSettings,
    prepare_inputs,
    pretrain_tokenizer,
)
from models.training.source import insembs, train_user_order_source


def sif_vocabularies(data: PreparedData) -> list[np.ndarray]:
    """Per cat field, then per multi field: the train split's sorted hashed ids (``_compact``)."""
    train = data.split_indices(0)
    out = []
    for j in range(data.cat.shape[1]):
        col = data.cat[train, j]
        out.append(np.unique(col[col >= 0]))
    for j in range(data.multi.shape[1]):
        col = data.multi[train][:, j]
        out.append(np.unique(col[col >= 0]))
    return out


def _settings_json(s: SIFSettings) -> dict:
    return {k: v for k, v in asdict(s).items() if k != "weights"}


def train_sif(data: PreparedData, cfg: ExperimentConfig, seed: int, s: SIFSettings = SETTINGS,
              progress: Callable[[str], None] = print) -> tuple[SampleTokenizer, SIFMixer, dict]:
    """The ``sif`` row of ``models.training.sif.rows`` (mirrored here because the row returns only
    predictions; keep the two in step) (factored mixer, joint L_rank + a L_aux + b L_commit
    + c L_align, one shared codebook, codes refreshed per epoch, best epoch by validation AUC),
    returning the trained tokenizer and mixer instead of only their predictions."""
    prepared = prepare_inputs(data)
    pretrained, tok_info = pretrain_tokenizer(data, prepared, seed, s)
    set_seed(seed)
    tok = copy.deepcopy(pretrained)
    tok.quantizer.reseed_enabled = False  # stored codes must keep their meaning from here on
    mixer = SIFMixer(prepared.schema, tok.quantizer.codebooks, k=s.k, d_s=s.d_s, n_blocks=s.n_blocks,
                     n_heads=s.n_heads, ffn_dim=s.ffn_dim, field_dim=s.field_dim, n_tasks=len(data.tasks))
    mixer.codebooks = tok.quantizer.codebooks  # one codebook: L_rank trains it too
    mixer.target_projection.load_state_dict(tok.encoder.state_dict())
    length = s.history_len(cfg)
    hist_index = torch.from_numpy(data.history_index(length))
    ts = torch.from_numpy(data.ts_ms).to(torch.float64) / 1000.0
    labels = torch.from_numpy(data.labels)
    inputs = prepared.inputs
    train, val = data.split_indices(0), data.split_indices(1)

    def logits_for(rows: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        hist = gather_history(tab, hist_index[rows], ts, ts[rows], labels, mixer.recency_buckets)
        memory = mixer.encode_history(hist.rows, hist.recency, hist.mask, hist.outcomes)
        return mixer.score_rows(memory, mixer.project_target(inputs.index(rows)).unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def predict(rows: np.ndarray, tab: torch.Tensor) -> np.ndarray:
        mixer.eval()
        return np.concatenate([torch.sigmoid(logits_for(torch.from_numpy(rows[i:i + 2048]), tab)).numpy()
                               for i in range(0, len(rows), 2048)])

    params = list({id(p): p for p in [*tok.parameters(), *mixer.parameters()]}.values())
    opt = torch.optim.Adam(params, lr=cfg.train.lr)
    rng = np.random.default_rng(seed)
    best, epochs = (-1.0, None, -1), []
    n_val = getattr(s, "val_rows_per_epoch", len(val))
    val_sample = np.sort(rng.choice(val, min(len(val), n_val), replace=False))
    for epoch in range(min(cfg.train.epochs, getattr(s, "max_epochs", cfg.train.epochs))):
        tab = tok.quantize(inputs, exact=False)
        tok.train()
        mixer.train()
        cap = s.rows_per_epoch(cfg) if callable(s.rows_per_epoch) else s.rows_per_epoch
        sample = rng.choice(train, cap, replace=False) if len(train) > cap else train
        for rows_np in shuffled_batches(sample, cfg.train.batch_size, rng):
            rows = torch.from_numpy(rows_np)
            target = inputs.index(rows)
            tout = tok(target)
            rank = ranking_loss(logits_for(rows, tab), labels[rows])
            align = alignment_loss(mixer.project_target(target), tout.quantized)
            loss = total_loss(rank, aux=auxiliary_pctr_loss(tout.aux_logits, labels[rows]),
                              commit=tout.commit_loss, align=align, weights=s.weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        tok.eval()
        val_auc = auc(data.labels[val_sample, 0], predict(val_sample, tok.quantize(inputs, exact=False))[:, 0])
        epochs.append({"epoch": epoch, "val_auc": val_auc})
        progress(f"sif epoch {epoch}: val AUC {val_auc:.4f}")
        if val_auc > best[0]:
            best = (val_auc, (copy.deepcopy(tok.state_dict()), copy.deepcopy(mixer.state_dict())), epoch)
        elif epoch - best[2] >= cfg.train.patience:
            break
    tok.load_state_dict(best[1][0])
    mixer.load_state_dict(best[1][1])
    tok.eval()
    mixer.eval()
    return tok, mixer, {"tokenizer_pretrain": tok_info, "best_val_auc": best[0], "best_epoch": best[2],
                        "epochs": epochs, "history_len": length}


def serving_configs(data: PreparedData, cfg: ExperimentConfig, tok: SampleTokenizer,
                    vocab_keys: int, s: SIFSettings = SETTINGS) -> dict[str, dict]:
    shape = FeatureShape.of(data)
    common = dict(shape=shape, max_multi=data.multi.shape[2],
                  item_column=data.cat_fields.index(data.item_field), tasks=data.tasks)
    sif_common = {"settings": _settings_json(s), "sample_schema": sample_schema_to_json(tok.schema),
                  "n_subtokens": tok.n_subtokens, "vocab_keys": int(vocab_keys)}
    return {
        "source": {**common_config("source", **common), **sif_common, "model_config": asdict(cfg.model),
                   "code_length": tok.n_subtokens * tok.levels, "code_dtype": tok.codes_dtype.name,
                   "history_length": cfg.model.seq_len},
        "iat": {**common_config("iat", **common), "model_config": asdict(cfg.model),
                "history_length": cfg.model.history_len},
        "sif": {**common_config("sif", **common), **sif_common, "history_length": s.history_len(cfg),
                "code_length": tok.n_subtokens * tok.levels, "code_dtype": tok.codes_dtype.name},
    }


def train_serving_set(data: PreparedData, cfg: ExperimentConfig, out_dir: str | Path, seed: int = 0,
                      progress: Callable[[str], None] = print) -> Path:
    """Train the three models and write RUN_DIR; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    set_seed(seed)
    source, source_info = train_user_order_source(data, cfg.model, cfg.train, seed, cfg.source_window)
    source.eval()
    e_all = insembs(source, data)
    progress(f"source: best val AUC {source_info['best_val_auc']:.4f} ({time.perf_counter() - t0:.0f}s)")
    set_seed(seed)
    iat, iat_info = train_downstream(data, e_all, cfg.model, cfg.train, seed, desc="iat downstream")
    progress(f"iat: best val AUC {iat_info['best_val_auc']:.4f} ({time.perf_counter() - t0:.0f}s)")
    tok, mixer, sif_info = train_sif(data, cfg, seed, progress=progress)
    progress(f"sif: best val AUC {sif_info['best_val_auc']:.4f} ({time.perf_counter() - t0:.0f}s)")

    from models.runtime.modules import VocabCompactor
    vocab = sif_vocabularies(data)
    compactor = VocabCompactor.build(vocab, data.n_buckets)
    configs = serving_configs(data, cfg, tok, compactor.keys.shape[0] if sum(map(len, vocab)) else 0)

    modules = {"source": SourceEncoder(configs["source"]), "iat": IATRanking(configs["iat"]),
               "sif": SIFRanking(configs["sif"])}
    modules["source"].source.load_state_dict(source.state_dict())
    modules["source"].encoder64.load_state_dict(tok.encoder.state_dict())
    modules["source"].quantizer64.load_state_dict(tok.quantizer.state_dict())
    modules["iat"].model.load_state_dict(iat.state_dict())
    modules["sif"].mixer.load_state_dict(mixer.state_dict())
    for name in ("source", "sif"):
        modules[name].inputs.compactor.load_state_dict(compactor.state_dict())
    for name, module in modules.items():
        folder = out / name
        folder.mkdir(exist_ok=True)
        torch.save(module.state_dict(), folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(configs[name], indent=2))
    run = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dataset": data.name,
           "tasks": data.tasks, "seed": seed, "experiment_config": cfg.to_dict(),
           "feature_spec": FeatureSpec.from_prepared(data).to_json(),
           "metrics": {"source": source_info, "iat": iat_info, "sif": sif_info},
           "seconds": time.perf_counter() - t0}
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, default=float))
    progress(f"wrote {out} in {run['seconds']:.0f}s")
    return out
