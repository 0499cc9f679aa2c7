"""The scheduler: the CPUs and GPUs that stages of running jobs hold on the Ray cluster.

A stage asks (`reserve`) before it is handed to Ray. Asks wait in queue order (priority, then
job age, then stage) and the first one is granted as soon as it fits, so a big stage is never
starved by a stream of small ones. A grant belongs to its job's fencing token: the grants of a
runner whose lease is gone are swept at the next ask, so a dead dispatcher gives its resources
back once its lease expires; and a runner whose lease is gone can neither ask (its ask would
replace the new owner's, or be told the new owner's grant is its own) nor release.
"""

import json
from typing import Any

from shared.claims import Claim, queue_score
from shared.redis_keys import Keys

# KEYS: scheduler hash (stage -> {job, token, need, granted}), waiting zset (order of asks).
# ARGV: stage key, job id, token, need json, cluster total json, queue score, lease key prefix.
# (Lease keys are built here rather than passed in KEYS: fine on a single Redis, the only
# deployment we support.)
_RESERVE = """
local granted_use = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if redis.call('GET', ARGV[7] .. entry.job) ~= entry.token then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('ZREM', KEYS[2], entries[i])
  elseif entry.granted then
    for kind, amount in pairs(entry.need) do
      granted_use[kind] = (granted_use[kind] or 0) + amount
    end
  end
end
if ARGV[1] == '' then return cjson.encode(granted_use) end
if redis.call('GET', ARGV[7] .. ARGV[2]) ~= ARGV[3] then return 'lost' end
local mine = redis.call('HGET', KEYS[1], ARGV[1])
if mine and cjson.decode(mine).granted then return 'granted' end
local need = cjson.decode(ARGV[4])
local total = cjson.decode(ARGV[5])
local entry = {job = ARGV[2], token = ARGV[3], need = need, granted = false}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('ZADD', KEYS[2], 'NX', ARGV[6], ARGV[1])
if redis.call('ZRANGE', KEYS[2], 0, 0)[1] ~= ARGV[1] then return 'behind' end
for kind, amount in pairs(need) do
  if (total[kind] or 0) - (granted_use[kind] or 0) + 1e-9 < amount then return 'no room' end
end
entry.granted = true
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('ZREM', KEYS[2], ARGV[1])
return 'granted'
"""

# KEYS: scheduler hash, waiting zset. ARGV: stage key, token. Only the ask of this token goes:
# a runner that lost its lease must not take back the grant of the runner that replaced it.
_RELEASE = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry or cjson.decode(entry).token ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class Scheduler:
    def __init__(self, client: Any, keys: Keys) -> None:
        self.redis: Any = client
        self.keys = keys
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    def reserve(
        self, claim: Claim, stage: str, need: dict[str, float], total: dict[str, float]
    ) -> str:
        """Ask for `need` out of a cluster of `total`: 'granted', 'behind' or 'no room'.

        Asking again keeps the place in line. 'lost' when the claim's token no longer holds
        the job's lease: the ask is not recorded, and the caller must stop.
        """
        job = claim.job
        keys = [self.keys.scheduler, self.keys.waiting]
        args: list[str | int] = [f"{job.id}/{stage}", job.id, str(claim.token), json.dumps(need),
                json.dumps(total), queue_score(job), self.keys.lease("")]  # fmt: skip
        return str(self._reserve(keys=keys, args=args))

    def asking_jobs(self) -> set[str]:
        """Jobs with a stage granted resources or waiting in line for them."""
        return {member.split("/")[0] for member in self.redis.hkeys(self.keys.scheduler)}

    def release(self, claim: Claim, stage: str) -> bool:
        """Give a stage's resources back (or leave the line); False if the ask is not ours."""
        keys = [self.keys.scheduler, self.keys.waiting]
        return bool(self._release(keys=keys, args=[f"{claim.job.id}/{stage}", str(claim.token)]))

    def reserved(self) -> tuple[dict[str, float], int]:
        """Resources granted to live stages, and how many stages wait for theirs."""
        keys = [self.keys.scheduler, self.keys.waiting]
        # An empty stage key makes the script only sweep and sum (cjson writes {} when empty).
        sweep: list[str | int] = ["", "", "", "", "", 0, self.keys.lease("")]
        used = json.loads(self._reserve(keys=keys, args=sweep))
        waiting = int(self.redis.zcard(self.keys.waiting))
        return {kind: float(amount) for kind, amount in used.items()}, waiting
