"""Table tests of the pure planner: given what was observed, the exact actions and status."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from spin_k8s import api, manifests, naming, planner
from spin_k8s.planner import CreateJob, CreateService, Lineage, Observed, RecordStep, SuspendJob
from spin_k8s.workers import runtime

NOW = "2026-11-26T00:00:00Z"


def make_run(status: dict[str, Any] | None = None, resumes: int = 0, **spec: Any) -> api.SpinRun:
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND,
           "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": 3,
                        "annotations": {api.RESUME_ANNOTATION: str(resumes)}},
           "spec": {"model": "s3://b/base", "dataset": "s3://b/sft.jsonl", "iterations": 2,
                    "storage": {"uri": "s3://b/spin"}, "restartLimit": 1, **spec},
           "status": status or {}}
    return api.parse(api.load_defaulted(obj))


def job(iteration: int, role: str, state: planner.JobState, attempt: int = 0) -> planner.JobView:
    return planner.JobView(naming.job_name("demo", iteration, role, attempt), f"uid-{iteration}-{role}-{attempt}",
                           iteration, role, attempt, state, started="t0", finished="t1" if state != "active" else None)


GEN, TRAIN = naming.GENERATE, naming.TRAIN
SVC0 = frozenset({naming.service_name("demo")})



def created(plan: planner.Plan) -> list[str]:
    return [a.body["metadata"]["name"] for a in plan.actions if isinstance(a, CreateJob | CreateService)]


def test_new_run_starts_generation_of_iteration_0() -> None:
    p = planner.plan(make_run(), Observed(), Lineage(), NOW)
    assert created(p) == ["demo-i0-gen"]
    assert (p.status["phase"], p.status["iteration"]) == ("Generating", 0)
    assert p.status["manifest"] == "s3://b/spin/ns/demo/u-1/manifest.json"
    assert [e.reason for e in p.events] == ["Generating"]


def test_active_generation_waits() -> None:
    run = make_run(status={"phase": "Generating"})
    p = planner.plan(run, Observed((job(0, GEN, "active"),)), Lineage(), NOW)
    assert p.actions == ()
    assert p.events == ()  # no phase change, no event


def carried(plan: planner.Plan) -> dict[str, Any] | None:
    """The generation record the plan's training Job carries."""
    (body,) = [a.body for a in plan.actions if isinstance(a, CreateJob) and "-train" in a.body["metadata"]["name"]]
    return planner.carried_generation(body["metadata"].get("annotations"))


def training(t: int, state: planner.JobState, record: dict[str, Any], attempt: int = 0) -> planner.JobView:
    """A training Job as the controller sees it, with the generation record it carries."""
    return replace(job(t, TRAIN, state, attempt), generation=record)


def test_completed_generation_starts_training_in_the_same_plan_and_the_job_carries_its_record() -> None:
    obs = Observed((job(0, GEN, "complete"),))
    p = planner.plan(make_run(), obs, Lineage(outputs={(0, GEN): {"shards": ["x"]}}), NOW)
    assert created(p) == ["demo-train", "demo-i0-train"]  # the headless Service, then the Job
    assert not any(isinstance(a, RecordStep) for a in p.actions)  # written with the training record
    record = carried(p)
    assert record is not None and (record["iteration"], record["role"], record["shards"]) == (0, GEN, ["x"])
    assert record["job"] == "demo-i0-gen" and record["jobUid"] == "uid-0-generate-0"
    assert p.status["phase"] == "Training"


def test_an_iterations_records_are_written_together_when_its_training_completes() -> None:
    gen = planner.plan(make_run(), Observed((job(0, GEN, "complete"),)), Lineage(outputs={(0, GEN): {"shards": []}}),
                       NOW)
    record = carried(gen)
    assert record is not None
    # The generation Job may be gone by now (a TTL, a user): the training Job carries what its record needs.
    obs = Observed((training(0, "complete", record),), SVC0)
    p = planner.plan(make_run(status=gen.status), obs, Lineage(outputs={(0, TRAIN): {"metrics": {}}}), NOW)
    assert [(a.iteration, a.role) for a in p.actions if isinstance(a, RecordStep)] == [(0, GEN), (0, TRAIN)]
    assert next(a.record for a in p.actions if isinstance(a, RecordStep)) == record
    assert created(p) == ["demo-i1-gen"]


