"""The transfer task and the state records, on real Redis and moto (and a real worker)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from qproxy.compose import Stores
from qproxy.config import Config
from qproxy.dev.devstack import Stack, free_port
from qproxy.errors import KeyExists, LeaseLost, TransferRetry, VerificationFailed
from qproxy.lifecycle.files import delete
from qproxy.stores.s3 import RemoteStore
from qproxy.stores.state import StateStore
from qproxy.worker.transfer import backoff, transfer
from tests.conftest import NoQueue, _stack, lone_node, put_local
from tests.hooks import CALLS


def s3_sha(stack: Stack, key: str) -> str:
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    return hashlib.sha256(s3.get_object(Bucket="qproxy-dev", Key=key)["Body"].read()).hexdigest()


def test_transfer_multipart_verifies_and_is_idempotent(stack: Stack, quiet_node: Stores) -> None:
    data = os.urandom(13 * 1024 * 1024)  # three 5 MiB parts
    key = put_local(quiet_node, data)
    record = quiet_node.state.get(key)
    assert record is not None and record.state == "queued"
    assert transfer(quiet_node, key) == "remote"
    assert s3_sha(stack, key) == hashlib.sha256(data).hexdigest()
    after = quiet_node.state.get(key)
    assert (
        after is not None
        and after.state == "remote"
        and after.attempts == 1
        and after.remote_at > 0
    )
    # A second (duplicate) run changes nothing.
    assert transfer(quiet_node, key) == "remote"
    again = quiet_node.state.get(key)
    assert again is not None and again.gen == after.gen


def test_transfer_skips_a_live_lease(quiet_node: Stores) -> None:
    key = put_local(quiet_node, b"busy")
    record = quiet_node.state.get(key)
    assert record is not None
    quiet_node.state.transition(
        key,
        "transferring",
        gen=record.gen,
        fields={"lease": "other", "lease_until": time.time() + 60},
    )
    assert transfer(quiet_node, key) == "transferring"
    now = quiet_node.state.get(key)
    assert now is not None and now.state == "transferring" and now.lease == "other"


def test_expired_lease_is_taken_over(quiet_node: Stores) -> None:
    key = put_local(quiet_node, b"stale run")
    record = quiet_node.state.get(key)
    assert record is not None
    quiet_node.state.transition(
        key,
        "transferring",
        gen=record.gen,
        fields={"lease": "dead", "lease_until": time.time() - 1},
    )
    assert transfer(quiet_node, key) == "remote"


def test_a_claim_is_one_step_and_only_one_run_gets_it(quiet_node: Stores) -> None:
    """Two runs of one job at once (a redelivery): the second finds the first's live lease,
    and the claimed record has left its old state's index for transferring's."""
    state = quiet_node.state
    key = put_local(quiet_node, b"claimed once")
    before = state.get(key)
    assert before is not None and before.state == "queued"
    until = time.time() + 60
    first, record = state.claim(key, {"lease": "run-1", "lease_until": until})
    assert first == "claimed" and record is not None
    assert (record.state, record.lease, record.attempts) == ("transferring", "run-1", 1)
    assert record.gen == before.gen + 1
    second, seen = state.claim(key, {"lease": "run-2", "lease_until": until})
    assert second == "leased" and seen is not None and seen.lease == "run-1"
    assert key in state.keys_in_state("transferring")
    assert key not in state.keys_in_state("queued")
    assert state.claim("no/such/key", {"lease": "x"}) == ("missing", None)
    # A transfer that is done needs no claim.
    assert transfer(quiet_node, key) == "transferring"
    state.transition(key, "remote", lease="run-1", fields={"lease": "", "lease_until": ""})
    settled, done = state.claim(key, {"lease": "run-3", "lease_until": until})
    assert settled == "settled" and done is not None and done.lease == ""


def test_failing_s3_retries_then_fails_but_still_serves_locally(
    stack: Stack, quiet_node: Stores
) -> None:
    broken = Stores(quiet_node.config.replace(s3_bucket="no-such-bucket"), queue=NoQueue())
    key = put_local(broken, b"cannot upload me")
    with pytest.raises(TransferRetry):
        transfer(broken, key, attempts_left=3)
    record = broken.state.get(key)
    assert record is not None and record.state == "queued"
    assert "NoSuchBucket" in record.error
    assert transfer(broken, key, attempts_left=1) == "failed"
    record = broken.state.get(key)
    assert record is not None and record.state == "failed" and record.attempts == 2
    assert "NoSuchBucket" in record.error
    # Failed files are still served from the local disk.
    r = httpx.get(f"{stack.files_url}/media/{key}")
    assert r.status_code == 200 and r.content == b"cannot upload me"
    # ...and retryable: with S3 back, the same record goes remote.
    assert transfer(quiet_node, key) == "remote"


def test_missing_local_copy_fails_for_good(quiet_node: Stores) -> None:
    key = put_local(quiet_node, b"soon gone")
    quiet_node.local.remove(key)
    assert transfer(quiet_node, key, attempts_left=5) == "failed"
    record = quiet_node.state.get(key)
    assert record is not None and "missing" in record.error


@pytest.mark.parametrize("change", [b"+", None], ids=["grown", "cut short"])
def test_a_local_copy_of_another_size_than_its_record_is_not_sent(
    stack: Stack, quiet_node: Stores, change: bytes | None
) -> None:
    data = b"as accepted\n" * 1000
    key = put_local(quiet_node, data)
    with open(quiet_node.local.path_for(key), "r+b") as fh:  # (a disk's or an admin's doing)
        if change:
            fh.seek(0, os.SEEK_END)
            fh.write(change)
        else:
            fh.truncate(len(data) - 1)
    assert transfer(quiet_node, key, attempts_left=1) == "failed"
    record = quiet_node.state.get(key)
    assert record is not None and f"its record says {len(data)}" in record.error
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    assert (
        s3.list_objects_v2(
            Bucket="qproxy-dev", Prefix=RemoteStore(stack.config).object_key(record.object)
        ).get("KeyCount")
        == 0
    )


def test_an_origin_that_does_not_answer_is_retried_not_failed(
    stack: Stack, quiet_node: Stores, tmp_path: object
) -> None:
    # A file committed on another node (its URL: a port nothing listens on), pulled by a
    # worker host without it: even on the last attempt, an unreachable origin is a retry.
    origin = Stores(
        stack.config.replace(
            node_id="web-elsewhere", node_url="http://127.0.0.1:9", local_root=str(tmp_path)
        ),
        queue=NoQueue(),
    )
    key = put_local(origin, b"on a node that is down")
    with pytest.raises(TransferRetry):
        transfer(quiet_node, key, attempts_left=1)
    record = quiet_node.state.get(key)
    assert record is not None and record.state == "queued" and "unreachable" in record.error


def test_verify_catches_a_corrupt_object(stack: Stack, quiet_node: Stores) -> None:
    remote = RemoteStore(stack.config)
    data = b"original bytes"
    sha = hashlib.sha256(data).hexdigest()
    remote.client.put_object(
        Bucket="qproxy-dev", Key="corrupt/x.bin", Body=b"0riginal bytes", Metadata={"sha256": sha}
    )
    with pytest.raises(VerificationFailed, match="no SHA-256 checksum"):
        remote.verify("corrupt/x.bin", size=len(data), sha256=sha)
    remote.client.put_object(
        Bucket="qproxy-dev",
        Key="corrupt/y.bin",
        Body=b"0riginal bytes",
        Metadata={"sha256": sha},
        ChecksumAlgorithm="SHA256",
    )
    with pytest.raises(VerificationFailed, match="does not match"):
        remote.verify("corrupt/y.bin", size=len(data), sha256=sha)
    remote.client.put_object(
        Bucket="qproxy-dev", Key="short/x.bin", Body=b"short", Metadata={"sha256": sha}
    )
    with pytest.raises(VerificationFailed, match="bytes"):
        remote.verify("short/x.bin", size=len(data), sha256=sha)


def test_store_skips_the_head_only_when_s3_confirmed_the_checksum(stack: Stack) -> None:
    import io

    remote = RemoteStore(stack.config.replace(multipart_threshold=6 * 1024 * 1024))
    heads: list[str] = []
    remote.client.meta.events.register(
        "before-call.s3.HeadObject", lambda params, **_: heads.append(params["url_path"])
    )

    def store(name: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        remote.store(name, io.BytesIO(data), size=len(data), sha256=sha, content_type="x/y")

    small = os.urandom(100_000)
    store("confirm/small.bin", small)
    assert heads == []  # S3 answered the PUT with the SHA-256 it computed: verified
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    assert s3.get_object(Bucket="qproxy-dev", Key="confirm/small.bin")["Body"].read() == small

    store("confirm/big.bin", os.urandom(7 * 1024 * 1024))
    assert len(heads) == 1  # multipart: verified by a HEAD

    # A store that reports no checksum, or another one, gets the HEAD (and its checks).
    # (That S3 refuses a body whose SHA-256 differs cannot be shown here: moto stores
    # whatever checksum it is sent.)
    answers = iter([None, "not-the-checksum"])

    def other_answer(parsed: dict[str, object], **_: object) -> None:
        value = next(answers)
        if value is None:
            parsed.pop("ChecksumSHA256", None)
        else:
            parsed["ChecksumSHA256"] = value

    remote.client.meta.events.register("after-call.s3.PutObject", other_answer)
    store("confirm/unreported.bin", small)
    assert len(heads) == 2
    store("confirm/other.bin", small)
    assert len(heads) == 3


def test_state_compare_and_set(quiet_node: Stores) -> None:
    state: StateStore = quiet_node.state
    key = "cas/" + os.urandom(4).hex() + ".txt"
    gen = state.create(key, "local", {"size": 1})
    with pytest.raises(KeyExists, match="already exists in state local"):
        state.create(key, "local", {"size": 2})  # no silent overwrite
    gen2 = state.transition(key, "queued", gen=gen, from_states=("local",))
    assert gen2 == gen + 1
    with pytest.raises(LeaseLost, match="generation"):
        state.transition(key, "transferring", gen=gen)  # stale generation
    with pytest.raises(LeaseLost, match="state"):
        state.transition(key, "remote", from_states=("transferring",))
    state.transition(key, "transferring", gen=gen2, fields={"lease": "t1"})
    with pytest.raises(LeaseLost, match="lease"):
        state.transition(key, "remote", lease="t2")
    assert key in state.keys_in_state("transferring")
    assert key not in state.keys_in_state("queued")


def test_backoff_has_jitter_and_a_cap() -> None:
    config = Config(retry_backoff=2, retry_backoff_max=60, visibility_timeout=3600)
    samples = [backoff(config, 3) for _ in range(200)]
    assert all(8 <= s <= 16 for s in samples)
    assert len(set(samples)) > 100
    assert all(30 <= backoff(config, 20) <= 60 for _ in range(50))


@pytest.fixture(scope="module")
def broken_s3_stack() -> Iterator[Stack]:
    """A stack whose bucket disappears: the real worker must retry, then give up."""
    with _stack(
        QPROXY_TRANSFER_RETRIES="3", QPROXY_RETRY_BACKOFF="0.2", QPROXY_RETRY_BACKOFF_MAX="0.5"
    ) as s:
        boto3.client("s3", endpoint_url=s.url("s3"), region_name="us-east-1").delete_bucket(
            Bucket="qproxy-dev"
        )
        yield s


def test_worker_retries_with_backoff_then_marks_failed(broken_s3_stack: Stack) -> None:
    stack = broken_s3_stack
    r = httpx.post(stack.front + "/upload", files={"file": ("a.txt", b"no bucket", "text/plain")})
    assert r.status_code == 201
    (key,) = r.json()["keys"]
    node = Stores(stack.config)
    deadline = time.monotonic() + 60
    record = node.state.get(key)
    while time.monotonic() < deadline and (record is None or record.state != "failed"):
        time.sleep(0.2)
        record = node.state.get(key)
    assert record is not None and record.state == "failed", record
    assert record.attempts == 3
    assert "NoSuchBucket" in record.error
    served = httpx.get(f"{stack.files_url}/media/{key}")
    assert served.status_code == 200 and served.content == b"no bucket"


def test_delete_removes_every_copy_and_then_the_record(stack: Stack, quiet_node: Stores) -> None:
    from qproxy.worker.sweep import drop_local_copies
    from qproxy.worker.transfer import purge

    key = put_local(quiet_node, b"delete me")
    assert transfer(quiet_node, key) == "remote"
    assert delete(quiet_node, key)
    record = quiet_node.state.get(key)
    assert record is not None and record.state == "deleted"
    assert httpx.get(f"{stack.files_url}/media/{key}").status_code == 404  # at once
    assert purge(quiet_node, key) == "deleted"  # what the worker's delete task runs
    s3 = boto3.client("s3", endpoint_url=stack.url("s3"), region_name="us-east-1")
    assert s3.list_objects_v2(Bucket="qproxy-dev", Prefix=key).get("KeyCount") == 0
    drop_local_copies(quiet_node)  # the local copy is the origin's janitor's
    assert not quiet_node.local.exists(key)
    assert quiet_node.state.get(key) is None  # no copy left: the record goes too


def test_a_late_purge_never_removes_a_new_upload_of_the_name(quiet_node: Stores) -> None:
    """Deleted, then saved again under the same name before the delete task ran (what
    collectstatic does): the purge and the janitor must leave the new file alone."""
    from qproxy.worker.sweep import drop_local_copies
    from qproxy.worker.transfer import purge

    key = put_local(quiet_node, b"old")
    assert delete(quiet_node, key)
    put_local(quiet_node, b"new bytes", key=key)  # a new version of the deleted name
    assert purge(quiet_node, key) == "queued"  # the delete task, late: nothing to remove
    drop_local_copies(quiet_node)
    with quiet_node.local.open(key) as fh:
        assert fh.read() == b"new bytes"


def test_the_janitor_leaves_a_file_saved_again_whose_record_is_not_written_yet(
    quiet_node: Stores,
) -> None:
    """Deleted, then saved again under its name while Redis did not answer that writer: the
    new file is on disk and in the journal only. The janitor, due to drop the deleted
    version's copy, must not take the new one (seen in CI: collectstatic's delete then
    save, the transfer then failing on a missing file), and reconcile brings its record."""
    from qproxy.worker.reconcile import reconcile
    from qproxy.worker.sweep import drop_local_copies

    key = put_local(quiet_node, b"body { color: red }")
    assert delete(quiet_node, key)
    cut_off = Stores(
        dataclasses.replace(quiet_node.config, redis_url=f"redis://127.0.0.1:{free_port()}/0"),
        queue=NoQueue(),
    )
    put_local(cut_off, b"body { color: blue }", key=key)  # on disk; Redis never heard
    record = quiet_node.state.get(key)
    assert record is not None and record.state == "deleted"  # what the janitor reads
    drop_local_copies(quiet_node)
    with quiet_node.local.open(key) as fh:
        assert fh.read() == b"body { color: blue }"
    assert reconcile(quiet_node).from_journal == 1
    restored = quiet_node.state.get(key)
    assert restored is not None and restored.state in ("local", "queued")
    assert restored.local_id == quiet_node.local.identity(key)
    assert transfer(quiet_node, key) == "remote"


def test_janitor_losing_a_race_to_purge_still_lets_the_record_go(
    stack: Stack, tmp_path: Path
) -> None:
    """The janitor read the record, removed the local file, and meanwhile the delete task
    cleared the S3 copy (a newer generation): its mark must still land, or a deleted
    record with no copy anywhere stays forever (seen in a fresh-clone run)."""
    from qproxy.worker.transfer import purge

    node, _ = lone_node(stack, tmp_path)  # the stack's janitor would drop the copy any time
    key = put_local(node, b"raced")
    assert transfer(node, key) == "remote"
    assert delete(node, key)
    node_id = node.config.node_id
    seen = node.state.get(key)  # the janitor's read
    assert seen is not None and seen.has_local and seen.has_remote
    assert node.local.remove(key)  # the janitor's removal
    assert purge(node, key) == "deleted"  # S3 copy gone; the record waits for the mark
    node.state.drop_done(node_id, key, seen)  # the janitor's (now stale) mark
    assert node.state.get(key) is None
    assert key not in node.state.due_drops(node_id, now=time.time() + 3600)


def test_delete_while_local_only(stack: Stack, quiet_node: Stores) -> None:
    from qproxy.worker.sweep import drop_local_copies

    key = put_local(quiet_node, b"never reached s3")
    assert delete(quiet_node, key)
    assert transfer(quiet_node, key) == "deleted"  # a queued transfer finds it deleted
    drop_local_copies(quiet_node)  # the origin node's janitor drops the local copy
    assert not quiet_node.local.exists(key)
    from qproxy.worker.transfer import purge

    assert purge(quiet_node, key) in ("deleted", "gone")
    assert quiet_node.state.get(key) is None


def test_hooks_get_the_whole_record(quiet_node: Stores) -> None:
    CALLS.clear()
    hooked = Stores(
        quiet_node.config.replace(
            on_transferred="tests.hooks.remember", on_failed="tests.hooks.remember"
        ),
        queue=NoQueue(),
    )
    key = put_local(hooked, b"hook me")
    assert transfer(hooked, key) == "remote"
    (record,) = CALLS
    assert record["key"] == key and record["state"] == "remote" and record["size"] == 7
    assert (
        record["url"] == "/media/" + key
        and record["sha256"] == hashlib.sha256(b"hook me").hexdigest()
    )
    broken = Stores(hooked.config.replace(s3_bucket="no-such-bucket"), queue=NoQueue())
    key2 = put_local(broken, b"fail me")
    assert transfer(broken, key2, attempts_left=1) == "failed"
    assert CALLS[-1]["key"] == key2 and CALLS[-1]["state"] == "failed"
    assert "NoSuchBucket" in str(CALLS[-1]["error"])


def test_stored_times_are_never_later_than_the_time() -> None:
    # A drop scheduled "now" must be due now: a time rounded up by half a millisecond made
    # the origin's janitor skip a just-deleted file (seen once in a full run).
    import random

    from qproxy.core.record import timestamp

    rng = random.Random(3)
    for t in [
        1774648635.4029999,
        5.0,
        1764191000.9999,
        *(rng.uniform(1e9, 2e9) for _ in range(20000)),
    ]:
        stored = float(timestamp(t))
        assert stored <= t and t - stored < 0.0011, t
