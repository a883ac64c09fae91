"""The local store's temp files: size, SHA-256 and bytes of what was written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qproxy.stores.local import HASH_THREAD_FROM, TempFile


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


def test_discard_of_a_large_file_leaves_nothing(tmp_path: Path) -> None:
    temp = TempFile(tmp_path / "t")
    for _ in range(4):
        temp.write(os.urandom(HASH_THREAD_FROM // 2))
    temp.discard()
    assert list(tmp_path.iterdir()) == []
