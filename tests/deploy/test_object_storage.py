"""deploy/ with AETRAIN_STORAGE=s3://bucket/prefix, checked offline: the variant README tells
an operator to make (one ConfigMap line, an optional Secret, the claim dropped; for compose,
two variables and an override file) is valid and consistent.

Every process that opens the storage (`aetrain api`, `aetrain worker`) gets the bucket and the
AWS variables; credentials come only from a Secret or the operator's shell, never from a file
in deploy/; the Ray nodes need neither (the dispatcher hands its AWS variables to the ranks).
"""

import re
from typing import Any

import yaml

from shared import locations
from shared.locations import AWS_VARIABLES
from shared.settings import Settings
from tests.deploy import manifests as m
from tests.deploy.manifests import Container, Doc
from tests.deploy.test_manifests import schema_errors, schema_for

CONFIG = m.DEPLOY / "k8s" / "config.yaml"
CLAIM = "aetrain-storage"
# Reaching a bucket takes these; the endpoint (MinIO, Ceph, R2) and a session token do not
# apply everywhere, so they are not required.
NEEDED = {"AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def s3_alternative() -> str:
    """The s3:// value config.yaml shows, commented out, for AETRAIN_STORAGE."""
    (url,) = re.findall(r"^\s*#\s*AETRAIN_STORAGE:\s*(s3://\S+)", CONFIG.read_text(), re.M)
    return str(url)


def opens_storage(container: Container) -> bool:
    """Whether the container runs a process that opens AETRAIN_STORAGE: the API or a worker."""
    return any(argv[:2] in (["aetrain", "api"], ["aetrain", "worker"])
               for argv in m.container_invocations(container))  # fmt: skip


def storage_of(container: Container, config: dict[str, str]) -> str | None:
    """AETRAIN_STORAGE as the container sees it, with `config` as the aetrain-config data."""
    value = None
    for source in container.env_from:
        name = source.get("configMapRef", {}).get("name")
        data = config if name == "aetrain-config" else m.config_map(name) if name else {}
        value = data.get("AETRAIN_STORAGE", value)
    for e in container.env:  # env wins over envFrom
        if e["name"] == "AETRAIN_STORAGE":
            value = e.get("value")
    return value


def s3_refs(container: Container) -> dict[str, dict[str, Any]]:
    """The container's variables that come from the optional aetrain-s3 Secret."""
    refs = {}
    for e in container.env:
        ref = e.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == m.S3_SECRET_NAME:
            refs[e["name"]] = ref
    return refs


def test_the_s3_alternative_in_the_config_map_is_a_setting_aetrain_accepts() -> None:
    url = s3_alternative()
    assert locations.check_url(url) == url
    assert Settings(storage=url).storage_root == url


def test_with_s3_every_pod_that_opens_the_storage_gets_the_bucket_and_the_aws_variables() -> None:
    config = {**m.config_map("aetrain-config"), "AETRAIN_STORAGE": s3_alternative()}
    openers = [c for c in m.kubernetes_containers() if opens_storage(c)]
    assert {c.where.split("#")[0] for c in openers} == {"k8s/api.yaml", "k8s/dispatcher.yaml"}
    for container in openers:
        assert storage_of(container, config) == s3_alternative(), container.where
        refs = s3_refs(container)
        assert NEEDED <= set(refs) <= set(AWS_VARIABLES), container.where
        assert all(ref.get("optional") is True for ref in refs.values()), container.where
    # Every pod that would see the bucket is one of those: no other gets half the settings.
    for container in m.kubernetes_containers():
        if locations.is_remote(storage_of(container, config) or "") or s3_refs(container):
            assert container in openers, container.where


def test_compose_switches_the_api_and_the_dispatcher_to_s3_with_variables_alone() -> None:
    services = m.compose()["services"]
    openers = {c.where.removeprefix("compose service "): c
               for c in m.compose_containers() if opens_storage(c)}  # fmt: skip
    assert set(openers) == {"api", "dispatcher"}
    for name in openers:
        env = services[name]["environment"]
        assert env["AETRAIN_STORAGE"] == "${AETRAIN_STORAGE:-/data/aetrain}", name
        aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
        assert NEEDED <= set(aws) <= set(AWS_VARIABLES), name
        assert all(v == f"${{{k}:-}}" for k, v in aws.items()), name  # the shell's, or empty


def test_no_credential_is_written_into_deploy() -> None:
    """Keys come from a Secret or the operator's shell: never a ConfigMap, a literal value, or
    a line in a file (a commented one included) that someone might fill in and commit."""
    for container in m.kubernetes_containers():
        for e in container.env:
            if e["name"] in CREDENTIALS:
                assert "secretKeyRef" in e.get("valueFrom", {}), (container.where, e["name"])
    for service in [*m.compose()["services"].values(), *m.compose_s3()["services"].values()]:
        env = service.get("environment", {})
        for name in CREDENTIALS & set(env):
            assert env[name] == f"${{{name}:-}}", name
    for doc in m.docs_of("ConfigMap"):
        assert not CREDENTIALS & set(doc.body.get("data", {})), doc.id
    for path in m.yaml_files():
        assert not re.search(r"\b(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)\s*[:=]"
                             r"\s*[A-Za-z0-9/+]{16,}", path.read_text()), path  # fmt: skip


def readme_claim_edit() -> tuple[str, str]:
    """(old, new) of README's sed line that turns the claim into emptyDirs."""
    (edit,) = [found for line in m.readme_shell_lines() if CLAIM in line and "sed " in line
               for found in re.findall(r"'s#([^#]+)#([^#]*)#g?'", line)]  # fmt: skip
    return str(edit[0]), str(edit[1])


def docs_without_the_claim() -> list[Doc]:
    """deploy/k8s and kuberay as README's S3 steps leave them: storage.yaml deleted, the sed
    line applied to the other files."""
    old, new = readme_claim_edit()
    docs = []
    for path in m.kubernetes_files():
        if path.name == "storage.yaml":
            continue
        for index, body in enumerate(yaml.safe_load_all(path.read_text().replace(old, new))):
            if body is not None:
                docs.append(Doc(path, index, body))
    return docs


def volumes_and_mounts(body: dict[str, Any]) -> list[tuple[dict[str, Any], set[str]]]:
    """(volumes by name, names mounted) of every pod template in a document."""
    spec = body.get("spec", {})
    if body.get("kind") in ("Deployment", "StatefulSet"):
        templates = [spec["template"]]
    elif body.get("kind") == "RayCluster":
        templates = [spec["headGroupSpec"]["template"]]
        templates += [g["template"] for g in spec["workerGroupSpecs"]]
    else:
        return []
    claimed = {c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])}
    found = []
    for template in templates:
        pod = template["spec"]
        mounts = {v["name"] for c in pod["containers"] for v in c.get("volumeMounts", [])}
        found.append(({**claimed, **{v["name"]: v for v in pod.get("volumes", [])}}, mounts))
    return found


