"""deploy/ checked without Docker or Kubernetes: schemas, commands, variables, secrets.

Every compose and Kubernetes document is validated against an offline copy of its schema
(deploy/schemas), every command a container runs is parsed by the real CLI (aetrain's or
Ray's) without running it, and every variable deploy/ sets is one aetrain or Ray reads.
"""

import copy
import json
import re
from typing import Any

import jsonschema
import pytest
import typer.main
from pydantic import AliasChoices

from shared.locations import AWS_VARIABLES
from shared.settings import Settings
from tests.deploy import manifests as m
from tests.deploy import refresh_raycluster_schema as refresh
from tests.deploy.manifests import Container, Doc

# Variables deploy/ sets that aetrain does not read, and who does. An AETRAIN_* name can
# never be here: those must be fields of shared.settings.Settings; nor an AWS_* name: those
# must be among shared.locations.AWS_VARIABLES, the ones aetrain builds its S3 client from
# and hands on to the ranks.
OTHER_VARIABLES = {
    "RAY_AUTH_MODE": "Ray: token authentication on every node and driver",
    "RAY_AUTH_TOKEN": "Ray: the shared token",
    "RAY_USAGE_STATS_ENABLED": "Ray: no usage reports",
    "REDIS_PASSWORD": "the Secret's key, expanded into AETRAIN_REDIS_URL and redis-server's args",
    "REDISCLI_AUTH": "redis-cli in Redis' health checks",
    "PYTHONUNBUFFERED": "python (Dockerfile)",
    "PYTHONDONTWRITEBYTECODE": "python (Dockerfile)",
    "PIP_NO_CACHE_DIR": "pip (Dockerfile build)",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip (Dockerfile build)",
}
PLUMBING = {"REDIS_PASSWORD", "REDISCLI_AUTH"}  # how a secret reaches a process, per platform
# Read by the `aetrain` client commands and the Python client, not by the services.
CLIENT_VARIABLES = {"AETRAIN_URL", "AETRAIN_API_KEY"}
# Compose's own knobs (image name, published port): interpolated in compose.yml, never set
# inside a container under this name.
COMPOSE_KNOBS = {"AETRAIN_IMAGE", "AETRAIN_API_PORT"}
# Programs besides `aetrain` and `ray` that deploy/ runs (third-party images, probes).
OTHER_PROGRAMS = {"redis-server", "redis-cli", "grep", "python", "set"}


