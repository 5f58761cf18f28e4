"""The one validator of what clients send: ids, times and feature values.

The source service (POST /v1/instances and the raw-instance stream) and the ranking service
(REST and gRPC Score) check through these functions, so the same value is accepted or
rejected by all of them, with the same words. Each check raises ``InvalidField`` naming the
offending field with a JSON path such as ``instances[3].user_id`` or
``candidates[1].features.categorical[genre]``.

Feature *names* depend on the model (its schema), so the model's featurizer checks them
(``Featurizer.check_names``, called by both services); here are the checks that need no model.

Pure Python: no pydantic, FastAPI, torch or redis. Where pydantic parses a body, the services
wrap these functions as field types (services/wire_types.py).
"""
from __future__ import annotations

import math
import re

MAX_ID_LENGTH = 512
# Unix ms after 1970 and before the year 3000: anything else is a unit mistake. Redis
# sorted-set scores are doubles, exact below 2**53, which this bound keeps well inside.
MAX_TIMESTAMP_MS = 32_503_680_000_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_FEATURES = 256  # per features map (context, one candidate, one instance)
# Long enough for a multi-valued cell ("a|b|c|..."), short enough that one value cannot
# fill a request body or an embedding cache entry with megabytes.
MAX_CATEGORICAL_LENGTH = 1024

# C0 and C1 controls and DEL (Unicode category Cc), and lone surrogates (not valid Unicode:
# they cannot be written to Redis as UTF-8).
_FORBIDDEN_IN_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_DECIMAL = re.compile(r"-?[0-9]+")


class InvalidField(ValueError):
    """A value that fails validation; ``field`` is its JSON path, ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- ids -----------------------------------------------------------------------------------
def id_problem(value: object, *, required: bool = True, max_length: int = MAX_ID_LENGTH) -> str | None:
    """Why ``value`` is not a valid id, or None. Ids are non-empty (unless not required),
    at most ``max_length`` characters, and hold no NUL, control character or lone surrogate."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty" if required else None
    if len(value) > max_length:
        return f"longer than {max_length} characters ({len(value)})"
    bad = _FORBIDDEN_IN_ID.search(value)
    if bad:
        char = bad.group()
        if char == "\x00":
            return "contains a NUL character"
        if "\ud800" <= char <= "\udfff":
            return f"contains a lone surrogate (U+{ord(char):04X}), not valid Unicode"
        return f"contains a control character (U+{ord(char):04X}) at position {bad.start()}"
    return None


def check_id(value: object, field: str, *, required: bool = True) -> str:
    problem = id_problem(value, required=required)
    if problem:
        raise InvalidField(field, problem)
    return value  # type: ignore[return-value]


# --- times ---------------------------------------------------------------------------------
def int64_problem(value: object) -> tuple[int | None, str | None]:
    """(the int64, None) or (None, why not). Strict: a JSON integer, or a decimal string as
    proto3's JSON mapping writes an int64; never a boolean (``true`` is not 1) or a float."""
    if isinstance(value, bool):
        return None, f"must be an integer, got {str(value).lower()}"
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = int(value)
    elif isinstance(value, str):
        return None, f"must be an integer or a decimal string, got {value[:40]!r}"
    else:
        return None, f"must be an integer, got {type(value).__name__}"
    if not INT64_MIN <= number <= INT64_MAX:
        return None, "outside the int64 range"
    return number, None


def time_ms_problem(value: object) -> tuple[int | None, str | None]:
    number, problem = int64_problem(value)
    if problem:
        return None, problem
    if not 0 < number <= MAX_TIMESTAMP_MS:
        return None, f"must be unix milliseconds in (0, {MAX_TIMESTAMP_MS}], got {number}"
    return number, None


def check_time_ms(value: object, field: str) -> int:
    """A request or instance time: strict int64 (see ``int64_problem``), positive unix ms."""
    number, problem = time_ms_problem(value)
    if problem:
        raise InvalidField(field, problem)
    return number  # type: ignore[return-value]


# --- feature values --------------------------------------------------------------------------
def categorical_value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if len(value) > MAX_CATEGORICAL_LENGTH:
        return f"longer than {MAX_CATEGORICAL_LENGTH} characters ({len(value)})"
    if "\x00" in value:
        return "contains a NUL character"
    return None


def numeric_value_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {type(value).__name__}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None


def check_features(categorical: dict, numeric: dict, field: str) -> None:
    """One features map (``field`` is its path, e.g. ``context`` or ``instances[3].features``):
    at most MAX_FEATURES entries, names valid as ids, bounded categorical values, finite numbers."""
    if len(categorical) + len(numeric) > MAX_FEATURES:
        raise InvalidField(field, f"more than {MAX_FEATURES} features")
    for name, value in categorical.items():
        check_id(name, f"{field}.categorical")
        problem = categorical_value_problem(value)
        if problem:
            raise InvalidField(f"{field}.categorical[{name}]", problem)
    for name, value in numeric.items():
        check_id(name, f"{field}.numeric")
        problem = numeric_value_problem(value)
        if problem:
            raise InvalidField(f"{field}.numeric[{name}]", problem)