def test_a_gang_restart_carries_the_record_on_and_a_failed_run_writes_it() -> None:
    record = {"iteration": 0, "role": GEN, "job": "demo-i0-gen", "shards": []}
    obs = Observed((job(0, GEN, "complete"), training(0, "failed", record)), SVC0)
    p = planner.plan(make_run(status={"phase": "Training"}), obs, Lineage(), NOW)
    assert created(p) == ["demo-i0-train-r1"] and carried(p) == record
    assert not any(isinstance(a, RecordStep) for a in p.actions)

    obs = Observed((*obs.jobs, training(0, "failed", record, attempt=1)), SVC0)  # restartLimit 1: exhausted
    p = planner.plan(make_run(status={"phase": "Training"}), obs, Lineage(), NOW)
    assert p.status["phase"] == "Failed"
    assert p.actions == (RecordStep(0, GEN, record),)
    # Once written, nothing more.
    assert planner.plan(make_run(status=p.status), obs, Lineage(steps={(0, GEN): record}), NOW).actions == ()


def test_a_generation_record_too_large_to_carry_is_written_at_once() -> None:
    shards = [{"uri": f"s3://b/spin/ns/demo/u-1/i0/synthetic/shard-{i:05d}-of-01024.jsonl", "sha256": "a" * 64,
               "modelDigest": "b" * 64, "rows": 100, "engine": "vllm", "lengthStopped": 0} for i in range(1024)]
    p = planner.plan(make_run(), Observed((job(0, GEN, "complete"),)),
                     Lineage(outputs={(0, GEN): {"shards": shards}}), NOW)
    assert [(a.iteration, a.role) for a in p.actions if isinstance(a, RecordStep)] == [(0, GEN)]
    assert carried(p) is None and created(p) == ["demo-train", "demo-i0-train"]




def test_the_status_written_with_a_create_is_the_status_once_the_watch_brings_the_job() -> None:
    """One status write per step: the plan that creates a Job names it in status, so the reconcile the Job's
    arrival causes finds nothing to write. Routine Generating <-> Training changes emit no event."""
    first = planner.plan(make_run(), Observed(), Lineage(), NOW)
    assert first.status["iterations"] == [{"iteration": 0, "generateAttempts": 1, "generateJob": "demo-i0-gen"}]
    run = make_run(status=first.status)
    assert planner.plan(run, Observed((job(0, GEN, "active"),)), Lineage(), NOW).status == first.status

    done = planner.plan(run, Observed((job(0, GEN, "complete"),)), Lineage(outputs={(0, GEN): {"shards": []}}), NOW)
    assert done.status["iterations"][0]["trainJob"] == "demo-i0-train" and done.events == ()
    record = carried(done)
    assert record is not None
    obs = Observed((job(0, GEN, "complete"), training(0, "active", record)), SVC0)
    assert planner.plan(make_run(status=done.status), obs, Lineage(), NOW).status == done.status


def test_failed_gang_restarts_as_a_new_attempt_then_exhausts() -> None:
    lineage = Lineage(steps={(0, GEN): {"job": "demo-i0-gen"}})
    obs = Observed((job(0, GEN, "complete"), job(0, TRAIN, "failed")), SVC0)
    p = planner.plan(make_run(), obs, lineage, NOW)
    assert created(p) == ["demo-i0-train-r1"]
    assert [e.reason for e in p.events] == ["Restarted", "Training"]

    obs = Observed((*obs.jobs, job(0, TRAIN, "failed", attempt=1)), SVC0)  # restartLimit 1: 2 attempts
    p = planner.plan(make_run(status={"phase": "Training"}), obs, lineage, NOW)
    assert p.actions == ()
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "TrainingRestartsExhausted")
    failed = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "spinctl resume" in failed["message"]

    p = planner.plan(make_run(status={"phase": "Failed"}, resumes=1), obs, lineage, NOW)
    assert created(p) == ["demo-i0-train-r2"]