def settings_variables() -> set[str]:
    """The environment variables shared.settings.Settings reads (env_prefix + field, or alias)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


# -- schemas ---------------------------------------------------------------------------------------
def test_every_yaml_file_in_deploy_is_checked() -> None:
    assert set(m.yaml_files()) == {m.COMPOSE, m.COMPOSE_S3, *m.kubernetes_files()}


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


@pytest.mark.parametrize("read", [m.compose, m.compose_s3], ids=["compose", "compose.s3"])
def test_compose_file_follows_the_compose_specification(read: Any) -> None:
    assert schema_errors(m.load_schema("compose-spec.json"), read()) == []


# What a RayCluster embeds from Kubernetes, which KubeRay's CRD types loosely (metadata: any
# object) or as of the Kubernetes release KubeRay built against: checked as v1.30 objects too.
POD_TEMPLATE = {"$ref": "#/$defs/io.k8s.api.core.v1.PodTemplateSpec"}
RAYCLUSTER_KUBERNETES_PARTS = {
    "properties": {
        "metadata": {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "properties": {
                "headGroupSpec": {"properties": {"template": POD_TEMPLATE}},
                "workerGroupSpecs": {"items": {"properties": {"template": POD_TEMPLATE}}},
            }
        },
    }
}


def schema_for(doc: Doc) -> dict[str, Any]:
    k8s = m.load_schema("kubernetes-v1.30.0.json")
    if doc.body.get("apiVersion") == "ray.io/v1" and doc.kind == "RayCluster":
        ray = m.load_schema("raycluster-ray.io-v1.json")  # KubeRay's CRD, self-contained
        crd = {k: v for k, v in ray.items() if k not in ("$schema", "$comment")}
        return {
            "$schema": ray["$schema"],
            "allOf": [crd, RAYCLUSTER_KUBERNETES_PARTS],
            "$defs": k8s["$defs"],
        }
    key = f"{doc.body.get('apiVersion')} {doc.kind}"
    assert key in k8s["kinds"], (
        f"{doc.id}: no vendored schema for {key}; add it in tests/deploy/refresh_schemas.py"
    )
    return {**k8s["kinds"][key], "$defs": k8s["$defs"]}


@pytest.mark.parametrize("doc", m.kubernetes_docs(), ids=lambda d: d.id)
def test_kubernetes_manifest_follows_its_schema(doc: Doc) -> None:
    assert schema_errors(schema_for(doc), doc.body) == []


@pytest.mark.parametrize(
    "name", ["compose-spec.json", "kubernetes-v1.30.0.json", "raycluster-ray.io-v1.json"]
)
def test_vendored_schema_is_a_valid_json_schema(name: str) -> None:
    schema = m.load_schema(name)
    jsonschema.validators.validator_for(schema).check_schema(schema)


def misspelt(body: dict[str, Any], where: str, key: str, typo: str) -> dict[str, Any]:
    """A copy of the RayCluster `body` with `key` of the object at `where` renamed `typo`."""
    body = copy.deepcopy(body)
    node: Any = body
    for step in where.split("/"):
        node = node[int(step) if step.isdigit() else step]
    node[typo] = node.pop(key)
    return body


@pytest.mark.parametrize(
    ("where", "key", "typo"),
    [
        ("spec", "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        ("spec/headGroupSpec", "rayStartParams", "rayStartParam"),
        ("spec/workerGroupSpecs/1", "rayStartParams", "rayStartParam"),
    ],
    ids=["spec", "headGroupSpec", "workerGroupSpec"],
)
def test_a_misspelt_raycluster_key_fails(where: str, key: str, typo: str) -> None:
    """The API server would prune the unknown key silently: the schema must not."""
    (doc,) = m.docs_of("RayCluster")
    body = misspelt(doc.body, where, key, typo)
    expected = [f"{where}: Additional properties are not allowed ('{typo}' was unexpected)"]
    assert schema_errors(m.load_schema("raycluster-ray.io-v1.json"), body) == expected
    assert schema_errors(schema_for(doc), body) == expected


def test_a_raycluster_is_also_checked_as_kubernetes_objects() -> None:
    """The CRD takes any metadata; Kubernetes' ObjectMeta and PodTemplateSpec check it too."""
    (doc,) = m.docs_of("RayCluster")
    crd = m.load_schema("raycluster-ray.io-v1.json")
    body = misspelt(doc.body, "metadata", "labels", "label")
    assert schema_errors(crd, body) == []
    assert schema_errors(schema_for(doc), body) == [
        "metadata: Additional properties are not allowed ('label' was unexpected)"
    ]
    where = "spec/workerGroupSpecs/0/template/spec/containers/0"
    body = misspelt(doc.body, where, "resources", "resource")
    error = f"{where}: Additional properties are not allowed ('resource' was unexpected)"
    assert schema_errors(crd, body) == [error]
    assert schema_errors(schema_for(doc), body) == [error, error]  # by the CRD and by v1.30


def test_raycluster_schema_is_generated_from_kuberays_crd() -> None:
    """The vendored file is refresh_raycluster_schema.py's output, not an edited copy."""
    schema = m.load_schema("raycluster-ray.io-v1.json")
    comment = schema["$comment"]
    assert refresh.KUBERAY_COMMIT in comment and refresh.CRD_PATH in comment
    assert refresh.CRD_SHA256 in comment and refresh.COMMAND in comment
    assert "python -m tests.deploy.refresh_raycluster_schema" in (refresh.__doc__ or "")
    assert schema["properties"]["apiVersion"] == {"const": "ray.io/v1"}
    assert schema["properties"]["kind"] == {"const": "RayCluster"}
    left = [key for key in keys_of_schemas(schema) if key in refresh.DROPPED or key == "nullable"]
    assert left == []
    text = json.dumps(schema)
    assert "x-kubernetes-" not in text and '"description": "' not in text
    # the groups' fields as the CRD of KubeRay 1.7 has them
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    worker = spec["properties"]["workerGroupSpecs"]["items"]
    assert {"groupName", "rayStartParams", "template", "numOfHosts"} <= set(worker["properties"])


