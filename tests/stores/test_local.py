"""The local store's temp files: size, SHA-256 and bytes of what was written."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from qproxy.errors import UnsafePath
from qproxy.stores.local import HASH_PIECE, HASH_THREAD_FROM, LocalStore, TempFile


def test_hash_of_a_large_file_written_from_a_reused_buffer(tmp_path: Path) -> None:
    """Past HASH_THREAD_FROM the hash runs beside the writes: a caller that refills the
    same buffer after each write must still get the hash of what it wrote."""
    temp = TempFile(tmp_path / "t")
    chunks = [os.urandom(200_003) for _ in range(3 * HASH_THREAD_FROM // 200_003 + 2)]
    buf = bytearray(len(chunks[0]))
    expected = hashlib.sha256()
    for chunk in chunks:
        buf[:] = chunk
        temp.write(buf)
        buf[:] = bytes(len(buf))  # at once: the hash thread has not run yet
        expected.update(chunk)
    temp.close()
    assert temp.size == (tmp_path / "t").stat().st_size
    assert temp.sha256 == expected.hexdigest()
    assert hashlib.sha256((tmp_path / "t").read_bytes()).hexdigest() == expected.hexdigest()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_hash_of_writes_of_every_size_across_the_hash_pieces(tmp_path: Path, kind: type) -> None:
    """The hash thread takes big writes in pieces of HASH_PIECE bytes: writes smaller than a
    piece, larger than several, and ending on its edges all count once, in order."""
    rng = random.Random(1)
    sizes = [1, HASH_PIECE - 1, 1, HASH_PIECE, 3 * HASH_PIECE + 7, 0, 5]
    sizes += [rng.randrange(1, 2 * HASH_PIECE) for _ in range(20)] + [HASH_PIECE // 2] * 4
    temp = TempFile(tmp_path / "t")
    expected = hashlib.sha256()
    for size in sizes:
        chunk = rng.randbytes(size)
        temp.write(kind(chunk))
        expected.update(chunk)
    temp.close()
    assert temp.size == sum(sizes) == (tmp_path / "t").stat().st_size
    assert temp.sha256 == expected.hexdigest()
    assert hashlib.sha256((tmp_path / "t").read_bytes()).hexdigest() == expected.hexdigest()


def test_a_hash_that_falls_behind_holds_a_few_mib_whatever_the_chunking(tmp_path: Path) -> None:
    """A server handing the app 4 MiB chunks and a busy machine (the hash thread gets little
    time): what waits to be hashed stays bounded in bytes, not in chunks."""

    class SlowHash:
        def __init__(self) -> None:
            self.inner = hashlib.sha256()

        def update(self, data: bytes) -> None:
            time.sleep(len(data) / (100 * 1024 * 1024))  # 100 MiB/s: slower than the writes
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    temp = TempFile(tmp_path / "t")
    temp._hash = SlowHash()  # type: ignore[assignment]
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        for _ in range(24):
            chunk = os.urandom(4 * 1024 * 1024)
            expected.update(chunk)
            temp.write(chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    temp.close()
    assert temp.sha256 == expected.hexdigest()
    # The chunk written, and the two that 2 MiB of queued pieces can span: never ~32 chunks.
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_discard_of_a_large_file_leaves_nothing(tmp_path: Path) -> None:
    temp = TempFile(tmp_path / "t")
    for _ in range(4):
        temp.write(os.urandom(HASH_THREAD_FROM // 2))
    temp.discard()
    assert list(tmp_path.iterdir()) == []


# -- symlinks under the root are refused, never followed -------------------------------------


def _store(tmp_path: Path) -> tuple[LocalStore, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "root")
    store.ensure()
    return store, outside


def _temp(store: LocalStore, data: bytes = b"upload") -> TempFile:
    temp = store.create_temp()
    temp.write(data)
    temp.close()
    return temp


def test_a_linked_date_folder_is_not_followed(tmp_path: Path) -> None:
    store, outside = _store(tmp_path)
    os.symlink(outside, store.root / "2026")
    temp = _temp(store)
    with pytest.raises(UnsafePath):
        store.commit(temp, "2026/12/01/a.txt")
    assert list(outside.iterdir()) == []


def test_a_linked_temp_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root" / ".qp").mkdir(parents=True)
    os.symlink(outside, tmp_path / "root" / ".qp" / "tmp")
    store = LocalStore(tmp_path / "root")
    with pytest.raises(UnsafePath):
        store.create_temp()
    assert list(outside.iterdir()) == []


def test_a_planted_link_is_not_a_stored_file(tmp_path: Path) -> None:
    store, outside = _store(tmp_path)
    secret = outside / "secret.txt"
    secret.write_text("not yours")
    (store.root / "2026").mkdir()
    os.symlink(secret, store.root / "2026" / "x.txt")
    assert not store.exists("2026/x.txt")
    with pytest.raises(UnsafePath):
        store.open("2026/x.txt")
    assert list(store.stored_keys()) == []
    assert store.remove("2026/x.txt")  # removes the link itself
    assert secret.read_text() == "not yours"


def test_commit_open_remove_round_trip(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    store.commit(_temp(store, b"bytes"), "2026/12/01/a.txt")
    assert store.exists("2026/12/01/a.txt") and store.size("2026/12/01/a.txt") == 5
    with store.open("2026/12/01/a.txt") as fh:
        assert fh.read() == b"bytes"
    assert list(store.stored_keys()) == ["2026/12/01/a.txt"]
    assert store.remove("2026/12/01/a.txt")
    assert not (store.root / "2026").exists()  # empty date folders tidied
    assert not store.remove("2026/12/01/a.txt")


def test_a_removal_naming_a_file_leaves_a_newer_one_saved_under_its_name(tmp_path: Path) -> None:
    store, _ = _store(tmp_path)
    key = "2026/12/01/site.css"
    old = store.commit(_temp(store, b"old"), key)
    new = store.commit(_temp(store, b"new"), key)  # saved again: another file
    assert old != new and store.identity(key) == new
    assert not store.remove(key, expect=old)  # what a janitor with an old record asks
    with store.open(key) as fh:
        assert fh.read() == b"new"
    assert store.remove(key, expect=new)
    assert not store.exists(key)


def test_a_removal_waits_for_a_file_being_placed_under_its_name(tmp_path: Path) -> None:
    """The janitor checks which file is there, then unlinks: a writer's rename between the
    two would lose the new file. The writer's placing holds the key's lock."""
    store, _ = _store(tmp_path)
    key = "2026/12/01/site.css"
    old = store.commit(_temp(store, b"old"), key)
    newer = _temp(store, b"new")
    removed: list[bool] = []
    janitor = threading.Thread(target=lambda: removed.append(store.remove(key, expect=old)))
    with store._locked(key, fcntl.LOCK_SH):  # a writer, between its checks and its rename
        janitor.start()
        janitor.join(0.3)
        assert janitor.is_alive() and removed == []  # held off
        os.replace(newer.path, store.path_for(key))  # the writer's rename
    janitor.join(10)
    assert removed == [False]
    with store.open(key) as fh:
        assert fh.read() == b"new"


def test_committing_into_a_folder_the_janitor_just_tidied_away(tmp_path: Path) -> None:
    """The janitor removes a date folder's last file and the folder with it while a writer
    has that folder open for its rename: the writer makes it again."""
    store, _ = _store(tmp_path)
    store.commit(_temp(store, b"first"), "2026/12/01/a.txt")
    real_parent = store._parent

    def parent_then_tidied(key: str, *, create: bool = False) -> tuple[int, str]:
        found = real_parent(key, create=create)
        if key.endswith("b.txt") and store.exists("2026/12/01/a.txt"):
            assert store.remove("2026/12/01/a.txt")  # removes 2026/12/01, 2026/12, 2026
        return found

    store._parent = parent_then_tidied  # type: ignore[method-assign]
    store.commit(_temp(store, b"second"), "2026/12/01/b.txt")
    with store.open("2026/12/01/b.txt") as fh:
        assert fh.read() == b"second"
