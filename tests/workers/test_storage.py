"""spin_k8s.storage against a real S3 server (SeaweedFS) and the local file system, through one API."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spin_k8s import storage


@pytest.fixture(params=["path", "file", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh prefix: a plain path, a file:// URI, or an s3:// prefix in a fresh bucket."""
    if request.param == "path":
        yield str(tmp_path / "root")
    elif request.param == "file":
        yield f"file://{tmp_path}/root"
    else:
        server: Any = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("bucket")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield f"s3://{bucket}/root"


def test_write_read_exists_and_missing(root: str) -> None:
    uri = storage.join(root, "a", "b.json")
    assert not storage.exists(uri)
    with pytest.raises(storage.NotFoundError):
        storage.read_bytes(uri)
    storage.write_bytes(uri, b"one")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"one"
    storage.write_bytes(uri, b"two")  # a plain write replaces
    assert storage.read_bytes(uri) == b"two"


def test_if_absent_writes_once(root: str) -> None:
    uri = storage.join(root, "done.json")
    storage.write_bytes(uri, b"first", if_absent=True)
    with pytest.raises(storage.AlreadyExistsError):
        storage.write_bytes(uri, b"second", if_absent=True)
    assert storage.read_bytes(uri) == b"first"


def test_if_absent_has_exactly_one_winner_among_racing_writers(root: str) -> None:
    uri = storage.join(root, "race.json")
    winners: list[int] = []
    losers: list[int] = []

    def attempt(n: int) -> None:
        try:
            storage.write_bytes(uri, str(n).encode(), if_absent=True)
            winners.append(n)
        except storage.AlreadyExistsError:
            losers.append(n)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5
    assert storage.read_bytes(uri) == str(winners[0]).encode()


def test_list_uris_is_recursive_sorted_and_keeps_the_uri_style(root: str) -> None:
    names = ["z.txt", "a/2.txt", "a/1.txt", "a/deeper/x.bin"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    storage.write_bytes(storage.join(root + "-sibling", "no.txt"), b"not under root")
    listed = storage.list_uris(root)
    assert listed == sorted(storage.join(root, n) for n in names)
    assert all(u.startswith(root + "/") for u in listed)
    assert storage.list_uris(storage.join(root, "missing")) == []


def test_upload_and_download_dir_round_trip(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.safetensors").write_bytes(bytes(range(256)) * 100)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    written = storage.upload_dir(src, storage.join(root, "model"))
    assert len(written) == 2
    dest = storage.download_dir(storage.join(root, "model"), tmp_path / "dest")
    assert storage.digest_dir(dest) == storage.digest_dir(src)
    with pytest.raises(storage.NotFoundError):
        storage.download_dir(storage.join(root, "nothing"), tmp_path / "empty")


def test_a_verified_download_checks_each_copy_against_the_listing(root: str, tmp_path: Path) -> None:
    """Sizes always; MD5s where the store states them: S3 for single-part uploads, never the file system."""
    body = bytes(range(256)) * 40
    storage.write_bytes(storage.join(root, "m", "weights.bin"), body)
    storage.write_bytes(storage.join(root, "m", "sub", "config.json"), b'{"a": 1}')
    listed = storage.list_objects(storage.join(root, "m"))
    assert [o.uri for o in listed] == storage.list_uris(storage.join(root, "m"))
    assert [o.size for o in listed] == [8, len(body)]
    s3 = storage.is_s3(root)
    assert [o.md5 for o in listed] == ([hashlib.md5(b'{"a": 1}').hexdigest(), hashlib.md5(body).hexdigest()]
                                       if s3 else [None, None])
    dest = storage.download_dir(storage.join(root, "m"), tmp_path / "dest", verify=True)
    weights = listed[1]
    storage.check_copy(dest / "weights.bin", weights)  # the copy is the object

    (dest / "weights.bin").write_bytes(body[:-1])  # cut short
    with pytest.raises(storage.IntegrityError, match=f"{len(body) - 1} bytes, but .* has {len(body)}"):
        storage.check_copy(dest / "weights.bin", weights)
    (dest / "weights.bin").write_bytes(body[:-1] + b"!")  # one byte changed, same size
    if s3:
        with pytest.raises(storage.IntegrityError, match="MD5"):
            storage.check_copy(dest / "weights.bin", weights)
    else:  # a local source states no checksum: the size is all a copy can be checked against here
        storage.check_copy(dest / "weights.bin", weights)


@pytest.mark.s3
def test_a_multipart_upload_states_no_md5(s3_server: Any, bucket: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ETag is the MD5 of the parts' MD5s: listed without one, so a verified download checks its size only."""
    from boto3.s3.transfer import TransferConfig

    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (6 << 20))
    client = s3_server.client()
    five = 5 << 20  # S3's smallest part
    client.upload_file(str(big), bucket, "m/big.bin", Config=TransferConfig(multipart_threshold=five,
                                                                          multipart_chunksize=five))
    assert "-" in client.head_object(Bucket=bucket, Key="m/big.bin")["ETag"]
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    [info] = storage.list_objects(f"s3://{bucket}/m")
    assert (info.size, info.md5) == (6 << 20, None)


def test_delete_prefix_deletes_the_tree_and_nothing_beside_it(root: str) -> None:
    names = ["step-1/a.pt", "step-1/deeper/b.pt", "step-10/c.pt", "latest"]
    for name in names:
        storage.write_bytes(storage.join(root, name), name.encode())
    assert storage.delete_prefix(storage.join(root, "step-1")) == 2
    assert storage.list_uris(root) == sorted(storage.join(root, n) for n in ("step-10/c.pt", "latest"))
    assert storage.delete_prefix(storage.join(root, "step-1")) == 0  # already gone: not an error
    with pytest.raises(ValueError, match="refusing"):
        storage.delete_prefix("s3://bucket" if root.startswith("s3://") else "/")

def test_join_parse_and_digests(tmp_path: Path) -> None:
    assert storage.join("s3://b/run/", "/iter-0/", "x.json") == "s3://b/run/iter-0/x.json"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("file:///data/run", "x") == "file:///data/run/x"
    assert storage.join("/data/run", "a", "b") == "/data/run/a/b"
    assert storage.parse("s3://bucket/k/e/y") == storage.Location("s3", "bucket", "k/e/y")
    for bad in ("gs://b/k", "s3:///key"):
        with pytest.raises(ValueError):
            storage.parse(bad)
    assert storage.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "f").write_bytes(b"abc")
    assert storage.sha256_file(tmp_path / "f") == storage.sha256_bytes(b"abc")
    before = storage.digest_dir(tmp_path)
    (tmp_path / "g").write_bytes(b"")
    assert storage.digest_dir(tmp_path) != before  # a new file changes the digest
    assert storage.digest_dir(tmp_path, suffixes=("f",)) == before  # only names ending in "f" count
