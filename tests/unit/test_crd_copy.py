"""The package's CRD copy cannot drift from the single source under manifests/."""

from pathlib import Path

ROOT = Path(__file__).parent.parent.parent


def test_package_crd_is_identical_to_manifests() -> None:
    source = ROOT / "manifests" / "crd" / "spinruns.selfplay.dev.yaml"
    assert (ROOT / "spin_k8s" / "crd.yaml").read_bytes() == source.read_bytes(), \
        "run: cp manifests/crd/spinruns.selfplay.dev.yaml spin_k8s/crd.yaml"
