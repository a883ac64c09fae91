"""sweep, retry and delete from the command line and from Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import httpx
import pytest

import qproxy
from qproxy.compose import Stores
from qproxy.dev.devstack import Stack
from qproxy.lifecycle.files import commit, enqueue, reserve, store
from qproxy.worker.sweep import abort_stale_multipart, requeue_stuck, sweep
from qproxy.worker.transfer import transfer
from tests.conftest import NoQueue, put_local, wait_state


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qproxy", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_retry_failed_from_the_cli(stack: Stack) -> None:
    broken = Stores(stack.config.replace(s3_bucket="no-such-bucket"), queue=NoQueue())
    key = put_local(broken, b"retry me")
    assert transfer(broken, key, attempts_left=1) == "failed"
    result = cli(stack, "retry", key)
    assert result.returncode == 0 and f"queued {key}" in result.stdout
    wait_state(Stores(stack.config), key, "remote")  # the real worker, with the real bucket
    again = cli(stack, "retry", key)
    assert again.returncode == 1 and "not failed" in again.stderr
    assert cli(stack, "retry").returncode == 2


def test_retry_all_failed(stack: Stack) -> None:
    broken = Stores(stack.config.replace(s3_bucket="no-such-bucket"), queue=NoQueue())
    keys = [put_local(broken, b"a"), put_local(broken, b"b")]
    for key in keys:
        assert transfer(broken, key, attempts_left=1) == "failed"
    result = cli(stack, "retry", "--all-failed")
    assert result.returncode == 0
    for key in keys:
        wait_state(Stores(stack.config), key, "remote")


def test_delete_from_cli_and_python(stack: Stack) -> None:
    node = Stores(stack.config)
    one = put_local(node, b"cli delete")
    two = put_local(node, b"python delete")
    wait_state(node, one, "remote")
    wait_state(node, two, "remote")
    result = cli(stack, "delete", one)
    assert result.returncode == 0 and "deleted" in result.stdout
    assert qproxy.delete(two, stack.config)
    for key in (one, two):
        assert httpx.get(f"{stack.files_url}/media/{key}").status_code == 404
    deadline = time.monotonic() + 30
    while (node.state.get(one) or node.state.get(two)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.state.get(one) is None and node.state.get(two) is None
    assert cli(stack, "delete", one).returncode == 1  # nothing left to delete


def test_stuck_transfers_are_queued_again(stack: Stack) -> None:
    quiet = Stores(stack.config, queue=NoQueue())
    key = put_local(quiet, b"lost job")  # recorded, queued, but the job never sent
    node = Stores(stack.config)
    assert requeue_stuck(node, older_than=time.time() + 1, now=time.time()) >= 1
    wait_state(node, key, "remote")


def test_sweep_aborts_stale_multipart_uploads(stack: Stack) -> None:
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    upload = s3.create_multipart_upload(Bucket="qproxy-dev", Key="left/behind.bin")
    node = Stores(stack.config.replace(multipart_max_age=0.001))
    time.sleep(1)
    report = sweep(node, local=False)
    assert report.multipart_aborted >= 1
    uploads = s3.list_multipart_uploads(Bucket="qproxy-dev").get("Uploads", [])
    assert upload["UploadId"] not in [u["UploadId"] for u in uploads]


def test_sweep_keeps_an_upload_younger_than_the_age(stack: Stack) -> None:
    """QPROXY_MULTIPART_MAX_AGE counts from when S3 says the upload began (moto says the
    same instant for every upload, long ago: the sweep is run at times relative to it)."""
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    okey = f"young/{os.urandom(4).hex()}.bin"
    upload = s3.create_multipart_upload(Bucket="qproxy-dev", Key=okey)["UploadId"]
    node = Stores(stack.config.replace(multipart_max_age=3600))
    (began,) = [u.started for u in node.remote.partial_uploads() if u.upload_id == upload]

    def still_open() -> bool:
        listed = s3.list_multipart_uploads(Bucket="qproxy-dev", Prefix=okey)
        return upload in {u["UploadId"] for u in listed.get("Uploads", [])}

    assert abort_stale_multipart(node, now=began + 3599) == 0
    assert still_open()
    assert abort_stale_multipart(node, now=began + 3601) >= 1
    assert not still_open()


@pytest.mark.parametrize("versions", [1, 2])
def test_sweep_leaves_the_upload_of_a_live_transfer_alone(stack: Stack, versions: int) -> None:
    """An upload older than QPROXY_MULTIPART_MAX_AGE that a run still sends is not aborted
    under it (a file slower to send than the age would never reach S3); once that run's
    lease is over, it is."""
    quiet = Stores(stack.config.replace(multipart_max_age=0.001), queue=NoQueue())
    key = put_local(quiet, b"v1")
    if versions == 2:
        put_local(quiet, b"v2", key, replace=True)
    now = time.time()
    outcome, record = quiet.state.claim(key, {"lease": "run", "lease_until": now + 600}, now=now)
    assert outcome == "claimed" and record is not None
    assert record.object == (key if versions == 1 else f"{key}~v2")
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    okey = quiet.remote.object_key(record.object)
    upload = s3.create_multipart_upload(Bucket="qproxy-dev", Key=okey)["UploadId"]
    other = s3.create_multipart_upload(Bucket="qproxy-dev", Key=okey + "-other")["UploadId"]

    def open_uploads() -> set[str]:
        listed = s3.list_multipart_uploads(Bucket="qproxy-dev", Prefix=okey)
        return {u["UploadId"] for u in listed.get("Uploads", [])}

    assert open_uploads() == {upload, other}
    time.sleep(0.01)
    abort_stale_multipart(quiet, now=time.time())
    assert open_uploads() == {upload}  # the run's is kept, the one nobody sends is not
    abort_stale_multipart(quiet, now=now + 601)  # the run's lease is over: it died
    assert open_uploads() == set()


def test_sweep_cli_reports(stack: Stack) -> None:
    result = cli(stack, "sweep", "--json")
    assert result.returncode == 0
    assert set(json.loads(result.stdout)) == {
        "replayed",
        "dropped",
        "pending_removed",
        "tus_expired",
        "requeued",
        "reservations_released",
        "multipart_aborted",
    }


def test_a_failed_save_frees_its_name(stack: Stack) -> None:
    node = Stores(stack.config, queue=NoQueue())
    key = "reserved/" + os.urandom(4).hex() + ".txt"
    gen = reserve(node, key)
    temps_before = {name for name, _ in node.local.pending()}

    def chunks() -> Iterator[bytes]:
        yield b"half a file"
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away"):
        store(node, chunks(), key, {"filename": "x.txt"}, reserved=gen)
    assert node.state.get(key) is None  # free again: the next save takes it
    assert {name for name, _ in node.local.pending()} <= temps_before  # no temp file left
    assert not node.local.exists(key)


def test_the_sweep_frees_names_whose_save_died(stack: Stack) -> None:
    # A process killed between reserving a name and writing its bytes leaves a ``pending``
    # record: the name would be taken for ever. The sweep frees it once it is older than
    # QPROXY_PENDING_MAX_AGE, and leaves a younger one (a save still writing) alone.
    node = Stores(stack.config, queue=NoQueue())
    dead = "reserved/" + os.urandom(4).hex() + ".txt"
    alive = "reserved/" + os.urandom(4).hex() + ".txt"
    reserve(node, dead)
    time.sleep(0.2)
    reserve(node, alive)
    born = node.state.get(alive).created  # type: ignore[union-attr]
    # Swept as if 0.1 s after the younger one, with a maximum age of 0.15 s: the older one
    # (reserved >= 0.2 s before it) is over the age, the younger one not.
    report = sweep(node, now=born + 0.1, pending_max_age=0.15, local=False)
    assert report.reservations_released >= 1
    assert node.state.get(dead) is None
    record = node.state.get(alive)
    assert record is not None and record.state == "pending"


def delayed_file(stack: Stack) -> tuple[Stores, str]:
    """A file saved with delayed=True (held: transferred only when asked), on a node whose
    queue sends nothing."""
    node = Stores(stack.config, queue=NoQueue())
    node.local.ensure()
    temp = node.local.create_temp()
    temp.write(b"later, on request")
    temp.close()
    key = "delayed/" + os.urandom(4).hex() + ".txt"
    commit(node, temp, key, {"filename": "d.txt"}, enqueue=False)
    return node, key


def test_sweep_leaves_delayed_files_alone(stack: Stack) -> None:
    node, key = delayed_file(stack)
    assert requeue_stuck(node, older_than=time.time() + 1, now=time.time()) == 0 or (
        node.state.get(key).state == "local"  # type: ignore[union-attr]
    )
    record = node.state.get(key)
    assert record is not None and record.state == "local" and record.hold
    real = Stores(stack.config)
    assert enqueue(real, key)  # asked for: now it goes
    wait_state(real, key, "remote")
    record = real.state.get(key)
    assert record is not None and not record.hold


def test_a_delayed_file_whose_job_outran_enqueue_is_not_held_any_more(stack: Stack) -> None:
    """enqueue() sends the job, then clears the hold: a worker can take the job between the
    two. The worker's run clears it too, or a run that dies leaves a file the sweep skips
    for ever."""
    node, key = delayed_file(stack)
    assert node.state.get(key).hold  # type: ignore[union-attr]
    assert transfer(node, key) == "remote"  # the job, before enqueue()'s own write
    record = node.state.get(key)
    assert record is not None and record.state == "remote" and not record.hold


def test_the_sweep_tries_failed_files_again_now_and_then(stack: Stack) -> None:
    broken = Stores(stack.config.replace(s3_bucket="no-such-bucket"), queue=NoQueue())
    key = put_local(broken, b"failed, then fixed")
    assert transfer(broken, key, attempts_left=1) == "failed"
    real = Stores(stack.config)
    # Not yet: failed less than QPROXY_FAILED_RETRY_SECONDS ago.
    requeue_stuck(real, older_than=0, now=time.time())
    record = real.state.get(key)
    assert record is not None and record.state == "failed"
    # Later (the bucket fixed meanwhile): queued again, and it goes.
    later = time.time() + stack.config.failed_retry_seconds + 1
    assert requeue_stuck(real, older_than=0, now=later) >= 1
    wait_state(real, key, "remote")