def test_failed_generation_fails_the_run_until_resumed() -> None:
    obs = Observed((job(0, GEN, "failed"),))
    p = planner.plan(make_run(), obs, Lineage(), NOW)
    assert (p.status["phase"], p.status["reason"], p.actions) == ("Failed", "GenerationFailed", ())
    p = planner.plan(make_run(resumes=1), obs, Lineage(), NOW)
    assert created(p) == ["demo-i0-gen-r1"]


def test_second_iteration_uses_first_model_and_mixes_previous_synthetic_set() -> None:
    steps = {(0, GEN): {}, (0, TRAIN): {"metrics": {}}, (1, GEN): {}}
    p = planner.plan(make_run(), Observed(services=SVC0), Lineage(steps=steps), NOW)
    train = next(a.body for a in p.actions if isinstance(a, CreateJob))
    args = train["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "s3://b/spin/ns/demo/u-1/i0/model"
    assert [a for a in args if a.startswith("--synthetic=")] == [
        "--synthetic=0=s3://b/spin/ns/demo/u-1/i0/synthetic", "--synthetic=1=s3://b/spin/ns/demo/u-1/i1/synthetic"]


def test_all_iterations_recorded_means_succeeded() -> None:
    steps = {(t, r): {"metrics": {"loss": 0.1}, "finished": "t", "checkpoint": f"c{t}"}
             for t in (0, 1) for r in (GEN, TRAIN)}
    p = planner.plan(make_run(status={"phase": "Training"}), Observed(), Lineage(steps=steps), NOW)
    assert (p.status["phase"], p.status["iteration"], p.actions) == ("Succeeded", 1, ())
    assert [i["checkpoint"] for i in p.status["iterations"]] == ["c0", "c1"]
    assert p.status["iterations"][1]["metrics"] == {"loss": 0.1}


def test_suspend_stops_active_jobs_and_resume_resumes_only_those() -> None:
    p = planner.plan(make_run(suspend=True), Observed((job(0, GEN, "active"),)), Lineage(), NOW)
    assert p.actions == (SuspendJob("demo-i0-gen", True),)
    assert p.status["phase"] == "Suspended"
    stopped = replace(job(0, GEN, "suspended"), stopped=True)
    assert planner.plan(make_run(suspend=True), Observed((stopped,)), Lineage(), NOW).actions == ()
    p = planner.plan(make_run(), Observed((stopped,)), Lineage(), NOW)
    assert p.actions == (SuspendJob("demo-i0-gen", False),)


def test_a_job_someone_else_suspended_is_left_to_them_and_the_run_says_queued() -> None:
    for run, says in ((make_run(), "suspended by another controller"),
                      (make_run(queueName="team-a"), "waits for admission by Kueue (LocalQueue team-a)")):
        p = planner.plan(run, Observed((job(0, GEN, "suspended"),)), Lineage(), NOW)
        assert p.actions == ()
        queued = next(c for c in p.status["conditions"] if c["type"] == "Queued")
        assert (queued["status"], queued["reason"], p.status["reason"]) == ("True", "WaitingForAdmission", "Queued")
        assert says in queued["message"]
    p = planner.plan(make_run(), Observed((job(0, GEN, "active"),)), Lineage(), NOW)
    assert next(c for c in p.status["conditions"] if c["type"] == "Queued")["status"] == "False"


def test_with_kueue_cancel_and_resume_go_through_the_workload_even_of_a_queued_job() -> None:
    run = make_run(queueName="team-a", suspend=True)
    queued, admitted = job(0, GEN, "suspended"), job(0, TRAIN, "active")
    p = planner.plan(run, Observed((queued, admitted)), Lineage(), NOW)
    assert p.actions == (SuspendJob(queued.name, True, queued.uid), SuspendJob(admitted.name, True, admitted.uid))
    p = planner.plan(make_run(queueName="team-a"), Observed((replace(queued, stopped=True),)), Lineage(), NOW)
    assert p.actions == (SuspendJob(queued.name, False, queued.uid),)


def test_storage_outage_keeps_phase_and_says_why() -> None:
    run = make_run(status={"phase": "Training", "iteration": 1})
    p = planner.plan(run, Observed(), Lineage(error="S3 unreachable: timeout"), NOW)
    assert p.actions == ()
    assert (p.status["phase"], p.status["iteration"]) == ("Training", 1)
    storage = next(c for c in p.status["conditions"] if c["type"] == "StorageAvailable")
    assert (storage["status"], storage["message"]) == ("False", "S3 unreachable: timeout")


def test_complete_job_without_output_fails_clearly() -> None:
    p = planner.plan(make_run(), Observed((job(0, GEN, "complete"),)), Lineage(outputs={(0, GEN): None}), NOW)
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "OutputMissing")


