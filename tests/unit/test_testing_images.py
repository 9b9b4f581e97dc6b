"""The real-node tier's image cache keys (spin_k8s/testing/images.py): a change to anything a build copies
rebuilds that image and the ones built on it; a change to anything else rebuilds nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from spin_k8s.testing import images

ROOT = Path(__file__).parent.parent.parent


def test_the_context_is_what_the_dockerignore_lets_through() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in images._selected(
        ROOT, ROOT / "images" / "train" / "Dockerfile.dockerignore")}
    assert {"pyproject.toml", "README.md", "spin_k8s/__init__.py", "spin_k8s/workers/train.py"} <= files
    assert not any(f.startswith(("tests/", "images/", ".venv/")) or "__pycache__" in f for f in files)


def test_a_change_to_a_copied_file_or_a_base_changes_the_key_and_nothing_else_does(tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "pkg").mkdir(parents=True)
    (context / "pkg" / "a.py").write_text("a = 1\n")
    (context / "other.txt").write_text("not copied\n")
    (context / "Dockerfile").write_text("FROM ${BASE}\nCOPY pkg/ /pkg/\n")
    (context / ".dockerignore").write_text("*\n!pkg/\n")
    (tmp_path / "Base").write_text("FROM scratch\n")
    catalogue = {
        "base": images.Image("base", tmp_path / "Base", tmp_path, ()),
        "app": images.Image("app", context / "Dockerfile", context,
                            images._selected(context, context / ".dockerignore"), "base"),
    }
    first = images.key(catalogue["app"], catalogue)

    (context / "other.txt").write_text("changed, still not copied\n")
    assert images.key(catalogue["app"], catalogue) == first
    (context / "pkg" / "a.py").write_text("a = 2\n")
    second = images.key(catalogue["app"], catalogue)
    assert second != first
    (tmp_path / "Base").write_text("FROM scratch\nENV X=1\n")
    assert images.key(catalogue["app"], catalogue) != second
    with_arg = {**catalogue, "app": replace(catalogue["app"], args={"EXTRAS": "worker"})}
    assert images.key(with_arg["app"], with_arg) != images.key(catalogue["app"], catalogue)
    assert images.reference(catalogue["app"], catalogue).startswith("spin-k8s.local/app:")
