"""The model download (``runtime.fetch_model``) against a real S3 server: a copy is used only once it is whole
and is the model its writer recorded; a corrupt source is refused with a clear error, and a download killed
half-way is neither used nor left behind. That it happens once per node is tested where several ranks race
for it: the training worker under torchrun (test_train.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spin_k8s import storage
from spin_k8s.workers import runtime, tiny

from .helpers import events

pytestmark = pytest.mark.s3


def store(model_dir: Path, uri: str) -> str:
    """Puts a model in storage as the training worker leaves one, its digest in metrics.json; the digest."""
    storage.upload_dir(model_dir, uri)
    digest = runtime.model_digest(model_dir)
    storage.write_bytes(storage.join(uri, runtime.METRICS_FILE), json.dumps({"checkpoint_sha256": digest}).encode())
    return digest


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def stored_model(tiny_assets: tiny.TinyAssets, s3_env: None, bucket: str) -> tuple[str, str]:
    """(URI, digest) of the tiny model in S3."""
    uri = f"s3://{bucket}/iter-1/model"
    return uri, store(tiny_assets.model_dir, uri)


def fetched(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [e for e in events(capsys.readouterr().out) if e["event"] == "model_fetched"]


def test_a_model_is_downloaded_once_verified_and_then_found(stored_model: tuple[str, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    uri, digest = stored_model
    path = runtime.fetch_model(uri, tmp_path / "cache")
    assert runtime.model_digest(path) == digest
    assert runtime.fetch_model(uri, tmp_path / "cache") == path
    assert [(e["path"], e["downloaded"]) for e in fetched(capsys)] == [(str(path), True), (str(path), False)]
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == [path.name]  # no staging left
    assert not any(p.name.startswith(".download-") for p in models.iterdir())


def test_a_model_that_is_not_the_one_its_writer_recorded_is_refused(
        stored_model: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file changed in storage after the model was written: every object matches its own listing (S3 computed
    the ETag of the new bytes), so only the recorded digest can tell; the copy is not used, nor kept."""
    uri, digest = stored_model
    original = storage.read_bytes(storage.join(uri, "tokenizer.json"))
    storage.write_bytes(storage.join(uri, "tokenizer.json"), original.replace(b"<|end|>", b"<|eot|>", 1))
    with pytest.raises(storage.IntegrityError, match=f"sha256 is [0-9a-f]{{64}}, but metrics.json records {digest}"):
        runtime.fetch_model(uri, tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").glob("[!.]*")) == []  # nothing published
    assert list((tmp_path / "cache" / "models").glob(".download-*")) == []  # nor left half-way
    with pytest.raises(storage.IntegrityError):  # a crash worth a retry, not an input error (exit 3): it may heal
        runtime.run_cli(lambda: len(str(runtime.fetch_model(uri, tmp_path / "cache"))))

    storage.write_bytes(storage.join(uri, "tokenizer.json"), original)
    path = runtime.fetch_model(uri, tmp_path / "cache")  # the retry downloads again and succeeds
    assert runtime.model_digest(path) == digest
    assert [e["downloaded"] for e in fetched(capsys)] == [True]


def started_writing(models: Path) -> bool:
    """Whether a download has written bytes into its staging directory. Its files come and go as it runs
    (the S3 client writes each under a temporary name, then renames it): one gone between the listing and the
    look is no answer."""
    for path in models.glob(".download-*/**/*"):
        try:
            if path.is_file() and path.stat().st_size:
                return True
        except FileNotFoundError:
            continue
    return False


def test_a_killed_download_is_never_used_and_the_next_one_starts_over(
        tiny_assets: tiny.TinyAssets, s3_env: None, bucket: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A process killed while it downloads (as a pod's container is) leaves a staging directory with part of the
    model and no copy in place; the next process on the node removes it and downloads the whole model again."""
    model = tmp_path / "model"
    shutil.copytree(tiny_assets.model_dir, model)
    (model / "extra.bin").write_bytes(os.urandom(64 << 20))  # slow enough a download to be caught half-way
    uri = f"s3://{bucket}/iter-1/model"
    digest = store(model, uri)
    models = tmp_path / "cache" / "models"
    code = ("import sys; from pathlib import Path; from spin_k8s.workers import runtime; "
            "runtime.fetch_model(sys.argv[1], Path(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / "cache")])
    try:
        deadline = time.monotonic() + 120
        while not started_writing(models):
            assert proc.poll() is None and time.monotonic() < deadline, "the download ended before it was caught"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    [staging] = models.glob(".download-*")
    assert list(models.glob("[!.]*")) == []  # a partial copy is never in place

    path = runtime.fetch_model(uri, tmp_path / "cache")
    assert not staging.exists() and list(models.glob(".download-*")) == []
    assert runtime.model_digest(path) == digest
    assert [e["downloaded"] for e in fetched(capsys)] == [True]
