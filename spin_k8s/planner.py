"""The pure planner: from what the controller observed (the SpinRun, its Jobs, its lineage) to what to do
(actions, each safe to repeat) and the status to write. No I/O, no clock: ``now`` is an argument.

The run advances step by step through ``(iteration, generate)``, ``(iteration, train)``. A step is done
when its lineage record exists; a record is written (by a RecordStep action, before the status that
reports it) once the step's Job is Complete and its outputs were read. One plan may finish a step and
start the next, so a Job turning Complete leads to the next Job in a single reconcile.

A generation step's record is carried by its iteration's training Jobs (annotation
``naming.ANNOTATION_GENERATION``) and written with the training record, in one manifest write per iteration;
or at once where the training cannot carry it (too large) or ends without a record (failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from spin_k8s import api, manifests, naming

JobState = Literal["active", "complete", "failed", "suspended"]
POD_FAILURE_POLICY = "PodFailurePolicy"  # the Job controller's reason for a Job failed by a FailJob rule

# Phases shown by `kubectl get spinruns`.
PENDING, GENERATING, TRAINING, SUCCEEDED, FAILED, SUSPENDED = (
    "Pending", "Generating", "Training", "Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class JobView:
    """One child Job, reduced to what decisions need."""

    name: str
    uid: str
    iteration: int
    role: str
    attempt: int
    state: JobState
    succeeded: int = 0
    failed: int = 0
    reason: str = ""
    message: str = ""
    started: str | None = None
    finished: str | None = None
    image: str = ""  # the worker image the Job's pods run (images may change mid-run: lineage records this one)
    # Of a failed Job, the pod that failed first: its container's termination message (the worker's one-line
    # reason, else the end of its log; "" when unknown) and exit code.
    pod_message: str = ""
    exit_code: int | None = None
    # Of an active Job with no pod: why the Job controller could not create one (admission, quota: the API
    # server's words from its FailedCreate event; "" when it could or nobody said).
    create_error: str = ""
    stopped: bool = False  # suspended by this controller for spec.suspend (naming.ANNOTATION_STOPPED)
    generation: dict[str, Any] | None = None  # of a training Job: the generation record it carries


    @property
    def permanent(self) -> bool:
        """Failed by a FailJob rule of its podFailurePolicy: an input error that no retry can fix."""
        return self.state == "failed" and self.reason == POD_FAILURE_POLICY

    def why(self) -> str:
        """Why it failed, in the worker's words where the pod said them, else the Job controller's."""
        if self.pod_message:
            code = f"exit code {self.exit_code}" if self.exit_code is not None else ""
            note = ", an input error: not retried" if self.permanent else ""
            return f"{self.pod_message} ({code}{note})" if code or note else self.pod_message
        return f"{self.reason} {self.message}".strip()


CARRIED_MAX_BYTES = 64 * 1024  # a larger generation record (hundreds of shards) is written at once instead


def carried_generation(annotations: dict[str, str] | None) -> dict[str, Any] | None:
    """The generation record a training Job carries (naming.ANNOTATION_GENERATION); None when it carries none
    or one that does not parse."""
    try:
        record = json.loads((annotations or {})[naming.ANNOTATION_GENERATION])
    except (KeyError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Observed:
    """The run's Jobs and Services, sorted into buckets once."""

    jobs: tuple[JobView, ...] = ()
    services: frozenset[str] = frozenset()

    def attempts(self, iteration: int, role: str) -> list[JobView]:
        return sorted((j for j in self.jobs if j.iteration == iteration and j.role == role), key=lambda j: j.attempt)

    def carried(self) -> dict[tuple[int, str], dict[str, Any]]:
        """Generation records the training Jobs carry, by step: steps whose outputs need no reading."""
        return {(j.iteration, naming.GENERATE): j.generation for j in self.jobs if j.generation is not None}