def test_with_s3_the_storage_claim_can_go_as_readme_says() -> None:
    (pvc,) = [d for d in m.docs_of("PersistentVolumeClaim") if d.name == CLAIM]
    assert pvc.path.name == "storage.yaml"
    assert len([d for d in m.kubernetes_docs() if d.path == pvc.path]) == 1  # nothing else there
    before = sum(CLAIM in p.read_text() for p in m.kubernetes_files() if p != pvc.path)
    assert before >= 2  # the edit has something to do
    docs = docs_without_the_claim()
    for doc in docs:
        assert schema_errors(schema_for(doc), doc.body) == [], doc.id
        assert CLAIM not in yaml.safe_dump(doc.body), doc.id
        for volumes, mounts in volumes_and_mounts(doc.body):
            assert mounts <= set(volumes), doc.id  # every mount still has its volume
            if "storage" in volumes:
                assert volumes["storage"].get("emptyDir") == {}, doc.id


def test_no_network_policy_restricts_egress() -> None:
    """With S3 the API, the dispatcher and every Ray pod talk to the bucket."""
    for doc in m.docs_of("NetworkPolicy"):
        assert "Egress" not in doc.body["spec"].get("policyTypes", ["Ingress"]), doc.id
        assert "egress" not in doc.body["spec"], doc.id


def test_compose_s3_gives_the_bucket_users_a_route_out_and_publishes_nothing() -> None:
    base, override = m.compose(), m.compose_s3()
    assert set(override["services"]) <= set(base["services"])
    networks = {**base["networks"], **override["networks"]}
    internal = {name for name, n in networks.items() if n and n.get("internal")}
    for name, service in override["services"].items():
        assert set(service) == {"networks"}, name  # no ports, images or settings of its own
    merged = {
        name: set(s["networks"]) | set(override["services"].get(name, {}).get("networks", []))
        for name, s in base["services"].items()
    }
    # Whatever runs ranks or opens the storage can leave the host; Redis still cannot.
    for name in ("api", "dispatcher", "ray-head", "ray-gpu-worker"):
        assert merged[name] - internal, name
    assert merged["redis"] <= internal
    # The API shares no network with Ray but the internal one it already had.
    ray = merged["ray-head"] | merged["ray-gpu-worker"] | merged["dispatcher"]
    assert merged["api"] & ray <= {"backend"}
