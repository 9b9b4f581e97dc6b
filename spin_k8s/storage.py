"""Object storage: one small API over local paths (``/abs/path`` or ``file:///abs/path``) and S3
(``s3://bucket/key``), shared by the workers and the controller.

S3 is reached through boto3 with the standard AWS environment (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so any S3-compatible server
works. A URI names an object; a *prefix* URI names a directory-like tree of objects. URIs keep their style
through :func:`join` and :func:`list_uris`: a plain path stays a plain path, ``file://`` stays ``file://``.

``write_bytes(..., if_absent=True)`` is the one conditional write (S3 ``If-None-Match: *``, an exclusive
hard link on files): it is how a worker publishes a record exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CHUNK = 1 << 20  # bytes read at a time when hashing files


class AlreadyExistsError(FileExistsError):
    """A conditional write (``if_absent=True``) found the object already there."""


class NotFoundError(FileNotFoundError):
    """The object does not exist."""


class IntegrityError(OSError):
    """A downloaded file is not the object it was copied from (size or checksum differ)."""


@dataclass(frozen=True)
class Location:
    """A parsed URI. ``scheme`` is ``"file"`` or ``"s3"``; for files ``bucket`` is empty and ``key`` is the
    absolute path; ``file_uri`` records whether the input was spelled ``file://`` (kept by :func:`join`)."""

    scheme: str
    bucket: str
    key: str
    file_uri: bool = False

    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{self.key}" if self.file_uri else self.key


def parse(uri: str) -> Location:
    """Splits a URI; raises ValueError for an unsupported scheme or an S3 URI without a bucket."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"S3 URI without a bucket: {uri!r}")
        return Location("s3", bucket, key.strip("/"))
    if uri.startswith("file://"):
        return Location("file", "", os.path.abspath(uri[len("file://"):]), file_uri=True)
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme (file:// or s3:// expected): {uri!r}")
    return Location("file", "", os.path.abspath(uri))


def is_s3(uri: str) -> bool:
    return parse(uri).scheme == "s3"


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/run", "iter-0", "x.json") == "s3://b/run/iter-0/x.json"``; same for paths."""
    loc = parse(uri)
    segments = [p.strip("/") for p in parts if p.strip("/")]
    if loc.scheme == "s3":
        key = "/".join([loc.key, *segments] if loc.key else segments)
        return Location("s3", loc.bucket, key).uri()
    return Location("file", "", os.path.join(loc.key, *segments), loc.file_uri).uri()


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, access_key: str | None, region: str | None) -> S3Client:
    import boto3

    # The arguments only key the cache: boto3 reads the same variables from the environment itself.
    del endpoint, access_key, region
    return boto3.client("s3")


