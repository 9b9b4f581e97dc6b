"""The preflight of spinctl start, without servers: S3's answers stubbed (botocore's Stubber), the Secret read
through a function. Definite refusals are problems; what this machine cannot check is a warning."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from spin_k8s import api
from spin_k8s.cli import preflight

KEYS = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


def spec(**fields: Any) -> dict[str, Any]:
    raw = {"model": "s3://models/sft", "dataset": "s3://data/sft.jsonl", "iterations": 1,
           "storage": {"uri": "s3://runs/spin", "credentialsSecret": "s3"}, **fields}
    defaulted: dict[str, Any] = api.load_defaulted({"metadata": {"name": "x"}, "spec": raw})["spec"]
    return defaulted


def secrets(**by_name: dict[str, str]) -> Any:
    def read(name: str) -> dict[str, str]:
        if name == "forbidden":
            raise preflight.SecretForbidden(name)
        if name not in by_name:
            raise preflight.SecretMissing(name)
        return by_name[name]

    return read


def test_s3_refusals_say_which_input_and_why() -> None:
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    report = preflight.Report()
    with Stubber(client) as stub:
        stub.add_client_error("get_object", "NoSuchKey", http_status_code=404, expected_params={
            "Bucket": "models", "Key": "sft/config.json", "Range": "bytes=0-0"})
        stub.add_client_error("get_object", "AccessDenied", http_status_code=403, expected_params={
            "Bucket": "data", "Key": "sft.jsonl", "Range": "bytes=0-0"})
        stub.add_client_error("head_bucket", "404", http_status_code=404, expected_params={"Bucket": "runs"})
        preflight.check_s3(spec(), client, 'the credentials of Secret "s3"', None, report)
        stub.assert_no_pending_responses()
    assert report.problems == [
        "model s3://models/sft: no config.json under this prefix (a Hugging Face checkpoint directory is expected)",
        'dataset s3://data/sft.jsonl: access denied with the credentials of Secret "s3"',
        "storage s3://runs/spin: bucket runs does not exist"]
    assert report.warnings == []


def test_readable_inputs_pass() -> None:
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    report = preflight.Report()
    with Stubber(client) as stub:
        for _ in range(2):
            stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"{"), 1)})
        stub.add_response("head_bucket", {})
        preflight.check_s3(spec(), client, "x", None, report)
    assert report == preflight.Report()


def test_the_secret_must_exist_and_hold_the_keys() -> None:
    assert preflight.check(spec(), "team", secrets()).problems == [
        'Secret "s3" not found in namespace "team" (--storage-secret, spec.storage.credentialsSecret)']
    assert preflight.check(spec(), "team", secrets(s3={"AWS_ACCESS_KEY_ID": "id"})).problems == [
        'Secret "s3" has no AWS_SECRET_ACCESS_KEY: the pods read their S3 credentials from it']
    forbidden = preflight.check(spec(storage={"uri": "s3://runs/spin", "credentialsSecret": "forbidden"}), "team",
                                secrets())
    assert forbidden.problems == []
    assert forbidden.warnings == ['you may not read Secret "forbidden": model, dataset and storage not checked']


def test_an_unreachable_endpoint_is_a_warning() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    report = preflight.check(spec(storage={"uri": "s3://runs/spin", "credentialsSecret": "s3", "endpoint": endpoint}),
                             "team", secrets(s3=KEYS))
    assert report.problems == []
    (warning,) = report.warnings
    assert warning.startswith(f"cannot reach S3 at {endpoint} from this machine (")
    assert warning.endswith("the pods may: model, dataset and storage not checked")


@pytest.mark.parametrize("missing", [True, False])
def test_a_file_uri_missing_here_is_only_a_warning(tmp_path: Path, missing: bool) -> None:
    model = tmp_path / ("nowhere" if missing else "")
    report = preflight.check(spec(model=f"file://{model}", dataset=f"file://{tmp_path}",
                                  storage={"uri": f"file://{tmp_path}/runs"}), "team", secrets())
    assert report.problems == []
    assert report.warnings == ([f"model file://{model} does not exist on this machine; fine if it exists where the "
                                "pods run (a file:// URI names a path inside the pods)"] if missing else [])
