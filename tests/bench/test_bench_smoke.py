"""The benchmarks run (on tiny inputs) so they do not rot. No timing is asserted here."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(
    *args: str, timeout: int, inject_failure: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"BENCH_INJECT_FAILURE": "1"} if inject_failure else {})}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.skipif(
    not (shutil.which("wrk") and shutil.which("curl")), reason="wrk and curl are needed"
)
def test_bench_quick_run(tmp_path: Path) -> None:
    # With a row that breaks on purpose in the middle: it is reported with its error, the
    # others are all measured and kept, and the run says it failed (exit status 1).
    result = _bench("--quick", "--out", str(tmp_path), timeout=300, inject_failure=True)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["failed"] == [
        {
            "row": "injected-failure",
            "error": "RuntimeError: a row that fails on purpose (BENCH_INJECT_FAILURE)",
        }
    ]
    assert "**failed**: RuntimeError" in (tmp_path / "latest.md").read_text()
    # Its servers' logs are kept where the results are (the stack's folder is removed).
    kept = tmp_path / "failed" / "injected-failure"
    assert {"worker.log", "resolver.log", "s3.log"} <= {p.name for p in kept.iterdir()}
    assert f"its servers' logs: {kept}" in result.stdout
    names = [row["name"] for row in data["rows"]]
    for prefix in (
        "upload",
        "memory",
        "request latency",
        "resolve + serve",
        "resolve remote",
        "transfer 8 MiB",
        "tus upload",
        "peer pull, 1 worker",
        "peer pull, 4 worker",
        "transfer 40 files",
        "state",
        "ingest",
        "upload 8 MiB, ASGI (uvicorn) vs a durable copy",
        "server: upload",
        "server: the resolver",
        "worker CPU per 1 MiB file",
        "serve 64 KiB held by another web node",
    ):
        assert any(name.startswith(prefix) for name in names), (prefix, names)
    for row in data["rows"]:
        assert row["cand_median"] is not None and row["cand_median"] > 0, row
    assert (tmp_path / "latest.md").read_text().startswith("Measured ")
    assert (tmp_path / "ratios.png").stat().st_size > 1000

    # The table and the chart can be made again from the results alone.
    table = (tmp_path / "latest.md").read_text()
    (tmp_path / "ratios.png").unlink()
    (tmp_path / "latest.md").unlink()
    redrawn = _bench("--redraw", "--out", str(tmp_path), timeout=60)
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "latest.md").read_text() == table


def test_bench_compares_rows_with_another_revision(tmp_path: Path) -> None:
    # The same row on this tree and on HEAD (a worktree), in turn, side by side.
    result = _bench(
        "--compare", "HEAD", "--quick", "--only", "state", "--out", str(tmp_path), timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "compare.md").read_text()
    assert "ratio on HEAD" in table
    rows = [line for line in table.splitlines() if line.startswith("| state")]
    for line in rows:  # a figure from each tree
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] != "-" and cells[4] != "-", table
    assert rows, table
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["this"] and data["HEAD"]
    # Two turns by default (this, HEAD, HEAD, this): each row's rounds from both, pooled.
    assert "(2 turns each, in turned order, their rounds pooled)" in table
    for tree in ("this", "HEAD"):
        for row in data[tree].values():
            assert row["turns"] == 2 and len(row["cand"]) == 2, row
            if row["baseline"] == "-":  # (the state rows measure no baseline)
                assert row["base"] == [] and row["ratio"] is None, row
                continue
            assert len(row["base"]) == 2, row
            assert row["ratio"] == statistics.median(row["cand"]) / statistics.median(row["base"])


def test_compare_turns_the_order_so_drift_favours_neither_tree() -> None:
    from bench.run import turn_order

    assert turn_order("HEAD", 1) == ["this", "HEAD"]
    assert turn_order("HEAD", 2) == ["this", "HEAD", "HEAD", "this"]
    assert turn_order("HEAD", 3) == ["this", "HEAD", "HEAD", "this", "this", "HEAD"]


def test_compare_refuses_no_turns() -> None:
    result = _bench("--compare", "HEAD", "--turns", "0", timeout=60)
    assert result.returncode == 2 and "--turns must be 1 or more" in result.stderr


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is needed")
def test_a_failed_upload_names_the_server_and_what_it_said(tmp_path: Path) -> None:
    """A row whose upload is refused says which server refused it and its answer (a run
    once failed with only "['500', '0.397374']")."""
    from bench.common import Bench
    from qproxy.dev.devstack import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if subprocess.run(["curl", "-s", "-o", "/dev/null", url]).returncode == 0:
                break
            time.sleep(0.05)
        payload = tmp_path / "f.bin"
        payload.write_bytes(b"x" * 1000)
        b = Bench(quick=True, rounds=1)  # its stack is not started: curl only
        with pytest.raises(AssertionError, match=rf"{url}/upload answered 501 in .* s: .*POST"):
            b.curl_time(url + "/upload", payload)
        shutil.rmtree(b.tmp)
    finally:
        server.kill()
        server.wait()


def test_compare_pools_the_rounds_of_every_turn() -> None:
    from bench.common import Row
    from bench.run import pool

    def row(cand: list[float], base: list[float]) -> dict[str, object]:
        return Row("r", "MiB/s", "c", "b", cand=cand, base=base, target_ratio=0.9).as_dict()

    first = row([1.0, 2.0], [2.0, 2.0])
    assert first["ratio"] == 0.75 and first["met"] is False
    pool(first, row([3.0], [4.0]))
    pool(first, row([5.0], [2.0]))
    assert first["cand"] == [1.0, 2.0, 3.0, 5.0] and first["base"] == [2.0, 2.0, 4.0, 2.0]
    assert first["ratio"] == 2.5 / 2.0 and first["met"] is True
    assert first["cand_spread"] == [1.0, 5.0] and first["turns"] == 3
