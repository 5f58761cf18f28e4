"""Typed messages of POST /v1/instances (DESIGN.md section 7) and POST /v1/labels, and their validation.

Pydantic parses with strict types (services/wire_types.py: ids, times) and rejects malformed
JSON, NaN/inf and unknown keys with a 422 that names the field; `validate_against_model` adds
the contract's checks of feature values (contract/validation.py, shared with the ranking
service) and what only the loaded model knows (feature names, task names), and
`distinct_instances` folds repeats of one InsID, so a whole batch is accepted or rejected
before anything is written.
"""
from __future__ import annotations

import math

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
)

from contract.ids import ins_id
from contract.validation import InvalidField, check_features
from models.runtime.featurizer import FeatureError, Featurizer
from services.wire_types import Id, TimeMs


def binary_labels(labels: dict[str, int]) -> dict[str, int]:
    """The check both instances and label updates make: every label is 0 or 1."""
    for task, value in labels.items():
        if value not in (0, 1):
            raise ValueError(f"labels[{task}] must be 0 or 1, got {value}")
    return labels


class InstanceFeatures(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categorical: dict[str, str] = Field(default_factory=dict)
    numeric: dict[str, StrictFloat] = Field(default_factory=dict)

    @field_validator("numeric")
    @classmethod
    def _finite(cls, values: dict[str, float]) -> dict[str, float]:
        for key, value in values.items():
            if not math.isfinite(value):
                raise ValueError(f"numeric[{key}] must be a finite number, got {value}")
        return values


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    request_id: Id
    user_id: Id
    item_id: Id
    timestamp_ms: TimeMs
    features: InstanceFeatures = Field(default_factory=InstanceFeatures)
    labels: dict[str, StrictInt] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _binary(cls, labels: dict[str, int]) -> dict[str, int]:
        return binary_labels(labels)


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1)


class IngestResponse(BaseModel):
    # Distinct instances accepted: an instance repeated in one request (same InsID, same
    # content) is one instance, stored once, and counted once.
    accepted: int
    # One per instance of the request, in its order (a repeat repeats its id); decimal
    # strings: a uint64 does not survive a JSON number in most clients.
    ins_ids: list[str]


class IngestRejected(ValueError):
    """A batch rejected as a whole; ``field`` is a JSON path such as instances[3].labels[like]."""

    def __init__(self, field: str, message: str, indices: list[int] | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.indices = indices  # the instances involved, where more than one is


def validate_against_model(instances: list[Instance], featurizer: Featurizer, tasks: list[str],
                           max_batch: int) -> None:
    if len(instances) > max_batch:
        raise IngestRejected("instances", f"{len(instances)} instances, the limit is {max_batch}")
    known_tasks = set(tasks)
    for i, inst in enumerate(instances):
        try:
            check_features(inst.features.categorical, inst.features.numeric, f"instances[{i}].features")
        except InvalidField as err:
            raise IngestRejected(err.field, err.message) from None
        try:
            featurizer.check_names(inst.features.categorical, inst.features.numeric, f"instances[{i}].features")
        except FeatureError as err:
            raise IngestRejected(err.field, err.message) from None
        for task in inst.labels:
            if task not in known_tasks:
                raise IngestRejected(f"instances[{i}].labels[{task}]", f"unknown task (this model has {tasks})")


def distinct_instances(instances: list[Instance]) -> tuple[list[Instance], list[int]]:
    """Fold repeats of one InsID: (the distinct instances, and for each input instance the
    position of its distinct instance).

    A repeat identical to the first is the same instance sent twice (a client retrying inside
    one batch) and is stored once. A repeat that differs (other user, labels or features) is a
    conflict: storing either would silently drop the other, so the batch is rejected, naming
    both indices.
    """
    seen: dict[int, tuple[int, int]] = {}  # InsID -> (position among the distinct, input index)
    distinct: list[Instance] = []
    positions: list[int] = []
    for i, inst in enumerate(instances):
        key = ins_id(inst.request_id, inst.item_id, inst.timestamp_ms)
        if key not in seen:
            seen[key] = (len(distinct), i)
            distinct.append(inst)
        k, j = seen[key]
        if inst != distinct[k]:
            differ = " and ".join(f for f in ("user_id", "features", "labels")
                                  if getattr(inst, f) != getattr(distinct[k], f))
            raise IngestRejected(
                f"instances[{i}]",
                f"same InsID (request_id, item_id, timestamp_ms) as instances[{j}] but a different {differ}: "
                f"instances[{j}] and instances[{i}] conflict",
                indices=[j, i])
        positions.append(k)
    return distinct, positions


# ---- POST /v1/labels: labels that arrive late (storage/late_labels.py) ---------------------

class LabelUpdateItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    ins_id: str = Field(pattern=r"^[0-9]{1,20}$", description="the InsID /v1/instances returned (decimal)")
    labels: dict[str, StrictInt] = Field(min_length=1)
    arrival_ms: TimeMs

    @field_validator("ins_id")
    @classmethod
    def _uint64(cls, value: str) -> str:
        if int(value) >= 2**64:
            raise ValueError(f"must be an unsigned 64-bit int, got {value}")
        return value

    @field_validator("labels")
    @classmethod
    def _binary(cls, labels: dict[str, int]) -> dict[str, int]:
        return binary_labels(labels)


class LabelsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    updates: list[LabelUpdateItem] = Field(min_length=1)


class LabelItemResult(BaseModel):
    ins_id: str
    labels: dict[str, str]  # task -> outcome (storage.late_labels.OUTCOMES)


class LabelsResponse(BaseModel):
    stored: int      # labels newly joined
    refused: int     # conflict, window_closed, early, incompatible
    unknown: int     # labels of InsIDs with no stored record
    results: list[LabelItemResult]  # one per update, in order


class ModelInfo(BaseModel):
    """``GET /v1/model``: the source model serving now (a hot reload changes it)."""

    name: str
    version: str
    lineage: str | None   # None: an artifact exported before lineages
    ordinal: int | None
    runtime: str
    device: str


def validate_label_updates(updates: list[LabelUpdateItem], tasks: list[str], max_batch: int) -> None:
    if len(updates) > max_batch:
        raise IngestRejected("updates", f"{len(updates)} updates, the limit is {max_batch}")
    known = set(tasks)
    for i, update in enumerate(updates):
        for task in update.labels:
            if task not in known:
                raise IngestRejected(f"updates[{i}].labels[{task}]", f"unknown task (this model has {tasks})")
