"""The ``spinctl`` commands: fetch from the cluster (or storage), then hand values to ``output``.

Mutating commands print what they did and the next command to run; ``start --dry-run`` computes and prints
what would be created, reading from the cluster only the SpinRuntime the run would use. Every failure leaves as
one line and exit code 1 (``session.Group``).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
from kubernetes.client.rest import ApiException

import spin_k8s
from spin_k8s import api, lineage, naming, planner
from spin_k8s.cli import output, preflight, spec
from spin_k8s.cli.session import Group, Session, cluster_options, list_output_option, output_option

G, V, P = api.GROUP, api.VERSION, api.PLURAL
TERMINAL = (planner.SUCCEEDED, planner.FAILED)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def get_run(session: Session, name: str) -> dict[str, Any]:
    try:
        run: dict[str, Any] = session.objects.get_namespaced_custom_object(G, V, session.namespace, P, name)
    except ApiException as e:
        if e.status == 404 and name in (e.body or ""):
            raise click.ClickException(f'spinrun "{name}" not found in namespace "{session.namespace}"') from None
        raise
    return run


def run_jobs(session: Session, run: dict[str, Any]) -> list[dict[str, Any]]:
    selector = naming.run_selector(run["metadata"]["name"], run["metadata"]["uid"])
    jobs = session.batch.list_namespaced_job(session.namespace, label_selector=selector).items
    return sorted((output.job_summary(j) for j in jobs),
                  key=lambda j: (j["iteration"], naming.ROLES.index(j["role"]) if j["role"] in naming.ROLES else 9,
                                 j["attempt"]))


def _complete_run_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of run names from the cluster; silent when the cluster cannot be reached."""
    try:
        p = ctx.params
        session = Session(p.get("kubeconfig"), p.get("context"), p.get("namespace"))
        items = session.objects.list_namespaced_custom_object(G, V, session.namespace, P, _request_timeout=3)["items"]
    except Exception:
        return []
    return [i["metadata"]["name"] for i in items if i["metadata"]["name"].startswith(incomplete)]


NAME = click.argument("name", shell_complete=_complete_run_names)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(spin_k8s.__version__, prog_name="spinctl")
@click.option("--debug", is_flag=True, hidden=True, help="show tracebacks instead of one-line errors")
def main(debug: bool) -> None:
    """Run Self-Play Fine-Tuning (SPIN) on Kubernetes.

    Iterations are counted from 0 everywhere (Job names, status, logs, lineage, kubectl get spinruns):
    a run of 2 iterations runs iteration 0, then iteration 1.

    \b
    Examples:
      spinctl start --name demo --iterations 4 --model s3://models/zephyr-sft \\
          --dataset s3://data/ultrachat.jsonl --storage s3://spin-runs
      spinctl start -f manifests/examples/tiny-cpu.yaml --wait
      spinctl wait demo
      spinctl list
      spinctl status demo
      spinctl logs demo --iteration 1 --role train -f
      spinctl lineage demo --diff 0 1
    """
    # The client's retry warnings would break the one-line error a user gets when the cluster is down.
    logging.getLogger("urllib3").setLevel(logging.CRITICAL if not debug else logging.DEBUG)


