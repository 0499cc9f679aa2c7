"""Storage quotas: what a job or an upload may take of the storage, and a ledger per tenant.

A job is charged at submission with an estimate from its spec (`estimate_job_bytes`): every
checkpoint holds the weights and Adam's two moments in float32, a stage keeps
`checkpoints_to_keep` of them plus the one being written, and the artifacts hold a few more
copies of the final weights and the validation codes. An upload is charged with its arrays as
stored (float32 x, int64 y). The ledger (`quota:<tenant>`, item -> bytes) is checked and
charged in one Lua script, so two submissions cannot both take the last room. A job's charge
goes when the job is deleted, or when the janitor finds its record expired (workers/janitor.py).

Items are named `job:<id>` and `dataset:<id>` (`job_item`, `dataset_item`).
"""

import math
from typing import Any

from shared.errors import QuotaExceeded, TooManyJobs
from shared.jobs import JobRecord
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.specs import (
    BUILTIN_ROWS,
    AnyJobSpec,
    AutoencoderSpec,
    ConvModelSpec,
    DataSpec,
    DenseModelSpec,
    LayerSpec,
    PretrainAutoencoderSpec,
    SemisupervisedSpec,
    StackedSpec,
)
from shared.stages import StagePlan, plan_stages
from shared.store import JobStore

DEFAULT_LIMIT_BYTES = 20 * 2**30  # as Settings.storage_quota_bytes
FLOAT_BYTES = 4
CHECKPOINT_COPIES = 3  # the weights and Adam's two moments, all float32
# encoder.pt, encoder.safetensors, autoencoder.pt, autoencoder.safetensors (or classifier.pt):
# each at most the whole model's weights.
ARTIFACT_COPIES = 4
FIXED_JOB_BYTES = 8 * 2**20  # figures, JSON, metrics.jsonl, stage logs and configs
BUILTIN_CLASSES = 10

# KEYS: ledger. ARGV: item, bytes, limit. Returns {1, used} when charged now, {0, used} when the
# item was charged before (a retry), {-1, used} when it does not fit; `used` is before this call.
_USED = """
local used = redis.call('GET', KEYS[2])
if not used then
  used = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do used = used + tonumber(v) end
  if used > 0 then redis.call('SET', KEYS[2], used) end
end
"""

# KEYS: ledger, its total. ARGV: item, bytes, limit. The total is kept beside the ledger, so a
# charge costs the same with 10 or 100,000 items in it (summing the ledger cost 2.5 ms at
# 10,000, and grew); a ledger from before the total is summed once.
_CHARGE = _USED + """
used = tonumber(used)
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {0, used} end
if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return {-1, used} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], ARGV[2])
return {1, used}
"""

# KEYS: ledger, its total. ARGV: items. Returns how many were charged.
_RELEASE = _USED + """
local released = 0
for _, item in ipairs(ARGV) do
  local charged = redis.call('HGET', KEYS[1], item)
  if charged then
    redis.call('HDEL', KEYS[1], item)
    redis.call('DECRBY', KEYS[2], charged)
    released = released + 1
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
return released
"""


def job_item(job_id: str) -> str:
    """The ledger item of a job."""
    return f"job:{job_id}"


def dataset_item(dataset_id: str) -> str:
    """The ledger item of a tenant's upload (each tenant that indexes it is charged)."""
    return f"dataset:{dataset_id}"


# -- estimates (pure) -------------------------------------------------------------------------
def dataset_bytes(shape: tuple[int, ...], labeled: bool) -> int:
    """Bytes of an upload's arrays as stored: float32 x of `shape`, int64 y when labeled."""
    return math.prod(shape) * FLOAT_BYTES + (shape[0] * 8 if labeled else 0)


def estimate_job_bytes(spec: AnyJobSpec) -> int:
    """The most storage a job may take: checkpoints of every stage, then its artifacts.

    Needs a resolved spec (an upload's shape looked up, as the API does before submitting).
    """
    stages = plan_stages(spec)
    kept = _checkpoints_to_keep(spec) + 1  # prune_run keeps this many: the newest is being written
    counts = [stage_parameters(spec, stage) for stage in stages]
    checkpoints = sum(counts) * FLOAT_BYTES * CHECKPOINT_COPIES * kept
    artifacts = max(counts) * FLOAT_BYTES * ARTIFACT_COPIES + _codes_bytes(spec) + FIXED_JOB_BYTES
    return checkpoints + artifacts


