"""Pure formatting for ``spinctl``: tables, the run summary, lineage and config diffs. No I/O: commands
fetch, these functions turn values into text (``-o table``), or the same values go out as JSON / YAML."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import yaml

from spin_k8s import naming


def dump(value: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(value, indent=2, sort_keys=False, default=str)
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A kubectl-style table: upper-case headers, columns padded by three spaces, ``<none>`` for blanks."""
    cells = [[str(h).upper() for h in headers]] + [["<none>" if v is None or v == "" else str(v) for v in r]
                                                    for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def age(timestamp: str | None, now: datetime.datetime) -> str:
    """Kubernetes-style age: 45s, 12m, 3h, 2d."""
    if not timestamp:
        return ""
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def without_managed_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as ``kubectl get -o yaml`` shows it: without ``metadata.managedFields`` (server bookkeeping)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta} if "metadata" in obj else obj


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Objects as ``kubectl get -o json`` prints several: one List."""
    return {"apiVersion": "v1", "kind": "List", "items": [without_managed_fields(i) for i in items]}


def run_message(status: dict[str, Any]) -> str:
    """What the run is doing or why it ended: the message of its condition that holds."""
    return next((c["message"] for c in status.get("conditions") or [] if c.get("status") == "True"
                 and c.get("message")), "")


def runs_table(runs: list[dict[str, Any]], now: datetime.datetime, all_namespaces: bool = False,
               wide: bool = False) -> str:
    """``spinctl list``: kubectl's columns for SpinRuns (ITERATION counts from 0, ITERATIONS is the total),
    and the reason; ``wide`` adds the model and the run's message."""
    rows = []
    for r in runs:
        status, meta = r.get("status") or {}, r["metadata"]
        row = [meta["name"], status.get("iteration", 0), r["spec"].get("iterations"), status.get("phase", "Pending"),
               status.get("reason"), age(meta.get("creationTimestamp"), now)]
        row += [r["spec"].get("model"), run_message(status)] if wide else []
        rows.append([meta.get("namespace"), *row] if all_namespaces else row)
    headers = ["name", "iteration", "iterations", "phase", "reason", "age", *(["model", "message"] if wide else [])]
    return table(["namespace", *headers] if all_namespaces else headers, rows)