def test_invalid_spec_creates_nothing() -> None:
    p = planner.plan(make_run(), Observed(), Lineage(), NOW, invalid="spec.training.maxLength: too small")
    assert p.actions == ()
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "InvalidSpec")


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = planner.plan(make_run(), Observed(), Lineage(), NOW)
    again = planner.plan(make_run(status=first.status), Observed((job(0, GEN, "active"),)), Lineage(),
                         "2026-11-27T00:00:00Z")
    assert again.status["conditions"] == first.status["conditions"]


@pytest.mark.parametrize("attempt", [0, 3])
def test_planning_is_deterministic(attempt: int) -> None:
    obs = Observed((*(job(0, TRAIN, "failed", a) for a in range(attempt)), job(0, GEN, "complete")), SVC0)
    lineage = Lineage(steps={(0, GEN): {}})
    assert planner.plan(make_run(), obs, lineage, NOW) == planner.plan(make_run(), obs, lineage, NOW)


def test_kueue_queue_label_and_created_suspended() -> None:
    p = planner.plan(make_run(queueName="team-a"), Observed(), Lineage(), NOW)
    body = next(a.body for a in p.actions if isinstance(a, CreateJob))
    assert body["metadata"]["labels"][naming.LABEL_KUEUE_QUEUE] == "team-a"
    assert body["spec"]["suspend"] is True


def test_early_stop_when_held_out_accuracy_falls_below_the_threshold() -> None:
    low = {"metrics": {"eval": {"eval/rewards/accuracies": 0.4}}}
    high = {"metrics": {"eval": {"eval/rewards/accuracies": 0.9}}}
    run = make_run(iterations=3, earlyStop={"minRewardAccuracy": 0.5})
    train = next(a.body for a in planner.plan(run, Observed(services=SVC0), Lineage(steps={(0, GEN): {}}),
                                              NOW).actions if isinstance(a, CreateJob))
    args = train["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--holdout-fraction") + 1] == "0.1"  # the CRD's default held-out share

    p = planner.plan(run, Observed(), Lineage(steps={(0, GEN): {}, (0, TRAIN): high}), NOW)
    assert created(p) == ["demo-i1-gen"]  # still tells them apart: go on
    p = planner.plan(run, Observed(), Lineage(steps={(0, GEN): {}, (0, TRAIN): high, (1, GEN): {}, (1, TRAIN): low}),
                     NOW)
    assert (p.status["phase"], p.status["reason"], p.status["iteration"], p.actions) == (
        "Succeeded", "Converged", 1, ())
    assert "0.400 < 0.5 at the start of iteration 2" in next(
        c["message"] for c in p.status["conditions"] if c["type"] == "Succeeded")
    # The last iteration has nothing left to skip: it completes normally.
    p = planner.plan(make_run(iterations=2, earlyStop={"minRewardAccuracy": 0.5}), Observed(),
                     Lineage(steps={(0, GEN): {}, (0, TRAIN): high, (1, GEN): {}, (1, TRAIN): low}), NOW)
    assert p.status["reason"] == "Completed"