def describe_job(spec: AnyJobSpec) -> str:
    """How a job is named in a quota refusal."""
    stages = len(plan_stages(spec))
    keep = _checkpoints_to_keep(spec)
    label = f"{spec.kind} job {spec.name!r}" if spec.name else f"{spec.kind} job"
    return f"{label} ({stages} stage(s), {keep} + 1 checkpoints each)"


def stage_parameters(spec: AnyJobSpec, stage: StagePlan) -> int:
    """Parameters of the model a stage trains (what its checkpoints hold)."""
    data = spec.data
    if isinstance(spec, AutoencoderSpec):
        return _model_parameters(spec.model, data)
    if isinstance(spec, StackedSpec):
        return _stack_stage_parameters(spec.layers, data, stage)
    assert isinstance(spec, SemisupervisedSpec)
    pretrain = spec.pretrain
    classes = data.upload.classes if data.upload is not None else BUILTIN_CLASSES
    if stage.kind == "baseline":
        return _mlp_parameters(data.input_dim, spec.head.hidden, classes)
    if stage.kind == "head":  # the classifier holds the encoder (at most the whole pretraining)
        if isinstance(pretrain, PretrainAutoencoderSpec):
            encoder, code = _model_parameters(pretrain.model, data), pretrain.model.latent_dim
        else:
            encoder, code = _stack_parameters(pretrain.layers, data), pretrain.layers[-1].units
        return encoder + _mlp_parameters(code, spec.head.hidden, classes)
    if isinstance(pretrain, PretrainAutoencoderSpec):
        return _model_parameters(pretrain.model, data)
    return _stack_stage_parameters(pretrain.layers, data, stage)


def _checkpoints_to_keep(spec: AnyJobSpec) -> int:
    # As workers/tasks.py: a semisupervised job's stages all keep its pretraining's number.
    if isinstance(spec, SemisupervisedSpec):
        return spec.pretrain.training.checkpoints_to_keep
    return spec.training.checkpoints_to_keep


def _model_parameters(model: DenseModelSpec | ConvModelSpec, data: DataSpec) -> int:
    if isinstance(model, ConvModelSpec):
        return model.parameter_count(data.input_shape)
    return model.parameter_count(data.input_dim)


def _layer_inputs(layers: tuple[LayerSpec, ...], data: DataSpec) -> list[int]:
    return [data.input_dim, *(layer.units for layer in layers[:-1])]


def _stack_parameters(layers: tuple[LayerSpec, ...], data: DataSpec) -> int:
    inputs = _layer_inputs(layers, data)
    return sum(layer.as_model().parameter_count(n) for layer, n in zip(layers, inputs, strict=True))


def _stack_stage_parameters(
    layers: tuple[LayerSpec, ...], data: DataSpec, stage: StagePlan
) -> int:
    if stage.layer is None:  # finetune: the whole stack
        return _stack_parameters(layers, data)
    return layers[stage.layer].as_model().parameter_count(_layer_inputs(layers, data)[stage.layer])


def _mlp_parameters(inputs: int, hidden: tuple[int, ...], classes: int) -> int:
    sizes = [inputs, *hidden, max(classes, 1)]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))


def _codes_bytes(spec: AnyJobSpec) -> int:
    """val_codes.npy: the codes of the validation split, and as many values again for pictures."""
    data = spec.data
    if data.upload is not None:
        rows = data.upload.rows
    else:
        rows = BUILTIN_ROWS.get(data.dataset, data.n_samples)
    if isinstance(spec, AutoencoderSpec):
        code = spec.model.latent_dim
    elif isinstance(spec, StackedSpec):
        code = spec.layers[-1].units
    else:
        code = 0  # a semisupervised job writes no codes
    return 2 * math.ceil(rows * data.validation_fraction) * code * FLOAT_BYTES


