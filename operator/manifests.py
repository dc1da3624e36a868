"""Kubernetes objects for a ModelDeployment's workers (pure functions of the spec)."""

import datetime as dt
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetwise.addresses import WORKER_INTERNAL_PORT, WORKER_PORT
from fleetwise.controllers.placement import GPU_RESOURCE
from fleetwise.fleet import PowerOverride, Routability, WorkerState
from fleetwise.spec import API_VERSION, ModelDeploymentSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL = "fleetwise.dev/model"
LABEL_ROLE = "fleetwise.dev/role"
LABEL_POOL = "fleetwise.dev/pool"
LABEL_DEPLOYMENT = "fleetwise.dev/deployment"
LABEL_TEMPLATE = "fleetwise.dev/template-hash"
LABEL_ROUTABLE = "fleetwise.dev/routable"
ANNOTATION_DRAINING = "fleetwise.dev/draining-since"  # seconds since the epoch; the drain timeout counts from it
# a worker's routability state: the routable label follows it (the router and the pool
# Services select on the label), these say which state, why and since when (ISO 8601, UTC)
ANNOTATION_ROUTABILITY = "fleetwise.dev/routability"
ANNOTATION_ROUTABILITY_REASON = "fleetwise.dev/routability-reason"
ANNOTATION_ROUTABILITY_SINCE = "fleetwise.dev/routability-since"
ANNOTATION_CORDON_REASON = "fleetwise.dev/cordon-reason"  # on a node fleetwise cordoned
ANNOTATION_POWER_OVERRIDE = "fleetwise.dev/power-override"  # JSON {"watts", "until", "reason"} on a worker pod
# the power controller's cap on a worker pod: JSON {"watts", "until", "fallbackWatts", "reason"}
ANNOTATION_POWER_CAP = "fleetwise.dev/power-cap"
SCHEDULER_NAME = "fleetwise"
# the shared internal token, copied by the operator into each namespace it places workers in
TOKEN_SECRET = "fleetwise-internal-token"
TOKEN_KEY = "token"
TOKEN_DIR = "/var/run/fleetwise"


def labels(name: str, spec: ModelDeploymentSpec, role: str) -> dict[str, str]:
    return {MANAGED_BY: "fleetwise", LABEL_DEPLOYMENT: name, LABEL_MODEL: _label_value(spec.model.name),
            LABEL_ROLE: role, LABEL_POOL: f"{name}-{role}"}


def _label_value(v: str) -> str:
    """Label values allow [A-Za-z0-9._-]; a model name may hold '/'."""
    return v.replace("/", ".")[:63]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso: str) -> float:
    try:
        return dt.datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return 0.0


def routability_patch(state: Routability, reason: str, now: float) -> tuple[dict[str, str], dict[str, str | None]]:
    """The labels and annotations that put a worker pod in `state` (a None annotation is
    removed): a drain starts the drain timeout; any other state ends a drain under way."""
    labels = {LABEL_ROUTABLE: "true" if state is Routability.SERVING else "false"}
    annotations: dict[str, str | None] = {
        ANNOTATION_ROUTABILITY: str(state), ANNOTATION_ROUTABILITY_REASON: reason[:1024],
        ANNOTATION_ROUTABILITY_SINCE: _iso(now),
        ANNOTATION_DRAINING: str(now) if state is Routability.DRAINING else None}
    return labels, annotations


def pod_state(pod: dict) -> WorkerState:
    """A worker pod's routability as recorded on it. A pod with no recorded state is serving,
    or draining when it carries only the drain annotation (a drain from before the state
    was recorded); a routable=false label set by hand takes a pod out of routing without
    giving it a state."""
    annotations = pod["metadata"].get("annotations") or {}
    recorded = annotations.get(ANNOTATION_ROUTABILITY)
    if recorded in tuple(Routability):
        return WorkerState(Routability(recorded), annotations.get(ANNOTATION_ROUTABILITY_REASON, ""),
                           _epoch(annotations.get(ANNOTATION_ROUTABILITY_SINCE, "")))
    draining = annotations.get(ANNOTATION_DRAINING)
    if draining:
        return WorkerState(Routability.DRAINING, "", float(draining))
    return WorkerState(Routability.SERVING)


def pod_power_override(pod: dict, now: float) -> PowerOverride | None:
    """The power-cap override recorded on a worker pod, when one is in force; a malformed
    annotation (edited by hand) is no override."""
    raw = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_POWER_OVERRIDE)
    try:
        o = json.loads(raw) if raw else None
        override = PowerOverride(float(o["watts"]), float(o["until"]), str(o.get("reason", ""))) if o else None
    except (ValueError, TypeError, KeyError):
        return None
    return override if override is not None and override.active(now) else None


def pod_power_cap(pod: dict) -> dict | None:
    """The power controller's cap recorded on a worker pod (its annotation's JSON), or None."""
    raw = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_POWER_CAP)
    try:
        cap = json.loads(raw) if raw else None
        ok = isinstance(cap, dict) and all(isinstance(cap.get(k), int | float) for k in ("watts", "until"))
        return cap if ok else None
    except ValueError:
        return None


def owner_reference(body: dict) -> dict:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": "ModelDeployment", "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


