"""The serving modules: what the exported artifacts run (tensors in, probabilities / InsEmbs and codes out)."""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from models.nn.base import FeatureShape, ModelConfig
from models.nn.downstream import HistoryMemory, IATDownstream, gap_bucket
from models.nn.sif.mixer import SIFMixer, recency_bucket
from models.nn.sif.rvq import ResidualVQ
from models.nn.sif.spec import (
    CategoricalField,
    FeatureGroup,
    SampleInputs,
    SampleSchema,
)
from models.nn.sif.subtokens import SubTokenEncoder
from models.nn.source import UserOrderSource


class VocabCompactor(nn.Module):
    """Hashed ids -> the SIF models' compact ids (``models.training.sif.rows._compact``): 1..V by the
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


class IATRanking(nn.Module):
    """Shared-history IAT downstream model (``ModelConfig.attention == "shared"``).

    Everything that depends on the user alone is computed once per request (``user_state``):
    the encoded history memory and the behaviour sequence's keys/values; the C candidates then
    attend to it (``score_user``). ``forward`` is the two in a row (the exported contract); the
    runtime calls the halves separately to reuse a user state across requests."""

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

    def history_inputs(self, hist_emb, hist_labels, hist_ts, hist_mask, request_ms):
        """(InsTokens [1, n, w], mask [1, n]) exactly as ``iat_batch`` builds them offline.
        A label of -1 (unknown) stays unknown: the model has an embedding for it."""
        emb = hist_emb * hist_mask.unsqueeze(-1).to(hist_emb.dtype)
        ts = torch.where(hist_mask, hist_ts, request_ms.expand_as(hist_ts))
        gaps = gap_bucket(request_ms, ts.unsqueeze(0))
        tokens = self.model.history_tokens(emb.unsqueeze(0), hist_labels.unsqueeze(0),
                                           hist_mask.unsqueeze(0), gaps)
        return tokens, hist_mask.unsqueeze(0)

    def sequence_labels(self, hist_labels, hist_mask) -> torch.Tensor:
        """The behaviour sequence's past labels [1, seq_len, T] (-1: unknown or padding), as
        ``feature_batch`` builds them (the same for every candidate of the request)."""
        labels = torch.where(hist_mask.unsqueeze(-1), hist_labels, torch.full_like(hist_labels, -1))
        return F.pad(labels, (0, 0, 0, self.seq_len), value=-1)[: self.seq_len].unsqueeze(0)

    def behaviour_sequence(self, hist_items, hist_mask) -> torch.Tensor:
        """The user's newest ``seq_len`` history item hashes, -1 padded: [1, seq_len] (the same
        sequence for every candidate of the request)."""
        items = torch.where(hist_mask, hist_items, torch.full_like(hist_items, -1))
        return F.pad(items, (0, self.seq_len), value=-1)[: self.seq_len].unsqueeze(0)

    def user_state(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms):
        """(history keys, values, mask, sequence keys, values, mask): the request's user side,
        batch 1. Depends on the request time only through the history's age buckets."""
        tokens, mask = self.history_inputs(hist_emb, hist_labels, hist_ts, hist_mask, request_ms)
        memory = self.model.encode_history(tokens, mask)
        # the behaviour sequence with its past labels, embedded and projected once for all candidates
        seq_keys, seq_values, seq_mask = self.model.backbone.seq_memory(
            self.behaviour_sequence(hist_items, hist_mask), self.sequence_labels(hist_labels, hist_mask))
        return memory.keys, memory.values, memory.mask, seq_keys, seq_values, seq_mask

    def score_user(self, keys, values, mask, seq_keys, seq_values, seq_mask, cat, multi, num):
        """Probabilities [C, T] of C candidates against one ``user_state``."""
        batch = {"cat": cat, "multi": multi, "num": num, "item": cat[:, self.item_column]}
        logits = self.model.score(HistoryMemory(keys, values, mask), batch, (seq_keys, seq_values, seq_mask))
        return torch.sigmoid(logits)

    def score_users(self, keys, values, mask, seq_keys, seq_values, seq_mask, slots, pad_index, cat, multi, num):
        """Probabilities [C, T] of the candidates of R requests against their own user states,
        stacked (batch R, history keys padded with mask False): cross-request batching. Row i
        is ``score_user`` of its request's state (``slots`` [C] / ``pad_index`` [R, W]: which
        request each row belongs to, ``CrossAttention.grouped``)."""
        batch = {"cat": cat, "multi": multi, "num": num, "item": cat[:, self.item_column]}
        logits = self.model.score_grouped(HistoryMemory(keys, values, mask), batch,
                                          (seq_keys, seq_values, seq_mask), slots, pad_index)
        return torch.sigmoid(logits)

    def forward(self, hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms, cat, multi, num):
        state = self.user_state(hist_emb, hist_labels, hist_ts, hist_items, hist_mask, request_ms)
        return self.score_user(*state, cat, multi, num)


def stack_user_states(states: list[tuple[torch.Tensor, ...]], counts: list[int]
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """``IATRanking.score_users``'s inputs besides the candidates: R user states of batch 1
    (``user_state``) stacked to batch R, each history padded to the longest with mask False
    (a masked key has zero weight, so a request's scores do not depend on the others'), and
    (slots [C], pad_index [R, W]) for request r owning the next ``counts[r]`` candidate rows."""
    keys, values, mask, seq_keys, seq_values, seq_mask = zip(*states)
    longest = max(k.shape[2] for k in keys)

    def pad(t: torch.Tensor, dim: int, value) -> torch.Tensor:
        missing = longest - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t, t.new_full(shape, value)], dim=dim)

    stacked = (torch.cat([pad(k, 2, 0.0) for k in keys]), torch.cat([pad(v, 2, 0.0) for v in values]),
               torch.cat([pad(m, 1, False) for m in mask]),
               torch.cat(seq_keys), torch.cat(seq_values), torch.cat(seq_mask))
    width = max(counts)
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    j = torch.arange(width)
    # a request with fewer than W candidates reads its own first row in the spare slots
    pad_index = starts[:, None] + torch.where(j[None, :] < torch.tensor(counts)[:, None], j[None, :], 0)
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    slots = owner * width + (torch.arange(int(sum(counts))) - starts[owner])
    return stacked, slots, pad_index


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
