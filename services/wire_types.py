"""Pydantic field types for request bodies, checked by contract.validation.

Pydantic's lax mode would turn ``true`` into 1 and ``"1.5"`` into a float before any check
saw them; these types validate the value as it came off the wire, with the contract's words,
so a REST body is rejected exactly where the same value in gRPC or the raw stream is.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from contract import validation as v


def _time_ms(value: object) -> int:
    number, problem = v.time_ms_problem(value)
    if problem:
        raise PydanticCustomError("invalid_time", problem)
    return number  # type: ignore[return-value]


def _id(required: bool):
    def check(value: str) -> str:
        problem = v.id_problem(value, required=required)
        if problem:
            raise PydanticCustomError("invalid_id", problem)
        return value

    return check


_ID_SCHEMA = {"type": "string", "maxLength": v.MAX_ID_LENGTH, "description": "no NUL or control characters"}

TimeMs = Annotated[int, BeforeValidator(_time_ms), WithJsonSchema({
    "anyOf": [{"type": "integer", "exclusiveMinimum": 0, "maximum": v.MAX_TIMESTAMP_MS},
              {"type": "string", "pattern": "^[0-9]{1,14}$"}],
    "description": "unix milliseconds; an int64 as a JSON integer or a decimal string (proto3 JSON)",
})]
Id = Annotated[str, AfterValidator(_id(required=True)), WithJsonSchema({**_ID_SCHEMA, "minLength": 1})]
OptionalId = Annotated[str, AfterValidator(_id(required=False)), WithJsonSchema(_ID_SCHEMA)]