def keys_of_schemas(node: dict[str, Any]) -> list[str]:
    """The keywords of `node` and every schema inside it (not property names, not defaults)."""
    keys = list(node)
    children = [*node.get("properties", {}).values(), *node.get("allOf", [])]
    children += [*node.get("anyOf", []), *node.get("oneOf", [])]
    children += [node[k] for k in ("items", "additionalProperties", "not") if k in node]
    for child in children:
        if isinstance(child, dict):
            keys += keys_of_schemas(child)
    return keys


def test_crd_schemas_are_converted_as_openapi2jsonschema_strict_does() -> None:
    openapi = {
        "type": "object",
        "description": "dropped",
        "properties": {
            "description": {"type": "string", "description": "a field named description"},
            "port": {"x-kubernetes-int-or-string": True},
            "quantity": {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
            },
            "when": {"type": "string", "format": "date-time", "nullable": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "config": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"known": {"type": "integer"}},
            },
            "ports": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "x-kubernetes-map-type": "atomic",
                },
            },
            "managedBy": {"type": "string", "x-kubernetes-validations": [{"rule": "true"}]},
        },
    }
    assert refresh.convert(openapi) == {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "port": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "quantity": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "when": {"type": ["string", "null"], "format": "date-time"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "config": {"type": "object", "properties": {"known": {"type": "integer"}}},
            "ports": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "managedBy": {"type": "string"},
        },
        "additionalProperties": False,
    }
    with pytest.raises(ValueError, match=r"/x: no conversion for \['x-kubernetes-new'\]"):
        refresh.convert({"properties": {"x": {"x-kubernetes-new": True}}})


# -- commands --------------------------------------------------------------------------------------
def cli_error(cli: Any, argv: list[str]) -> str | None:
    """Parse argv as the CLI would, without running it; the usage error, if any.

    Works for Ray's click commands and for typer's, which bring their own copy of click
    (typer._click), hence no isinstance checks on click's classes.
    """
    command, path, args = cli, [argv[0]], argv[1:]
    while isinstance(getattr(command, "commands", None), dict):  # a group: find the command
        if not args or args[0] not in command.commands:
            return f"`{' '.join(path)}` has no command {args[0] if args else '(none)'!r}"
        command, path, args = command.commands[args[0]], [*path, args[0]], args[1:]
    try:
        command.make_context(" ".join(path), list(args))
    except Exception as exc:  # click's UsageError and BadParameter, from either copy
        if not hasattr(exc, "format_message"):
            raise
        return str(exc.format_message())
    return None


def deploy_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command deploy/ runs or tells an operator to run."""
    found: list[tuple[str, list[str]]] = []
    for container in [*m.compose_containers(), *m.kubernetes_containers()]:
        found += [(container.where, argv) for argv in m.container_invocations(container)]
    image_default = [*m.dockerfile_exec_form("ENTRYPOINT"), *m.dockerfile_exec_form("CMD")]
    found.append(("Dockerfile ENTRYPOINT + CMD", image_default))
    found += list(m.ray_start_invocations())
    for line in m.readme_shell_lines():
        for argv in m.shell_commands(line):
            found += [(f"README: {line.strip()}", argv[i:]) for i in program_positions(argv)]
    return found


def program_positions(argv: list[str]) -> list[int]:
    """Where `aetrain` or `ray` is run in a README line: first, after `--` (kubectl exec),
    or after `exec|run SERVICE` (docker compose); not `--namespace aetrain`."""
    return [
        i for i, word in enumerate(argv) if word in ("aetrain", "ray") and (
            i == 0 or argv[i - 1] == "--"
            or (i >= 2 and argv[i - 2] in ("exec", "run") and not argv[i - 1].startswith("-"))
        )
    ]  # fmt: skip


def test_every_command_deploy_runs_exists_in_its_cli() -> None:
    from ray.scripts.scripts import cli as ray_cli

    from service.cli import app

    clis = {"aetrain": typer.main.get_command(app), "ray": ray_cli}
    invocations = deploy_invocations()
    errors = []
    for where, argv in invocations:
        if argv[0] in clis:
            error = cli_error(clis[argv[0]], argv)
        else:
            error = None if argv[0] in OTHER_PROGRAMS else f"unknown program {argv[0]!r}"
        if error:
            errors.append(f"{where}: {' '.join(argv)}: {error}")
    assert errors == []
    # the extraction itself found the processes it should have
    lines = {" ".join(argv[:2]) for _, argv in invocations}
    assert {"aetrain api", "aetrain worker", "aetrain keys", "ray start"} <= lines


# -- variables -------------------------------------------------------------------------------------
def set_variables() -> list[tuple[str, str]]:
    """(where, NAME) of every variable deploy/ puts into a process's environment."""
    found = [("Dockerfile ENV", n) for n in m.dockerfile_env_names()]
    for container in [*m.compose_containers(), *m.kubernetes_containers()]:
        found += [(container.where, e["name"]) for e in container.env]
    for doc in m.docs_of("ConfigMap"):  # only envFrom'd: their keys are variable names
        found += [(doc.id, key) for key in doc.body.get("data", {})]
    for secret in (m.SECRET_NAME, m.S3_SECRET_NAME):
        found += [(f"README: kubectl create secret {secret}", key)
                  for key in m.readme_secret_keys(secret)]  # fmt: skip
    return found