def job_summary(job: Any) -> dict[str, Any]:
    """A Job (client model) as the few fields ``spinctl status`` shows."""
    labels = job.metadata.labels or {}
    conditions = [c.type for c in job.status.conditions or [] if c.status == "True" and c.type in
                  ("Complete", "Failed", "Suspended")]
    return {"name": job.metadata.name, "role": labels.get(naming.LABEL_ROLE),
            "iteration": int(labels.get(naming.LABEL_ITERATION, 0)),
            "attempt": int(labels.get(naming.LABEL_ATTEMPT, 0)),
            "state": conditions[0] if conditions else ("Suspended" if job.spec.suspend else "Running"),
            "completions": job.spec.completions, "succeeded": job.status.succeeded or 0,
            "failed": job.status.failed or 0, "active": job.status.active or 0,
            "created": job.metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")}


def run_status(run: dict[str, Any], jobs: list[dict[str, Any]], now: datetime.datetime) -> str:
    """``spinctl status``: what the run is doing, per iteration, its Jobs and conditions."""
    meta, spec, status = run["metadata"], run["spec"], run.get("status") or {}
    phase = status.get("phase", "Pending")
    cond = {c["type"]: c for c in status.get("conditions") or []}
    message = run_message(status)
    lines = [
        f"Name:        {meta['name']}",
        f"Namespace:   {meta.get('namespace', '')}",
        f"Phase:       {phase}" + (f" ({status['reason']})" if status.get("reason") else ""),
        f"Iteration:   {status.get('iteration', 0)} (of {spec.get('iterations')}, counted from 0)",
        f"Model:       {spec.get('model')}",
        f"Dataset:     {spec.get('dataset')}",
        f"Manifest:    {status.get('manifest', '')}",
    ]
    if meta.get("creationTimestamp"):  # a local run has none
        lines.append(f"Age:         {age(meta['creationTimestamp'], now)}")
    if message:
        lines.append(f"Message:     {message}")
    if spec.get("suspend"):
        lines.append("Suspended:   yes (`spinctl resume` continues)")
    if "StorageAvailable" in cond and cond["StorageAvailable"].get("status") == "False":
        lines.append(f"Storage:     unavailable: {cond['StorageAvailable'].get('message')}")
    rows = []
    for it in status.get("iterations") or []:
        m = it.get("metrics") or {}
        rows.append([it["iteration"], it.get("generateJob"), it.get("trainJob"), it.get("restarts", 0),
                     _number(m.get("loss")), _number(m.get("rewards/accuracies")), _number(m.get("rewards/margins")),
                     it.get("checkpoint")])
    lines += ["", "Iterations:", table(["iteration", "generate job", "train job", "restarts", "loss", "accuracy",
                                        "margin", "checkpoint"], rows)]
    if jobs:
        job_rows = [[j["name"], j["role"], j["iteration"], j["attempt"], j["state"],
                     f"{j['succeeded']}/{j['completions']}", j["failed"], age(j["created"], now)] for j in jobs]
        lines += ["", "Jobs:", table(["name", "role", "iteration", "attempt", "state", "done", "failed pods", "age"],
                                     job_rows)]
    lines += ["", "Conditions:", table(["type", "status", "reason", "since"],
                                       [[c["type"], c["status"], c.get("reason"), c.get("lastTransitionTime")]
                                        for c in cond.values()])]
    return "\n".join(lines)


def elapsed(seconds: float) -> str:
    """``[mm:ss]`` since a wait began."""
    whole = int(seconds)
    return f"[{whole // 60:02d}:{whole % 60:02d}]"


def progress_line(run: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """One line of ``spinctl wait`` progress: the iteration (counted from 0, as everywhere), the phase, and the
    current Job's pods done: ``demo: iteration 0 of 2 Generating, shards done 1/2``."""
    status, spec = run.get("status") or {}, run["spec"]
    phase, t = status.get("phase", "Pending"), int(status.get("iteration", 0))
    line = f"{run['metadata']['name']}: iteration {t} of {spec.get('iterations')} {phase}"
    role = {"Generating": naming.GENERATE, "Training": naming.TRAIN}.get(phase)
    current = [j for j in jobs if j["iteration"] == t and j["role"] == role]
    if current:
        j = max(current, key=lambda j: j["attempt"])
        noun = "shards" if role == naming.GENERATE else "nodes"
        line += f", {noun} done {j['succeeded']}/{j['completions']}"
        if j["attempt"]:
            line += f", restart {j['attempt']}"
    if status.get("reason"):
        line += f" ({status['reason']})"
    return line


_STEP = ("step", "loss", "rewards/accuracies", "rewards/margins", "tokens/s")


def log_line(line: str) -> str:
    """One line of a worker's log, readable: a training step as its loss, reward accuracy, margin and
    throughput; another JSON event as its name and fields; anything else (a traceback, a library's own
    output) as written."""
    try:
        fields = json.loads(line)
    except ValueError:
        return line
    if not isinstance(fields, dict) or "event" not in fields:
        return line
    event = fields.pop("event")
    if event == "step" and all(isinstance(fields.get(k), int | float) for k in _STEP):
        return (f"step {fields['step']}: loss {fields['loss']:.4f}, "
                f"reward accuracy {fields['rewards/accuracies']:.2f}, margin {fields['rewards/margins']:+.3f}, "
                f"{fields['tokens/s']:.0f} tokens/s")
    return f"{event}: " + ", ".join(f"{k}={_number(v)}" for k, v in fields.items())


def lineage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's steps in order, one flat row each."""
    rows = []
    for t in sorted(manifest.get("iterations") or {}, key=int):
        for role in naming.ROLES:
            rec = manifest["iterations"][t].get(role)
            if rec is None:
                continue
            if role == naming.GENERATE:
                digests = ",".join(s["sha256"][:12] for s in rec.get("shards") or [])
                rows_out = sum(int(s.get("rows", 0)) for s in rec.get("shards") or [])
                detail = f"{len(rec.get('shards') or [])} shards, {rows_out} rows"
            else:
                digests = (rec.get("checkpointDigest") or "")[:12]
                final = (rec.get("metrics") or {}).get("final") or {}
                detail = (f"loss {_number(final.get('loss'))}, accuracy {_number(final.get('rewards/accuracies'))}, "
                          f"restarts {rec.get('restarts', 0)}")
            rows.append({"iteration": int(t), "role": role, "job": rec.get("job"), "model": rec.get("model"),
                         "output": rec.get("output") or rec.get("checkpoint"), "sha256": digests, "detail": detail,
                         "finished": rec.get("finished")})
    return rows


def lineage_table(manifest: dict[str, Any]) -> str:
    rows = lineage_rows(manifest)
    head = [f"Run:      {manifest.get('run', {}).get('namespace')}/{manifest.get('run', {}).get('name')}",
            f"Code:     spin-k8s {manifest.get('codeVersion')}", f"Updated:  {manifest.get('updated')}", ""]
    return "\n".join(head) + table(["iteration", "role", "job", "sha256", "detail", "output"],
                                   [[r["iteration"], r["role"], r["job"], r["sha256"], r["detail"], r["output"]]
                                    for r in rows])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def iteration_config(manifest: dict[str, Any], iteration: int) -> dict[str, Any]:
    """What an iteration ran with: each step's config, its input model and its data mix, flattened."""
    steps = (manifest.get("iterations") or {}).get(str(iteration))
    if steps is None:
        raise KeyError(iteration)
    flat: dict[str, Any] = {}
    for role, rec in steps.items():
        flat.update(_flatten({role: {"config": rec.get("config") or {}, "model": rec.get("model"),
                                     **({"dataMix": rec["dataMix"]} if "dataMix" in rec else {})}}))
    return flat


def config_diff(manifest: dict[str, Any], a: int, b: int) -> list[dict[str, Any]]:
    """The settings that differ between two iterations, key by key."""
    left, right = iteration_config(manifest, a), iteration_config(manifest, b)
    return [{"key": k, str(a): left.get(k), str(b): right.get(k)} for k in sorted(left.keys() | right.keys())
            if left.get(k) != right.get(k)]


def diff_table(diff: list[dict[str, Any]], a: int, b: int) -> str:
    if not diff:
        return f"iterations {a} and {b} ran with the same settings"
    return table(["setting", f"iteration {a}", f"iteration {b}"],
                 [[d["key"], json.dumps(d[str(a)]), json.dumps(d[str(b)])] for d in diff])