@dataclass(frozen=True)
class Lineage:
    """The run's lineage as read from storage.

    ``steps``: the recorded steps. ``outputs``: for each Complete Job whose step is not recorded yet, what its
    worker left in storage (None when nothing readable is there). ``error``: storage could not be read, and
    ``error_reason`` the condition reason that says so.
    """

    steps: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    outputs: dict[tuple[int, str], dict[str, Any] | None] = field(default_factory=dict)
    error: str | None = None
    error_reason: str = "StorageUnavailable"


# -- actions: small values; apply.py carries them out ---------------------------------------------------
@dataclass(frozen=True)
class CreateJob:
    body: dict[str, Any]


@dataclass(frozen=True)
class CreateService:
    body: dict[str, Any]


@dataclass(frozen=True)
class SuspendJob:
    """Stop (``suspend``) a Job for spec.suspend, or resume one this controller stopped. ``kueue_uid``: the run
    has a queueName, so Kueue owns the Job's suspend field (it unsuspends a Job it admitted that anyone else
    suspends): the Job's Workload, found by this Job uid, is deactivated or activated instead, and Kueue stops
    or requeues the Job itself."""

    name: str
    suspend: bool
    kueue_uid: str = ""


@dataclass(frozen=True)
class RecordStep:
    """Write a step's lineage record (once) and add it to the run manifest."""

    iteration: int
    role: str
    record: dict[str, Any]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = CreateJob | CreateService | SuspendJob | RecordStep


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    status: dict[str, Any]
    events: tuple[Event, ...] = ()

    def creates(self) -> bool:
        """Whether the plan creates a Job or Service: the moment a run's SpinRuntime must be known."""
        return any(isinstance(a, CreateJob | CreateService) for a in self.actions)