def is_read(name: str, settings: set[str]) -> bool:
    """Whether aetrain (its settings, its S3 client) or Ray, Redis or Python reads `name`."""
    if name.startswith("AETRAIN_"):
        return name in settings
    if name.startswith("AWS_"):
        return name in AWS_VARIABLES
    return name in settings or name in OTHER_VARIABLES


def test_every_variable_deploy_sets_is_one_aetrain_or_ray_reads() -> None:
    settings = settings_variables()
    wrong = [f"{where}: {name}" for where, name in set_variables() if not is_read(name, settings)]
    assert wrong == []
    assert "RAY_ADDRESS" in settings and "AETRAIN_REDIS_URL" in settings  # the derivation works
    assert {n for _, n in set_variables() if n.startswith("AWS_")}  # the S3 settings are seen


def deploy_texts() -> dict[str, str]:
    files = [m.DOCKERFILE, m.README, *m.yaml_files()]
    return {str(p.relative_to(m.DEPLOY)): p.read_text() for p in files}


def test_every_aetrain_name_deploy_mentions_exists() -> None:
    """README prose and comments too: a misspelt AETRAIN_ name would mislead an operator."""
    known = settings_variables() | CLIENT_VARIABLES | COMPOSE_KNOBS
    wrong = {
        f"{path}: {name}"
        for path, text in deploy_texts().items()
        for name in re.findall(r"\bAETRAIN_[A-Z0-9_]*[A-Z0-9]", text)
        if name not in known
    }
    assert wrong == set()


def test_every_aws_name_deploy_mentions_is_one_aetrain_hands_on() -> None:
    """README prose and comments too: only these reach the S3 client and the ranks."""
    wrong = {
        f"{path}: {name}"
        for path, text in deploy_texts().items()
        for name in re.findall(r"\bAWS_[A-Z0-9_]*[A-Z0-9]", text)
        if name not in AWS_VARIABLES
    }
    assert wrong == set()


def test_client_and_compose_variables_are_read_where_this_test_says() -> None:
    root = m.DEPLOY.parent
    client_source = "".join(
        p.read_text() for package in ("aetrain", "service") for p in (root / package).rglob("*.py")
    )
    assert {n for n in CLIENT_VARIABLES if n not in client_source} == set()
    compose_text = m.COMPOSE.read_text()
    assert {n for n in COMPOSE_KNOBS if "${" + n not in compose_text} == set()


def test_every_variable_compose_interpolates_is_documented() -> None:
    readme = m.README.read_text()
    text = m.COMPOSE.read_text() + m.COMPOSE_S3.read_text()
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert {n for n in names if f"`{n}`" not in readme} == set()


def test_the_secrets_readme_creates_have_the_keys_the_manifests_use() -> None:
    """`aetrain-secrets`: exactly its keys, all required. `aetrain-s3`: optional, so every
    reference says so, and README need not create every key (no endpoint for AWS S3)."""
    used: dict[str, set[str]] = {m.SECRET_NAME: set(), m.S3_SECRET_NAME: set()}
    for container in m.kubernetes_containers():
        for e in container.env:
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            if ref:
                assert ref["name"] in used, container.where
                assert bool(ref.get("optional")) == (ref["name"] == m.S3_SECRET_NAME), e
                if ref["name"] == m.S3_SECRET_NAME:  # README names its keys as the variables
                    assert ref["key"] == e["name"], (container.where, e)
                used[ref["name"]].add(ref["key"])
        assert not any("secretRef" in s for s in container.env_from), container.where
    assert used[m.SECRET_NAME] == m.readme_secret_keys(m.SECRET_NAME)
    assert set() < m.readme_secret_keys(m.S3_SECRET_NAME) <= used[m.S3_SECRET_NAME]
    assert used[m.S3_SECRET_NAME] <= set(AWS_VARIABLES)


