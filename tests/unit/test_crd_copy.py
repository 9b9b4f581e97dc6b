"""No copy of the SpinRun CRD can drift from the single source, manifests/crd/spinruns.selfplay.dev.yaml:
the package's copy (offline defaulting and validation) and the chart's (which Helm installs from crds/)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent.parent
SOURCE = ROOT / "manifests" / "crd" / "spinruns.selfplay.dev.yaml"
COPIES = [ROOT / "spin_k8s" / "crd.yaml", ROOT / "charts" / "spin" / "crds" / "spinruns.selfplay.dev.yaml"]


@pytest.mark.parametrize("copy", COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_crd_copy_is_identical_to_the_source(copy: Path) -> None:
    assert copy.read_bytes() == SOURCE.read_bytes(), \
        f"{copy.relative_to(ROOT)} differs from the source; re-sync with: " \
        f"cp {SOURCE.relative_to(ROOT)} {copy.relative_to(ROOT)}"


def test_the_chart_installs_the_crd_from_crds_only() -> None:
    """Helm installs crds/ once and never deletes it, so `helm uninstall` keeps every SpinRun. A CRD in
    templates/ would be deleted with the release, and every SpinRun with it."""
    crds = sorted(p.name for p in (ROOT / "charts" / "spin" / "crds").iterdir())
    assert crds == [SOURCE.name]
    for template in (ROOT / "charts" / "spin" / "templates").iterdir():
        assert "CustomResourceDefinition" not in template.read_text(), template.name


def test_the_source_is_the_spinrun_crd() -> None:
    crd = yaml.safe_load(SOURCE.read_text())
    assert (crd["kind"], crd["metadata"]["name"]) == ("CustomResourceDefinition", "spinruns.selfplay.dev")
