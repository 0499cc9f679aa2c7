"""What deploy/ says, read as data: its documents, containers, commands and variables.

Only PyYAML, the standard library and (for label selectors) plain dicts: no Docker, no
Kubernetes, no Ray cluster. The tests beside this module compare what is read here with
the schemas in deploy/schemas, the CLI and shared/settings.py.
"""

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCHEMAS = DEPLOY / "schemas"
COMPOSE = DEPLOY / "compose.yml"
COMPOSE_S3 = DEPLOY / "compose.s3.yml"  # an override: `-f compose.yml -f compose.s3.yml`
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
KUBERNETES_DIRS = (DEPLOY / "k8s", DEPLOY / "kuberay")
SECRET_NAME = "aetrain-secrets"
S3_SECRET_NAME = "aetrain-s3"  # optional: object storage's endpoint, region and keys
IMAGE = "aetrain"  # the image deploy/Dockerfile builds; its entrypoint is `aetrain`


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name"))

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(DEPLOY)}#{self.index}:{self.kind}/{self.name}"


@dataclass
class Container:
    """One container of a compose service or a Kubernetes pod template."""

    where: str
    image: str
    command: list[str] | None  # replaces the image's entrypoint
    args: list[str] | None  # replaces the image's CMD
    env: list[dict[str, Any]] = field(default_factory=list)  # Kubernetes style: name, value
    env_from: list[dict[str, Any]] = field(default_factory=list)
    probes: list[list[str]] = field(default_factory=list)  # exec commands
    started_by_operator: bool = False  # KubeRay sets a Ray pod's command (from rayStartParams)

    def env_names(self) -> set[str]:
        names = {e["name"] for e in self.env}
        for source in self.env_from:
            if "configMapRef" in source:
                names |= set(config_map(source["configMapRef"]["name"]))
        return names


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<` merge keys


@cache
def compose_s3() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_S3.read_text())


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def kubernetes_files() -> list[Path]:
    return sorted(p for d in KUBERNETES_DIRS for p in d.glob("*.yaml"))


@cache
def kubernetes_docs() -> tuple[Doc, ...]:
    docs = []
    for path in kubernetes_files():
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                docs.append(Doc(path, index, body))
    return tuple(docs)


def docs_of(kind: str) -> list[Doc]:
    return [d for d in kubernetes_docs() if d.kind == kind]


def config_map(name: str) -> dict[str, str]:
    for doc in docs_of("ConfigMap"):
        if doc.name == name:
            return dict(doc.body.get("data", {}))
    raise AssertionError(f"envFrom names ConfigMap {name!r}, which deploy/ does not define")


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


# -- pod templates and containers ------------------------------------------------------------------
def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of every workload: Deployments, StatefulSets, Ray groups."""
    for doc in kubernetes_docs():
        spec = doc.body.get("spec", {})
        if doc.kind in ("Deployment", "StatefulSet"):
            yield doc.id, spec["template"]
        elif doc.kind == "RayCluster":
            yield f"{doc.id} head", spec["headGroupSpec"]["template"]
            for group in spec.get("workerGroupSpecs", []):
                yield f"{doc.id} group {group['groupName']}", group["template"]


def is_ray_pod(where: str) -> bool:
    return ":RayCluster/" in where


def kubernetes_containers() -> Iterator[Container]:
    for where, template in pod_templates():
        spec = template["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            probes = [
                c[probe]["exec"]["command"]
                for probe in ("readinessProbe", "livenessProbe", "startupProbe")
                if "exec" in c.get(probe, {})
            ]
            yield Container(f"{where} container {c['name']}", c["image"], c.get("command"),
                            c.get("args"), c.get("env", []), c.get("envFrom", []),
                            probes, started_by_operator=is_ray_pod(where))  # fmt: skip


def compose_containers() -> Iterator[Container]:
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        if isinstance(env, list):  # the KEY=VALUE list form
            env = dict(item.split("=", 1) for item in env)
        test = service.get("healthcheck", {}).get("test")
        probes = []
        if isinstance(test, list) and test[0] == "CMD":
            probes.append(test[1:])
        elif isinstance(test, list) and test[0] == "CMD-SHELL":
            probes.append(["/bin/sh", "-c", test[1]])
        yield Container(f"compose service {name}", service.get("image", ""),
                        as_argv(service.get("entrypoint")), as_argv(service.get("command")),
                        [{"name": k, "value": v} for k, v in env.items()], [], probes)  # fmt: skip


def as_argv(value: str | list[str] | None) -> list[str] | None:
    return shlex.split(value) if isinstance(value, str) else value


def with_defaults(text: str) -> str:
    """Compose's ${VAR:-default} and ${VAR-default} read as their defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def runs_aetrain_image(container: Container) -> bool:
    """Whether the image is the one deploy/Dockerfile builds (any registry and tag)."""
    last = with_defaults(container.image).split("@")[0].rsplit("/", 1)[-1]  # name[:tag]
    return last.split(":")[0] == IMAGE


# -- the Dockerfile --------------------------------------------------------------------------------
def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            instruction, _, rest = logical.strip().partition(" ")
            yield instruction.upper(), rest.strip()
        logical = ""


def dockerfile_exec_form(instruction: str) -> list[str]:
    forms = [json.loads(rest) for ins, rest in dockerfile_instructions() if ins == instruction]
    assert forms, f"deploy/Dockerfile has no {instruction}"
    return forms[-1]  # the last one wins


def dockerfile_env_names() -> set[str]:
    names = set()
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            names |= {word.split("=", 1)[0] for word in shlex.split(rest) if "=" in word}
    return names


# -- commands --------------------------------------------------------------------------------------
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a small shell script: one per line and per &&, ||, ;, |."""
    script = script.replace("$$", "$")  # compose's escape for a literal $
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in SHELL_OPERATORS or set(token) <= set(";&|"):
                words = [w for w in argv if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)]
                while words and words[0] in ("exec", "command", "time"):
                    words = words[1:]
                if words:
                    yield words
                argv = []
            else:
                argv.append(token)


def expand_shell(argv: list[str]) -> Iterator[list[str]]:
    """argv itself, or the commands inside it when it is `sh -c SCRIPT`."""
    if len(argv) >= 3 and argv[0] in SHELLS and argv[1] == "-c":
        yield from shell_commands(argv[2])
    else:
        yield argv


def container_invocations(container: Container) -> Iterator[list[str]]:
    """Every command line the container runs: its main process and its exec probes."""
    if container.started_by_operator:
        for probe in container.probes:
            yield from expand_shell(probe)
        return
    entrypoint = container.command
    if entrypoint is None:
        if not runs_aetrain_image(container):
            entrypoint = []  # a third-party image: its entrypoint is its own business
        else:
            entrypoint = dockerfile_exec_form("ENTRYPOINT")
    args = container.args
    if args is None and container.command is None and runs_aetrain_image(container):
        args = dockerfile_exec_form("CMD")
    main = [*entrypoint, *(args or [])]
    if main:
        yield from expand_shell(main)
    for probe in container.probes:
        yield from expand_shell(probe)


def ray_start_invocations() -> Iterator[tuple[str, list[str]]]:
    """The `ray start` lines KubeRay builds from rayStartParams (keys become --key=value)."""
    for doc in docs_of("RayCluster"):
        spec = doc.body["spec"]
        groups = [("head", ["--head"], spec["headGroupSpec"])]
        groups += [(g["groupName"], ["--address=HEAD:6379"], g) for g in spec["workerGroupSpecs"]]
        for name, base, group in groups:
            params = [f"--{k}={v}" for k, v in group.get("rayStartParams", {}).items()]
            yield f"{doc.id} {name} rayStartParams", ["ray", "start", *base, *params]


def readme_shell_lines() -> Iterator[str]:
    """The lines of README's ```sh blocks, with continuation lines joined."""
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", README.read_text(), re.S):
        yield from block.replace("\\\n", " ").splitlines()


def readme_secret_keys(name: str) -> set[str]:
    """The keys README's `kubectl create secret generic NAME` commands put in that Secret."""
    keys: set[str] = set()
    for line in readme_shell_lines():
        if re.search(rf"create secret generic {re.escape(name)}(\s|$)", line):
            keys |= set(re.findall(r"--from-literal=([A-Za-z_][A-Za-z0-9_]*)=", line))
    return keys


