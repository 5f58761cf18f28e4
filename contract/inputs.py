"""The model input contract: names, dtypes and shapes of every exported forward (written into manifest.json)."""
from __future__ import annotations

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
