"""The preflight of ``spinctl start``: before anything is created, what the run will read is checked the way
its pods will read it. The credentials Secret exists in the run's namespace and holds the AWS keys; with those
keys, against the run's endpoint, the model prefix holds a checkpoint (``config.json``), the dataset object is
readable and the storage bucket exists. A wrong ``--model`` otherwise shows only after minutes, as failed
generation pods.

Only definite answers are problems (a missing Secret, object or bucket, refused credentials); what cannot be
checked from this machine is a warning and the start goes on: an endpoint only the cluster reaches, a Secret
this user may not read, a ``file://`` path (it names a path inside the pods; one missing here may be there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spin_k8s import lineage, storage

if TYPE_CHECKING:
    from botocore.exceptions import ClientError
    from mypy_boto3_s3 import S3Client

AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # the start stops
    warnings: list[str] = field(default_factory=list)  # printed; the start goes on


class SecretMissing(Exception):
    """The Secret does not exist."""


class SecretForbidden(Exception):
    """This user may not read the Secret."""


def check(spec: dict[str, Any], namespace: str, read_secret: Callable[[str], dict[str, str]]) -> Report:
    """Check what a defaulted ``spec`` reads. ``read_secret``: a Secret's decoded data by name, raising
    :class:`SecretMissing` or :class:`SecretForbidden`."""
    report = Report()
    check_files(spec, report)
    stored = spec["storage"]
    secret = stored.get("credentialsSecret")
    credentials: dict[str, str] | None = None
    if secret:
        try:
            data = read_secret(secret)
        except SecretMissing:
            report.problems.append(f'Secret "{secret}" not found in namespace "{namespace}" '
                                   "(--storage-secret, spec.storage.credentialsSecret)")
            return report
        except SecretForbidden:
            report.warnings.append(f'you may not read Secret "{secret}": model, dataset and storage not checked')
            return report
        missing = [k for k in AWS_KEYS if not data.get(k)]
        if missing:
            report.problems.append(f'Secret "{secret}" has no {" and no ".join(missing)}: the pods read their S3 '
                                   "credentials from it")
            return report
        credentials = {k: data[k] for k in AWS_KEYS}
    uris = [u for u in (spec["model"], spec["dataset"], stored["uri"]) if storage.is_s3(u)]
    if uris:
        store = lineage.open_store(uris[0], endpoint=stored.get("endpoint"), region=stored.get("region", "us-east-1"),
                                   credentials=credentials)
        assert isinstance(store, lineage.S3Store)  # an s3:// prefix
        whose = f'the credentials of Secret "{secret}"' if secret else "this environment's AWS credentials"
        check_s3(spec, store.client, whose, stored.get("endpoint"), report)
    return report


def check_files(spec: dict[str, Any], report: Report) -> None:
    """``file://`` inputs: a warning when this machine lacks them (the pods may not)."""
    for what in ("model", "dataset"):
        uri = spec[what]
        loc = storage.parse(uri)
        if loc.scheme == "file" and not Path(loc.key).exists():
            report.warnings.append(f"{what} {uri} does not exist on this machine; fine if it exists where the "
                                   "pods run (a file:// URI names a path inside the pods)")


def check_s3(spec: dict[str, Any], client: S3Client, whose: str, endpoint: str | None, report: Report) -> None:
    """The ``s3://`` inputs, read with ``client`` (``whose`` credentials): the model's ``config.json``, the
    dataset's first byte, the storage bucket."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    def first_byte(bucket: str, key: str) -> None:
        client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()

    checks: list[tuple[str, str, Callable[[storage.Location], object]]] = []
    model, dataset, store = (storage.parse(spec["model"]), storage.parse(spec["dataset"]),
                             storage.parse(spec["storage"]["uri"]))
    if model.scheme == "s3":
        checks.append(("model", spec["model"], lambda loc: first_byte(loc.bucket, f"{loc.key}/config.json")))
    if dataset.scheme == "s3":
        checks.append(("dataset", spec["dataset"], lambda loc: first_byte(loc.bucket, loc.key)))
    if store.scheme == "s3":
        checks.append(("storage", spec["storage"]["uri"], lambda loc: client.head_bucket(Bucket=loc.bucket)))
    for what, uri, probe in checks:
        loc = storage.parse(uri)
        try:
            probe(loc)
        except NoCredentialsError:
            report.warnings.append("no AWS credentials here (no --storage-secret, none in this environment): "
                                   "model, dataset and storage not checked")
            return
        except ClientError as e:
            report.problems.append(f"{what} {uri}: {_refusal(e, what, loc, whose)}")
        except BotoCoreError as e:
            report.warnings.append(f"cannot reach S3 at {endpoint or 'AWS'} from this machine ({e}); the pods may: "
                                   "model, dataset and storage not checked")
            return


def _refusal(e: ClientError, what: str, loc: storage.Location, whose: str) -> str:
    """Why S3 refused a check, in words."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket" or (what == "storage" and status == 404):
        return f"bucket {loc.bucket} does not exist"
    if code in ("NoSuchKey", "404"):
        return ("no config.json under this prefix (a Hugging Face checkpoint directory is expected)"
                if what == "model" else "no such object")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"S3 refused {whose} ({code})"
    if code == "AccessDenied" or status == 403:
        return f"access denied with {whose}"
    return f"{code or status}: {e.response.get('Error', {}).get('Message', '')}".rstrip(": ")
