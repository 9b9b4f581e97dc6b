"""Builds the Kubernetes objects of one iteration: the generation Job, the training Job and its headless
Service. Pure functions of the SpinRun; the worker command lines are made here and nowhere else.

Generation: an Indexed Job, one pod (one vLLM engine) per shard; ``backoffLimitPerIndex`` reruns a failed
shard alone and ``maxFailedIndexes: 0`` fails the Job once a shard has used up its retries.
Training: an Indexed Job, one pod per node, run by torchrun with node rank = completion index and the
master = pod 0 through the headless Service. ``backoffLimit: 0``: one failed pod fails the gang, and the
controller recreates the whole gang (a new attempt) from its last DeepSpeed checkpoint.
Disruptions (preemption, node drain) never count as failures (``podFailurePolicy``). A worker pod that exits
with the workers' ``INPUT_EXIT`` (a model, dataset or tokenizer no retry can fix) fails its Job at once: no
shard rerun, no gang restart (training runs torchrun under ``spin_k8s.workers.gang``, which passes the code on).
Containers report why they failed: the worker's termination-log line, else the end of its log
(``FallbackToLogsOnError``); the controller copies it into the SpinRun's status.
Worker pods meet the restricted Pod Security Standard, get a memory-backed /dev/shm (``spec.shmSize``) and a
scratch volume at /tmp for everything they stage (``spec.scratchSize``, ``spec.scratchVolume``), and carry the
pod infrastructure the spec adds (env, volumes, pull secrets, priority, affinity, deadlines) after their own,
which the CRD keeps it from replacing.
"""

from __future__ import annotations

from typing import Any

from spin_k8s import api, naming
from spin_k8s.workers import runtime

WORKER_UID = 65532  # the numeric USER of images/generate and images/train (tests/unit/test_images.py)


def _failure_policy(container: str) -> dict[str, Any]:
    """Disruptions never count as failures; the workers' INPUT_EXIT fails the Job."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In",
                                              "values": [runtime.INPUT_EXIT]}}]}


def _owner(run: api.SpinRun) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(run: api.SpinRun, name: str, iteration: int, role: str, attempt: int) -> dict[str, Any]:
    labels = naming.labels(run.name, run.uid, iteration, role, attempt)
    if run.spec.queue_name:
        labels[naming.LABEL_KUEUE_QUEUE] = run.spec.queue_name
    return {"name": name, "namespace": run.namespace, "labels": labels, "ownerReferences": [_owner(run)]}


def _env(run: api.SpinRun, role: str, cpu: bool) -> list[dict[str, Any]]:
    """Where the workers find S3, then the spec's variables (never one of ours: api.RESERVED_ENV). Credentials
    come from the user's Secret (envFrom), never from here."""
    storage = run.spec.storage
    env = [{"name": "AWS_DEFAULT_REGION", "value": storage.region}]
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": storage.endpoint})
    if cpu:
        env += [{"name": "DS_ACCELERATOR", "value": "cpu"}, {"name": "OMP_NUM_THREADS", "value": "1"}]
    return env + [dict(e) for e in run.spec.env[role]]


def _container(run: api.SpinRun, name: str, image: str, command: list[str], gpus: int) -> dict[str, Any]:
    resources: dict[str, Any] = {k: dict(v) for k, v in run.spec.resources[name].items()}
    if gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": run.spec.pull_policy,
        "command": command[:1], "args": command[1:], "env": _env(run, name, cpu=gpus == 0), "resources": resources,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, _scratch_mount(run, name),
                         *(dict(m) for m in run.spec.volume_mounts[name])],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if run.spec.storage.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": run.spec.storage.credentials_secret}}]
    return container


def _scratch_mount(run: api.SpinRun, role: str) -> dict[str, Any]:
    mount = {"name": "scratch", "mountPath": "/tmp"}
    if "persistentVolumeClaim" in run.spec.scratch_volume[role]:
        # A claim outlives the pods and may be shared by all of them: each completion index gets a directory of
        # its own (two nodes of a gang never stage into the same one), which its retries and restarts find again.
        mount["subPathExpr"] = "$(JOB_COMPLETION_INDEX)"
    return mount