def test_every_dollar_reference_in_a_pod_is_defined_before_it() -> None:
    """Kubernetes leaves an unknown $(NAME) as it is: a typo would become a literal password."""
    errors = []
    for container in m.kubernetes_containers():
        defined = container.env_names() - {e["name"] for e in container.env}  # envFrom's
        for e in container.env:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                if ref not in defined:
                    errors.append(f"{container.where}: {e['name']} uses $({ref})")
            defined.add(e["name"])
        for word in [*(container.command or []), *(container.args or [])]:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                if ref not in defined:
                    errors.append(f"{container.where}: args use $({ref})")
    assert errors == []


# -- compose and Kubernetes agree ------------------------------------------------------------------
def kubernetes_roles() -> dict[str, Container]:
    """The Kubernetes container that plays each compose service's part."""
    by_where = {c.where: c for c in m.kubernetes_containers()}

    def one(prefix: str) -> Container:
        matches = [c for where, c in by_where.items() if where.startswith(prefix)]
        assert len(matches) == 1, (prefix, list(by_where))
        return matches[0]

    return {
        "redis": one("k8s/redis.yaml#0:StatefulSet/aetrain-redis"),
        "api": one("k8s/api.yaml#0:Deployment/aetrain-api"),
        "dispatcher": one("k8s/dispatcher.yaml#0:Deployment/aetrain-dispatcher"),
        "ray-head": one("kuberay/raycluster.yaml#0:RayCluster/aetrain head"),
        "ray-gpu-worker": one("kuberay/raycluster.yaml#0:RayCluster/aetrain group gpu"),
    }


def test_compose_and_kubernetes_give_each_process_the_same_variables() -> None:
    compose = {c.where.removeprefix("compose service "): c for c in m.compose_containers()}
    roles = kubernetes_roles()
    assert set(compose) == set(roles)
    differ = {
        role: sorted((compose[role].env_names() ^ k8s.env_names()) - PLUMBING)
        for role, k8s in roles.items()
    }
    assert {role: names for role, names in differ.items() if names} == {}


def test_redis_keeps_an_append_only_file_and_wants_a_password_in_both() -> None:
    compose_args = m.compose()["services"]["redis"]["command"]
    k8s_args = kubernetes_roles()["redis"].args
    assert compose_args[0] == k8s_args[0] == "redis-server"
    for args, password in ((compose_args, "${REDIS_PASSWORD:?"), (k8s_args, "$(REDIS_PASSWORD)")):
        flags = dict(zip(args[1::2], args[2::2], strict=True))
        assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "always"
        assert flags["--maxmemory-policy"] == "noeviction"
        assert flags["--requirepass"].startswith(password)
    assert len(compose_args) == len(k8s_args)


def test_every_redis_url_carries_the_password() -> None:
    urls = [
        (c.where, e.get("value", ""))
        for c in [*m.compose_containers(), *m.kubernetes_containers()]
        for e in c.env if e["name"] == "AETRAIN_REDIS_URL"
    ]  # fmt: skip
    assert len(urls) >= 4  # api and dispatcher, in compose and in Kubernetes
    pattern = r"redis://:(\$\{REDIS_PASSWORD:\?[^}]*\}|\$\(REDIS_PASSWORD\))@[a-z0-9-]+:6379/0"
    assert [(where, url) for where, url in urls if not re.fullmatch(pattern, url)] == []


def test_gpu_workers_ask_for_gpus() -> None:
    (doc,) = m.docs_of("RayCluster")
    (gpu,) = [g for g in doc.body["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    # Kubernetes requires requests == limits for extended resources like nvidia.com/gpu.
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    devices = m.compose()["services"]["ray-gpu-worker"]["deploy"]["resources"]["reservations"]
    assert any("gpu" in d.get("capabilities", []) for d in devices["devices"])
