"""SIF (Sample Is Feature): the Sample Tokenizer (HGAQ residual VQ) and the SIF-Mixer."""
from models.sif.compression import compression_ratio, dense_sample_bytes, raw_sample_bytes, token_sample_bytes
from models.sif.health import code_perplexity, codebook_health
from models.sif.losses import LossWeights, alignment_loss, auxiliary_pctr_loss, ranking_loss, total_loss
from models.sif.mixer import HISTORY_MODES, HistoryMemory, SIFMixer, recency_bucket
from models.sif.rvq import ResidualVQ, RVQOutput
from models.sif.spec import (
    CategoricalField,
    FeatureGroup,
    SampleInputs,
    SampleSchema,
    SubToken,
    split_into_subtokens,
    validate_inputs,
)
from models.sif.tokenizer import SampleTokenizer, TokenizerOutput, codes_from_token_samples

__all__ = [
    "CategoricalField",
    "FeatureGroup",
    "HISTORY_MODES",
    "HistoryMemory",
    "LossWeights",
    "RVQOutput",
    "ResidualVQ",
    "SIFMixer",
    "SampleInputs",
    "SampleSchema",
    "SampleTokenizer",
    "SubToken",
    "TokenizerOutput",
    "alignment_loss",
    "auxiliary_pctr_loss",
    "code_perplexity",
    "codebook_health",
    "codes_from_token_samples",
    "compression_ratio",
    "dense_sample_bytes",
    "raw_sample_bytes",
    "ranking_loss",
    "recency_bucket",
    "split_into_subtokens",
    "token_sample_bytes",
    "total_loss",
    "validate_inputs",
]
