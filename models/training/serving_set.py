"""Train the serving set (``iat train``): the user-order source model with the SIF Sample
Tokenizer, the IAT downstream ranking model over that source's InsEmbs, and the SIF-Mixer over
that tokenizer's codes; save each as the state dict of its serving module (``models.runtime.modules``)
plus a JSON config, into ``RUN_DIR/<name>/{weights.pt, config.json}`` and ``RUN_DIR/run.json``.

Settings are the experiment's defaults (``ExperimentConfig()`` / ``.quick()`` and
``models.training.sif.rows.SETTINGS``): the serving set is the ``user_iat`` and ``sif`` rows, one seed.

The source and downstream models are the ``user_iat`` row's, by the same code
(``experiment.fit_downstream_row``): the source trained by the time-ordered protocol
(``models.training.protocol``), the downstream on the InsEmbs that pass stored (each computed
by ``source.embed`` in eval mode, as the source service computes it, before the source trained
on its instance), so the model served is the model evaluated.
"""
from __future__ import annotations

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
from models.training.experiment import fit_downstream_row, source_result
from models.training.loop import set_seed
from models.training.registry import ExperimentConfig
from models.training.sif.rows import (
    SETTINGS,
    SIFSettings,
    prepare_inputs,
    pretrain_tokenizer,
    train_sif,
    train_vocabulary,
)


def sif_vocabularies(data: PreparedData) -> list[np.ndarray]:
    """Per cat field, then per multi field: the train split's vocabulary (``_compact``)."""
    train = data.split_indices(0)
    out = []
    for j in range(data.cat.shape[1]):
        out.append(train_vocabulary(data.cat[train, j]))
    for j in range(data.multi.shape[1]):
        out.append(train_vocabulary(data.multi[train][:, j]))
    return out


def _settings_json(s: SIFSettings) -> dict:
    return {k: v for k, v in asdict(s).items() if k != "weights"}


def train_sif_models(data: PreparedData, cfg: ExperimentConfig, seed: int, s: SIFSettings = SETTINGS,
                     progress: Callable[[str], None] = print) -> tuple[SampleTokenizer, SIFMixer, dict]:
    """The ``sif`` row's training (``models.training.sif.rows.train_sif``, the same code), keeping
    the trained tokenizer and mixer instead of only their predictions."""
    prepared = prepare_inputs(data)
    pretrained, tok_info = pretrain_tokenizer(data, prepared, seed, s)
    trained = train_sif(data, prepared, pretrained, seed, cfg, s,
                        on_epoch_end=lambda r: progress(f"sif epoch {r['epoch']}: val AUC {r['val_auc']:.4f}"))
    return trained.tokenizer, trained.mixer, {"tokenizer_pretrain": tok_info, **trained.info}


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
    cfg._shared.clear()
    iat, _, row_info = fit_downstream_row("user_iat", data, seed, cfg)
    source = source_result("user", data, seed, cfg).model.eval()
    cfg._shared.clear()
    # one pass, no early stopping: its validation AUC is what the manifest reports as best
    source_info = {**row_info["source"], "best_val_auc": row_info["source"]["val_auc"]}
    iat_info = row_info["train"]
    progress(f"source: val AUC {source_info['val_auc']:.4f}; iat: best val AUC "
             f"{iat_info['best_val_auc']:.4f} ({time.perf_counter() - t0:.0f}s)")
    tok, mixer, sif_info = train_sif_models(data, cfg, seed, progress=progress)
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
