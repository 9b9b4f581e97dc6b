"""Deterministic names and labels of everything a SpinRun creates, and where its data lives.

A repeated reconcile computes the same names, so it finds what an earlier one created instead of
creating it twice. Lengths are checked here, once: Indexed Job pods take ``{job}-{index}`` as hostname,
which must fit a DNS label (63).
"""

from __future__ import annotations

GENERATE = "generate"
TRAIN = "train"
ROLES = (GENERATE, TRAIN)
MANAGER = "spin-k8s"

LABEL_RUN = "selfplay.dev/run"
LABEL_RUN_UID = "selfplay.dev/run-uid"
LABEL_ITERATION = "selfplay.dev/iteration"
LABEL_ROLE = "selfplay.dev/role"
LABEL_ATTEMPT = "selfplay.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue makes for a Job
# On a Job that the controller stopped because its run was suspended (`spinctl cancel`): resuming the run
# resumes these Jobs and no other (a Job suspended by someone else, Kueue above all, is theirs to resume).
ANNOTATION_STOPPED = "selfplay.dev/stopped"
# On a training Job: its iteration's generation record (JSON), written to the lineage manifest together with the
# training record, in one write (planner.carried_generation).
ANNOTATION_GENERATION = "selfplay.dev/generation-record"

_DNS_LABEL = 63
_INDEX_ROOM = 6  # "-" and up to 5 digits of completion index


def _checked(name: str) -> str:
    if len(name) > _DNS_LABEL - _INDEX_ROOM:
        raise ValueError(f"derived name {name!r} is longer than {_DNS_LABEL - _INDEX_ROOM} characters")
    return name


def job_name(run: str, iteration: int, role: str, attempt: int = 0) -> str:
    """``{run}-i{iteration}-gen`` / ``{run}-i{iteration}-train``, with ``-r{attempt}`` for gang restarts."""
    short = {GENERATE: "gen", TRAIN: "train"}[role]
    suffix = f"-r{attempt}" if attempt else ""
    return _checked(f"{run}-i{iteration}-{short}{suffix}")


def service_name(run: str) -> str:
    """The headless Service every training gang of a run rendezvouses through: gangs never overlap (one
    iteration, one attempt at a time), so one Service serves them all."""
    return _checked(f"{run}-train")


def labels(run: str, run_uid: str, iteration: int, role: str, attempt: int = 0) -> dict[str, str]:
    return {
        LABEL_RUN: run, LABEL_RUN_UID: run_uid, LABEL_ITERATION: str(iteration), LABEL_ROLE: role,
        LABEL_ATTEMPT: str(attempt), LABEL_MANAGED_BY: MANAGER,
    }


def run_selector(run: str, run_uid: str) -> str:
    """Selects every Job of one incarnation of a run (a deleted and recreated run has a new uid)."""
    return f"{LABEL_RUN}={run},{LABEL_RUN_UID}={run_uid}"


# -- storage layout ---------------------------------------------------------------------------------------
def run_prefix(storage_uri: str, namespace: str, run: str, run_uid: str) -> str:
    return f"{storage_uri.rstrip('/')}/{namespace}/{run}/{run_uid}"


def manifest_uri(prefix: str) -> str:
    return f"{prefix}/manifest.json"


def synthetic_uri(prefix: str, iteration: int) -> str:
    return f"{prefix}/i{iteration}/synthetic"


def model_uri(prefix: str, iteration: int) -> str:
    """The model iteration ``iteration`` trains (the opponent of iteration + 1)."""
    return f"{prefix}/i{iteration}/model"


def checkpoint_uri(prefix: str, iteration: int) -> str:
    return f"{prefix}/i{iteration}/checkpoints"