# -- label selectors and network policies ----------------------------------------------------------
def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def ingress_allowed(
    source: dict[str, str], target: dict[str, str], port: int,
    namespace: dict[str, str] | None = None,
) -> bool:  # fmt: skip
    """Whether the NetworkPolicies let a pod labelled `source` reach `target`: a pod of the same
    namespace, or with `namespace` (that namespace's labels) a pod of another one."""
    policies = [
        d.body["spec"] for d in docs_of("NetworkPolicy")
        if selects(d.body["spec"]["podSelector"], target)
        and "Ingress" in d.body["spec"].get("policyTypes", ["Ingress"])
    ]  # fmt: skip
    if not policies:
        return True  # a pod no policy selects takes any traffic
    for policy in policies:
        for rule in policy.get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (None, port) for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admits(peer, source, namespace) for peer in peers):
                return True
    return False


def peer_admits(
    peer: dict[str, Any], source: dict[str, str], namespace: dict[str, str] | None
) -> bool:
    """Kubernetes' rule for one `from` entry: a podSelector alone means this namespace; a
    namespaceSelector, the namespaces it selects (this one is not assumed to be among them)."""
    if "ipBlock" in peer:
        return True  # addresses, not labels: count it as open
    if "namespaceSelector" in peer:
        if namespace is None or not selects(peer["namespaceSelector"], namespace):
            return False
    elif namespace is not None:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source)
