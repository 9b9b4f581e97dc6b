"""The installed SpinRun and SpinRuntime CRDs against the ones this controller was built with, checked once at
start.

`helm upgrade` never upgrades `crds/`. A controller running against an older CRD reads objects whose schema
lacks its fields: the API server prunes what it does not know from specs (settings silently lost) and from the
status the controller writes (so every reconcile sees a status differing from the one it wrote and writes it
again). Refusing to start, with the fields missing and the command that fixes it, is the safe answer; a newer CRD
(a superset) is accepted. The SpinRuntime CRD must exist too: the controller watches SpinRuntimes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from spin_k8s import api

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
RUNTIME_CRD_NAME = f"{api.RUNTIME_PLURAL}.{api.GROUP}"
UPGRADE = ("kubectl apply --server-side --force-conflicts -f charts/spin/crds/ "
           "(README: Upgrading: the CRDs first)")


def property_paths(node: dict[str, Any], path: str = "") -> Iterator[str]:
    """Every property path a schema declares, e.g. ``spec.training.beta``; ``[]`` marks an array's items."""
    for name, prop in (node.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here
        yield from property_paths(prop, here)
    if "items" in node:
        yield from property_paths(node["items"], f"{path}[]")


def missing(installed: dict[str, Any], ours: dict[str, Any] | None = None) -> list[str]:
    """The property paths of this controller's schema (``ours``; default the SpinRun's) that the installed CRD
    object lacks (for the version served), sorted; an absent version lacks everything."""
    versions = {v.get("name"): v for v in (installed.get("spec") or {}).get("versions") or []}
    served = ((versions.get(api.VERSION) or {}).get("schema") or {}).get("openAPIV3Schema") or {}
    return sorted(set(property_paths(ours or api.schema())) - set(property_paths(served)))


def problem(api_client: client.ApiClient, timeout: float) -> str | None:
    """Why this controller must not run against the cluster's CRDs, in one line; None when it may. ``timeout``:
    seconds for connecting and for the answer (this runs before the manager gives every request its timeout)."""
    for name, kind, ours in ((CRD_NAME, api.KIND, api.schema()), (RUNTIME_CRD_NAME, api.RUNTIME_KIND,
                                                                  api.runtime_schema())):
        try:
            installed = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(
                name, _request_timeout=(timeout, timeout))
        except ApiException as e:
            if e.status == 404:
                return f"the {kind} CRD {name} is not installed: {UPGRADE}"
            return f"cannot read the {kind} CRD {name} ({e.status} {e.reason}): the controller's role needs get on it"
        lacking = missing(api_client.sanitize_for_serialization(installed), ours)
        if lacking:
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            return f"the installed {kind} CRD is older than this controller (it lacks {shown}): {UPGRADE}"
    return None
