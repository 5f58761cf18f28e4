"""Typed messages of POST /v1/instances (DESIGN.md section 7) and their validation.

Pydantic rejects malformed JSON, NaN/inf, empty ids and negative timestamps with a 422 that
names the field; `validate_against_model` adds what only the loaded model knows (feature names,
task names), so a whole batch is accepted or rejected before anything is written.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.runtime.featurizer import FeatureError, Featurizer

MAX_ID_LENGTH = 512
# Unix ms before the year 3000 (Redis sorted-set scores are doubles: exact below 2**53).
MAX_TIMESTAMP_MS = 32_503_680_000_000


class InstanceFeatures(BaseModel):
    model_config = ConfigDict(extra="forbid")
    categorical: dict[str, str] = Field(default_factory=dict)
    numeric: dict[str, float] = Field(default_factory=dict)

    @field_validator("numeric")
    @classmethod
    def _finite(cls, values: dict[str, float]) -> dict[str, float]:
        import math

        for key, value in values.items():
            if not math.isfinite(value):
                raise ValueError(f"numeric[{key}] must be a finite number, got {value}")
        return values


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    request_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    timestamp_ms: int = Field(ge=0, le=MAX_TIMESTAMP_MS)
    features: InstanceFeatures = Field(default_factory=InstanceFeatures)
    labels: dict[str, int] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _binary(cls, labels: dict[str, int]) -> dict[str, int]:
        for task, value in labels.items():
            if value not in (0, 1):
                raise ValueError(f"labels[{task}] must be 0 or 1, got {value}")
        return labels


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1)


class IngestResponse(BaseModel):
    accepted: int
    ins_ids: list[str]  # decimal strings: uint64 does not survive a JSON number in most clients


class IngestRejected(ValueError):
    """A batch rejected as a whole; ``field`` is a JSON path such as instances[3].labels[like]."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_against_model(instances: list[Instance], featurizer: Featurizer, tasks: list[str],
                           max_batch: int) -> None:
    if len(instances) > max_batch:
        raise IngestRejected("instances", f"{len(instances)} instances, the limit is {max_batch}")
    known_tasks = set(tasks)
    for i, inst in enumerate(instances):
        try:
            featurizer.check_names(inst.features.categorical, inst.features.numeric, f"instances[{i}].features")
        except FeatureError as err:
            raise IngestRejected(err.field, err.message) from None
        for task in inst.labels:
            if task not in known_tasks:
                raise IngestRejected(f"instances[{i}].labels[{task}]", f"unknown task (this model has {tasks})")