# Kubernetes' "restricted" Pod Security Standard: not root, no privilege escalation, no
# capabilities, the runtime's default seccomp profile; and a read-only root filesystem with a
# writable /tmp (HOME points there, for libraries that cache under ~). The uid is the one
# distroless images call "nonroot".
NON_ROOT_UID = 65532
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
                "fsGroup": NON_ROOT_UID, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


MODEL_DIR = "/var/lib/fleetwise/model"  # where a pvc:// or hf:// model appears in the worker container


@dataclass
class ModelMount:
    """What a pod needs to see its model: the directory the worker loads, the volumes, the
    worker's mounts and, for hf://, the init container that downloads it."""
    directory: str
    volumes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    init_containers: list[dict] = field(default_factory=list)


def model_mount(spec: ModelDeploymentSpec) -> ModelMount:
    source = spec.model.source()
    if source.kind == "path":
        return ModelMount(source.path)
    mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
    if source.kind == "pvc":
        directory = f"{MODEL_DIR}/{source.path}" if source.path else MODEL_DIR
        return ModelMount(directory, [{"name": "model", "persistentVolumeClaim": {"claimName": source.claim,
                                                                                   "readOnly": True}}], [mount])
    env: list[dict] = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"},
                       {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    secret = spec.model.token_secret
    if secret is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    download = {
        "name": "model-download", "image": spec.image, "command": ["fleetwise"],
        "args": ["model", "download", spec.model.uri, "--out", MODEL_DIR],
        "securityContext": CONTAINER_SECURITY, "env": env,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "model", "mountPath": MODEL_DIR}],
    }
    return ModelMount(MODEL_DIR, [{"name": "model", "emptyDir": {}}], [mount], [download])


def worker_pod(body: dict, spec: ModelDeploymentSpec, role: str, template: str,
               tolerations: Sequence[dict] = ()) -> dict:
    name = body["metadata"]["name"]
    pool = spec.pools()[role]
    e = spec.engine
    # a worker whose engine keeps failing exits, and the kubelet restarts it
    model = model_mount(spec)
    args = ["worker", "--model", model.directory, "--served-model-name", spec.model.name, "--role", role,
            "--exit-on-engine-failure",
            "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--internal-port", str(WORKER_INTERNAL_PORT),
            "--internal-token-file", f"{TOKEN_DIR}/{TOKEN_KEY}", "--block-size", str(e.block_size),
            "--max-num-seqs", str(e.max_num_seqs), "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--dtype", e.dtype]
    if e.kv_cache_mib:
        args += ["--kv-cache-mib", str(e.kv_cache_mib)]
    resources = {GPU_RESOURCE: str(pool.gpus_per_replica)}
    if pool.resources:
        for key in ("cpu", "memory"):
            value = getattr(pool.resources, key)
            if value is not None:
                resources[key] = str(value)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": f"{name}-{role}-{secrets.token_hex(3)}",
            "labels": {**labels(name, spec, role), LABEL_TEMPLATE: template, LABEL_ROUTABLE: "true"},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            "restartPolicy": "Always",
            "automountServiceAccountToken": False,  # a worker has no business with the API server
            "securityContext": POD_SECURITY,
            "volumes": [{"name": "tmp", "emptyDir": {}},
                        # read by the worker's user through fsGroup; nobody else in the pod
                        {"name": "internal-token", "secret": {"secretName": TOKEN_SECRET, "defaultMode": 0o440,
                                                              "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]}},
                        *model.volumes],
            "initContainers": model.init_containers,
            "terminationGracePeriodSeconds": 60,
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}, *tolerations],
            "containers": [{
                "name": "worker", "image": spec.image, "command": ["fleetwise"], "args": args,
                # the kubelet probes the public port; the internal one is the router's and the
                # other workers' (the chart's NetworkPolicy keeps it to them)
                "ports": [{"name": "http", "containerPort": WORKER_PORT},
                          {"name": "internal", "containerPort": WORKER_INTERNAL_PORT}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": WORKER_PORT}, "periodSeconds": 5,
                                   "failureThreshold": 2},
                "livenessProbe": {"httpGet": {"path": "/health", "port": WORKER_PORT}, "periodSeconds": 10,
                                  "failureThreshold": 6, "initialDelaySeconds": 60},
                "resources": {"requests": resources, "limits": resources},
                "securityContext": CONTAINER_SECURITY,
                "env": [{"name": "HOME", "value": "/tmp"}],
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                 {"name": "internal-token", "mountPath": TOKEN_DIR, "readOnly": True},
                                 *model.mounts],
            }],
        },
    }


def token_secret(token: str) -> dict:
    """The copy of the shared internal token that a namespace's worker pods mount."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": TOKEN_SECRET, "labels": {MANAGED_BY: "fleetwise"}},
            "stringData": {TOKEN_KEY: token}}


def pool_service(body: dict, spec: ModelDeploymentSpec, role: str) -> dict:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": f"{name}-{role}", "labels": labels(name, spec, role),
                     "ownerReferences": [owner_reference(body)]},
        "spec": {"selector": {LABEL_DEPLOYMENT: name, LABEL_ROLE: role, LABEL_ROUTABLE: "true"},
                 "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": WORKER_PORT}]},
    }
