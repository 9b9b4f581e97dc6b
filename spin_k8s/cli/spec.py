"""Builds the SpinRun ``spinctl start`` submits, from ``-f FILE``, flags and ``--set`` overrides, and
checks it offline against the CRD (the same schema the API server applies) so a bad field is named before
anything is sent. Pure, apart from reading the file."""

from __future__ import annotations

import copy
import re
import secrets
from pathlib import Path
from typing import Any

import yaml

from spin_k8s import api, manifests, naming

_PART = re.compile(r"^([A-Za-z0-9_-]+)(?:\[(\d+)\])?$")
DRY_RUN_UID = "00000000-0000-0000-0000-000000000000"  # a real uid is given by the API server at create


class SpecError(ValueError):
    """A spec that cannot be submitted; the message is one line."""


def load_file(path: Path) -> dict[str, Any]:
    """A SpinRun from YAML: a whole object (``kind: SpinRun``) or just its ``spec``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a SpinRun or a spec mapping")
    if "spec" in doc or doc.get("kind") == api.KIND:
        if doc.get("kind", api.KIND) != api.KIND:
            raise SpecError(f"{path}: kind is {doc['kind']!r}, expected {api.KIND}")
        return doc
    return {"spec": doc}


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``key.path=value`` with the value read as YAML (numbers, booleans, lists, strings)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {assignment!r}: expected key=value, e.g. training.learningRate=5e-7")
    for number in (int, float):  # YAML 1.1 reads 5e-7 as a string; a learning rate is a number
        try:
            return key, number(raw)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_path(spec: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (``a.b[i].c``, relative to the spec; a leading ``spec.`` is allowed) to ``value``."""
    parts = key.removeprefix("spec.").split(".")
    node: Any = spec
    for i, part in enumerate(parts):
        m = _PART.match(part)
        if m is None:
            raise SpecError(f"--set {key}: {part!r} is not a field name")
        name, index = m.group(1), m.group(2)
        last = i == len(parts) - 1
        if index is None:
            if last:
                node[name] = value
                continue
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {key}: {name} is not an object")
            continue
        items = node.setdefault(name, [])
        if not isinstance(items, list):
            raise SpecError(f"--set {key}: {name} is not a list")
        while len(items) <= int(index):
            items.append({})
        if last:
            items[int(index)] = value
        else:
            node = items[int(index)]


def build(base: dict[str, Any] | None, *, name: str | None, namespace: str, flags: dict[str, Any],
          sets: tuple[str, ...]) -> dict[str, Any]:
    """The object to create: the file's, then the flags (those given), then ``--set`` in order."""
    base = copy.deepcopy(base) if base else {}
    meta = base.get("metadata") or {}
    meta["name"] = name or meta.get("name") or f"spin-{secrets.token_hex(3)}"
    meta["namespace"] = namespace
    spec = base.get("spec") or {}
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta, "spec": spec}
    for path, value in flags.items():
        if value is not None:
            set_path(spec, path, value)
    for assignment in sets:
        set_path(spec, *parse_assignment(assignment))
    return obj


def check(obj: dict[str, Any]) -> None:
    """Refuse what the API server would refuse, naming the field (all problems, on one line)."""
    defaulted = api.load_defaulted(obj)
    errors = api.schema_errors(defaulted) + api.semantic_errors(defaulted)
    if errors:
        more = f" (and {len(errors) - 1} more: {'; '.join(errors[1:3])})" if len(errors) > 1 else ""
        raise SpecError(f"invalid SpinRun {obj['metadata']['name']}: {errors[0]}{more}")


def preview(obj: dict[str, Any], images: api.Images = api.DEFAULT_IMAGES) -> list[dict[str, Any]]:
    """What ``start`` creates (the SpinRun) and what the controller then creates for iteration 0 (the
    generation Job, the training Service and Job), as the controller's own builders make them."""
    defaulted = api.load_defaulted(obj)
    defaulted["metadata"] = {**obj["metadata"], "uid": DRY_RUN_UID}
    run = api.parse(defaulted, images)
    prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
    return [obj, manifests.generate_job(run, prefix, 0), manifests.train_service(run),
            manifests.train_job(run, prefix, 0, 0)]