def _s3() -> S3Client:
    env = os.environ
    return _s3_client(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                      env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_DEFAULT_REGION"))


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def read_bytes(uri: str) -> bytes:
    """The object's bytes; NotFoundError when it does not exist."""
    loc = parse(uri)
    if loc.scheme == "s3":
        client = _s3()
        try:
            return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise NotFoundError(f"no such object: {uri}") from exc
    try:
        return Path(loc.key).read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {uri}") from exc


def write_bytes(uri: str, data: bytes, *, if_absent: bool = False) -> None:
    """Writes the whole object atomically (readers see the old content or the new, never a part).

    With ``if_absent`` the write happens only if nothing is there yet; otherwise AlreadyExistsError.
    """
    loc = parse(uri)
    if loc.scheme == "s3":
        client = _s3()
        try:
            if if_absent:
                client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
            else:
                client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except client.exceptions.ClientError as exc:
            # 412: the key exists. 409: a concurrent conditional write to the same key is in flight, and
            # exactly one of the racing writers wins: for this caller it is the same as losing.
            if if_absent and _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise AlreadyExistsError(f"already exists: {uri}") from exc
            raise
        return
    target = Path(loc.key)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the object is meant to be read by other pods too
        if if_absent:
            # A hard link is an exclusive create (like O_EXCL) that also publishes the complete content.
            try:
                os.link(tmp, target)
            except FileExistsError as exc:
                raise AlreadyExistsError(f"already exists: {uri}") from exc
        else:
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "s3":
        client = _s3()
        try:
            client.head_object(Bucket=loc.bucket, Key=loc.key)
        except client.exceptions.ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True
    return Path(loc.key).is_file()


@dataclass(frozen=True)
class ObjectInfo:
    """An object as its store lists it."""

    uri: str
    size: int  # bytes
    md5: str | None  # hex MD5 of the content where the store states it (an S3 ETag of a single-part upload)


def list_objects(prefix: str) -> list[ObjectInfo]:
    """Every object under the directory-like ``prefix`` (recursively), sorted by URI, in its style."""
    loc = parse(prefix)
    if loc.scheme == "s3":
        key_prefix = f"{loc.key}/" if loc.key else ""
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=key_prefix)
        # A multipart upload's ETag is the MD5 of its parts' MD5s with a "-N" suffix: not the content's MD5,
        # and not recomputable without the part size, so only a plain 32-digit ETag is one.
        found = [ObjectInfo(join(prefix, obj["Key"][len(key_prefix):]), obj["Size"],
                            etag if len(etag := obj.get("ETag", "").strip('"')) == 32 else None)
                 for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
        return sorted(found, key=lambda o: o.uri)
    root = Path(loc.key)
    if not root.is_dir():
        return []
    return sorted((ObjectInfo(join(prefix, str(p.relative_to(root))), p.stat().st_size, None)
                   for p in root.rglob("*") if p.is_file()), key=lambda o: o.uri)


def list_uris(prefix: str) -> list[str]:
    """Every object under the directory-like ``prefix`` (recursively), as sorted URIs in its style."""
    return [o.uri for o in list_objects(prefix)]


def delete_prefix(prefix: str) -> int:
    """Deletes every object under the directory-like ``prefix`` (recursively; never a sibling such as
    ``prefix-2``); returns how many there were. Nothing there is not an error. A bucket's or file system's root
    is refused (ValueError): no caller means to delete everything."""
    loc = parse(prefix)
    if loc.key.strip("/") == "":
        raise ValueError(f"refusing to delete everything under {prefix!r}")
    if loc.scheme == "s3":
        client = _s3()
        key_prefix = f"{loc.key}/"
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=key_prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start:start + 1000]
            response = client.delete_objects(Bucket=loc.bucket,
                                             Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if response.get("Errors"):
                error = response["Errors"][0]
                raise OSError(f"could not delete s3://{loc.bucket}/{error.get('Key')}: {error.get('Message')}")
        return len(keys)
    root = Path(loc.key)
    if not root.is_dir():
        return 0
    count = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return count


def upload_dir(local: str | Path, uri: str) -> list[str]:
    """Copies every file under the local directory to the prefix ``uri``; returns the written URIs."""
    root = Path(local)
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        dest = join(uri, str(path.relative_to(root)))
        loc = parse(dest)
        if loc.scheme == "s3":
            _s3().upload_file(str(path), loc.bucket, loc.key)  # multipart for large files
        else:
            Path(loc.key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, loc.key)
        written.append(dest)
    return written


def download_dir(uri: str, local: str | Path, *, verify: bool = False) -> Path:
    """Copies every object under the prefix ``uri`` into the local directory; NotFoundError if none.

    With ``verify`` each copy is checked against the listing (``check_copy``); IntegrityError names the first
    file that differs. The caller decides what becomes of a directory that failed: nothing here deletes it.
    """
    root = Path(local)
    sources = list_objects(uri)
    if not sources:
        raise NotFoundError(f"nothing under {uri}")
    base = parse(uri).key.rstrip("/")
    for source in sources:
        loc = parse(source.uri)
        dest = root / loc.key[len(base):].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if loc.scheme == "s3":
            _s3().download_file(loc.bucket, loc.key, str(dest))
        else:
            shutil.copyfile(loc.key, dest)
        if verify:
            check_copy(dest, source)
    return root


def check_copy(path: str | Path, source: ObjectInfo) -> None:
    """IntegrityError unless the local file has the listed object's size and, where the store states one, its
    MD5: a download cut short, or a byte changed on the way or on disk."""
    size = Path(path).stat().st_size
    if size != source.size:
        raise IntegrityError(f"{path}: {size} bytes, but {source.uri} has {source.size}")
    if source.md5 is not None:
        with open(path, "rb") as f:
            md5 = hashlib.file_digest(f, "md5").hexdigest()
        if md5 != source.md5:
            raise IntegrityError(f"{path}: MD5 {md5}, but {source.uri} has {source.md5}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_dir(local: str | Path, suffixes: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
    """One sha256 over a directory's files (relative names and contents), optionally only those whose
    names end with one of ``suffixes`` and never those named in ``exclude``: the identity of a model checkpoint."""
    root = Path(local)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if (suffixes and not path.name.endswith(suffixes)) or path.name in exclude:
            continue
        h.update(f"{path.relative_to(root)}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()