# -- why a run failed ---------------------------------------------------------------------------------------------
def test_jobs_report_why_and_generation_input_errors_fail_the_job() -> None:
    run = make_run()
    gen, train = manifests.generate_job(run, "s3://b/p", 0), manifests.train_job(run, "s3://b/p", 0, 0)
    for body in (gen, train):
        pod = body["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"  # a podFailurePolicy requires it
        assert [c["terminationMessagePolicy"] for c in pod["containers"]] == ["FallbackToLogsOnError"]
    disruption = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    for body, container in ((gen, "generate"), (train, "train")):
        assert body["spec"]["podFailurePolicy"] == {"rules": [disruption, {
            "action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [3]}}]}
    assert runtime.INPUT_EXIT == 3
    # torchrun exits 1 whatever its ranks exited with: the gang wrapper passes the reserved code on.
    (container,) = train["spec"]["template"]["spec"]["containers"]
    assert [*container["command"], *container["args"][:2]] == ["python", "-m", "spin_k8s.workers.gang"]


def test_failed_generation_says_the_workers_reason() -> None:
    failed = planner.JobView("demo-i0-gen", "u", 0, GEN, 0, "failed", failed=1, reason="PodFailurePolicy",
                             message="Container generate for pod ns/demo-i0-gen-0-x failed with exit code 3 "
                                     "matching FailJob rule at index 0",
                             pod_message="nothing under s3://b/base", exit_code=3)
    p = planner.plan(make_run(), Observed((failed,)), Lineage(), NOW)
    message = next(c["message"] for c in p.status["conditions"] if c["type"] == "Failed")
    assert message == ("demo-i0-gen failed after 1 attempt(s): nothing under s3://b/base (exit code 3, an input "
                       "error: not retried); `spinctl resume` grants another round")
    # Without the pod's words, the Job controller's.
    bare = planner.JobView("demo-i0-gen", "u", 0, GEN, 0, "failed", reason="BackoffLimitExceeded", message="m")
    p = planner.plan(make_run(), Observed((bare,)), Lineage(), NOW)
    assert next(c["message"] for c in p.status["conditions"] if c["type"] == "Failed").startswith(
        "demo-i0-gen failed after 1 attempt(s): BackoffLimitExceeded m; ")


def test_a_gang_restart_event_says_why_the_last_attempt_failed() -> None:
    lineage = Lineage(steps={(0, GEN): {"job": "demo-i0-gen"}})
    failed = planner.JobView("demo-i0-train", "u", 0, TRAIN, 0, "failed", reason="BackoffLimitExceeded",
                             pod_message="RuntimeError: CUDA out of memory", exit_code=1)
    p = planner.plan(make_run(), Observed((job(0, GEN, "complete"), failed), SVC0), lineage, NOW)
    assert p.events[0].message.startswith(
        "demo-i0-train failed (RuntimeError: CUDA out of memory (exit code 1)); started demo-i0-train-r1")


def test_unreadable_credentials_keep_the_run_pending_with_their_own_reason() -> None:
    message = 'Secret "s3" not found in namespace "ns" (spec.storage.credentialsSecret)'
    p = planner.plan(make_run(), Observed(), Lineage(error=message, error_reason="CredentialsUnavailable"), NOW)
    assert (p.status["phase"], p.status["reason"], p.actions) == ("Pending", "CredentialsUnavailable", ())
    conditions = {c["type"]: c for c in p.status["conditions"]}
    assert (conditions["StorageAvailable"]["reason"], conditions["StorageAvailable"]["message"]) == (
        "CredentialsUnavailable", message)
    assert conditions["Progressing"]["message"] == message


# -- worker pods on a GPU cluster -----------------------------------------------------------------------------
def test_worker_pods_meet_the_restricted_standard_with_shm_and_scratch_volumes() -> None:
    cpu = make_run(generation={"gpusPerShard": 0}, training={"gpusPerNode": 0})
    gpu = make_run(scratchSize={"train": "2Ti"}, shmSize={"generate": "32Gi"})  # one GPU per pod by default
    for run, sizes in ((cpu, {"generate": ("1Gi", "100Gi"), "train": ("1Gi", "500Gi")}),
                       (gpu, {"generate": ("32Gi", "100Gi"), "train": ("16Gi", "2Ti")})):
        for body in (manifests.generate_job(run, "s3://b/p", 0), manifests.train_job(run, "s3://b/p", 0, 0)):
            pod = body["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            shm, scratch = sizes[container["name"]]
            assert pod["securityContext"] == {
                "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}}
            assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}}
            assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
            volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
            assert volumes == {"shm": {"medium": "Memory", "sizeLimit": shm}, "scratch": {"sizeLimit": scratch}}
            assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {
                "/dev/shm": "shm", "/tmp": "scratch"}


def test_a_named_service_account_gets_its_token() -> None:
    pod = manifests.generate_job(make_run(serviceAccountName="workers"), "s3://b/p", 0)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "workers" and pod["automountServiceAccountToken"] is True


def flag(command: list[str], name: str) -> str:
    assert command.count(name) == 1, command
    return command[command.index(name) + 1]


@pytest.mark.parametrize(("generation", "training", "tensor_parallel", "keep"), [
    ({}, {}, "1", "2"),  # the defaults: one GPU per shard, two checkpoints kept
    ({"gpusPerShard": 0}, {"checkpointsToKeep": 1}, "1", "1"),  # on CPU: one engine process
    ({"gpusPerShard": 4}, {"checkpointsToKeep": 5}, "4", "5"),
])
def test_the_workers_get_tensor_parallelism_and_checkpoint_retention_from_the_spec(
        generation: dict[str, Any], training: dict[str, Any], tensor_parallel: str, keep: str) -> None:
    run = make_run(generation=generation, training=training)
    assert flag(manifests.generate_command(run, "s3://b/p", 0), "--tensor-parallel-size") == tensor_parallel
    assert flag(manifests.train_command(run, "s3://b/p", 0, 0), "--checkpoints-to-keep") == keep



# -- attempts survive their Jobs --------------------------------------------------------------------------------
def status_with(train_attempts: int) -> dict[str, Any]:
    return {"phase": "Training", "iterations": [{"iteration": 0, "generateAttempts": 1,
                                                 "trainAttempts": train_attempts}]}


RECORDED_GEN = Lineage(steps={(0, GEN): {"job": "demo-i0-gen", "attempt": 0}})


def test_a_restart_is_counted_in_status() -> None:
    obs = Observed((job(0, TRAIN, "failed"),), SVC0)
    p = planner.plan(make_run(status=status_with(1)), obs, RECORDED_GEN, NOW)
    assert created(p) == ["demo-i0-train-r1"]
    (item,) = p.status["iterations"]
    assert (item["generateAttempts"], item["trainAttempts"], item["restarts"], p.status["restarts"]) == (1, 2, 1, 1)


def test_a_deleted_attempt_neither_reuses_a_name_nor_resets_the_budget() -> None:
    # restartLimit 2: three attempts. r0 failed and was deleted (a TTL); r1 failed and is still there.
    obs = Observed((job(0, TRAIN, "failed", attempt=1),), SVC0)
    p = planner.plan(make_run(status=status_with(2), restartLimit=2), obs, RECORDED_GEN, NOW)
    assert created(p) == ["demo-i0-train-r2"]  # not r1 again: that name exists (a 409, then a hot loop)
    # Every attempt deleted: the budget spent stays spent.
    p = planner.plan(make_run(status=status_with(3), restartLimit=2), Observed(services=SVC0), RECORDED_GEN, NOW)
    assert (p.actions, p.status["phase"], p.status["reason"]) == ((), "Failed", "TrainingRestartsExhausted")
    assert next(c["message"] for c in p.status["conditions"] if c["type"] == "Failed") == (
        "demo-i0-train-r2 was deleted before it finished, attempt 3; `spinctl resume` grants another round")
    assert p.status["iterations"][0]["trainAttempts"] == 3


def test_an_attempt_deleted_while_it_ran_counts_as_failed_and_restarts() -> None:
    p = planner.plan(make_run(status=status_with(1)), Observed(services=SVC0), RECORDED_GEN, NOW)
    assert created(p) == ["demo-i0-train-r1"]
    assert p.events[0].message == ("demo-i0-train was deleted before it finished; started demo-i0-train-r1, "
                                   "attempt 2 of 2")


# -- refusals become status ------------------------------------------------------------------------------------
def test_a_refused_create_keeps_the_phase_and_says_what_and_why() -> None:
    run = make_run(status={"phase": "Training", "iteration": 0, "reason": "",
                           "conditions": [{"type": "Progressing", "status": "True", "reason": "Training"}]})
    action = planner.plan(run, Observed(services=SVC0), RECORDED_GEN, NOW).actions[0]
    quota = 'jobs.batch "demo-i0-train" is forbidden: exceeded quota: q, limited: count/jobs.batch=0'
    p = planner.action_failed(run, action, quota, NOW)
    assert (p.actions, p.status["phase"], p.status["reason"]) == ((), "Training", "JobCreationFailed")
    (progressing,) = p.status["conditions"]
    assert (progressing["status"], progressing["reason"], progressing["message"]) == (
        "False", "JobCreationFailed", f"creating Job demo-i0-train: {quota}")
    assert p.events == (planner.Event("Warning", "JobCreationFailed", f"creating Job demo-i0-train: {quota}"),)
    # On a run with no status yet it still reads as a run that has not started.
    first = planner.action_failed(make_run(), planner.plan(make_run(), Observed(), Lineage(), NOW).actions[0], "x", NOW)
    assert (first.status["phase"], first.status["conditions"][0]["reason"]) == ("Pending", "JobCreationFailed")


def test_pods_the_job_controller_could_not_create_are_named_in_progressing() -> None:
    refused = ('Error creating: pods "demo-i0-gen-0-x7k2p" is forbidden: violates PodSecurity "restricted:latest": '
               'runAsNonRoot != true')
    stuck = planner.JobView("demo-i0-gen", "u", 0, GEN, 0, "active", create_error=refused)
    p = planner.plan(make_run(status={"phase": "Generating"}), Observed((stuck,)), Lineage(), NOW)
    progressing = next(c for c in p.status["conditions"] if c["type"] == "Progressing")
    assert (p.status["reason"], progressing["reason"], progressing["message"]) == (
        "PodCreationFailed", "PodCreationFailed", f"Job demo-i0-gen: {refused}")
    assert p.status["phase"] == "Generating" and progressing["status"] == "False"


def test_lineage_records_the_image_the_job_ran_not_the_one_the_spec_names_now() -> None:
    ran = planner.JobView("demo-i0-gen", "u", 0, GEN, 0, "complete", image="registry/generate:1.0")
    run = make_run(images={"generate": "registry/generate:2.0"})  # changed mid-run: images stay mutable
    p = planner.plan(run, Observed((ran,)), Lineage(outputs={(0, GEN): {"shards": []}}), NOW)
    record = carried(p)
    assert record is not None and record["image"] == "registry/generate:1.0"
