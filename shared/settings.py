"""Deployment settings shared by the API and the dispatcher (environment, prefix AETRAIN_)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import locations
from shared.logs import LogFormat


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AETRAIN_", extra="ignore")

    home: Path = Field(default=Path(".aetrain"), description="state folder of the embedded stack")
    storage: str | None = Field(
        default=None,
        description="storage root: a local or mounted path, or s3://bucket/prefix (with the "
        "AWS_* variables); default $HOME/storage",
    )
    redis_url: str | None = Field(default=None, description="unset under `up`: spawn redis")
    key_prefix: str = "aetrain"
    auth: Literal["off", "on"] = "on"
    lease_ttl_s: float = Field(default=15.0, gt=0.5, description="lease life without heartbeat")
    dispatcher_slots: int = Field(
        default=4, ge=1, le=64, description="jobs one dispatcher runs at once, as room allows"
    )
    max_open_jobs: int = Field(
        default=100, ge=1, le=1_000_000, description="queued + running jobs per tenant (429)"
    )
    max_takeovers: int = Field(
        default=3, ge=0, le=100, description="times a job's lost runner is replaced, then failed"
    )
    max_upload_bytes: int = Field(default=256 * 2**20, ge=1024, description="dataset file cap")
    # 256 MiB of float32 holds MNIST-70k; each training rank holds about three copies while
    # it loads and splits, so 1 GiB would be 3 GiB per rank.
    max_dataset_bytes: int = Field(
        default=256 * 2**20, ge=1024, description="cap on a dataset's arrays once unpacked"
    )
    max_submissions_per_minute: int = Field(
        default=600, ge=1, le=1_000_000, description="job submissions per tenant and minute (429)"
    )
    max_body_bytes: int = Field(
        default=2**20, ge=1024, le=2**30, description="cap on a JSON request body (413)"
    )
    allowed_hosts: str = Field(
        default="",
        description="comma-separated Host names served with auth off, besides loopback ones",
    )
    max_event_streams: int = Field(
        default=16, ge=1, le=100_000, description="open event streams per tenant (429)"
    )
    retention_days: float = Field(
        default=30.0, gt=0, le=36_500, description="finished jobs are deleted after this long"
    )
    storage_quota_bytes: int = Field(
        default=20 * 2**30, ge=0, description="storage a tenant's jobs and uploads may take (507)"
    )
    min_free_disk_bytes: int = Field(
        default=2**30, ge=0, description="submissions and uploads are refused below this (507)"
    )
    warm_idle_s: float = Field(
        default=60.0, ge=0, le=86_400, description="an idle warm worker group is let go after this"
    )
    warm_groups: int = Field(
        default=0, ge=0, le=64, description="one-worker groups kept started (`up` sets 1)"
    )
    cluster_max_cpus: float | None = Field(
        default=None, gt=0, description="CPUs an autoscaling Ray cluster may grow to"
    )
    cluster_max_gpus: float | None = Field(
        default=None, ge=0, description="GPUs an autoscaling Ray cluster may grow to"
    )
    group_start_timeout_s: float = Field(
        default=1800.0, gt=0, le=86_400,
        description="a worker group not ready by then fails its stage (the cluster did not grow)",
    )  # fmt: skip
    # A stage logs a line or two per epoch: 1 MiB is a whole log but for pathological ones,
    # and each request reads at most this much into memory.
    stage_log_max_bytes: int = Field(
        default=2**20, ge=1024, le=64 * 2**20,
        description="most bytes of a stage log one GET .../logs sends (page on with ?offset=)",
    )  # fmt: skip
    stage_log_follow_max_s: float = Field(
        default=600.0, gt=0, le=3600,
        description="a followed log's stream ends after this long (the CLI reconnects)",
    )  # fmt: skip
    ray_address: str | None = Field(default=None, validation_alias="RAY_ADDRESS")
    # -- observability (docs/observability.md) --
    log_format: LogFormat = Field(
        default="auto", description="log lines as `json` or `plain`; `auto`: plain on a terminal"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api_workers: int = Field(
        default=1, ge=1, le=64,
        description="API worker processes on one port (about one per core under load)",
    )  # fmt: skip
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="serve the API's metrics on this port, without a key, instead of /metrics",
    )  # fmt: skip
    metrics_tenant: str | None = Field(
        default=None, description="with auth on, only this tenant's keys may read /metrics"
    )
    dispatcher_metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="a dispatcher serves its metrics on this port"
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="bind address of the metrics ports (0.0.0.0 in a pod)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def extra_allowed_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    @property
    def cluster_max(self) -> dict[str, float]:
        """The most the cluster may grow to, per resource, where a setting says so."""
        most = {"CPU": self.cluster_max_cpus, "GPU": self.cluster_max_gpus}
        return {kind: amount for kind, amount in most.items() if amount is not None}

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86_400

    @field_validator("storage")
    @classmethod
    def _storage_is_a_path_or_s3(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            return locations.check_url(value)  # ValueError: the setting names what is wrong
        return value

    @property
    def storage_root(self) -> str:
        if self.storage and locations.is_remote(self.storage):
            return self.storage
        return self.storage or str((self.home / "storage").resolve())

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "AETRAIN_REDIS_URL is not set: point it at Redis, or run `aetrain up`, "
                "which starts a private redis-server"
            )
        return self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
