"""`make bench`: every figure a ratio against a baseline measured in the same run.

Each row runs its candidate and its baseline alternately for several rounds on this machine
and reports the medians, their ratio and the spread (min-max). Results go to
bench/results/latest.json and latest.md, charts to bench/results/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Bench, Row
from bench.report import redraw, write_results
from bench.resolver import peer_serve_row, resolve_rows
from bench.servers import servers_row
from bench.state import state_row
from bench.transfer import peer_pull_row, transfer_many_row, transfer_row, worker_cpu_row
from bench.uploads import latency_row, memory_row, tus_row, upload_rows
from qproxy.dev.devstack import AWS_TEST_ENV

ROWS: dict[str, Callable[[Bench], None]] = {
    "upload": upload_rows,
    "memory": memory_row,
    "latency": latency_row,
    "tus": tus_row,
    "resolve": resolve_rows,
    "peer-serve": peer_serve_row,
    "servers": servers_row,
    "transfer": transfer_row,
    "transfer-many": transfer_many_row,
    "peer-pull": peer_pull_row,
    "worker-cpu": worker_cpu_row,
    "state": state_row,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="write the table and draw the chart again from latest.json, measure nothing",
    )
    parser.add_argument("--only", action="append", choices=sorted(ROWS), help="run only these rows")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where results go (default: bench/results)"
    )
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="also run the rows on git revision REV (a worktree of it), row by row in turn "
        "with this tree's, and print them side by side (compare.md in --out)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=2,
        metavar="N",
        help="with --compare: run each row N times on each tree, the order turned each time "
        "(this, REV, REV, this, ...), so a machine that speeds up or slows down during the "
        "run favours neither; the rounds of every turn are pooled (default: 2)",
    )
    args = parser.parse_args(argv)
    if args.redraw:
        redraw(args.out)
        return 0
    if args.compare:
        if args.turns < 1:
            parser.error("--turns must be 1 or more")
        names = args.only or list(ROWS)
        return compare(args.compare, names, args.out, quick=args.quick, turns=args.turns)
    rounds = 1 if args.quick else args.rounds
    started = time.monotonic()
    for name, value in AWS_TEST_ENV.items():  # moto's throwaway credentials
        os.environ.setdefault(name, value)
    b = Bench(quick=args.quick, rounds=rounds)
    print(f"starting the stack in {b.tmp}", flush=True)
    names = list(args.only or ROWS)
    if os.environ.get("BENCH_INJECT_FAILURE"):  # (the smoke test: a row that breaks)
        names.insert(len(names) // 2, "injected-failure")
    with b.stack:
        for name in names:
            print(f"[{name}]", flush=True)
            extra = set(b.stack.services)
            try:
                ROWS.get(name, _injected)(b)
            except Exception as exc:  # a row that breaks is reported, and the rest go on
                error = f"{type(exc).__name__}: {exc}"[:500]
                print(f"  {name}: FAILED: {error}", flush=True)
                b.failed.append({"row": name, "error": error})
                kept = keep_logs(b, Path(args.out) / "failed" / name)
                print(f"  its servers' logs: {kept}", flush=True)
                for left in set(b.stack.services) - extra:  # its servers, still running
                    b.stop(left)
            # Written after every row: a run that dies keeps what it measured.
            write_results(b, started, args.out, charts=False)
        write_results(b, started, args.out)
    subprocess.run(["rm", "-rf", str(b.tmp)], check=False)
    return 1 if b.failed else 0


def keep_logs(b: Bench, folder: Path) -> Path:
    """The stack's logs as they are now (every server's, those a row started too), copied
    to ``folder``: a row that failed is explained there, not in a folder removed at the end."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if b.stack.base is not None:
        for log in b.stack.base.glob("*.log"):
            shutil.copy(log, folder / log.name)
    return folder


def _injected(b: Bench) -> None:
    raise RuntimeError("a row that fails on purpose (BENCH_INJECT_FAILURE)")


def pool(into: dict[str, Any], row: dict[str, Any]) -> None:
    """``row``'s rounds added to ``into`` (the same row from an earlier turn): its medians,
    spreads and ratio then say all the turns."""
    pooled = Row(
        **{f.name: into[f.name] for f in dataclasses.fields(Row) if f.name not in ("cand", "base")},
        cand=[*into["cand"], *row["cand"]],
        base=[*into["base"], *row["base"]],
    )
    into.update(pooled.as_dict())
    into["turns"] = into.get("turns", 1) + 1


def turn_order(rev: str, turns: int) -> list[str]:
    """Which tree runs a row when: this, REV, then REV, this, ... (drift cancels out)."""
    order = []
    for turn in range(turns):
        pair = ["this", rev]
        order += pair if turn % 2 == 0 else pair[::-1]
    return order


def compare(rev: str, names: list[str], out: Path, *, quick: bool, turns: int = 2) -> int:
    """Each row on this tree and on ``rev``, one after the other, a row at a time (so both
    see the machine in the same state), ``turns`` times in turned order, side by side."""
    root = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="qproxy-bench-compare-"))
    other = work / "tree"
    subprocess.run(
        ["git", "-C", str(root), "worktree", "add", "--detach", str(other), rev],
        check=True,
        capture_output=True,
    )
    results: dict[str, dict[str, dict[str, Any]]] = {"this": {}, rev: {}}
    try:
        trees = {"this": root, rev: other}
        for name in names:
            for turn, label in enumerate(turn_order(rev, turns)):
                tree = trees[label]
                where = work / label.replace("/", "_") / name / str(turn)
                argv = [sys.executable, "-m", "bench", "--only", name, "--out", str(where)]
                print(f"[{name}] on {label}", flush=True)
                subprocess.run([*argv, *(["--quick"] if quick else [])], cwd=tree, check=False)
                found = where / "latest.json"
                if found.exists():
                    for row in json.loads(found.read_text())["rows"]:
                        if row["name"] in results[label]:
                            pool(results[label][row["name"]], row)
                        else:
                            results[label][row["name"]] = row
    finally:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "remove", "--force", str(other)],
            check=False,
            capture_output=True,
        )
    lines = [
        f"Each row on this tree and on {rev}, in turn, in one run"
        + (f" ({turns} turns each, in turned order, their rounds pooled)." if turns > 1 else "."),
        "",
        f"| what | ratio here | ratio on {rev} | candidate here | candidate on {rev} | change |",
        "|---|---|---|---|---|---|",
    ]
    for row_name, here in results["this"].items():
        there = results[rev].get(row_name, {})

        def ratio(row: dict[str, Any]) -> str:
            return "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"

        def median(row: dict[str, Any]) -> float | None:
            values = row.get("cand") or []
            return statistics.median(values) if values else None

        a, b = median(here), median(there)
        change = "-" if not a or not b else f"{(a / b - 1) * 100:+.0f}%"
        unit = here.get("unit", "")
        shown = [f"{v:.1f} {unit}" if v is not None else "-" for v in (a, b)]
        lines.append(
            f"| {row_name} | {ratio(here)} | {ratio(there)} | {shown[0]} | {shown[1]} | {change} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if results["this"] and results[rev] else 1
