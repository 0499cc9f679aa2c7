"""model_response: a pydantic model as the JSON response of a route, serialized once.

A route that returns a model has FastAPI validate it again against its `response_model`
before it serializes it, for a sync route on a thread of the pool (one more hop per
request); a JobRecord carries its whole spec, so that is a second full validation of what
the store has just built and validated. The routes on the hot paths (submit, read, list,
cancel) return this instead, with `response_model=` kept on the route for the OpenAPI
document.
"""

from fastapi import Response
from pydantic import BaseModel


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    # by_alias, as FastAPI serializes a response_model; a NaN is written as null (pydantic's
    # default), so the body is strict JSON.
    return Response(
        model.model_dump_json(by_alias=True), status_code=status_code, media_type="application/json"
    )