def _condition(old: list[dict[str, Any]], ctype: str, status: bool, reason: str, message: str, generation: int,
               now: str) -> dict[str, Any]:
    """A condition in the Kubernetes shape; lastTransitionTime moves only when status flips."""
    value = "True" if status else "False"
    prev = next((c for c in old if c.get("type") == ctype), None)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == value and "lastTransitionTime" in prev else now
    return {"type": ctype, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


@dataclass
class _Progress:
    """Mutable scratch of one planning pass (local to plan())."""

    phase: str = PENDING
    iteration: int = 0
    reason: str = ""
    message: str = ""
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    made: dict[tuple[int, str], int] = field(default_factory=dict)  # attempts made, counting this plan's creates
    stalled: bool = False  # waiting on something only a person can fix (pods refused): not Progressing
    queued: str = ""  # why the current step's Job waits suspended by someone else (Kueue), "" when it does not
    unrecorded: dict[int, dict[str, Any]] = field(default_factory=dict)  # generation records not yet written


def generate_record(run: api.SpinRun, prefix: str, job: JobView, output: dict[str, Any]) -> dict[str, Any]:
    t = job.iteration
    return {"iteration": t, "role": naming.GENERATE, "job": job.name, "jobUid": job.uid, "attempt": job.attempt,
            "image": job.image,
            "model": manifests.model_for(run, prefix, t), "dataset": run.spec.dataset,
            "output": naming.synthetic_uri(prefix, t), "started": job.started, "finished": job.finished,
            "config": {"shards": run.spec.generation.shards, "temperature": run.spec.generation.temperature,
                       "topP": run.spec.generation.top_p, "maxTokens": run.spec.generation.max_tokens,
                       "engine": run.spec.generation.engine,
                       "scoreReference": run.spec.generation.score_reference,
                       "promptFormat": run.spec.generation.prompt_format, "systemPrompt": run.spec.system_prompt,
                       "maxResponseLength": run.spec.training.max_response_length},
            **output}


def train_record(run: api.SpinRun, prefix: str, job: JobView, output: dict[str, Any]) -> dict[str, Any]:
    t = job.iteration
    hyper = run.spec.hyper(t)
    first = max(0, t - run.spec.keep_previous)
    return {"iteration": t, "role": naming.TRAIN, "job": job.name, "jobUid": job.uid, "restarts": job.attempt,
            "image": job.image,
            "model": manifests.model_for(run, prefix, t), "checkpoint": naming.model_uri(prefix, t),
            "dataMix": [naming.synthetic_uri(prefix, i) for i in range(first, t + 1)],
            "started": job.started, "finished": job.finished,
            "config": {"learningRate": hyper.learning_rate, "beta": hyper.beta, "epochs": hyper.epochs,
                       "scheduleEpochs": hyper.schedule_epochs, "lengthGrouping": run.spec.training.length_grouping,
                       "maxResponseLength": run.spec.training.max_response_length,
                       "nodes": run.spec.training.nodes, "gpusPerNode": run.spec.training.gpus_per_node,
                       "zeroStage": run.spec.training.zero_stage, "precision": run.spec.training.precision,
                       "optimizer": run.spec.training.optimizer, "lossType": run.spec.training.loss_type},
            **output}


def attempts_made(run: api.SpinRun, obs: Observed, t: int, role: str) -> int:
    """How many attempts of a step were ever created: the most of what the status counted and what exists, so a
    deleted attempt (TTL, a user) neither resets the restart budget nor makes its name reusable."""
    counted = next((int(it.get(f"{role}Attempts") or 0) for it in run.status.get("iterations") or []
                    if isinstance(it, dict) and it.get("iteration") == t), 0)
    return max([counted] + [j.attempt + 1 for j in obs.attempts(t, role)])


def _step(run: api.SpinRun, prefix: str, obs: Observed, lineage: Lineage, t: int, role: str,
          p: _Progress) -> bool:
    """Plan one step; True when it is done (recorded now or before, or carried by a training Job) and the next
    step may be planned."""
    if (t, role) in lineage.steps:
        return True
    if role == naming.GENERATE and (carried := obs.carried().get((t, role))) is not None:
        p.unrecorded[t] = carried
        return True
    p.phase = GENERATING if role == naming.GENERATE else TRAINING
    p.iteration = t
    attempts = obs.attempts(t, role)
    made = attempts_made(run, obs, t, role)
    # Generation retries failed shards inside its Job; training restarts the whole gang. Each `spinctl resume`
    # grants the same budget again.
    per_grant = 1 if role == naming.GENERATE else run.spec.restart_limit + 1
    allowed = per_grant * (run.resumes + 1)
    latest = attempts[-1] if attempts else None
    # The newest attempt ever made is gone before its step was recorded: it counts as a failed one.
    deleted = made > 0 and (latest is None or latest.attempt < made - 1)
    if deleted:
        why = f"{naming.job_name(run.name, t, role, made - 1)} was deleted before it finished"
        final = f"{why}, attempt {made}"
    elif latest is not None and latest.state == "failed":
        why = f"{latest.name} failed ({latest.why()})"
        final = f"{latest.name} failed after {made} attempt(s): {latest.why()}"
    else:
        why = final = ""
    if role == naming.TRAIN and naming.service_name(run.name) not in obs.services:
        p.actions.append(CreateService(manifests.train_service(run)))
    if made == 0 or (why and made < allowed):
        if role == naming.GENERATE:
            body = manifests.generate_job(run, prefix, t)
            if made:
                body["metadata"]["name"] = naming.job_name(run.name, t, role, made)
                body["metadata"]["labels"][naming.LABEL_ATTEMPT] = str(made)
        else:
            body = manifests.train_job(run, prefix, t, made)
            if t in p.unrecorded:
                body["metadata"].setdefault("annotations", {})[naming.ANNOTATION_GENERATION] = json.dumps(
                    p.unrecorded[t], sort_keys=True, separators=(",", ":"))
        p.actions.append(CreateJob(body))
        p.made[(t, role)] = made + 1
        if made:
            p.events.append(Event("Warning", "Restarted", f"{why}; started {body['metadata']['name']}, "
                                  f"attempt {made + 1} of {allowed}"))
        return False
    if why:
        p.phase, p.reason = FAILED, ("GenerationFailed" if role == naming.GENERATE else "TrainingRestartsExhausted")
        p.message = f"{final}; `spinctl resume` grants another round"
        _record_generation(p, t)
        return False
    assert latest is not None  # made > 0 and not deleted
    if latest.state == "suspended" and not latest.stopped:
        p.queued = (f"Job {latest.name} waits for admission by Kueue (LocalQueue {run.spec.queue_name})"
                    if run.spec.queue_name else
                    f"Job {latest.name} is suspended by another controller (Kueue managing Jobs without a queue "
                    "name?): it runs when that one resumes it")
        p.reason, p.message = "Queued", p.queued
        return False
    if latest.state != "complete":
        if latest.create_error:
            p.reason, p.message = "PodCreationFailed", f"Job {latest.name}: {latest.create_error}"
            p.stalled = True
        return False
    output = lineage.outputs.get((t, role))
    if output is None:
        p.phase, p.reason = FAILED, "OutputMissing"
        p.message = f"{latest.name} completed but its output in storage is missing or unreadable"
        _record_generation(p, t)
        return False
    if role == naming.GENERATE:
        p.unrecorded[t] = generate_record(run, prefix, latest, output)
        if len(json.dumps(p.unrecorded[t])) > CARRIED_MAX_BYTES:  # too large for an annotation: written now
            _record_generation(p, t)
        return True
    _record_generation(p, t)
    p.actions.append(RecordStep(t, role, train_record(run, prefix, latest, output)))
    return True


def _record_generation(p: _Progress, t: int) -> None:
    """Write iteration t's generation record now, if it is not written yet (with its training record, or as the
    run stops without one)."""
    if t in p.unrecorded:
        p.actions.append(RecordStep(t, naming.GENERATE, p.unrecorded.pop(t)))


def _held_out_accuracy(lineage: Lineage, p: _Progress, t: int) -> float | None:
    """Reward accuracy on held-out prompts of the model iteration t trained: the model that would start
    iteration t + 1 against the synthetic answers of its opponent."""
    record = lineage.steps.get((t, naming.TRAIN)) or next(
        (a.record for a in p.actions if isinstance(a, RecordStep) and (a.iteration, a.role) == (t, naming.TRAIN)), {})
    value = ((record.get("metrics") or {}).get("eval") or {}).get("eval/rewards/accuracies")
    return float(value) if isinstance(value, int | float) else None


def plan(run: api.SpinRun, obs: Observed, lineage: Lineage, now: str, invalid: str | None = None) -> Plan:
    """Decide the next actions and the status for one SpinRun."""
    prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
    old = list(run.status.get("conditions") or [])
    p = _Progress(phase=run.status.get("phase") or PENDING, iteration=int(run.status.get("iteration") or 0))
    storage_ok = True
    if invalid:
        p.phase, p.reason, p.message = FAILED, "InvalidSpec", invalid
    elif lineage.error:
        storage_ok = False
        p.reason, p.message = lineage.error_reason, lineage.error
    elif run.spec.suspend:
        p.phase, p.reason, p.message = SUSPENDED, "Suspended", "spec.suspend is true: no Job runs"
        kueue = bool(run.spec.queue_name)
        # Through Kueue a queued Job is stopped too: its deactivated Workload is not admitted meanwhile.
        p.actions += [SuspendJob(j.name, True, j.uid if kueue else "") for j in obs.jobs if not j.stopped and (
            j.state == "active" or (kueue and j.state == "suspended"))]
    else:
        # Only what spec.suspend stopped: a Job suspended by anyone else (Kueue) is theirs to resume.
        p.actions += [SuspendJob(j.name, False, j.uid if run.spec.queue_name else "") for j in obs.jobs
                      if j.stopped and j.state in ("active", "suspended")]
        p.reason = p.message = ""
        finished = True
        for t in range(run.spec.iterations):
            if not (_step(run, prefix, obs, lineage, t, naming.GENERATE, p)
                    and _step(run, prefix, obs, lineage, t, naming.TRAIN, p)):
                finished = False
                break
            accuracy = _held_out_accuracy(lineage, p, t)
            threshold = run.spec.early_stop_accuracy
            if threshold is not None and accuracy is not None and accuracy < threshold and t + 1 < run.spec.iterations:
                finished = False
                p.phase, p.iteration, p.reason = SUCCEEDED, t, "Converged"
                p.message = (f"held-out reward accuracy {accuracy:.3f} < {threshold} at the start of iteration "
                             f"{t + 1}: the model no longer tells real from synthetic; stopped early")
                break
        if finished:
            p.phase, p.iteration = SUCCEEDED, run.spec.iterations - 1
            p.reason, p.message = "Completed", f"{run.spec.iterations} iteration(s) trained"

    gen = run.generation
    terminal = p.phase in (SUCCEEDED, FAILED)
    conditions = [
        _condition(old, "Progressing", not terminal and p.phase != SUSPENDED and storage_ok and not p.stalled,
                   p.reason or p.phase,
                   p.message or f"iteration {p.iteration}: {p.phase}", gen, now),
        _condition(old, "Succeeded", p.phase == SUCCEEDED, p.reason or p.phase, p.message, gen, now),
        _condition(old, "Failed", p.phase == FAILED, p.reason or p.phase, p.message, gen, now),
        _condition(old, "Suspended", p.phase == SUSPENDED, p.reason or p.phase, p.message, gen, now),
        _condition(old, "Queued", bool(p.queued) and p.phase not in (SUSPENDED, SUCCEEDED, FAILED),
                   "WaitingForAdmission" if p.queued else "NotQueued", p.queued, gen, now),
        _condition(old, "StorageAvailable", storage_ok, lineage.error_reason if not storage_ok else "Reachable",
                   lineage.error or "", gen, now),
    ]
    steps = dict(lineage.steps)
    steps.update({(t, naming.GENERATE): record for t, record in p.unrecorded.items()})
    steps.update({(a.iteration, a.role): a.record for a in p.actions if isinstance(a, RecordStep)})
    iterations = _iterations(run, obs, steps, p.iteration, p.made)
    status = {
        "observedGeneration": gen, "phase": p.phase, "iteration": p.iteration, "reason": p.reason,
        "manifest": naming.manifest_uri(prefix), "conditions": conditions,
        "iterations": iterations,
        # The SpinRuntime copy the reconcile put in (api.parse merged the spec over it), kept for every later Job.
        **({"runtime": run.status["runtime"]} if "runtime" in run.status else {}),
    }
    status["restarts"] = sum(max(0, it.get(f"{role}Attempts", 1) - 1) for it in iterations
                             for role in (naming.GENERATE, naming.TRAIN))
    events = list(p.events)
    old_phase = run.status.get("phase")
    # An event per phase change, but not for each step of the routine Generating <-> Training: the status and
    # the Jobs' own events say that, and two events per iteration would be a fifth of what an iteration costs.
    if p.phase != old_phase and {p.phase, old_phase} != {GENERATING, TRAINING}:
        kind: Literal["Normal", "Warning"] = "Warning" if p.phase == FAILED else "Normal"
        events.append(Event(kind, p.phase, p.message or f"iteration {p.iteration}: {p.phase}"))
    return Plan(tuple(p.actions), status, tuple(events))


def action_failed(run: api.SpinRun, action: Action, error: str, now: str) -> Plan:
    """The status after carrying out ``action`` failed: the run's status as it was, with Progressing False naming
    the action and the API server's (or the store's) words, and one Warning event. The actions before it stand
    (each is safe to repeat); the caller retries the reconcile after a backoff."""
    if isinstance(action, CreateJob | CreateService):
        kind = action.body["kind"]
        reason, what = f"{kind}CreationFailed", f"creating {kind} {action.body['metadata']['name']}"
    elif isinstance(action, SuspendJob):
        reason, what = "JobUpdateFailed", f"{'suspending' if action.suspend else 'resuming'} Job {action.name}"
    else:
        reason, what = "LineageWriteFailed", f"recording iteration {action.iteration} {action.role} in lineage"
    return _held(run, reason, f"{what}: {error}", now)


def runtime_missing(run: api.SpinRun, name: str, now: str) -> Plan:
    """The status of a run whose SpinRuntime does not exist (yet): nothing is created, the run stays as it was
    with Progressing False naming the runtime, and one Warning event; the caller retries after a backoff."""
    return _held(run, "RuntimeNotFound", f'SpinRuntime "{name}" (spec.runtime) not found: no Job is created until '
                 "it exists (kubectl get spinruntimes)", now)


def _held(run: api.SpinRun, reason: str, message: str, now: str) -> Plan:
    """The run's status as it was, with Progressing False for ``reason``, and one Warning event."""
    old = list(run.status.get("conditions") or [])
    progressing = _condition(old, "Progressing", False, reason, message, run.generation, now)
    conditions = [progressing if c.get("type") == "Progressing" else c for c in old]
    if progressing not in conditions:
        conditions.insert(0, progressing)
    status = {"phase": PENDING, "iteration": 0, **run.status, "observedGeneration": run.generation,
              "reason": reason, "conditions": conditions}
    return Plan((), status, (Event("Warning", reason, message),))


def _iterations(run: api.SpinRun, obs: Observed, steps: dict[tuple[int, str], dict[str, Any]],
                current: int, made: dict[tuple[int, str], int]) -> list[dict[str, Any]]:
    """The per-iteration summary in status: Jobs, attempts made (kept here so that deleting an attempt loses no
    count), times, restarts, key metrics, checkpoint."""
    summary = []
    for t in range(min(current, run.spec.iterations - 1) + 1):
        gen, train = obs.attempts(t, naming.GENERATE), obs.attempts(t, naming.TRAIN)
        rec_gen, rec_train = steps.get((t, naming.GENERATE)), steps.get((t, naming.TRAIN))
        item: dict[str, Any] = {"iteration": t}
        for role, record in ((naming.GENERATE, rec_gen), (naming.TRAIN, rec_train)):
            recorded = (record or {}).get("attempt" if role == naming.GENERATE else "restarts")
            count = max(made.get((t, role), 0), attempts_made(run, obs, t, role),
                        recorded + 1 if isinstance(recorded, int) else 0)
            if count:
                item[f"{role}Attempts"] = count
        # A Job this plan creates is named now: the status written with the create needs no second write when the
        # watch brings the Job.
        created = {role: naming.job_name(run.name, t, role, made[(t, role)] - 1)
                   for role in (naming.GENERATE, naming.TRAIN) if (t, role) in made}
        if gen or rec_gen or naming.GENERATE in created:
            item["generateJob"] = created.get(naming.GENERATE) or (gen[-1].name if gen else (rec_gen or {}).get("job"))
            item["startTime"] = (rec_gen or {}).get("started")  # from lineage: status changes only per step
        if train or rec_train or naming.TRAIN in created:
            item["trainJob"] = created.get(naming.TRAIN) or (train[-1].name if train else (rec_train or {}).get("job"))
            item["restarts"] = max(0, item.get(f"{naming.TRAIN}Attempts", 1) - 1)
        if rec_train:
            item["completionTime"] = rec_train.get("finished")
            item["checkpoint"] = rec_train.get("checkpoint")
            metrics = rec_train.get("metrics") or {}
            final = metrics.get("final", metrics)  # the training worker's last-step metrics
            item["metrics"] = {k: v for k, v in final.items() if isinstance(v, int | float)}
        summary.append({k: v for k, v in item.items() if v is not None})
    return summary
