"""The SIF rows of `iat experiment`: `sif` and the ablations of the paper's Tables 3 and 4.

Per seed (shared by the five rows): the Sample Tokenizer is pre-trained on the train split
with its auxiliary pCTR head and commitment loss, re-seeding dead codes. Per row: a copy of it
is trained jointly with the mixer on L_rank + a L_aux + b L_commit + c L_align (Eq. 17); the
mixer's codebook IS the tokenizer's (one parameter), so the ranking loss shapes it through the
history lookups. History codes are refreshed once per epoch, and the codes the row is
evaluated with are those of the final tokenizer (eval mode, as the source side would store).

Rows:
  sif                     factored row/column SIF-Mixer over HGAQ Token Samples
  sif_item_id_only        history samples reduced to the item id sub-token (Table 3)
  sif_dense_raw           no quantization: the dense sub-token vectors z as history (Table 3)
  sif_pooled_then_attend  each history sample mean-pooled, then attention across samples (Table 4)
  sif_flat_attention      all history sub-tokens in one sequence, ordinary attention (Table 4)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from models.data.prepared import PreparedData
from models.nn.sif.mixer import SIFMixer
from models.nn.sif.spec import (
    CategoricalField,
    FeatureGroup,
    SampleInputs,
    SampleSchema,
)
from models.nn.sif.tokenizer import SampleTokenizer
from models.training.loop import fit, set_seed, shuffled_batches
from models.training.metrics import auc
from models.training.registry import ExperimentConfig, RowResult, register_row
from models.training.sif.compression import (
    compression_ratio,
    dense_sample_bytes,
    raw_sample_bytes,
)
from models.training.sif.health import codebook_health
from models.training.sif.history import gather_history
from models.training.sif.losses import (
    LossWeights,
    alignment_loss,
    auxiliary_pctr_loss,
    ranking_loss,
    total_loss,
)


@dataclass(frozen=True)
class SIFSettings:
    k: int = 4
    d_s: int = 32
    levels: int = 3
    codebook_size: int = 256
    field_dim: int = 16
    n_blocks: int = 2
    n_heads: int = 4
    ffn_dim: int = 64
    tokenizer_epochs: int = 1
    tokenizer_batch: int = 1024
    weights: LossWeights = LossWeights()
    # CPU budget (five rows x three seeds in ~10 min on 2 cores): a training step costs about
    # 20 us per history sub-token, so L and the rows seen per epoch are kept small:
    # L = downstream L / 16 (16 full, 8 quick), at most 6144 train rows per epoch (a fresh
    # random sample each epoch) and at most 2 epochs.
    history_divisor: int = 16
    rows_per_epoch: int = 6144
    max_epochs: int = 2
    val_rows_per_epoch: int = 4096  # early stopping reads a fixed random sample of validation

    def history_len(self, cfg: ExperimentConfig) -> int:
        return max(8, cfg.model.history_len // self.history_divisor)


SETTINGS = SIFSettings()


# ---------------------------------------------------------------- data -> tokenizer inputs

# An id must occur this often in the train split to get its own row; rarer ids share row 0 with
# the ids never seen in training. So row 0 is trained (on the rare ids) and an id first seen at
# test time reads a trained row instead of one left at its random init.
MIN_COUNT = 2


def train_vocabulary(values: np.ndarray) -> np.ndarray:
    """Sorted ids (>= 0) occurring at least ``MIN_COUNT`` times in ``values`` (train split)."""
    ids, counts = np.unique(values[values >= 0], return_counts=True)
    return ids[counts >= MIN_COUNT]


def _compact(values: np.ndarray, train_rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Hashed ids -> 1..V by the train split's vocabulary (``train_vocabulary``); 0 = rare or
    unseen in train; -1 stays -1."""
    vocab = train_vocabulary(values[train_rows])
    pos = np.searchsorted(vocab, values)
    found = (pos < len(vocab)) & (vocab[np.clip(pos, 0, max(0, len(vocab) - 1))] == values) if len(vocab) else np.zeros(values.shape, bool)
    out = np.where(found, pos + 1, 0)
    return np.where(values < 0, -1, out).astype(np.int64), len(vocab) + 1


@dataclass
class SIFInputs:
    schema: SampleSchema
    inputs: SampleInputs  # all N instances
    raw_bytes: float


def prepare_inputs(data: PreparedData) -> SIFInputs:
    """Tokenizer inputs for every instance: compact per-field vocabularies, groups from the data."""
    train = data.split_indices(0)
    cat = np.empty_like(data.cat)
    cat_fields = []
    for j, name in enumerate(data.cat_fields):
        cat[:, j], buckets = _compact(data.cat[:, j], train)
        cat_fields.append(CategoricalField(name, buckets))
    multi = np.empty_like(data.multi)
    multi_fields = []
    for j, name in enumerate(data.multi_fields):
        multi[:, j], buckets = _compact(data.multi[:, j], train)
        multi_fields.append(CategoricalField(name, buckets))
    groups = []
    for group, names in data.field_groups.items():
        names = [n for n in names if n != data.item_field]
        if group == "item":
            groups.append(FeatureGroup("item_id", (data.item_field,)))  # the item id alone (HGAQ)
        if names:
            groups.append(FeatureGroup(group, tuple(names)))
    schema = SampleSchema(tuple(cat_fields), tuple(multi_fields), tuple(data.num_fields), tuple(groups),
                          item_id_field=data.item_field)
    mean_multi = {name: float((data.multi[:, j] >= 0).sum(-1).mean()) for j, name in enumerate(data.multi_fields)}
    inputs = SampleInputs(torch.from_numpy(cat), torch.from_numpy(data.num.astype(np.float32)),
                          torch.from_numpy(multi))
    return SIFInputs(schema, inputs, raw_sample_bytes(schema, mean_multi))


