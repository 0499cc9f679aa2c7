"""The base of every spec model: frozen, and unknown keys refused."""

from pydantic import BaseModel, ConfigDict


class FrozenSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
