"""Metrics that JSON can carry: a NaN or infinite number becomes null, the rest stays."""

import json
import math

import numpy as np
import pytest

from shared.jobs import JobRecord, StageRecord
from shared.metrics import dumps_metrics, is_finite, json_safe, loads_metrics
from shared.specs import parse_job_spec
from tests.specs import digits_spec


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan"), np.inf])
def test_a_non_finite_number_becomes_none_and_is_flagged(bad: float) -> None:
    assert json_safe({"train_loss": bad}) == {"train_loss": None}
    assert not is_finite({"train_loss": bad})
    assert not is_finite(bad)


@pytest.mark.parametrize("good", [0.0, -1.5, 1e308, 5e-324, 0, 7, -3, True, np.float64(0.25)])
def test_finite_numbers_stay_as_they_are(good: float) -> None:
    safe = json_safe({"value": good})
    assert safe == {"value": good} and type(safe["value"]) is type(good)
    assert is_finite({"value": good}) and is_finite(good)


def test_nested_rows_and_lists_are_made_safe_and_other_values_kept() -> None:
    row = {"stage": "train", "epoch": 3, "metrics": {"val_mse": math.nan, "lr": 0.1},
           "curve": [1.0, math.inf], "note": None}  # fmt: skip
    assert json_safe(row) == {"stage": "train", "epoch": 3,
                              "metrics": {"val_mse": None, "lr": 0.1},
                              "curve": [1.0, None], "note": None}  # fmt: skip
    assert not is_finite(row) and is_finite(json_safe(row))
    assert math.isnan(row["metrics"]["val_mse"])  # the input is not changed


def test_dumps_writes_null_where_json_dumps_would_write_nan() -> None:
    metrics = {"train_loss": math.nan, "val_mse": -math.inf, "epoch_seconds": 1.25}
    assert "NaN" in json.dumps(metrics)  # what an old worker wrote into Redis
    text = dumps_metrics(metrics)
    assert strict_loads(text) == {"train_loss": None, "val_mse": None, "epoch_seconds": 1.25}


def test_loads_reads_what_an_old_worker_wrote_as_null() -> None:
    old = json.dumps({"train_loss": math.nan, "val_mse": math.inf, "x": -math.inf, "ok": 2.0})
    assert loads_metrics(old) == {"train_loss": None, "val_mse": None, "x": None, "ok": 2.0}


def test_a_record_with_null_metrics_round_trips_through_its_json() -> None:
    job = JobRecord.for_spec(parse_job_spec(digits_spec()))
    stage = StageRecord(name="train", metrics={"train_loss": None, "val_mse": 0.5},
                        result={"val_mse": None, "pca_val_mse": 0.1})  # fmt: skip
    job = job.model_copy(update={"metrics": {"train_loss": None}, "stages": [stage]})
    text = job.model_dump_json()
    strict_loads(text)
    again = JobRecord.model_validate_json(text)
    assert again.metrics == {"train_loss": None}
    assert again.stages[0].metrics == {"train_loss": None, "val_mse": 0.5}
    assert again.stages[0].result == {"val_mse": None, "pca_val_mse": 0.1}


def test_a_record_written_with_nan_metrics_reads_back_as_null() -> None:
    # pydantic writes a NaN float as null; before metrics could be null that record could not
    # be read again, and every read of the job failed.
    job = JobRecord.for_spec(parse_job_spec(digits_spec()))
    stage = job.stages[0].model_copy(update={"result": {"val_mse": math.nan}})
    job = job.model_copy(update={"metrics": {"train_loss": math.inf}, "stages": [stage]})
    again = JobRecord.model_validate_json(job.model_dump_json())
    assert again.metrics == {"train_loss": None} and again.stages[0].result == {"val_mse": None}