def _scratch_volume(run: api.SpinRun, role: str) -> dict[str, Any]:
    """The workers stage the model, data and checkpoints under /tmp (tempfile): on a volume of its own, never in
    the container's layer. By default an emptyDir bounded so a runaway pod is evicted, not the node's disk filled;
    else a claim made per pod from a StorageClass (sized as the emptyDir would be) or an existing one."""
    source = run.spec.scratch_volume[role]
    size = run.spec.scratch_size[role]
    if "ephemeral" in source:
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
        if source["ephemeral"].get("storageClassName"):
            claim["storageClassName"] = source["ephemeral"]["storageClassName"]
        return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
    if "persistentVolumeClaim" in source:
        return {"name": "scratch", "persistentVolumeClaim": {"claimName": source["persistentVolumeClaim"]["claimName"]}}
    return {"name": "scratch", "emptyDir": {"sizeLimit": size}}


def _template_metadata(run: api.SpinRun, labels: dict[str, str]) -> dict[str, Any]:
    # The user's extra labels never override ours: the controller selects its pods and Services by them.
    meta: dict[str, Any] = {"labels": {**run.spec.pod_labels, **labels}}
    if run.spec.pod_annotations:
        meta["annotations"] = dict(run.spec.pod_annotations)
    return meta


def _pod_spec(run: api.SpinRun, container: dict[str, Any]) -> dict[str, Any]:
    role = container["name"]
    spec: dict[str, Any] = {
        "restartPolicy": "Never", "containers": [container],
        # The restricted Pod Security Standard, so namespaces that enforce it admit the pods. The uid is the
        # one images/{generate,train} create and run as; fsGroup makes the volumes writable for it.
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                            "fsGroup": WORKER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [
            # A container's /dev/shm is 64 MiB: NCCL and vLLM's tensor-parallel workers die of SIGBUS in it.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": run.spec.shm_size[role]}},
            _scratch_volume(run, role), *(dict(v) for v in run.spec.volumes[role]),
        ],
        # The workers never call the API server: no token unless the user names a ServiceAccount (for its
        # cloud identity, say), when whatever it grants may be wanted.
        "automountServiceAccountToken": bool(run.spec.service_account),
    }
    if run.spec.service_account:
        spec["serviceAccountName"] = run.spec.service_account
    if run.spec.node_selector:
        spec["nodeSelector"] = dict(run.spec.node_selector)
    if run.spec.tolerations:
        spec["tolerations"] = [dict(t) for t in run.spec.tolerations]
    if run.spec.affinity:
        spec["affinity"] = dict(run.spec.affinity)
    if run.spec.priority_class:
        spec["priorityClassName"] = run.spec.priority_class
    if run.spec.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in run.spec.image_pull_secrets]
    return spec


def _deadline(run: api.SpinRun, role: str) -> dict[str, Any]:
    """The Job's activeDeadlineSeconds, where the spec sets one for the role."""
    seconds = run.spec.active_deadline.get(role)
    return {} if seconds is None else {"activeDeadlineSeconds": seconds}


def literal(text: str) -> str:
    """``text`` as a container argument the kubelet passes on unchanged: it expands ``$(VAR)`` in arguments,
    and ``$$`` is its escape for one ``$``."""
    return text.replace("$", "$$")


def template_flags(run: api.SpinRun) -> list[str]:
    """How both workers tokenize a pair: the same flags for both, so generation and training never differ."""
    t = run.spec.training
    flags = ["--prompt-format", run.spec.generation.prompt_format, "--max-response-length", str(t.max_response_length)]
    if run.spec.system_prompt is not None:  # one argument: a text starting with "-" is no option, "" stays itself
        flags.append(f"--system-prompt={literal(run.spec.system_prompt)}")
    return flags


def model_for(run: api.SpinRun, prefix: str, iteration: int) -> str:
    """The opponent of an iteration: the base model first, then the previous iteration's output."""
    return run.spec.model if iteration == 0 else naming.model_uri(prefix, iteration - 1)


def generate_command(run: api.SpinRun, prefix: str, iteration: int) -> list[str]:
    g, t = run.spec.generation, run.spec.training
    command = [
        "python", "-m", "spin_k8s.workers.generate",
        "--model", model_for(run, prefix, iteration), "--data", run.spec.dataset,
        "--output", naming.synthetic_uri(prefix, iteration), "--num-shards", str(g.shards),
        "--run-name", run.name, "--iteration", str(iteration),
        "--temperature", repr(g.temperature), "--top-p", repr(g.top_p), "--max-tokens", str(g.max_tokens),
        "--max-prompt-length", str(t.max_prompt_length), "--max-length", str(t.max_length),
        *template_flags(run), "--engine", g.engine,
        # One engine per pod spans the pod's GPUs; on CPU (0 GPUs) one process.
        "--tensor-parallel-size", str(max(1, g.gpus_per_shard)),
    ]
    if g.score_reference:
        command.append("--score-reference")
    return command


