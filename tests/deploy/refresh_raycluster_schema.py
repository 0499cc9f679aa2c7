"""Rebuild deploy/schemas/raycluster-ray.io-v1.json from KubeRay's RayCluster CRD.

    curl -fsSLo /tmp/ray.io_rayclusters.yaml https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/ray-operator/config/crd/bases/ray.io_rayclusters.yaml
    python -m tests.deploy.refresh_raycluster_schema /tmp/ray.io_rayclusters.yaml

It takes the `v1` version's `schema.openAPIV3Schema` and converts it to JSON Schema draft
2020-12 as openapi2jsonschema's "strict" mode (datree's CRDs-catalog, kubeconform) does:
an object that lists `properties` gets `additionalProperties: false` unless it says otherwise
or has `x-kubernetes-preserve-unknown-fields: true`; `x-kubernetes-int-or-string` becomes
anyOf integer/string; `nullable: true` allows null; the other `x-kubernetes-*` keys (list
and map types, CEL rules) are dropped, and so are descriptions. Then `apiVersion` and `kind`
become consts. A keyword this script does not know stops it, so a new CRD is never
half-converted. To move to another KubeRay release, change KUBERAY_TAG, KUBERAY_COMMIT and
CRD_SHA256 together (the script says the file's sha256 when it differs) and the URL above.
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

KUBERAY_REPO = "github.com/ray-project/kuberay"
KUBERAY_TAG = "v1.7.0"
KUBERAY_COMMIT = "59d663aeec13760646da3db9c1cf8cfe883e30b7"  # what the tag points at
CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayclusters.yaml"
CRD_SHA256 = "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"
VERSION = "v1"
OUT = Path(__file__).resolve().parents[2] / "deploy" / "schemas" / "raycluster-ray.io-v1.json"
COMMAND = (
    f"curl -fsSLo /tmp/ray.io_rayclusters.yaml "
    f"https://raw.githubusercontent.com/ray-project/kuberay/{KUBERAY_TAG}/{CRD_PATH} && "
    "python -m tests.deploy.refresh_raycluster_schema /tmp/ray.io_rayclusters.yaml"
)
# Every object sent to the API server has the first three; spec (with its required
# headGroupSpec) is what makes it a cluster. The CRD itself requires none of them.
REQUIRED = ["apiVersion", "kind", "metadata", "spec"]

# OpenAPI v3 keywords that mean the same in JSON Schema 2020-12, copied as they are
# (those holding schemas are converted in turn, below).
SAME = {
    "type", "format", "enum", "default", "pattern", "minimum", "maximum", "multipleOf",
    "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties",
    "maxProperties", "required", "title",
}  # fmt: skip
# Annotations, and Kubernetes extensions JSON Schema has no word for: list/map merge types,
# CEL rules (in v1.7.0 two `self == oldSelf` and an enum of managedBy, which deploy/ omits).
DROPPED = {
    "description",
    "example",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "x-kubernetes-embedded-resource",
}
HANDLED = {
    "properties", "additionalProperties", "items", "allOf", "anyOf", "oneOf", "not",
    "nullable", "exclusiveMinimum", "exclusiveMaximum",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip


def convert(node: dict[str, Any], where: str = "") -> dict[str, Any]:
    """One OpenAPI v3 schema (a CRD's structural schema) as JSON Schema 2020-12, strict."""
    unknown = set(node) - SAME - DROPPED - HANDLED
    if unknown:
        raise ValueError(f"{where or '(top)'}: no conversion for {sorted(unknown)}")
    out = {k: v for k, v in node.items() if k in SAME}
    if "properties" in node:
        out["properties"] = {
            name: convert(sub, f"{where}/{name}") for name, sub in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = convert(node["additionalProperties"], f"{where}/*")
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    if "items" in node:
        out["items"] = convert(node["items"], f"{where}/[]")
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [convert(sub, f"{where}/{key}") for sub in node[key]]
    if "not" in node:
        out["not"] = convert(node["not"], f"{where}/not")
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(key) is True:  # OpenAPI 3.0's boolean form
            out[key] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    open_ = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not open_:
        out["additionalProperties"] = False
    return out


def build(crd_file: Path) -> dict[str, Any]:
    sha256 = hashlib.sha256(crd_file.read_bytes()).hexdigest()
    if sha256 != CRD_SHA256:
        raise SystemExit(
            f"{crd_file} has sha256 {sha256}, not that of {KUBERAY_TAG}'s {CRD_PATH} "
            f"({CRD_SHA256}): update KUBERAY_TAG, KUBERAY_COMMIT and CRD_SHA256 together"
        )
    crd = yaml.safe_load(crd_file.read_text())
    assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    schema = convert(version["schema"]["openAPIV3Schema"])
    api_version = f"{crd['spec']['group']}/{VERSION}"
    kind = crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = REQUIRED
    return {
        "$comment": f"{kind} ({api_version}) from KubeRay's CRD, {KUBERAY_REPO} {KUBERAY_TAG} "
        f"(commit {KUBERAY_COMMIT}) {CRD_PATH} (sha256 {CRD_SHA256}), version {VERSION}'s "
        "schema.openAPIV3Schema converted to JSON Schema 2020-12 as openapi2jsonschema's "
        "strict mode does, without descriptions; apiVersion and kind are consts. Generated, "
        f"do not edit; regenerate with: {COMMAND}; see deploy/schemas/README.md.",
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
    }


def dumps(node: Any, column: int = 0, indent: int = 0) -> str:
    """JSON indented by one space, but a value that fits on its line (100 columns) on one line:
    the pod template nests some fifteen levels deep, and one key per line would double the file."""
    flat = json.dumps(node)
    if not isinstance(node, dict | list) or column + len(flat) <= 100:
        return flat
    pad = " " * (indent + 1)
    if isinstance(node, dict):
        lines = []
        for key, value in node.items():
            head = f"{pad}{json.dumps(key)}: "
            lines.append(head + dumps(value, len(head), indent + 1))
    else:
        lines = [pad + dumps(value, len(pad), indent + 1) for value in node]
    start, end = "[]" if isinstance(node, list) else "{}"
    return start + "\n" + ",\n".join(lines) + "\n" + " " * indent + end


def main() -> None:
    OUT.write_text(dumps(build(Path(sys.argv[1]))) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