def pretrain_tokenizer(data: PreparedData, prepared: SIFInputs, seed: int, s: SIFSettings) -> tuple[SampleTokenizer, dict]:
    """Stage 1: the tokenizer alone on the train split, aux pCTR head + commitment, dead-code re-seed."""
    set_seed(seed)
    tok = SampleTokenizer(prepared.schema, k=s.k, d_s=s.d_s, levels=s.levels, codebook_size=s.codebook_size,
                          field_dim=s.field_dim, n_tasks=len(data.tasks))
    labels = torch.from_numpy(data.labels)
    train = data.split_indices(0)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    reseeded = 0
    for _ in range(s.tokenizer_epochs):
        tok.train()
        for rows in shuffled_batches(train, s.tokenizer_batch, rng):
            out = tok(prepared.inputs.index(torch.from_numpy(rows)))
            loss = auxiliary_pctr_loss(out.aux_logits, labels[rows]) + s.weights.commit * out.commit_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            reseeded += tok.quantizer.reseed_dead_codes()
    tok.eval()
    val = torch.from_numpy(data.split_indices(1))
    with torch.no_grad():
        aux = torch.sigmoid(tok(prepared.inputs.index(val)).aux_logits).numpy()
    return tok, {"reseeded_codes": reseeded, "aux_val_auc": auc(data.labels[val.numpy(), 0], aux[:, 0])}


# ---------------------------------------------------------------- one row

@dataclass
class TrainedSIF:
    tokenizer: SampleTokenizer
    mixer: SIFMixer
    predict: Callable[[np.ndarray, torch.Tensor], np.ndarray]  # (rows, history table) -> probs [n, T]
    table: Callable[[bool], torch.Tensor]                      # exact -> every instance's history row
    columns: list[int] | None
    info: dict