def train_command(run: api.SpinRun, prefix: str, iteration: int, attempt: int) -> list[str]:
    t = run.spec.training
    hyper = run.spec.hyper(iteration)
    job = naming.job_name(run.name, iteration, naming.TRAIN, attempt)
    service = naming.service_name(run.name)
    first = max(0, iteration - run.spec.keep_previous)
    synthetic = [f"--synthetic={i}={naming.synthetic_uri(prefix, i)}" for i in range(first, iteration + 1)]
    return [
        "python", "-m", "spin_k8s.workers.gang", f"--nnodes={t.nodes}", f"--nproc-per-node={max(1, t.gpus_per_node)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={job}-0.{service}", f"--master-port={t.port}",
        "-m", "spin_k8s.workers.train",
        "--model", model_for(run, prefix, iteration), *synthetic,
        "--iteration", str(iteration), "--keep-previous", str(run.spec.keep_previous),
        "--output", naming.model_uri(prefix, iteration),
        "--checkpoint-dir", naming.checkpoint_uri(prefix, iteration),
        "--checkpoint-every", str(t.checkpoint_every_steps), "--checkpoints-to-keep", str(t.checkpoints_to_keep),
        "--zero-stage", str(t.zero_stage), "--precision", t.precision, "--optimizer", t.optimizer,
        "--learning-rate", repr(hyper.learning_rate), "--beta", repr(hyper.beta), "--loss-type", t.loss_type,
        "--epochs", str(hyper.epochs), "--schedule-epochs", str(hyper.schedule_epochs),
        "--warmup-ratio", repr(t.warmup_ratio),
        "--length-grouping" if t.length_grouping else "--no-length-grouping",
        "--micro-batch-size", str(t.per_device_batch_size),
        "--gradient-accumulation-steps", str(t.gradient_accumulation_steps),
        "--max-length", str(t.max_length), "--max-prompt-length", str(t.max_prompt_length), *template_flags(run),
        "--gradient-checkpointing" if t.gradient_checkpointing else "--no-gradient-checkpointing",
        "--reference", "precomputed",
        *(["--holdout-fraction", repr(run.spec.held_out_fraction)] if run.spec.early_stop_accuracy is not None else []),
    ]


def generate_job(run: api.SpinRun, prefix: str, iteration: int) -> dict[str, Any]:
    name = naming.job_name(run.name, iteration, naming.GENERATE)
    meta = _metadata(run, name, iteration, naming.GENERATE, 0)
    shards = run.spec.generation.shards
    container = _container(run, naming.GENERATE, run.spec.image_generate, generate_command(run, prefix, iteration),
                           run.spec.generation.gpus_per_shard)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {
            "completionMode": "Indexed", "completions": shards, "parallelism": shards,
            "backoffLimitPerIndex": run.spec.restart_limit, "maxFailedIndexes": 0,
            "podFailurePolicy": _failure_policy(naming.GENERATE),
            "suspend": bool(run.spec.queue_name), **_deadline(run, naming.GENERATE),
            "template": {"metadata": _template_metadata(run, meta["labels"]), "spec": _pod_spec(run, container)},
        },
    }


def train_job(run: api.SpinRun, prefix: str, iteration: int, attempt: int) -> dict[str, Any]:
    name = naming.job_name(run.name, iteration, naming.TRAIN, attempt)
    meta = _metadata(run, name, iteration, naming.TRAIN, attempt)
    nodes = run.spec.training.nodes
    container = _container(run, naming.TRAIN, run.spec.image_train, train_command(run, prefix, iteration, attempt),
                           run.spec.training.gpus_per_node)
    container["ports"] = [{"name": "rendezvous", "containerPort": run.spec.training.port}]
    pod_spec = _pod_spec(run, container)
    pod_spec["subdomain"] = naming.service_name(run.name)
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {
            "completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 0,
            "podFailurePolicy": _failure_policy(naming.TRAIN),
            "suspend": bool(run.spec.queue_name), **_deadline(run, naming.TRAIN),
            "template": {"metadata": _template_metadata(run, meta["labels"]), "spec": pod_spec},
        },
    }


def train_service(run: api.SpinRun) -> dict[str, Any]:
    labels = {k: v for k, v in naming.labels(run.name, run.uid, 0, naming.TRAIN).items()
              if k not in (naming.LABEL_ITERATION, naming.LABEL_ATTEMPT)}
    meta = {"name": naming.service_name(run.name), "namespace": run.namespace, "labels": labels,
            "ownerReferences": [_owner(run)]}
    selector = {naming.LABEL_RUN_UID: run.uid, naming.LABEL_ROLE: naming.TRAIN}
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": run.spec.training.port}]},
    }
