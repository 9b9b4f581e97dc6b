"""Builds the SpinRun ``spinctl start`` submits, from ``-f FILE``, flags and ``--set`` overrides, and
checks it offline against the CRD (the same schema the API server applies) so a bad field is named before
anything is sent. Strict: a field the CRD does not declare is refused (the API server would drop it and the
run would go ahead with the default), and every message names what the user wrote: the flag, the ``--set``
key, the field in the file. Pure, apart from reading the file."""

from __future__ import annotations

import copy
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from spin_k8s import api, manifests, naming

_PART = re.compile(r"^([A-Za-z0-9_-]+)(?:\[(\d+)\])?$")
DRY_RUN_UID = "00000000-0000-0000-0000-000000000000"  # a real uid is given by the API server at create

# The flags of `spinctl start` that set a spec field, in the order --help lists them.
FLAG_PATHS = {"--model": "model", "--dataset": "dataset", "--iterations": "iterations", "--storage": "storage.uri",
              "--storage-secret": "storage.credentialsSecret", "--storage-endpoint": "storage.endpoint",
              "--runtime": "runtime"}
_URI_FIELDS = ("spec.model", "spec.dataset", "spec.storage.uri")
# ObjectMeta's fields. The CRD leaves metadata open (the API server types it itself), and strict field validation
# refuses any other field there, as it does under spec: a misspelt `lables` must not be dropped either.
METADATA_FIELDS = ("name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
                   "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                   "deletionGracePeriodSeconds", "selfLink", "managedFields")


class SpecError(ValueError):
    """A spec that cannot be submitted; the message is one line."""


class SpecLoader(yaml.SafeLoader):
    """YAML as the API server reads it: ``5e-7`` is a number. YAML 1.1, PyYAML's default, wants a dot in a
    float (``5.0e-7``) and reads ``5e-7`` as a string; YAML 1.2 and Go's YAML reader take both."""


SpecLoader.add_implicit_resolver(  # tried after the int resolver, so 3 stays an int
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def one_line(head: str, problems: list[str]) -> str:
    """``head: first (and N more: second; third)``: every problem on one line."""
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    return f"{head}: {problems[0]}{more}"


def _unknown(written: str, found: api.UnknownField, parent: str) -> str:
    """``unknown field "training.learningrate" (did you mean "learningRate"?)``."""
    guess = found.suggestion()
    if guess is not None:
        return f'unknown field "{written}" (did you mean "{guess}"?)'
    return f'unknown field "{written}" ({parent} has: {", ".join(found.known)})'


def _unknown_in_file(found: api.UnknownField) -> str:
    parent = api.field_path(list(found.path[:-1]))
    return _unknown(api.field_path(list(found.path)), found, "the top level" if parent == "<root>" else parent)


def load_file(path: Path) -> dict[str, Any]:
    """A SpinRun from YAML: a whole object (``kind: SpinRun``) or just its ``spec``; fields the CRD (or, under
    ``metadata``, ObjectMeta) does not declare are refused, named by their path in the file."""
    try:
        doc = yaml.load(path.read_text(), Loader=SpecLoader)  # a SafeLoader
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a SpinRun or a spec mapping")
    whole = "spec" in doc or doc.get("kind") == api.KIND
    if whole and doc.get("kind", api.KIND) != api.KIND:
        raise SpecError(f"{path}: kind is {doc['kind']!r}, expected {api.KIND}")
    if whole and doc.get("apiVersion", api.API_VERSION) != api.API_VERSION:
        raise SpecError(f"{path}: apiVersion is {doc['apiVersion']!r}, expected {api.API_VERSION}")
    meta = (doc.get("metadata") or {}) if whole else {}
    if not isinstance(meta, dict):
        raise SpecError(f"{path}: metadata must be a mapping (name, labels, annotations), not {meta!r}")
    unknown = [api.UnknownField(("metadata", str(k)), METADATA_FIELDS) for k in meta if k not in METADATA_FIELDS]
    unknown += api.unknown_fields(doc, api.schema() if whole else api.schema()["properties"]["spec"])
    if unknown:
        raise SpecError(one_line(str(path), [_unknown_in_file(u) for u in unknown]))
    return doc if whole else {"spec": doc}


def _walk(key: str) -> tuple[list[tuple[str, int | None]], dict[str, Any]]:
    """The parts of a ``--set`` key (``a.b[i].c``, relative to the spec; a leading ``spec.`` is allowed) and
    the schema of the field it names; SpecError naming the key for a field the CRD does not declare."""
    parts: list[tuple[str, int | None]] = []
    node = api.schema()["properties"]["spec"]
    written = ""
    for part in key.removeprefix("spec.").split("."):
        m = _PART.match(part)
        if m is None:
            raise SpecError(f"--set {key}: {part!r} is not a field name")
        name, index = m.group(1), None if m.group(2) is None else int(m.group(2))
        parent, written = written or "spec", f"{written}.{name}" if written else name
        if node.get("type", "object") != "object":
            raise SpecError(f"--set {key}: {parent} is a {node['type']}, it has no field {name!r}")
        sub = api.field_schema(node, name)
        if sub is None:
            found = api.UnknownField(tuple(written.split(".")), tuple(node.get("properties") or ()))
            raise SpecError(f"--set {key}: {_unknown(written, found, parent)}")
        if index is not None:
            if sub.get("type") not in (None, "array"):
                raise SpecError(f"--set {key}: {written} is a {sub['type']}, not a list")
            sub = sub.get("items") or api.OPEN_SCHEMA
            written += f"[{index}]"
        parts.append((name, index))
        node = sub
    return parts, node


def _fits(key: str, value: Any, node: dict[str, Any]) -> None:
    """A value for an object or a list field must be one (``--set training=3`` sets no field of training),
    and may name only declared fields."""
    kind = node.get("type")
    field = key.removeprefix("spec.")
    if kind == "object" and not isinstance(value, dict):
        raise SpecError(f"--set {key}={value}: {field} is an object; set one of its fields, "
                        f"e.g. --set {field}.{next(iter(node.get('properties') or {'NAME': 0}))}=VALUE")
    if kind == "array" and not isinstance(value, list):
        raise SpecError(f"--set {key}={value}: {field} is a list; set an item's field, "
                        f"e.g. --set {field}[0].FIELD=VALUE")
    unknown = api.unknown_fields(value, node, (field,))
    if unknown:
        raise SpecError(one_line(f"--set {key}", [_unknown(api.field_path(list(u.path)), u,
                                                           api.field_path(list(u.path[:-1]))) for u in unknown]))


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``key.path=value``: the value read as YAML (numbers, booleans, lists), or as text where the field is
    a string (``--set queueName=123``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {assignment!r}: expected key=value, e.g. training.learningRate=5e-7")
    _, node = _walk(key)
    if node.get("type") == "string" or not raw:
        return key, raw
    try:
        value = yaml.load(raw, Loader=SpecLoader)  # a SafeLoader
    except yaml.YAMLError:
        value = raw
    _fits(key, value, node)
    return key, value


def set_path(spec: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (``a.b[i].c``, relative to the spec; a leading ``spec.`` is allowed) to ``value``."""
    parts, _ = _walk(key)
    node: Any = spec
    for i, (name, index) in enumerate(parts):
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
        while len(items) <= index:
            items.append({})
        if last:
            items[index] = value
        else:
            node = items[index]
            if not isinstance(node, dict):
                raise SpecError(f"--set {key}: {name}[{index}] is not an object")


def build(base: dict[str, Any] | None, *, name: str | None, namespace: str, flags: dict[str, Any],
          sets: tuple[str, ...]) -> dict[str, Any]:
    """The object to create: the file's, then the flags (``FLAG_PATHS`` keys; those given), then ``--set``
    in order."""
    base = copy.deepcopy(base) if base else {}
    meta = base.get("metadata") or {}
    meta["name"] = name or meta.get("name") or f"spin-{secrets.token_hex(3)}"
    meta["namespace"] = namespace
    spec = base.get("spec") or {}
    obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta, "spec": spec}
    for flag, value in flags.items():
        if value is not None:
            set_path(spec, FLAG_PATHS[flag], value)
    for assignment in sets:
        set_path(spec, *parse_assignment(assignment))
    return obj


def _uri_hint(value: str) -> str:
    """Why a model / dataset / storage URI is refused, in words instead of the schema's regular expression."""
    if value.startswith("file://"):
        return "a file:// URI takes an absolute path: file:///absolute/path (three slashes)"
    if not value.startswith("s3://"):
        return "a local path needs file:///absolute/path (the path as the pods see it), or use s3://bucket/key"
    bucket = value.removeprefix("s3://").partition("/")[0]
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,62}", bucket):
        return f"bucket name {bucket!r}: 2 to 63 lowercase letters, digits, dots and hyphens"
    return "expected s3://bucket/key"  # the bucket is fine: the key is missing


def _in_user_terms(error: str, obj: Mapping[str, Any], flags: Mapping[str, str]) -> str:
    """An offline error (``spec.model: ...``) as the user wrote it: the flag that sets a missing field, or
    the flag that gave a bad value (``flags``: spec path -> the flag that set it)."""
    path, _, message = error.partition(": ")
    if message == "Required value":
        flag = next((f for f, p in FLAG_PATHS.items() if f"spec.{p}" == path or f"spec.{p}".startswith(f"{path}.")),
                    None)
        return f"{flag} is required ({path})" if flag else error
    value = obj.get("spec", {})
    for part in path.split(".")[1:]:
        value = value.get(part) if isinstance(value, dict) else None
    if path in _URI_FIELDS and isinstance(value, str) and " does not match " in message:
        return f"{flags.get(path, path)} {value}: {_uri_hint(value)}"
    if path == "spec.storage.endpoint" and isinstance(value, str) and " does not match " in message:
        return f"{flags.get(path, path)} {value}: expected a URL, http://host:port or https://host"
    return error


def check(obj: dict[str, Any], *, flags: Iterable[str] = (), storage_optional: bool = False) -> None:
    """Refuse what the API server would refuse, naming the field (all problems, on one line). ``flags``: the
    ``FLAG_PATHS`` flags the user gave. ``storage_optional``: a local run stores under its directory, and a run
    on a cluster may take its storage from its SpinRuntime."""
    defaulted = api.load_defaulted(obj)
    errors = api.schema_errors(defaulted)
    if not api.cel_blocked(defaulted):  # as the API server: the rules need the schema's types
        errors += api.semantic_errors(defaulted)
    if storage_optional:
        errors = [e for e in errors if e not in ("spec.storage: Required value", "spec.storage.uri: Required value")]
    if errors:
        given = {f"spec.{FLAG_PATHS[f]}": f for f in flags}
        raise SpecError(one_line(f"invalid SpinRun {obj['metadata']['name']}",
                                 [_in_user_terms(e, defaulted, given) for e in errors]))


def with_runtime_storage(obj: dict[str, Any], runtime: dict[str, Any] | None) -> dict[str, Any]:
    """``obj`` with the SpinRuntime's storage where the run names no storage URI: its storage fields fill the ones
    the run leaves unset (a run's storage is part of its identity, so it is written into the run, never resolved
    later). A new dict."""
    spec = obj.get("spec") or {}
    theirs = ((runtime or {}).get("spec") or {}).get("storage") or {}
    if (spec.get("storage") or {}).get("uri") or not theirs.get("uri"):
        return obj
    return {**obj, "spec": {**spec, "storage": {**theirs, **(spec.get("storage") or {})}}}


def preview(obj: dict[str, Any], images: api.Images = api.DEFAULT_IMAGES,
            runtime: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What ``start`` creates (the SpinRun, shown with the copy of its SpinRuntime the controller will keep in its
    ``status.runtime``) and what the controller then creates for iteration 0 (the generation Job, the training
    Service and Job, their pod fields the run's spec merged over the runtime's), as the controller's own
    builders make them."""
    shown = {**obj, "status": {"runtime": api.runtime_snapshot(runtime)}} if runtime is not None else obj
    defaulted = api.load_defaulted(shown)
    defaulted["metadata"] = {**obj["metadata"], "uid": DRY_RUN_UID}
    run = api.parse(defaulted, images)
    prefix = naming.run_prefix(run.spec.storage.uri, run.namespace, run.name, run.uid)
    return [shown, manifests.generate_job(run, prefix, 0), manifests.train_service(run),
            manifests.train_job(run, prefix, 0, 0)]