def train_sif(data: PreparedData, prepared: SIFInputs, pretrained: SampleTokenizer, seed: int,
              cfg: ExperimentConfig, s: SIFSettings = SETTINGS, history_mode: str = "factored",
              item_id_only: bool = False, dense: bool = False,
              on_epoch_end: Callable[[dict], None] | None = None) -> TrainedSIF:
    """Stage 2, shared by the SIF rows and the serving set (``iat train``): a copy of the
    pre-trained tokenizer trained jointly with the mixer on L_rank + a L_aux + b L_commit +
    c L_align, one shared codebook, history codes refreshed per epoch, the best epoch by
    validation AUC (``models.training.loop.fit``)."""
    set_seed(seed)
    tok = copy.deepcopy(pretrained)
    tok.quantizer.reseed_enabled = False  # stored codes must keep their meaning from here on
    columns = tok.subtoken_index("item_id") if item_id_only else None
    mixer = SIFMixer(prepared.schema, None if dense else tok.quantizer.codebooks, k=s.k, d_s=s.d_s,
                     n_blocks=s.n_blocks, n_heads=s.n_heads, ffn_dim=s.ffn_dim, field_dim=s.field_dim,
                     n_tasks=len(data.tasks), history_mode=history_mode, history_columns=columns,
                     unknown_outcome_rate=cfg.model.unknown_label_rate)
    if not dense:
        mixer.codebooks = tok.quantizer.codebooks  # one codebook: L_rank trains it too
    mixer.target_projection.load_state_dict(tok.encoder.state_dict())  # P(x) starts at z ~ q
    length = s.history_len(cfg)
    hist_index = torch.from_numpy(data.history_index(length))
    ts = torch.from_numpy(data.ts_ms).to(torch.float64) / 1000.0
    labels = torch.from_numpy(data.labels)
    inputs = prepared.inputs
    train, val = data.split_indices(0), data.split_indices(1)

    def table(exact: bool) -> torch.Tensor:
        return tok.encode(inputs) if dense else tok.quantize(inputs, exact=exact)

    def logits_for(rows: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        hist = gather_history(tab, hist_index[rows], ts, ts[rows], labels, mixer.recency_buckets)
        if dense:
            memory = mixer.encode_history_rows(hist.rows, hist.recency, hist.mask, hist.outcomes)
        else:
            memory = mixer.encode_history(hist.rows, hist.recency, hist.mask, hist.outcomes)
        return mixer.score_rows(memory, mixer.project_target(inputs.index(rows)).unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def predict(rows: np.ndarray, tab: torch.Tensor) -> np.ndarray:
        mixer.eval()
        out = [torch.sigmoid(logits_for(torch.from_numpy(rows[i:i + 2048]), tab)).numpy()
               for i in range(0, len(rows), 2048)]
        return np.concatenate(out).astype(np.float32)

    rng = np.random.default_rng(seed)
    val_sample = np.sort(rng.choice(val, min(len(val), s.val_rows_per_epoch), replace=False))
    current: dict[str, torch.Tensor] = {}

    def on_epoch_start(epoch: int) -> None:
        current["table"] = table(exact=False)  # before train mode: what the store would hold now

    def epoch_batches(epoch: int):
        sample = rng.choice(train, s.rows_per_epoch, replace=False) if len(train) > s.rows_per_epoch else train
        return shuffled_batches(sample, cfg.train.batch_size, rng)

    def step(rows_np: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(rows_np)
        target = inputs.index(rows)
        tout = tok(target)
        rank = ranking_loss(logits_for(rows, current["table"]), labels[rows])
        align = alignment_loss(mixer.project_target(target), tout.z if dense else tout.quantized)
        return total_loss(rank, aux=auxiliary_pctr_loss(tout.aux_logits, labels[rows]),
                          commit=tout.commit_loss, align=align, weights=s.weights)

    def validate() -> tuple[np.ndarray, np.ndarray]:
        tok.eval()
        return data.labels[val_sample], predict(val_sample, table(exact=False))

    tcfg = replace(cfg.train, epochs=min(cfg.train.epochs, s.max_epochs))
    info = fit([tok, mixer], epoch_batches, validate, tcfg, desc="sif", on_epoch_start=on_epoch_start,
               step=step, on_epoch_end=on_epoch_end)
    info["history_len"] = length
    info["train_rows_per_epoch"] = min(len(train), s.rows_per_epoch)
    return TrainedSIF(tok, mixer, predict, table, columns, info)


# The IAT rows' budget (issue 13): history L = the downstream L, every training row each epoch,
# the experiment's epochs. Costs about 16x the default SIF row's CPU per epoch at quick sizes.
EQUAL_BUDGET = replace(SETTINGS, history_divisor=1, rows_per_epoch=10**12, max_epochs=10**6,
                       val_rows_per_epoch=10**12)


def _row(history_mode: str = "factored", item_id_only: bool = False, dense: bool = False,
         settings: SIFSettings = SETTINGS):
    def row(data: PreparedData, seed: int, cfg: ExperimentConfig) -> RowResult:
        s = settings
        prepared = cfg.shared(("sif_inputs", id(data)), lambda: prepare_inputs(data))
        pretrained, tok_info = cfg.shared(("sif_tokenizer", id(data), seed),
                                          lambda: pretrain_tokenizer(data, prepared, seed, s))
        trained = train_sif(data, prepared, pretrained, seed, cfg, s, history_mode, item_id_only, dense)
        tok, columns = trained.tokenizer, trained.columns
        val, test = data.split_indices(1), data.split_indices(2)
        final = trained.table(True)  # what the source side would store
        if dense:
            token_bytes = dense_sample_bytes(tok.n_subtokens, s.d_s)
        else:
            token_bytes = (len(columns) if columns else tok.n_subtokens) * s.levels * tok.codes_dtype.itemsize
        extra = {
            "compression_ratio": compression_ratio(prepared.raw_bytes, token_bytes),
            "raw_sample_bytes": prepared.raw_bytes,
            "token_bytes": token_bytes,
            "n_subtokens": tok.n_subtokens,
            "layout": [f"{t.group}[{t.slot}]: {', '.join(t.fields)}" for t in tok.layout],
            "history_len": trained.info["history_len"],
            "train_rows_per_epoch": trained.info["train_rows_per_epoch"],
            "tokenizer_pretrain": tok_info,
            "train": {k: trained.info[k] for k in ("best_val_auc", "best_epoch", "epochs")},
        }
        if not dense:
            test_inputs = prepared.inputs.index(torch.from_numpy(test))
            extra["codebook_health"] = codebook_health(tok.quantizer, tok.encode(test_inputs), final[test])
        return RowResult(trained.predict(val, final), trained.predict(test, final), extra)

    return row


register_row("sif", _row(), description="SIF: HGAQ Token Samples + factored SIF-Mixer")
register_row("sif_equal_budget", _row(settings=EQUAL_BUDGET), default=False,
             description="SIF on the IAT rows' budget: history L = the downstream L, every training row, "
                         "the same epochs (not the CPU-capped default)")
register_row("sif_item_id_only", _row(item_id_only=True),
             description="SIF ablation: history samples reduced to the item id (Table 3)")
register_row("sif_dense_raw", _row(dense=True),
             description="SIF ablation: dense sub-token vectors as history, no quantization (Table 3)")
register_row("sif_pooled_then_attend", _row(history_mode="pooled"),
             description="SIF ablation: each history sample pooled, then attention across samples (Table 4)")
register_row("sif_flat_attention", _row(history_mode="flat"),
             description="SIF ablation: all history sub-tokens flattened, ordinary attention (Table 4)")
