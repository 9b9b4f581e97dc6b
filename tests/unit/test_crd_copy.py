"""No copy of a CRD can drift from its single source under manifests/crd/: the package's copies (offline
defaulting and validation) and the chart's (which Helm installs from crds/)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent.parent
SOURCES = {"spinruns.selfplay.dev": "crd.yaml", "spinruntimes.selfplay.dev": "runtime-crd.yaml"}  # -> package copy
COPIES = [(ROOT / "manifests" / "crd" / f"{name}.yaml", copy) for name, packaged in SOURCES.items()
          for copy in (ROOT / "spin_k8s" / packaged, ROOT / "charts" / "spin" / "crds" / f"{name}.yaml")]


@pytest.mark.parametrize(("source", "copy"), COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_crd_copy_is_identical_to_the_source(source: Path, copy: Path) -> None:
    assert copy.read_bytes() == source.read_bytes(), \
        f"{copy.relative_to(ROOT)} differs from the source; re-sync with: " \
        f"cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"


def test_the_chart_installs_the_crds_from_crds_only() -> None:
    """Helm installs crds/ once and never deletes it, so `helm uninstall` keeps every SpinRun. A CRD in
    templates/ would be deleted with the release, and every SpinRun with it."""
    crds = sorted(p.name for p in (ROOT / "charts" / "spin" / "crds").iterdir())
    assert crds == sorted(f"{name}.yaml" for name in SOURCES)
    for template in (ROOT / "charts" / "spin" / "templates").iterdir():
        assert "CustomResourceDefinition" not in template.read_text(), template.name


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_is_its_crd(name: str) -> None:
    crd = yaml.safe_load((ROOT / "manifests" / "crd" / f"{name}.yaml").read_text())
    assert (crd["kind"], crd["metadata"]["name"]) == ("CustomResourceDefinition", name)
