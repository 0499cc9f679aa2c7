"""The scheduler: the CPUs and GPUs that stages of running jobs hold on the Ray cluster.

A stage asks (`reserve`) before it is handed to Ray. Asks wait in queue order (priority, then
job age, then stage) and the first one is granted as soon as it fits, so a big stage is never
starved by a stream of small ones. A grant belongs to its job's fencing token: the grants of a
runner whose lease is gone are swept at the next ask, so a dead dispatcher gives its resources
back once its lease expires; and a runner whose lease is gone can neither ask (its ask would
replace the new owner's, or be told the new owner's grant is its own) nor release.

An idle warm worker group (workers/group_pool.py) still holds its CPUs and GPUs on Ray, so
the scheduler counts it as a `hold`, which its dispatcher renews and which lapses when the
dispatcher stops renewing it. A stage becomes a group's hold when it ends on the group
(`park`, atomically with its release), and a hold becomes a stage's grant when the stage is
granted on that group (`reserve(..., adopt=group)`): the resources change hands without a
moment in which another stage could be granted them twice.
"""

import json
import time
from typing import Any

from shared.claims import Claim, queue_score
from shared.redis_keys import Keys

HOLD_PREFIX = "hold/"

# The first part of every script that counts: drop the asks of lost leases and the holds
# whose dispatcher stopped renewing them, and sum what the rest hold, except the hold `adopt`.
# KEYS: scheduler hash (stage -> {job, token, need, granted}; hold/<group> -> {hold, need,
# expires}), waiting zset (order of asks). Locals from the caller: lease_prefix, now, adopt.
# (Lease keys are built here rather than passed in KEYS: fine on a single Redis, the only
# deployment we support.)
_SUM_USE = """
local granted_use = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = cjson.decode(entries[i + 1])
  if entry.hold then
    if entry.expires < now then
      redis.call('HDEL', KEYS[1], entries[i])
    elseif entries[i] ~= adopt then
      for kind, amount in pairs(entry.need) do
        granted_use[kind] = (granted_use[kind] or 0) + amount
      end
    end
  elseif redis.call('GET', lease_prefix .. entry.job) ~= entry.token then
    redis.call('HDEL', KEYS[1], entries[i])
    redis.call('ZREM', KEYS[2], entries[i])
  elseif entry.granted then
    for kind, amount in pairs(entry.need) do
      granted_use[kind] = (granted_use[kind] or 0) + amount
    end
  end
end
"""

# ARGV: stage key, job id, token, need json, cluster total json, queue score, lease key prefix,
# the hold to adopt ('' for none), now (ms). A grant that adopts a hold deletes it: the
# group's resources are the stage's now.
_RESERVE = """
local lease_prefix, adopt, now = ARGV[7], ARGV[8], tonumber(ARGV[9])
""" + _SUM_USE + """
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
if adopt ~= '' then redis.call('HDEL', KEYS[1], adopt) end
return 'granted'
"""

# KEYS: scheduler hash, waiting zset. ARGV: stage key, token, hold key, hold json.
# The stage's grant (if still this token's) goes and the group's hold comes, in one step.
_PARK = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry and cjson.decode(entry).token == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""

# KEYS: scheduler hash, waiting zset. ARGV: hold key, hold json, cluster total json, lease
# key prefix, now (ms). A hold for a group started with no stage (kept warm): granted only
# while no stage waits and it fits.
_HOLD = """
local lease_prefix, adopt, now = ARGV[4], '', tonumber(ARGV[5])
""" + _SUM_USE + """
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
local need = cjson.decode(ARGV[2]).need
local total = cjson.decode(ARGV[3])
for kind, amount in pairs(need) do
  if (total[kind] or 0) - (granted_use[kind] or 0) + 1e-9 < amount then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: scheduler hash. ARGV: expiry (ms), then hold keys. Renews the holds that still exist
# and returns the ones that lapsed (their resources may have been granted to others).
_RENEW = """
local lapsed = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local entry = cjson.decode(raw)
    entry.expires = tonumber(ARGV[1])
    redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(entry))
  else
    table.insert(lapsed, ARGV[i])
  end
