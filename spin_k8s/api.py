"""The SpinRun API as typed values: constants of the resource, the spec parsed from an API object, offline
defaulting and validation from the CRD schema, and the merge of a run's spec over its SpinRuntime.

The CRD (``manifests/crd/spinruns.selfplay.dev.yaml``, copied into the package as
``spin_k8s/crd.yaml``) is the single source of truth for field names, defaults and bounds: the API server
applies it to every object, and :func:`load_defaulted` applies the same schema offline (``spinctl --dry-run``,
the local executor). :func:`semantic_errors` holds the checks a schema cannot express, which the controller
turns into a Failed condition.

A SpinRuntime (``manifests/crd/spinruntimes.selfplay.dev.yaml``, packaged as ``spin_k8s/runtime-crd.yaml``) holds
the pod infrastructure a platform team sets for runs; :func:`merge_runtime` lays a run's spec over the copy of it
the controller keeps in the run's ``status.runtime``, and :func:`parse` builds the spec from that merge.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import yaml

import spin_k8s

GROUP = "selfplay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SpinRun"
PLURAL = "spinruns"
MAX_NAME_LENGTH = 40
# Run names become Service names and pod hostnames (`{job}-0.{service}`): a DNS-1035 label, as the CRD says.
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RUNTIME_KIND = "SpinRuntime"
RUNTIME_PLURAL = "spinruntimes"  # cluster-scoped
DEFAULT_RUNTIME = "default"  # the SpinRuntime a run without spec.runtime uses, when it exists
RESUME_ANNOTATION = f"{GROUP}/resume"  # an integer bumped by `spinctl resume`: each grants a new restart budget
ROLES = ("generate", "train")  # the keys of the per-role spec fields (resources, shmSize, env, volumes, ...)
# What the Job bodies (spin_k8s/manifests.py) use themselves, so a spec's env and volumes may not: the same lists
# and path rule as the CRD's CEL rules (tests/unit/test_crd_schema.py compares them).
RESERVED_ENV = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "DS_ACCELERATOR", "OMP_NUM_THREADS", "JOB_COMPLETION_INDEX")
RESERVED_VOLUMES = ("shm", "scratch")
RESERVED_MOUNT = r"^/+((dev(/+shm)?|tmp)/*)?$"  # /dev/shm, /tmp, or a directory above them


@dataclass(frozen=True)
class Images:
    """Worker images used where a SpinRun's ``spec.images`` names none (the controller's flags set them)."""

    generate: str
    train: str


DEFAULT_IMAGES = Images(generate=f"ghcr.io/spin-k8s/generate:{spin_k8s.__version__}",
                        train=f"ghcr.io/spin-k8s/train:{spin_k8s.__version__}")


@functools.cache
def crd(filename: str = "crd.yaml") -> dict[str, Any]:
    """The SpinRun CRD as shipped in the package (``runtime-crd.yaml``: the SpinRuntime CRD)."""
    text = importlib.resources.files("spin_k8s").joinpath(filename).read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def schema(filename: str = "crd.yaml") -> dict[str, Any]:
    """The OpenAPI v3 schema of the served version of the SpinRun CRD (or of ``filename``'s)."""
    (version,) = (v for v in crd(filename)["spec"]["versions"] if v["name"] == VERSION)
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def runtime_schema() -> dict[str, Any]:
    """The OpenAPI v3 schema of the SpinRuntime."""
    return schema("runtime-crd.yaml")


# How merge_runtime lays a run's field over its runtime's: these maps key by role (images also by pullPolicy, which
# every served SpinRun has, so the run's always applies) or by label / annotation / node label, so they merge one key
# at a time; env merges by variable name within a role. Every other field the run sets replaces the runtime's whole.
_MERGED_BY_KEY = frozenset({"images", "resources", "shmSize", "scratchSize", "scratchVolume", "env", "volumes",
                            "volumeMounts", "activeDeadlineSeconds", "nodeSelector", "podLabels", "podAnnotations"})


def runtime_snapshot(runtime: dict[str, Any] | None) -> dict[str, Any]:
    """What a run's ``status.runtime`` keeps of the SpinRuntime object it was read with (None: no runtime, {})."""
    if runtime is None:
        return {}
    meta = runtime["metadata"]
    return {"name": meta["name"], "resourceVersion": meta.get("resourceVersion", ""),
            "spec": copy.deepcopy(runtime.get("spec") or {})}


def _merge_env(runtime: list[dict[str, Any]], run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runtime's variables in their order, each replaced by the run's of the same name, then the run's others."""
    mine = {e.get("name"): e for e in run}
    theirs = {e.get("name") for e in runtime}
    return [mine.get(e.get("name"), e) for e in runtime] + [e for e in run if e.get("name") not in theirs]


def merge_runtime(runtime: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A run's ``spec`` laid over a SpinRuntime's ``runtime`` spec (both as served): the run wins, key by key in
    the maps of :data:`_MERGED_BY_KEY`, by variable name in env, whole in every other field. The runtime's storage
    is not merged: spinctl writes it into a new run, whose storage is part of its identity. Pure; a new dict."""
    merged = copy.deepcopy(spec)
    for name, theirs in runtime.items():
        if name == "storage":
            continue
        mine = spec.get(name)
        if mine is None:
            merged[name] = copy.deepcopy(theirs)
        elif name == "env":
            merged[name] = {role: _merge_env(theirs.get(role) or [], mine.get(role) or [])
                            for role in {**theirs, **mine}}
        elif name in _MERGED_BY_KEY:
            merged[name] = copy.deepcopy({**theirs, **mine})
    return merged


def _apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill ``default``s the way the API server does: for absent properties of present objects."""
    if isinstance(value, dict):
        for name, prop in (node.get("properties") or {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = _apply_defaults(prop, value[name])
    elif isinstance(value, list) and "items" in node:
        return [_apply_defaults(node["items"], v) for v in value]
    return value


def load_defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of a SpinRun object with the CRD's defaults applied."""
    result: dict[str, Any] = _apply_defaults(schema(), copy.deepcopy(obj))
    return result


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Offline schema validation, one ``field.path: message`` line per error (CEL rules excepted: they are
    mirrored in :func:`semantic_errors`)."""
    validator = jsonschema.Draft4Validator(schema())
    errors: dict[str, None] = {}  # ordered, without repeats: one "required" error per object names them all
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "required":  # name each missing field itself, as the API server does
            for missing in sorted(set(err.validator_value) - set(err.instance)):
                errors[f"{field_path([*path, missing])}: Required value"] = None
        else:
            errors[f"{field_path(path)}: {err.message}"] = None
    return list(errors)


def field_path(parts: list[Any]) -> str:
    """``spec.iterationOverrides[0].iteration``: a path written as the API server writes it."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "<root>"


@dataclass(frozen=True)
class Generation:
    shards: int
    gpus_per_shard: int
    temperature: float  # 0: greedy decoding
    top_p: float
    max_tokens: int
    score_reference: bool
    engine: str  # "vllm" (production, the default) or "transformers" (slow: CPU tests and debugging)
    prompt_format: str  # "chatTemplate" (the default) or "paperInstruction" (the authors' prompt); both workers


@dataclass(frozen=True)
class Training:
    nodes: int
    gpus_per_node: int
    zero_stage: int
    precision: str
    optimizer: str
    learning_rate: float
    beta: float
    loss_type: str
    epochs: int  # where training stops
    schedule_epochs: int | None  # epochs the learning-rate schedule spans; None: each iteration's epochs
    per_device_batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    max_prompt_length: int
    max_response_length: int  # tokens; max_length - max_prompt_length unless the spec sets it
    warmup_ratio: float
    gradient_checkpointing: bool
    length_grouping: bool
    checkpoint_every_steps: int
    checkpoints_to_keep: int  # newest DeepSpeed checkpoints kept, in storage and on each node (default 2)
    port: int


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one iteration after per-iteration overrides."""

    learning_rate: float
    beta: float
    epochs: int
    schedule_epochs: int  # training.scheduleEpochs, else this iteration's epochs


@dataclass(frozen=True)
class Storage:
    uri: str
    credentials_secret: str | None
    endpoint: str | None
    region: str


@dataclass(frozen=True)
class Spec:
    model: str
    dataset: str
    iterations: int
    storage: Storage
    keep_previous: int
    system_prompt: str | None  # None: no system turn; "": an empty one
    generation: Generation
    training: Training
    overrides: dict[int, dict[str, Any]]
    image_generate: str
    image_train: str
    pull_policy: str
    resources: dict[str, dict[str, Any]]  # role -> container resources, default requests resolved (no GPUs yet)
    shm_size: dict[str, str]  # role -> quantity, defaults resolved
    scratch_size: dict[str, str]  # role -> quantity, defaults resolved
    scratch_volume: dict[str, dict[str, Any]]  # role -> {} (emptyDir) or the CRD's one source
    env: dict[str, tuple[dict[str, Any], ...]]  # role -> the user's EnvVars
    volumes: dict[str, tuple[dict[str, Any], ...]]  # role -> the user's Volumes
    volume_mounts: dict[str, tuple[dict[str, Any], ...]]  # role -> the user's VolumeMounts
    active_deadline: dict[str, int]  # role -> seconds; a role without one has no limit
    image_pull_secrets: tuple[str, ...]
    priority_class: str | None
    affinity: dict[str, Any]
    node_selector: dict[str, str]
    pod_labels: dict[str, str]
    pod_annotations: dict[str, str]
    tolerations: tuple[dict[str, Any], ...]
    service_account: str | None
    queue_name: str | None
    runtime: str | None  # the SpinRuntime spec.runtime names; None: DEFAULT_RUNTIME where it exists
    suspend: bool
    restart_limit: int
    early_stop_accuracy: float | None
    held_out_fraction: float  # 0 without early stop

    def hyper(self, iteration: int) -> Hyper:
        o = self.overrides.get(iteration, {})
        t = self.training
        epochs = o.get("epochs", t.epochs)
        return Hyper(o.get("learningRate", t.learning_rate), o.get("beta", t.beta), epochs, t.schedule_epochs or epochs)


@dataclass(frozen=True)
class SpinRun:
    """A SpinRun as the controller sees it: identity, parsed spec, the raw status it last wrote."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Spec
    status: dict[str, Any] = field(default_factory=dict)
    resumes: int = 0
    deleting: bool = False


# Requests of a worker pod whose spec.resources names no cpu or memory (the CRD's spec.resources says why): per GPU,
# (cpu, memory in Gi); on CPU, one small pod.
_REQUESTS_PER_GPU = {"generate": (4, 32), "train": (4, 24)}
_CPU_POD_REQUESTS = {"cpu": "500m", "memory": "2Gi"}


def _resources(raw: dict[str, Any] | None, role: str, gpus: int) -> dict[str, Any]:
    """A role's container resources: the spec's, with a default request for cpu and memory where neither its
    requests nor its limits name them (a default request above a user's limit would make the pod invalid)."""
    resources: dict[str, Any] = {k: dict(v) for k, v in (raw or {}).items()}
    named = set(resources.get("requests") or {}) | set(resources.get("limits") or {})
    cpu, gib = _REQUESTS_PER_GPU[role]
    defaults = {"cpu": str(cpu * gpus), "memory": f"{gib * gpus}Gi"} if gpus else _CPU_POD_REQUESTS
    missing = {k: v for k, v in defaults.items() if k not in named}
    if missing:
        resources["requests"] = {**missing, **(resources.get("requests") or {})}
    return resources


def _per_role(raw: dict[str, Any], name: str) -> dict[str, tuple[dict[str, Any], ...]]:
    by_role = raw.get(name) or {}
    return {role: tuple(dict(item) for item in by_role.get(role) or ()) for role in ROLES}


def _spec(raw: dict[str, Any], defaults: Images) -> Spec:
    g, t, d = raw["generation"], raw["training"], raw["data"]
    storage = raw["storage"]
    images = raw["images"]
    return Spec(
        model=raw["model"], dataset=raw["dataset"], iterations=raw["iterations"],
        storage=Storage(storage["uri"].rstrip("/"), storage.get("credentialsSecret"), storage.get("endpoint"),
                        storage.get("region", "us-east-1")),
        keep_previous=d["keepPreviousIterations"], system_prompt=d.get("systemPrompt"),
        generation=Generation(g["shards"], g["gpusPerShard"], float(g["temperature"]), float(g["topP"]),
                              g["maxTokens"], g["scoreReference"], g["engine"], g["promptFormat"]),
        training=Training(
            t["nodes"], t["gpusPerNode"], t["zeroStage"], t["precision"], t["optimizer"], float(t["learningRate"]),
            float(t["beta"]), t["lossType"], t["epochs"], t.get("scheduleEpochs"), t["perDeviceBatchSize"],
            t["gradientAccumulationSteps"], t["maxLength"], t["maxPromptLength"],
            t.get("maxResponseLength", t["maxLength"] - t["maxPromptLength"]), float(t["warmupRatio"]),
            t["gradientCheckpointing"], t["lengthGrouping"], t["checkpointEverySteps"], t["checkpointsToKeep"],
            t["port"]),
        overrides={o["iteration"]: {k: v for k, v in o.items() if k != "iteration"}
                   for o in raw.get("iterationOverrides") or []},
        image_generate=images.get("generate") or defaults.generate,
        image_train=images.get("train") or defaults.train, pull_policy=images["pullPolicy"],
        resources={"generate": _resources((raw.get("resources") or {}).get("generate"), "generate", g["gpusPerShard"]),
                   "train": _resources((raw.get("resources") or {}).get("train"), "train", t["gpusPerNode"])},
        shm_size={"generate": "8Gi" if g["gpusPerShard"] else "1Gi", "train": "16Gi" if t["gpusPerNode"] else "1Gi",
                  **(raw.get("shmSize") or {})},
        scratch_size={"generate": "100Gi", "train": "500Gi", **(raw.get("scratchSize") or {})},
        scratch_volume={role: dict((raw.get("scratchVolume") or {}).get(role) or {}) for role in ROLES},
        env=_per_role(raw, "env"), volumes=_per_role(raw, "volumes"), volume_mounts=_per_role(raw, "volumeMounts"),
        active_deadline=dict(raw.get("activeDeadlineSeconds") or {}),
        image_pull_secrets=tuple(s["name"] for s in raw.get("imagePullSecrets") or ()),
        priority_class=raw.get("priorityClassName"), affinity=dict(raw.get("affinity") or {}),
        node_selector=dict(raw.get("nodeSelector") or {}),
        pod_labels=dict(raw.get("podLabels") or {}), pod_annotations=dict(raw.get("podAnnotations") or {}),
        tolerations=tuple(raw.get("tolerations") or ()), service_account=raw.get("serviceAccountName"),
        queue_name=raw.get("queueName"), runtime=raw.get("runtime"), suspend=raw["suspend"],
        restart_limit=raw["restartLimit"],
        early_stop_accuracy=(raw.get("earlyStop") or {}).get("minRewardAccuracy"),
        held_out_fraction=float((raw.get("earlyStop") or {}).get("heldOutFraction", 0.0)),
    )


def semantic_errors(obj: dict[str, Any]) -> list[str]:
    """The rules the CRD states in CEL, checked again here for offline use and as defence in depth."""
    errors = []
    name = obj.get("metadata", {}).get("name", "")
    if len(name) > MAX_NAME_LENGTH:
        errors.append(f"metadata.name: must be at most {MAX_NAME_LENGTH} characters (got {len(name)})")
    if name and not _DNS_1035.fullmatch(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits and '-', "
                      "starting with a letter and ending with a letter or digit)")
    spec = obj.get("spec") or {}
    iterations = spec.get("iterations", 0)
    for i, o in enumerate(spec.get("iterationOverrides") or []):
        if o.get("iteration", 0) >= iterations:
            errors.append(f"spec.iterationOverrides[{i}].iteration: must be below spec.iterations ({iterations})")
    t = spec.get("training") or {}
    if t.get("maxPromptLength", 0) >= t.get("maxLength", 1):
        errors.append("spec.training.maxPromptLength: must be below spec.training.maxLength")
    if t.get("maxResponseLength", 0) >= t.get("maxLength", 1):
        errors.append("spec.training.maxResponseLength: must be below spec.training.maxLength")
    if "scheduleEpochs" in t:
        epochs = [t.get("epochs", 0), *(o.get("epochs", 0) for o in spec.get("iterationOverrides") or [])]
        if t["scheduleEpochs"] < max(epochs):
            errors.append("spec.training.scheduleEpochs: must be at least spec.training.epochs and every "
                          "iterationOverrides[].epochs")
    g = spec.get("generation") or {}
    if g.get("engine") == "transformers" and g.get("gpusPerShard", 1) > 1:
        errors.append("spec.generation.gpusPerShard: the transformers engine cannot shard a model over GPUs; "
                      "gpusPerShard above 1 needs engine vllm")
    if (spec.get("generation") or {}).get("promptFormat") == "paperInstruction" and \
            "systemPrompt" in (spec.get("data") or {}):
        errors.append("spec.data.systemPrompt: the paperInstruction prompt has no system turn")
    return errors + _pod_errors(spec)


def _duplicates(path: str, items: list[dict[str, Any]]) -> list[str]:
    """The API server's check of a list keyed by name (x-kubernetes-list-type: map)."""
    names = [item.get("name") for item in items]
    return [f"{path}[{i}]: Duplicate value: {{\"name\": {name!r}}}" for i, name in enumerate(names)
            if name in names[:i]]


def _pod_errors(spec: dict[str, Any]) -> list[str]:
    """The CRD's rules on the pod infrastructure a spec adds to the Job bodies: nothing it adds may replace or
    hide what the bodies use themselves."""
    errors = _duplicates("spec.imagePullSecrets", spec.get("imagePullSecrets") or [])
    for role in ROLES:
        scratch = (spec.get("scratchVolume") or {}).get(role) or {}
        if "ephemeral" in scratch and "persistentVolumeClaim" in scratch:
            errors.append(f"spec.scratchVolume.{role}: set at most one of ephemeral and persistentVolumeClaim")
        env = (spec.get("env") or {}).get(role) or []
        errors += _duplicates(f"spec.env.{role}", env)
        errors += [f"spec.env.{role}[{i}].name: the Job sets {e.get('name')} itself" for i, e in enumerate(env)
                   if e.get("name") in RESERVED_ENV]
        volumes = (spec.get("volumes") or {}).get(role) or []
        errors += _duplicates(f"spec.volumes.{role}", volumes)
        errors += [f"spec.volumes.{role}[{i}].name: {v.get('name')} is one of the Job's own volumes" for i, v in
                   enumerate(volumes) if v.get("name") in RESERVED_VOLUMES]
        names = {v.get("name") for v in volumes}
        for i, mount in enumerate((spec.get("volumeMounts") or {}).get(role) or []):
            if re.fullmatch(RESERVED_MOUNT, str(mount.get("mountPath", ""))):
                errors.append(f"spec.volumeMounts.{role}[{i}].mountPath: {mount['mountPath']} would hide the Job's "
                              "own /dev/shm or /tmp")
            if mount.get("name") not in names:
                errors.append(f"spec.volumeMounts.{role}: {mount.get('name')} is no volume of spec.volumes.{role}")
    return errors


def parse(obj: dict[str, Any], images: Images = DEFAULT_IMAGES) -> SpinRun:
    """A SpinRun from an API object (as served: defaults already applied), its spec merged over the SpinRuntime
    copy in its ``status.runtime`` if it has one; ``images`` fill worker images neither names."""
    meta = obj["metadata"]
    annotations = meta.get("annotations") or {}
    try:
        resumes = max(0, int(annotations.get(RESUME_ANNOTATION, "0")))
    except ValueError:
        resumes = 0
    return SpinRun(
        name=meta["name"], namespace=meta.get("namespace", "default"), uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        spec=_spec(merge_runtime(((obj.get("status") or {}).get("runtime") or {}).get("spec") or {}, obj["spec"]),
                   images),
        status=dict(obj.get("status") or {}),
        resumes=resumes, deleting=meta.get("deletionTimestamp") is not None,
    )


# The errors after which the API server skips a CRD's CEL rules ("some validation rules were not checked
# because the object was invalid"): a rule cannot be evaluated on a value of the wrong type or shape.
_CEL_BLOCKING = frozenset({"type", "enum", "required", "maxLength", "maxItems", "maxProperties"})


def cel_blocked(obj: dict[str, Any]) -> bool:
    """Whether the API server would skip the CEL rules (mirrored in :func:`semantic_errors`) for ``obj``,
    which may then not be evaluated offline either."""
    validator = jsonschema.Draft4Validator(schema())
    return any(err.validator in _CEL_BLOCKING for err in validator.iter_errors(obj))


OPEN_SCHEMA: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}  # anything goes below


def field_schema(node: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The schema of field ``name`` of an object described by ``node``; None where ``node`` does not declare
    the field (the API server drops it, or refuses it under strict field validation); :data:`OPEN_SCHEMA` where
    ``node`` leaves its fields free (``x-kubernetes-preserve-unknown-fields``, or ``metadata``, an object
    without declared properties)."""
    extra = node.get("additionalProperties")
    props = node.get("properties")
    if node.get("x-kubernetes-preserve-unknown-fields") or (props is None and not isinstance(extra, dict)):
        return OPEN_SCHEMA
    if props is not None and name in props:
        result: dict[str, Any] = props[name]
        return result
    return extra if isinstance(extra, dict) else None


@dataclass(frozen=True)
class UnknownField:
    """A field the schema does not declare: where it is, and the names declared next to it."""

    path: tuple[str | int, ...]  # from the root of the value checked
    known: tuple[str, ...]

    def suggestion(self) -> str | None:
        """The declared name closest to the unknown one (``learningrate`` -> ``learningRate``), if any is close."""
        name = str(self.path[-1])
        by_lower = {k.lower(): k for k in self.known}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
        return by_lower[close[0]] if close else None


def unknown_fields(value: Any, node: dict[str, Any] | None = None,
                   path: tuple[str | int, ...] = ()) -> list[UnknownField]:
    """Every field of ``value`` that ``node`` (default: the SpinRun schema) does not declare, in order."""
    node = schema() if node is None else node
    found: list[UnknownField] = []
    if isinstance(value, dict) and node.get("type", "object") == "object":
        for name, item in value.items():
            sub = field_schema(node, str(name))
            if sub is None:
                found.append(UnknownField((*path, str(name)), tuple(node.get("properties") or ())))
            elif sub is not OPEN_SCHEMA:
                found += unknown_fields(item, sub, (*path, str(name)))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, node["items"], (*path, i))
    return found