@main.command()
@cluster_options
@click.option("-f", "--filename", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a SpinRun YAML (the whole object or just its spec); flags and --set override it")
@click.option("--name", help="run name (default: from the file, else spin-XXXXXX)")
@click.option("--model", help="the SFT model to start from: s3://bucket/prefix or file:///path (a path in the pods)")
@click.option("--dataset", help="the SFT dataset, JSONL or Parquet: s3://bucket/key or file:///path")
@click.option("--iterations", type=int, help="how many SPIN iterations to run, numbered from 0 (required unless the "
                                             "file sets it)")
@click.option("--storage", "storage_uri", metavar="URI", help="where lineage, data and models go, e.g. s3://bucket/spin")
@click.option("--storage-secret", metavar="SECRET", help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
@click.option("--storage-endpoint", metavar="URL", help="S3 endpoint for non-AWS object stores")
@click.option("--runtime", "runtime_name", metavar="NAME",
              help="the SpinRuntime (platform defaults) the run uses, and whose storage it gets without --storage "
                   "(default: the one named default, if it exists)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="set any spec field, e.g. --set training.learningRate=5e-7 --set generation.shards=8 (repeatable)")
@click.option("--dry-run", is_flag=True,
              help="print the SpinRun (with the copy of its SpinRuntime the controller keeps) and the Jobs of "
                   "iteration 0, built from both; create nothing")
@click.option("-o", "--output", "fmt", type=click.Choice(["name", "yaml", "json"]), default="name", show_default=True,
              help="what to print: the run's name, or the objects (with --dry-run: the Jobs too)")
@click.option("--wait", is_flag=True, help="then follow the run as `spinctl wait` does: exit 0 if it succeeded, "
                                           "1 if it failed, 130 on Ctrl-C (the run keeps running)")
@click.option("--timeout", type=float, default=0, help="with --wait: give up after this many seconds (0: never)")
@click.option("--no-preflight", is_flag=True,
              help="skip the checks that the Secret, model, dataset and storage bucket exist and are readable")
@click.option("--local", "local_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="run on this machine instead, as local processes, state in DIR (resumes if DIR has the run)")
def start(session: Session, filename: Path | None, name: str | None, model: str | None, dataset: str | None,
          iterations: int | None, storage_uri: str | None, storage_secret: str | None, storage_endpoint: str | None,
          runtime_name: str | None, sets: tuple[str, ...], dry_run: bool, fmt: str, wait: bool, timeout: float,
          no_preflight: bool, local_dir: Path | None) -> None:
    """Create a SpinRun: the controller then runs its iterations (0, 1, ...).

    The spec is checked offline first (fields the CRD does not declare are refused), then, unless
    --no-preflight, against the cluster and storage: the Secret exists, the model and dataset are
    readable with its credentials. Nothing is created when a check fails. Without --storage, the run's
    storage comes from its SpinRuntime (--runtime, else the one named default), written into the run.

    \b
    Examples:
      spinctl start --name demo --iterations 4 --model s3://models/sft --dataset s3://data/sft.jsonl \\
          --storage s3://spin-runs --storage-secret s3-credentials --wait
      spinctl start --iterations 4 --model s3://models/sft --dataset s3://data/sft.jsonl  # storage: the runtime's
      spinctl start -f manifests/examples/zephyr-7b-gpu.yaml --set training.nodes=2
      spinctl start -f run.yaml --dry-run -o yaml        # the SpinRun, its runtime and iteration 0's Jobs
      spinctl start -f run.yaml --local ./runs/demo      # no cluster: everything as local processes
    """
    flags = {"--model": model, "--dataset": dataset, "--iterations": iterations, "--storage": storage_uri,
             "--storage-secret": storage_secret, "--storage-endpoint": storage_endpoint, "--runtime": runtime_name}
    try:
        base = spec.load_file(filename) if filename else None
        # Reading the namespace from the kubeconfig is offline; a local run needs no kubeconfig at all.
        namespace = (session.namespace_flag or "default") if local_dir else session.namespace
        obj = spec.build(base, name=name, namespace=namespace, flags=flags, sets=sets)
        # Storage may still come from the SpinRuntime, read below: offline errors first, without a cluster.
        spec.check(obj, flags=[f for f, v in flags.items() if v is not None], storage_optional=True)
    except spec.SpecError as e:
        raise click.ClickException(str(e)) from None
    if local_dir is not None:
        _start_local(obj, local_dir)
        return
    wanted = obj["spec"].get("runtime")
    runtime = _runtime(session, wanted, offline_ok=dry_run)
    obj = spec.with_runtime_storage(obj, runtime)
    if not (obj["spec"].get("storage") or {}).get("uri"):
        source = (f'SpinRuntime "{runtime["metadata"]["name"]}" sets no storage.uri' if runtime is not None else
                  f'no SpinRuntime "{api.DEFAULT_RUNTIME}" gives one')
        raise click.ClickException(f"--storage is required (spec.storage.uri): {source}")
    if dry_run:
        objects = spec.preview(obj, runtime=runtime)
        if fmt == "json":
            click.echo(output.dump(output.as_list(objects), "json"))
        elif fmt == "yaml":
            click.echo("\n---\n".join(output.dump(o, "yaml") for o in objects))
        else:
            click.echo("\n".join(f"{o['kind'].lower()}/{o['metadata']['name']} (dry run)" for o in objects))
            if runtime is not None:
                click.echo(f"with spinruntime/{runtime['metadata']['name']} under the run's spec (-o yaml shows both)")
        return
    if not no_preflight:
        _preflight(session, obj)
    # Strict: the API server refuses an unknown field instead of dropping it (the offline check names it first).
    created = session.objects.create_namespaced_custom_object(G, V, session.namespace, P, obj,
                                                              field_validation="Strict")
    name = created["metadata"]["name"]
    click.echo(output.dump(output.without_managed_fields(created), fmt) if fmt != "name" else f"spinrun/{name} created")
    if wait:
        _follow(session, name, timeout)
    elif fmt == "name":
        click.echo(f"follow it: spinctl wait {name} -n {session.namespace}", err=True)


def _runtime(session: Session, name: str | None, offline_ok: bool) -> dict[str, Any] | None:
    """The SpinRuntime the run will use: ``name`` (spec.runtime), else the one named default where it exists and
    this user may read it (none otherwise, as the controller decides). ``offline_ok``: a dry run without a runtime
    named needs no cluster, and shows the run without one when none can be reached."""
    try:
        found: dict[str, Any] = session.objects.get_cluster_custom_object(
            G, V, api.RUNTIME_PLURAL, name or api.DEFAULT_RUNTIME, _request_timeout=10)
    except ApiException as e:
        if e.status == 404 and name:
            raise click.ClickException(f'spinruntime "{name}" not found (kubectl get spinruntimes)') from None
        if e.status in (403, 404) and not name:
            return None
        raise
    except Exception:
        if offline_ok and not name:
            return None
        raise
    return found


def _preflight(session: Session, obj: dict[str, Any]) -> None:
    """Refuse a run whose Secret, model, dataset or storage is missing or unreadable (preflight.check)."""

    def read_secret(secret: str) -> dict[str, str]:
        try:
            return session.secret(secret)
        except ApiException as e:
            if e.status == 404:
                raise preflight.SecretMissing(secret) from None
            if e.status == 403:
                raise preflight.SecretForbidden(secret) from None
            raise

    report = preflight.check(api.load_defaulted(obj)["spec"], session.namespace, read_secret)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.problems:
        raise click.ClickException(spec.one_line(f"preflight refused {obj['metadata']['name']} (nothing created; "
                                                 "--no-preflight skips these checks)", report.problems))


def _start_local(obj: dict[str, Any], workdir: Path) -> None:
    from spin_k8s import local

    try:
        result = local.run(obj, workdir, on_event=click.echo)
    except ValueError as e:
        problems = str(e).replace("\n", "; ")
        raise click.ClickException(f"invalid SpinRun {obj['metadata']['name']}: {problems}") from None
    except KeyboardInterrupt:
        click.echo("interrupted: every process of the run stopped; the same command resumes it", err=True)
        raise SystemExit(130) from None
    click.echo(f"{obj['metadata']['name']}: {result.phase} ({result.reason}); lineage: {result.manifest}")
    if result.phase != planner.SUCCEEDED:
        raise click.ClickException(f"{obj['metadata']['name']} {result.phase.lower()}: {result.message}")


def _follow(session: Session, name: str, timeout: float) -> None:
    """Print a line whenever the run's progress changes, until it ends: return if it succeeded, exit 1 if it
    failed (with its reason) or ``timeout`` passed, 130 on Ctrl-C. Only this command stops: the run goes on."""
    started, last = time.monotonic(), ""
    try:
        while True:
            run = get_run(session, name)
            line = output.progress_line(run, run_jobs(session, run))
            if line != last:
                click.echo(f"{output.elapsed(time.monotonic() - started)} {line}")
                last = line
            status = run.get("status") or {}
            if status.get("phase") in TERMINAL and status.get("observedGeneration") == run["metadata"]["generation"]:
                break
            if timeout and time.monotonic() - started > timeout:
                raise click.ClickException(f"gave up waiting for {name} after {timeout:g}s; it keeps running "
                                           f"(spinctl status {name})")
            time.sleep(1)
    except KeyboardInterrupt:
        ns = session.namespace
        click.echo(f"interrupted: {name} keeps running on the cluster; `spinctl wait {name} -n {ns}` follows it "
                   f"again, `spinctl cancel {name} -n {ns}` stops it", err=True)
        raise SystemExit(130) from None
    if status["phase"] == planner.FAILED:
        message = next((c.get("message") for c in status.get("conditions") or [] if c["type"] == "Failed"), "")
        raise click.ClickException(f"{name} failed: {status.get('reason')}: {message}")
    click.echo(f"{name} succeeded: {status.get('reason')}; lineage: {status.get('manifest')}")


@main.command()
@cluster_options
@NAME
@click.option("--timeout", type=float, default=0, help="give up after this many seconds (exit 1; 0: never)")
def wait(session: Session, name: str, timeout: float) -> None:
    """Follow a run until it ends: a line whenever its iteration (counted from 0), phase or count of finished
    shards / nodes changes. Exit code 0 if it succeeded, 1 if it failed (with the reason) or --timeout passed,
    130 on Ctrl-C, which stops only the waiting: the run keeps running (`spinctl cancel` stops it).

    \b
    Examples:
      spinctl wait demo
      spinctl wait demo --timeout 3600 && spinctl lineage demo
    """
    _follow(session, name, timeout)


@main.command(name="list")
@cluster_options
@list_output_option
@click.option("-A", "--all-namespaces", is_flag=True, help="list runs in every namespace")
def list_runs(session: Session, fmt: str, all_namespaces: bool) -> None:
    """List SpinRuns: the iteration now running (counted from 0) of how many, phase and reason.

    \b
    Examples:
      spinctl list
      spinctl list -o wide               # also the model and what the run is doing
      spinctl list -A -o json            # a List, as kubectl get -o json prints
      spinctl list -o name | xargs -n1 kubectl describe
    """
    if all_namespaces:
        items = session.objects.list_cluster_custom_object(G, V, P)["items"]
    else:
        items = session.objects.list_namespaced_custom_object(G, V, session.namespace, P)["items"]
    items.sort(key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"]["name"]))
    if fmt in ("json", "yaml"):
        click.echo(output.dump(output.as_list(items), fmt))
    elif fmt == "name":
        for r in items:
            click.echo(f"{api.PLURAL[:-1]}.{api.GROUP}/{r['metadata']['name']}")
    elif not items:
        click.echo("No SpinRuns found" + ("" if all_namespaces else f" in namespace {session.namespace}") + ".",
                   err=True)
    else:
        click.echo(output.runs_table(items, _now(), all_namespaces, wide=fmt == "wide"))


LOCAL = click.option("--local", "local_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="a run started with `spinctl start --local DIR` (no cluster involved)")


def _local_run(workdir: Path, name: str) -> dict[str, Any]:
    """A local run's SpinRun object with the status the local executor last wrote."""
    from spin_k8s import local

    run = local.saved_run(workdir, name)
    if run is None:
        raise click.ClickException(f"no local run {name!r} in {workdir}")
    return run


@main.command()
@cluster_options
@output_option
@NAME
@LOCAL
def status(session: Session, fmt: str, name: str, local_dir: Path | None) -> None:
    """Show a run: phase, each iteration's (counted from 0) Jobs, restarts and metrics, conditions.

    \b
    Examples:
      spinctl status demo
      spinctl status demo -o json | jq '.run.status.iterations'
      spinctl status demo --local ./runs/demo
    """
    if local_dir is not None:
        run, jobs = _local_run(local_dir, name), []
    else:
        run = get_run(session, name)
        jobs = run_jobs(session, run)
    if fmt == "table":
        click.echo(output.run_status(run, jobs, _now()))
    else:
        click.echo(output.dump({"run": output.without_managed_fields(run), "jobs": jobs}, fmt))


@main.command()
@cluster_options
@NAME
@click.option("--iteration", type=int, help="iteration, counted from 0 (default: the run's current one)")
@click.option("--role", type=click.Choice(["gen", "generate", "train"]),
              help="which Job (default: the one the run is in: generate while Generating, else train)")
@click.option("--index", type=int,
              help="completion index, from 0: the shard or the node rank (default: 0; of a failed run, the pod "
                   "that failed)")
@click.option("-f", "--follow", is_flag=True, help="stream the log until the pod ends")
@click.option("--tail", type=int, help="only the last N lines")
@click.option("--raw", is_flag=True, help="the worker's JSON lines as written (default: one readable line each)")
def logs(session: Session, name: str, iteration: int | None, role: str | None, index: int | None, follow: bool,
         tail: int | None, raw: bool) -> None:
    """Print a worker's log (the newest attempt's pod). A training step reads as one line with its loss, reward
    accuracy, margin and tokens/s; --raw prints the worker's JSON lines instead.

    \b
    Examples:
      spinctl logs demo                                   # the pod the run waits for (failed run: the failed pod)
      spinctl logs demo --iteration 0 --role gen --index 1
      spinctl logs demo --role train -f --tail 20
      spinctl logs demo --role train --raw | jq -c 'select(.event == "step")'
    """
    run = get_run(session, name)
    failed = None if (iteration, role, index) != (None, None, None) else _failed_pod(session, run)
    if failed is not None:
        pod, container = failed
        click.echo(f"# {pod.metadata.name}: the {container} pod that failed", err=True)
    else:
        pod, container = _worker_pod(session, run, iteration, role, index or 0)
    if follow:
        stream = session.core.read_namespaced_pod_log(pod.metadata.name, session.namespace, container=container,
                                                      follow=True, tail_lines=tail, _preload_content=False)
        chunks: Iterable[str] = (chunk.decode(errors="replace") for chunk in stream.stream(1024))
    else:  # the client gives None for an empty log
        chunks = [session.core.read_namespaced_pod_log(pod.metadata.name, session.namespace, container=container,
                                                       tail_lines=tail) or ""]
    _echo_log(chunks, raw)


def _failed_pod(session: Session, run: dict[str, Any]) -> tuple[Any, str] | None:
    """Of a Failed run, the newest failed pod of its newest failed Job, and that Job's role (None otherwise)."""
    if (run.get("status") or {}).get("phase") != planner.FAILED:
        return None
    failed_jobs = [j for j in run_jobs(session, run) if j["state"] == "Failed"]
    if not failed_jobs:
        return None
    job = failed_jobs[-1]  # run_jobs sorts by iteration, role, attempt
    pods = [p for p in session.core.list_namespaced_pod(
        session.namespace, label_selector=f"batch.kubernetes.io/job-name={job['name']}").items
        if p.status.phase == "Failed"]
    return (max(pods, key=lambda p: p.metadata.creation_timestamp), job["role"]) if pods else None


def _worker_pod(session: Session, run: dict[str, Any], iteration: int | None, role: str | None,
                index: int) -> tuple[Any, str]:
    """The newest pod of one completion index of one step, and its container (the role). An iteration or
    index the run will never have is told apart from one it has not reached."""
    name, status_ = run["metadata"]["name"], run.get("status") or {}
    parsed = api.parse(api.load_defaulted(run)).spec
    if iteration is not None and not 0 <= iteration < parsed.iterations:
        raise click.ClickException(f"{name} has {parsed.iterations} iteration(s), counted from 0: there is no "
                                   f"iteration {iteration}")
    t = int(status_.get("iteration", 0)) if iteration is None else iteration
    chosen = {"gen": naming.GENERATE, "generate": naming.GENERATE, "train": naming.TRAIN}.get(role or "") or (
        naming.GENERATE if status_.get("phase") in (planner.PENDING, planner.GENERATING) else naming.TRAIN)
    count, noun = ((parsed.generation.shards, "generation shard") if chosen == naming.GENERATE
                   else (parsed.training.nodes, "training node"))
    if not 0 <= index < count:
        raise click.ClickException(f"{name} has {count} {noun}(s), --index 0 to {count - 1}: there is no "
                                   f"{noun} {index}")
    selector = (f"{naming.run_selector(name, run['metadata']['uid'])},{naming.LABEL_ITERATION}={t},"
                f"{naming.LABEL_ROLE}={chosen}")
    pods = [p for p in session.core.list_namespaced_pod(session.namespace, label_selector=selector).items
            if (p.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index") == str(index)]
    if not pods:
        why = ("the run ended without it" if status_.get("phase") in TERMINAL else "not started yet") + \
            ", or its Job was removed"
        raise click.ClickException(f"no {chosen} pod with index {index} in iteration {t} of {name} ({why})")
    pod = max(pods, key=lambda p: (int((p.metadata.labels or {}).get(naming.LABEL_ATTEMPT, 0)),
                                   p.metadata.creation_timestamp))
    return pod, chosen


def _echo_log(chunks: Iterable[str], raw: bool) -> None:
    """Print a log as it arrives: as written with ``raw``, else each whole line through ``output.log_line``."""
    pending = ""
    for chunk in chunks:
        if raw:
            click.echo(chunk, nl=False)
            continue
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            click.echo(output.log_line(line))
    if pending:
        click.echo(output.log_line(pending))


def _refuse_finished(run: dict[str, Any], action: str, refused: tuple[str, ...]) -> None:
    """One line instead of a patch that would do nothing: the run is in one of the ``refused`` phases."""
    status_ = run.get("status") or {}
    phase, name, reason = status_.get("phase"), run["metadata"]["name"], status_.get("reason")
    if phase == planner.SUCCEEDED and phase in refused:
        raise click.ClickException(f"{name} has already succeeded ({reason}): there is nothing to {action}"
                                   + ("; start a new run to train further" if action == "resume" else ""))
    if phase == planner.FAILED and phase in refused:
        raise click.ClickException(f"{name} has already failed ({reason}): nothing runs to {action}; "
                                   f"`spinctl resume {name}` retries it")


@main.command()
@cluster_options
@NAME
def cancel(session: Session, name: str) -> None:
    """Stop a running run: its Jobs are suspended (their pods end), lineage and finished iterations are kept.
    With a queueName, Kueue's way: the Jobs' Workloads are deactivated and Kueue suspends them (Kueue would
    resume a Job it admitted that anyone else suspends). A run that already succeeded or failed is refused.

    \b
    Examples:
      spinctl cancel demo
      spinctl resume demo        # continue from the last finished step
    """
    _refuse_finished(get_run(session, name), "cancel", TERMINAL)
    session.objects.patch_namespaced_custom_object(G, V, session.namespace, P, name, {"spec": {"suspend": True}})
    click.echo(f"spinrun/{name} cancelled: its Jobs are suspended, lineage is kept; `spinctl resume {name}` continues")


@main.command()
@cluster_options
@NAME
def resume(session: Session, name: str) -> None:
    """Continue a cancelled run, or retry a failed one with a fresh restart budget. A run that already
    succeeded is refused.

    \b
    Examples:
      spinctl resume demo
    """
    run = get_run(session, name)
    _refuse_finished(run, "resume", (planner.SUCCEEDED,))
    annotations = run["metadata"].get("annotations") or {}
    try:
        grants = int(annotations.get(api.RESUME_ANNOTATION, "0")) + 1
    except ValueError:
        grants = 1
    session.objects.patch_namespaced_custom_object(G, V, session.namespace, P, name, {
        "metadata": {"annotations": {api.RESUME_ANNOTATION: str(grants)}}, "spec": {"suspend": False}})
    click.echo(f"spinrun/{name} resumed from iteration {(run.get('status') or {}).get('iteration', 0)}")


@main.command()
@cluster_options
@NAME
@click.option("--wait", is_flag=True, help="return once the run and its Jobs are gone")
def delete(session: Session, name: str, wait: bool) -> None:
    """Delete a run and its Jobs (lineage, data and models in storage are kept).

    \b
    Examples:
      spinctl delete demo --wait
    """
    run = get_run(session, name)
    session.objects.delete_namespaced_custom_object(G, V, session.namespace, P, name,
                                                    body={"propagationPolicy": "Foreground"})
    if wait:
        while True:
            try:
                get_run(session, name)
            except click.ClickException:
                break
            time.sleep(0.5)
    manifest = (run.get("status") or {}).get("manifest")
    click.echo(f"spinrun/{name} deleted" + (f"; its lineage stays at {manifest}" if manifest else ""))


def _manifest(session: Session | None, run: dict[str, Any]) -> dict[str, Any]:
    """The run's lineage manifest, read with the run's storage settings and, where this user may read it,
    its credentials Secret (else the standard AWS_* environment). ``session`` None: a local run."""
    storage = run["spec"]["storage"]
    prefix = naming.run_prefix(storage["uri"], run["metadata"]["namespace"], run["metadata"]["name"],
                               run["metadata"]["uid"])
    creds: dict[str, str] | None = None
    if storage.get("credentialsSecret") and session is not None:
        try:
            creds = session.secret(storage["credentialsSecret"])
        except ApiException as e:
            if e.status not in (403, 404):
                raise
    store = lineage.open_store(prefix, endpoint=storage.get("endpoint"), region=storage.get("region", "us-east-1"),
                               credentials=creds)
    got = store.get(lineage.MANIFEST_KEY)
    carried = _carried(session, run) if session is not None else {}
    if got is None and not carried:
        raise click.ClickException(f"{run['metadata']['name']} has no lineage yet ({naming.manifest_uri(prefix)}): "
                                   "the first step has not finished")
    manifest: dict[str, Any] = json.loads(got[0]) if got is not None else {
        "run": {k: run["metadata"][k] for k in ("name", "namespace", "uid")}, "iterations": {}}
    for t, record in carried.items():  # what the manifest will hold once that training ends
        manifest["iterations"].setdefault(t, {}).setdefault(naming.GENERATE, record)
    return manifest


def _carried(session: Session, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """By iteration, the generation records the run's training Jobs carry: the controller writes one to the
    manifest with its iteration's training record (planner.carried_generation). Empty where this user may not
    list Jobs."""
    meta = run["metadata"]
    try:
        jobs = session.batch.list_namespaced_job(
            meta["namespace"], label_selector=f"{naming.LABEL_RUN_UID}={meta['uid']},"
                                              f"{naming.LABEL_ROLE}={naming.TRAIN}").items
    except ApiException as e:
        if e.status != 403:
            raise
        return {}
    found = {}
    for job in jobs:
        record = planner.carried_generation(job.metadata.annotations)
        if record is not None:
            found[str(record.get("iteration", job.metadata.labels.get(naming.LABEL_ITERATION)))] = record
    return found


@main.command(name="lineage")
@cluster_options
@output_option
@NAME
@click.option("--diff", nargs=2, type=int, metavar="A B",
              help="show the settings that differ between two iterations (counted from 0)")
@LOCAL
def lineage_cmd(session: Session, fmt: str, name: str, diff: tuple[int, int] | None, local_dir: Path | None) -> None:
    """Show a run's lineage: every recorded step with its Job, inputs, outputs and digests.

    \b
    Examples:
      spinctl lineage demo
      spinctl lineage demo -o json > lineage.json
      spinctl lineage demo --diff 0 1       # what changed between iterations 0 and 1 (the first two)
      spinctl lineage demo --local ./runs/demo
    """
    run = _local_run(local_dir, name) if local_dir is not None else get_run(session, name)
    iterations = int(run["spec"]["iterations"])
    beyond = [t for t in diff or () if not 0 <= t < iterations]
    if beyond:
        raise click.ClickException(f"{name} has {iterations} iteration(s), counted from 0: there is no iteration "
                                   f"{beyond[0]}")
    manifest = _manifest(None if local_dir is not None else session, run)
    if diff is not None:
        a, b = diff
        try:
            changed = output.config_diff(manifest, a, b)
        except KeyError as e:
            status_ = run.get("status") or {}
            if status_.get("phase") not in TERMINAL:
                raise click.ClickException(f"iteration {e.args[0]} of {name} is not in its lineage yet") from None
            raise click.ClickException(f"iteration {e.args[0]} of {name} did not run: the run ended "
                                       f"({status_['phase']}, {status_.get('reason')}) in iteration "
                                       f"{status_.get('iteration', 0)}") from None
        click.echo(output.diff_table(changed, a, b) if fmt == "table" else output.dump(changed, fmt))
        return
    click.echo(output.lineage_table(manifest) if fmt == "table" else output.dump(manifest, fmt))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []}, add_help_option=False)
@click.pass_context
def demo(ctx: click.Context) -> None:
    """SPIN from a converged SFT model on this machine, against continued SFT and lower temperatures, scored by
    exact distance to a known distribution (`spinctl demo --help`).

    \b
    Examples:
      spinctl demo --out /tmp/spin-demo                 # one seed, under 10 minutes on 2 cores
      spinctl demo --out /tmp/spin-cmp --seeds 0,1,2    # the comparison over 3 seeds
    """
    from spin_k8s.demo import __main__ as demo_main

    # The demo owns its options (python -m spin_k8s.demo takes the same); spinctl only passes them on.
    ctx.exit(demo_main.main(ctx.args or ["--help"], prog="spinctl demo"))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (run names complete from the cluster).

    \b
    Examples:
      source <(spinctl completion bash)
      spinctl completion zsh > "${fpath[1]}/_spinctl"
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above lists only shells click supports
    click.echo(cls(main, {}, "spinctl", "_SPINCTL_COMPLETE").source())
