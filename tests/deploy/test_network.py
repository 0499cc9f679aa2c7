"""Who can reach what: Kubernetes selectors and NetworkPolicies, and compose's networks.

The policies are evaluated here with Kubernetes' rules (a pod that some policy selects takes
only what one of them allows), on the labels of the pods the manifests create.
"""

import pytest

from tests.deploy import manifests as m

PORTS = {"api": 8000, "redis": 6379, "gcs": 6379, "dashboard": 8265, "raylet": 10002,
         "dispatcher metrics": 9101}  # fmt: skip
# A pod of someone else's in the same namespace: no aetrain labels.
OUTSIDER = {"app.kubernetes.io/name": "something-else"}
# Prometheus, in the namespace the metrics policy names; and any other namespace.
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
ELSEWHERE = {"kubernetes.io/metadata.name": "team-x"}


def pods() -> dict[str, dict[str, str]]:
    """Labels of each kind of aetrain pod, by its app.kubernetes.io/component."""
    found: dict[str, dict[str, str]] = {}
    for where, template in m.pod_templates():
        labels = template.get("metadata", {}).get("labels", {})
        component = labels.get("app.kubernetes.io/component")
        assert component, f"{where}: pod template without app.kubernetes.io/component"
        found[component] = labels
    return found


def test_every_aetrain_pod_is_under_the_deny_all_policy() -> None:
    (deny,) = [d for d in m.docs_of("NetworkPolicy") if not d.body["spec"].get("ingress")]
    unguarded = [c for c, labels in pods().items()
                 if not m.selects(deny.body["spec"]["podSelector"], labels)]  # fmt: skip
    assert unguarded == []
    assert set(pods()) == {"api", "dispatcher", "redis", "ray-head", "ray-worker"}


def test_every_selector_selects_a_pod() -> None:
    """A label typo in a Service or policy selects nothing, which nothing else would notice."""
    labels = list(pods().values())
    selectors = []
    for doc in m.kubernetes_docs():
        spec = doc.body.get("spec", {})
        if doc.kind == "Service":
            selectors.append((doc.id, {"matchLabels": spec["selector"]}))
        elif doc.kind in ("Deployment", "StatefulSet"):
            selectors.append((doc.id, spec["selector"]))
        elif doc.kind == "NetworkPolicy":
            selectors.append((doc.id, spec["podSelector"]))
            for rule in spec.get("ingress", []):
                selectors += [(f"{doc.id} from", p["podSelector"])
                              for p in rule.get("from", []) if "podSelector" in p]  # fmt: skip
    empty = [where for where, s in selectors if not any(m.selects(s, pod) for pod in labels)]
    assert empty == []


def test_the_api_is_reachable_from_outside() -> None:
    assert m.ingress_allowed(OUTSIDER, pods()["api"], PORTS["api"])


@pytest.mark.parametrize("source", ["api", "dispatcher", "ray-head", "ray-worker"])
def test_redis_is_reachable_from_aetrain_processes(source: str) -> None:
    assert m.ingress_allowed(pods()[source], pods()["redis"], PORTS["redis"])


@pytest.mark.parametrize("target", ["redis", "ray-head", "ray-worker", "dispatcher"])
@pytest.mark.parametrize("port", sorted(set(PORTS.values())))
def test_redis_and_ray_are_private(target: str, port: int) -> None:
    assert not m.ingress_allowed(OUTSIDER, pods()[target], port)
    assert not m.ingress_allowed(OUTSIDER, pods()[target], port, namespace=ELSEWHERE)
    if (target, port) != ("dispatcher", PORTS["dispatcher metrics"]):
        assert not m.ingress_allowed(PROMETHEUS, pods()[target], port, namespace=MONITORING)


def test_only_the_monitoring_namespace_reaches_the_dispatchers_metrics() -> None:
    dispatcher, port = pods()["dispatcher"], PORTS["dispatcher metrics"]
    assert m.ingress_allowed(PROMETHEUS, dispatcher, port, namespace=MONITORING)
    assert not m.ingress_allowed(PROMETHEUS, dispatcher, port, namespace=ELSEWHERE)
    assert not m.ingress_allowed(OUTSIDER, dispatcher, port)
    assert not m.ingress_allowed(pods()["api"], dispatcher, port)
    # The port the policy opens is the one the dispatcher serves and its pod announces.
    (template,) = [t for where, t in m.pod_templates() if where.endswith("aetrain-dispatcher")]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AETRAIN_DISPATCHER_METRICS_PORT"] == str(port)
    assert env["AETRAIN_METRICS_HOST"] == "0.0.0.0"  # the pod's address, not its loopback
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("target", ["ray-head", "ray-worker", "dispatcher"])
@pytest.mark.parametrize("port", [PORTS["gcs"], PORTS["dashboard"], PORTS["raylet"]])
def test_ray_nodes_reach_each_other_and_the_api_does_not(target: str, port: int) -> None:
    for source in ("ray-head", "ray-worker", "dispatcher"):
        assert m.ingress_allowed(pods()[source], pods()[target], port), (source, target)
    assert not m.ingress_allowed(pods()["api"], pods()[target], port)


def test_compose_publishes_only_the_api() -> None:
    services = m.compose()["services"]
    assert [name for name, s in services.items() if "ports" in s] == ["api"]
    backend = {name for name, n in m.compose()["networks"].items() if n and n.get("internal")}
    for name, service in services.items():
        if name != "api":  # Redis and Ray: only on internal networks
            assert set(service["networks"]) <= backend, name
