"""The table of bad SpinRuns (tests/data/invalid-spinruns.yaml) as ready objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from spin_k8s import api

_TABLE = yaml.safe_load((Path(__file__).parent / "data" / "invalid-spinruns.yaml").read_text())


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def valid(name: str = "ok") -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": copy.deepcopy(_TABLE["base"])}


def cases() -> list[tuple[str, dict[str, Any], str]]:
    """(why, object, field the error must name), one per bad spec."""
    return [(c["why"], _merge(valid(f"bad-{i}"), {"spec": c["patch"]}), c["field"])
            for i, c in enumerate(_TABLE["cases"])]
