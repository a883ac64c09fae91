"""The S3 store against moto's S3 server (the session stack): deletes take their open
uploads with them; small files go in one request."""

from __future__ import annotations

import hashlib
import io
import logging
import os

import boto3
import pytest

from qproxy.dev.devstack import Stack
from qproxy.stores.s3 import RemoteStore


def test_a_delete_aborts_the_uploads_of_the_object_left_open(stack: Stack) -> None:
    """A CreateMultipartUpload botocore sent twice while S3 stalled leaves a second upload
    nobody completes: its parts would stay, billed, until a lifecycle rule. A delete of the
    object (a deleted record, a run that lost its lease) aborts them; other objects' stay."""
    remote = RemoteStore(stack.config)
    name, other = f"del/{os.urandom(4).hex()}.bin", f"del/{os.urandom(4).hex()}.bin"
    data = b"x" * 1000
    sha = hashlib.sha256(data).hexdigest()
    remote.store(name, io.BytesIO(data), size=1000, sha256=sha, content_type="text/plain")
    client = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    bucket = stack.config.s3_bucket
    for key in (name, name, other):
        client.create_multipart_upload(Bucket=bucket, Key=remote.object_key(key))

    def open_uploads() -> list[str]:
        answer = client.list_multipart_uploads(Bucket=bucket, Prefix="del/")
        return sorted(u["Key"] for u in answer.get("Uploads", []))

    assert open_uploads() == sorted([name, name, other])
    remote.delete(name)
    assert open_uploads() == [other]
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=name)
    remote.delete(other)
    assert open_uploads() == []


def test_a_multipart_upload_aborts_what_a_dead_run_left_of_the_same_object(stack: Stack) -> None:
    """A run killed mid-upload leaves its upload open; the next run of the same version
    (the only live one: it holds the lease) aborts it before it starts its own, instead of
    leaving the parts billed until the sweep's QPROXY_MULTIPART_MAX_AGE. Other objects'
    uploads stay."""
    remote = RemoteStore(stack.config)
    name, other = f"dead/{os.urandom(4).hex()}.bin", f"dead/{os.urandom(4).hex()}.bin"
    client = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    bucket = stack.config.s3_bucket
    left = client.create_multipart_upload(Bucket=bucket, Key=remote.object_key(name))
    client.upload_part(
        Bucket=bucket,
        Key=remote.object_key(name),
        UploadId=left["UploadId"],
        PartNumber=1,
        Body=b"old" * 1000,
    )
    client.create_multipart_upload(Bucket=bucket, Key=remote.object_key(other))
    data = os.urandom(stack.config.multipart_threshold + 1)  # sent in parts
    sha = hashlib.sha256(data).hexdigest()
    remote.store(name, io.BytesIO(data), size=len(data), sha256=sha, content_type="text/plain")
    answer = client.list_multipart_uploads(Bucket=bucket, Prefix="dead/")
    assert [u["Key"] for u in answer.get("Uploads", [])] == [remote.object_key(other)]
    body = client.get_object(Bucket=bucket, Key=remote.object_key(name))["Body"].read()
    assert body == data
    remote.delete(other)


def test_a_small_file_is_sent_without_waiting_for_100_continue(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore sends every PutObject with "Expect: 100-continue" and waits for the
    server's go-ahead before the body: against S3, one round trip more for every small
    file. A single PUT sends its bytes at once (and they arrive whole)."""
    remote = RemoteStore(stack.config)
    name = f"small/{os.urandom(4).hex()}.bin"
    data = os.urandom(64 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    with caplog.at_level(logging.DEBUG, logger="botocore.awsrequest"):
        remote.store(name, io.BytesIO(data), size=len(data), sha256=sha, content_type="a/b")
    sent = [r.getMessage() for r in caplog.records if r.name == "botocore.awsrequest"]
    assert not [m for m in sent if "100 Continue" in m], sent
    client = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    bucket = stack.config.s3_bucket
    assert client.get_object(Bucket=bucket, Key=remote.object_key(name))["Body"].read() == data
    remote.delete(name)
