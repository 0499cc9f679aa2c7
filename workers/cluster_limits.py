"""What the Ray cluster may grow to: an operator's setting, else the autoscaler's maximum.

A stage is admitted against this, not only against what is up now (stage_graph.py): one that
fits waits for the autoscaler to add nodes, one that does not fails at once with the reason.

An autoscaler reports its cluster config to the GCS (`ReportClusterConfig`, autoscaler.proto):
the node groups it may start, each with its resources per node and its `max_count`, and
optionally a cap on the whole cluster (`max_resources`). Ray keeps it in the GCS's internal KV,
where `ray._private.state.state.get_cluster_config()` reads it back: Ray Data's autoscaler and
Ray Train's worker group read it there too (Ray 2.60 has no public API for it). Ray 2.60's own
autoscalers never report one (ray-project/ray#63012 proposes that its v2 autoscaler does); a
managed platform's may. Where none is reported, the settings alone say it.
"""

import logging
import sys
import time
from typing import Any

import ray._private.state

log = logging.getLogger("aetrain.cluster")

KINDS = ("CPU", "GPU")  # the resources a stage asks for
# A node group without a most (`max_count` -1): Ray counts it as sys.maxsize, and so do we (a
# finite number, unlike inf, passes through JSON to the scheduler's Lua script).
UNBOUNDED = float(sys.maxsize)
_CACHE_S = 10.0  # admission reads it often; the autoscaler's config rarely changes


def limits_from_config(config: Any) -> dict[str, float]:
    """The most of each resource a reported `ClusterConfig` lets the cluster grow to.

    The sum over node groups of `max_count` x the resources of one node, as Ray counts it
    (`GlobalState._calculate_max_resource_from_cluster_config`), which is what Ray Train
    checks before a worker group waits for its placement group: a stage over it would fail
    there anyway, later. The head node is not added: where the reporter lists its group (the
    proto says the groups include the head), it is in the sum already; where it leaves it out
    (Ray's v2 autoscaler does: the head cannot be scaled), Ray Train does not count it either,
    and what is up now, head included, still counts (stage_graph.cluster_size).

    `max_resources` caps the sum, and stands alone without node groups; unlike Ray, it caps an
    unlimited group too, for the autoscaler grows the cluster no further than that.
    """
    most: dict[str, float] = {}
    if config is None:
        return most
    for kind in KINDS:
        groups = [g for g in config.node_group_configs if g.resources.get(kind, 0) and g.max_count]
        bounds = []
        if any(g.max_count == -1 for g in groups):
            bounds.append(UNBOUNDED)
        elif groups:
            bounds.append(float(sum(g.max_count * g.resources[kind] for g in groups)))
        if kind in config.max_resources:
            bounds.append(float(config.max_resources[kind]))
        if bounds:
            most[kind] = min(bounds)
    return most


def combine(settings: dict[str, float], autoscaler: dict[str, float]) -> dict[str, float]:
    """Per resource, the setting where there is one (an operator's explicit cap), else the
    autoscaler's maximum."""
    return {**autoscaler, **settings}


def read_autoscaler_limits() -> dict[str, float]:
    """The autoscaler's maximum from the GCS of the connected Ray; {} when none is reported or
    it cannot be read (no autoscaler, an older Ray, the GCS away): admission then goes by the
    settings and by what is up."""
    try:
        config = ray._private.state.state.get_cluster_config()  # [ray] one GCS KV read
        return limits_from_config(config)
    except Exception as exc:
        log.debug("no cluster config from the autoscaler: %s", exc)
        return {}


class ClusterLimits:
    """What admission counts the cluster as able to grow to, re-read every 10 s at most."""

    def __init__(self, settings: dict[str, float], cache_s: float = _CACHE_S) -> None:
        self.settings = settings  # AETRAIN_CLUSTER_MAX_CPUS/GPUS (Settings.cluster_max)
        self.cache_s = cache_s
        self._most: dict[str, float] = dict(settings)
        self._autoscaler: dict[str, float] = {}
        self._read_at = -1e9

    def most(self) -> dict[str, float]:
        # Called from the dispatcher's loop and its jobs' threads: a race only reads twice.
        if time.monotonic() - self._read_at > self.cache_s:
            autoscaler = read_autoscaler_limits()
            if autoscaler != self._autoscaler:  # once per change, not per read
                log.info("the autoscaler's cluster config: the cluster may grow to %s",
                         autoscaler or "what is up (no config)")  # fmt: skip
                self._autoscaler = autoscaler
            self._most = combine(self.settings, autoscaler)
            self._read_at = time.monotonic()
        return self._most