# -- the ledger ---------------------------------------------------------------------------------
class Quotas:
    """A tenant's storage ledger in Redis, with its limit and the disk's free-space floor."""

    def __init__(
        self, client: Any, keys: Keys, limit_bytes: int = DEFAULT_LIMIT_BYTES,
        min_free_bytes: int = 0,
    ) -> None:  # fmt: skip
        self.redis: Any = client
        self.keys = keys
        self.limit_bytes = limit_bytes
        self.min_free_bytes = min_free_bytes
        self._charge = client.register_script(_CHARGE)
        self._release = client.register_script(_RELEASE)

    def _keys(self, tenant: str) -> list[str]:
        return [self.keys.quota(tenant), self.keys.quota_total(tenant)]

    def used(self, tenant: str) -> int:
        """Bytes charged to the tenant now."""
        total = self.redis.get(self.keys.quota_total(tenant))
        return int(total) if total is not None else sum(self.ledger(tenant).values())

    def ledger(self, tenant: str) -> dict[str, int]:
        """Item -> bytes charged to the tenant."""
        return {item: int(n) for item, n in self.redis.hgetall(self.keys.quota(tenant)).items()}

    def charge(
        self, tenant: str, item: str, nbytes: int, what: str | None = None,
        free_bytes: int | None = None,
    ) -> bool:  # fmt: skip
        """Charge `nbytes` for `item` if it fits the quota; QuotaExceeded (507) if not.

        Returns False when the item was charged before (a retry is not charged twice). With
        `free_bytes` (Storage.free_bytes()), nothing is charged while the disk has less than
        `min_free_bytes` free (507 too). `what` names the item in the refusal.
        """
        what = what or item
        if free_bytes is not None:
            self.require_free_disk(free_bytes, what)
        status, used = self._charge(keys=self._keys(tenant),
                                    args=[item, int(nbytes), self.limit_bytes])  # fmt: skip
        if int(status) < 0:
            quota = (f"{what}, under tenant {tenant!r}'s quota of {self.limit_bytes:,} bytes "
                     f"({int(used):,} in use; AETRAIN_STORAGE_QUOTA_BYTES),")  # fmt: skip
            raise QuotaExceeded(quota, nbytes, max(0, self.limit_bytes - int(used)))
        return int(status) == 1

    def require_free_disk(self, free_bytes: int, what: str) -> None:
        """QuotaExceeded (507) while the storage has less than `min_free_bytes` free."""
        if free_bytes < self.min_free_bytes:
            floor = (f"{what}: refused while the storage's free space is below "
                     "AETRAIN_MIN_FREE_DISK_BYTES; the disk")  # fmt: skip
            raise QuotaExceeded(floor, self.min_free_bytes, free_bytes)

    def release(self, tenant: str, *items: str) -> int:
        """Drop items from the ledger; returns how many were there."""
        if not items:
            return 0
        return int(self._release(keys=self._keys(tenant), args=list(items)))


def quotas_of(store: JobStore, settings: Settings) -> Quotas:
    """The ledger of a store with the deployment's limits."""
    return Quotas(store.redis, store.keys, settings.storage_quota_bytes,
                  settings.min_free_disk_bytes)  # fmt: skip


def submit_within_quota(
    store: JobStore,
    quotas: Quotas,
    job: JobRecord,
    free_bytes: int,
    idempotency_key: str | None = None,
    max_open: int | None = None,
    max_per_minute: int | None = None,
) -> tuple[JobRecord, bool]:
    """`store.submit` with the job's estimate charged first, so nothing is stored over quota.

    The charge is taken back if the job was not created (a retried Idempotency-Key returns
    the first job, which was charged when it was created) or if the submission failed. A
    retry of a stored job gets that job even when its quota is full now.
    """
    tenant, item = job.tenant, job_item(job.id)
    try:
        quotas.charge(tenant, item, estimate_job_bytes(job.spec), describe_job(job.spec),
                      free_bytes)  # fmt: skip
    except QuotaExceeded:
        if idempotency_key is None:
            raise
        try:  # max_open=0 stores nothing: it answers a known key with its job, else refuses
            return store.submit(job, idempotency_key, max_open=0)
        except TooManyJobs:  # the key is new: the refusal stands
            pass
        raise
    try:
        stored, created = store.submit(job, idempotency_key, max_open, max_per_minute)
    except BaseException:
        quotas.release(tenant, item)
        raise
    if not created:
        quotas.release(tenant, item)
    return stored, created