end
return lapsed
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
        self._park = client.register_script(_PARK)
        self._hold = client.register_script(_HOLD)
        self._renew = client.register_script(_RENEW)

    def reserve(
        self, claim: Claim, stage: str, need: dict[str, float], total: dict[str, float],
        adopt: str | None = None,
    ) -> str:  # fmt: skip
        """Ask for `need` out of a cluster of `total`: 'granted', 'behind' or 'no room'.

        Asking again keeps the place in line. 'lost' when the claim's token no longer holds
        the job's lease: the ask is not recorded, and the caller must stop. `adopt` names an
        idle warm group of the stage's shape: its hold counts as room, and becomes the grant.
        """
        job = claim.job
        keys = [self.keys.scheduler, self.keys.waiting]
        args: list[str | int | float] = [
            f"{job.id}/{stage}", job.id, str(claim.token), json.dumps(need), json.dumps(total),
            queue_score(job), self.keys.lease(""), hold_key(adopt) if adopt else "", _now_ms(),
        ]  # fmt: skip
        return str(self._reserve(keys=keys, args=args))

    def park(
        self, claim: Claim, stage: str, group: str, need: dict[str, float], ttl_s: float
    ) -> None:
        """The stage ended on a warm group that stays: its grant becomes the group's hold."""
        keys = [self.keys.scheduler, self.keys.waiting]
        self._park(keys=keys, args=[f"{claim.job.id}/{stage}", str(claim.token),
                                    hold_key(group), _hold_json(need, ttl_s)])  # fmt: skip

    def hold(self, group: str, need: dict[str, float], total: dict[str, float],
             ttl_s: float) -> bool:  # fmt: skip
        """A hold for a group started with no stage; False while stages wait or it won't fit."""
        keys = [self.keys.scheduler, self.keys.waiting]
        args = [hold_key(group), _hold_json(need, ttl_s), json.dumps(total),
                self.keys.lease(""), _now_ms()]  # fmt: skip
        return bool(self._hold(keys=keys, args=args))

    def renew_holds(self, groups: list[str], ttl_s: float) -> set[str]:
        """Renew the holds of these groups; returns the groups whose hold had lapsed."""
        if not groups:
            return set()
        expires = _now_ms() + int(ttl_s * 1000)
        lapsed = self._renew(keys=[self.keys.scheduler],
                             args=[expires, *(hold_key(g) for g in groups)])  # fmt: skip
        return {key.removeprefix(HOLD_PREFIX) for key in lapsed}

    def drop_hold(self, group: str) -> None:
        self.redis.hdel(self.keys.scheduler, hold_key(group))

    def holds(self) -> dict[str, dict[str, float]]:
        """The live holds of idle warm groups: group -> what it holds."""
        now = _now_ms()
        held = {}
        for key, raw in self.redis.hgetall(self.keys.scheduler).items():
            entry = json.loads(raw)
            if key.startswith(HOLD_PREFIX) and entry["expires"] >= now:
                held[key.removeprefix(HOLD_PREFIX)] = entry["need"]
        return held

    def asking_jobs(self) -> set[str]:
        """Jobs with a stage granted resources or waiting in line for them."""
        members = self.redis.hkeys(self.keys.scheduler)
        return {m.split("/")[0] for m in members if not m.startswith(HOLD_PREFIX)}

    def waiting_count(self) -> int:
        return int(self.redis.zcard(self.keys.waiting))

    def release(self, claim: Claim, stage: str) -> bool:
        """Give a stage's resources back (or leave the line); False if the ask is not ours."""
        keys = [self.keys.scheduler, self.keys.waiting]
        return bool(self._release(keys=keys, args=[f"{claim.job.id}/{stage}", str(claim.token)]))

    def reserved(self) -> tuple[dict[str, float], int]:
        """Resources granted to live stages, and how many stages wait for theirs."""
        keys = [self.keys.scheduler, self.keys.waiting]
        # An empty stage key makes the script only sweep and sum (cjson writes {} when empty).
        sweep: list[str | int] = ["", "", "", "", "", 0, self.keys.lease(""), "", _now_ms()]
        used = json.loads(self._reserve(keys=keys, args=sweep))
        waiting = int(self.redis.zcard(self.keys.waiting))
        return {kind: float(amount) for kind, amount in used.items()}, waiting


def hold_key(group: str) -> str:
    return f"{HOLD_PREFIX}{group}"


def _hold_json(need: dict[str, float], ttl_s: float) -> str:
    return json.dumps({"hold": True, "need": need, "expires": _now_ms() + int(ttl_s * 1000)})


def _now_ms() -> int:
    return int(time.time() * 1000)
