"""Iteration lineage: what each step of a run consumed and produced, kept in object storage.

Layout under the run's prefix (``naming.run_prefix``): ``steps/i{t}-{role}.json``, each written once
(``If-None-Match: *``), and ``manifest.json``, the run's aggregate (spec, code version, every recorded
step), updated by compare-and-swap on its ETag (``If-Match``). A writer that loses the race (412, 409, or
404 where the object vanished) re-reads and retries. A crash between the step write and the manifest update
replays harmlessly: the step record is found already there and the manifest catches up.

:func:`step_outputs` reads what the workers of a finished step left (shard done records, ``metrics.json``)
for the planner's record of that step; the controller and the local executor both read outputs through it.

Stores: :class:`S3Store` (boto3 client given by the caller: each run has its own credentials) and
:class:`FileStore` (local directory, same interface) for local runs and tests of pure logic.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import spin_k8s
from spin_k8s import naming, storage
from spin_k8s.workers import data

if TYPE_CHECKING:
    from spin_k8s import api, planner

_CAS_ATTEMPTS = 20


class Store(Protocol):
    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None when absent."""

    def put(self, key: str, data: bytes, *, etag: str | None) -> bool:
        """Write only if the object's ETag is ``etag`` (``None``: only if absent). False: lost the race."""


@dataclass(frozen=True)
class S3Store:
    client: Any
    bucket: str
    prefix: str

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/")

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), str(obj["ETag"])

    def put(self, key: str, data: bytes, *, etag: str | None) -> bool:
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ContentType="application/json", **condition)
        except self.client.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412, 404):
                return False
            raise
        return True


@dataclass(frozen=True)
class FileStore:
    root: Path

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put(self, key: str, data: bytes, *, etag: str | None) -> bool:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the compare and the swap happen under one lock
            current = self.get(key)
            if (current is None) != (etag is None) or (current is not None and current[1] != etag):
                return False
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return True


@functools.lru_cache(maxsize=64)
def _s3_client(endpoint: str | None, region: str, key: str | None, secret: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}))


def open_store(prefix: str, *, endpoint: str | None = None, region: str = "us-east-1",
               credentials: dict[str, str] | None = None) -> Store:
    """The store of a run's prefix (``naming.run_prefix``): S3 for ``s3://``, else a local directory.
    ``credentials`` holds ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (None: boto3's default chain)."""
    loc = storage.parse(prefix)
    if loc.scheme != "s3":
        return FileStore(Path(loc.key))
    creds = credentials or {}
    return S3Store(_s3_client(endpoint, region, creds.get("AWS_ACCESS_KEY_ID"), creds.get("AWS_SECRET_ACCESS_KEY")),
                   loc.bucket, loc.key)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()


def step_key(iteration: int, role: str) -> str:
    return naming.step_uri("", iteration, role).lstrip("/")


MANIFEST_KEY = "manifest.json"


def load(store: Store) -> dict[tuple[int, str], dict[str, Any]]:
    """The recorded steps, from the manifest (one read)."""
    got = store.get(MANIFEST_KEY)
    if got is None:
        return {}
    manifest = json.loads(got[0])
    return {(int(t), role): rec for t, roles in manifest.get("iterations", {}).items() for role, rec in roles.items()}


def record_step(store: Store, run: dict[str, Any], spec: dict[str, Any], iteration: int, role: str,
                record: dict[str, Any]) -> dict[str, Any]:
    """Write a step's record once, then add it to the manifest by compare-and-swap; the record as stored (an
    earlier attempt's, where one was written first)."""
    record = {**record, "recorded": _now()}
    key = step_key(iteration, role)
    if not store.put(key, _dump(record), etag=None):
        existing = store.get(key)
        if existing is not None:  # written by an earlier attempt that crashed before the manifest update
            record = json.loads(existing[0])
    for _ in range(_CAS_ATTEMPTS):
        got = store.get(MANIFEST_KEY)
        if got is None:
            manifest: dict[str, Any] = {"run": run, "spec": spec, "codeVersion": spin_k8s.__version__,
                                        "created": _now(), "iterations": {}}
            etag = None
        else:
            manifest, etag = json.loads(got[0]), got[1]
        roles = manifest["iterations"].setdefault(str(iteration), {})
        if roles.get(role) == record:
            return record
        roles[role] = record
        manifest["updated"] = _now()
        if store.put(MANIFEST_KEY, _dump(manifest), etag=etag):
            return record
    raise RuntimeError(f"lineage manifest: lost the compare-and-swap race {_CAS_ATTEMPTS} times")


def step_outputs(store: Store, run: api.SpinRun, prefix: str, jobs: Iterable[planner.JobView],
                 steps: dict[tuple[int, str], dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any] | None]:
    """What the workers of Complete, unrecorded steps left in storage (None where it is incomplete)."""
    outputs: dict[tuple[int, str], dict[str, Any] | None] = {}
    for j in jobs:
        if j.state != "complete" or (j.iteration, j.role) in steps:
            continue
        if j.role == naming.GENERATE:
            sub = f"i{j.iteration}/synthetic/"
            records, length_stopped = [], 0
            for s in range(run.spec.generation.shards):
                name = data.shard_name(s, run.spec.generation.shards)
                got = store.get(f"{sub}{data.done_name(s, run.spec.generation.shards)}")
                if got is None:
                    break
                # Read as the workers read it: a record an older worker image wrote lacks the newer fields,
                # and ShardRecord gives them the values they meant then.
                rec = data.ShardRecord.from_json(got[0])
                records.append({"uri": f"{naming.synthetic_uri(prefix, j.iteration)}/{name}",
                                "sha256": rec.sha256, "rows": rec.rows, "engine": rec.engine,
                                "modelDigest": rec.model_digest, "lengthStopped": rec.length_stopped})
                length_stopped += rec.length_stopped
            complete = len(records) == run.spec.generation.shards
            # Samples cut at maxTokens: no end-of-turn token follows them, in scoring and training.
            outputs[(j.iteration, j.role)] = {"shards": records, "lengthStopped": length_stopped} if complete else None
        else:
            got = store.get(f"i{j.iteration}/model/metrics.json")
            metrics = json.loads(got[0]) if got else None
            outputs[(j.iteration, j.role)] = (
                {"metrics": metrics, "checkpointDigest": metrics.get("checkpoint_sha256")} if metrics else None)
    return outputs
