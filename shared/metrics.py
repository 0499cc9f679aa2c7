"""Metrics as JSON can carry them: a number that is not finite becomes null.

A diverged run reports NaN or infinite losses. Python's `json` writes those as the bare words
`NaN` and `Infinity`, which no JSON parser accepts, and Starlette refuses to send them at all
(its JSONResponse uses allow_nan=False), so one such number made every read of the job a 500.
Every metric goes through `json_safe` before it is written anywhere: Redis, result.json,
metrics.jsonl, the job record. A null metric means "was not a finite number".
"""

import json
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

Metrics = dict[str, float | None]  # a stored metric: a finite number, or null


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite number in it (in dicts and lists too) made None."""
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, Real) and not math.isfinite(value):
        return None
    return value


def is_finite(value: Any) -> bool:
    """Whether no number in `value` (a number, or dicts and lists of them) is NaN or infinite."""
    if isinstance(value, Mapping):
        return all(is_finite(item) for item in value.values())
    if isinstance(value, list | tuple):
        return all(is_finite(item) for item in value)
    return not isinstance(value, Real) or math.isfinite(value)


def dumps_metrics(metrics: Mapping[str, Any]) -> str:
    """Metrics as JSON text, non-finite numbers as null; raises on anything else JSON lacks."""
    return json.dumps(json_safe(metrics), allow_nan=False)


def loads_metrics(text: str | bytes) -> Any:
    """Parse JSON written before metrics were made safe: `NaN` and `Infinity` read as None."""
    return json.loads(text, parse_constant=lambda _constant: None)
