"""`make bench`: every figure a ratio against a baseline measured in the same run.

Each row runs its candidate and its baseline alternately for several rounds on this machine
and reports the medians, their ratio and the spread (min-max). Results go to
bench/results/latest.json and latest.md, charts to bench/results/*.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import RESULTS, Bench
from bench.report import redraw, write_results
from bench.resolver import resolve_rows
from bench.servers import servers_row
from bench.state import state_row
from bench.transfer import peer_pull_row, transfer_many_row, transfer_row
from bench.uploads import latency_row, memory_row, tus_row, upload_rows
from qproxy.dev.devstack import AWS_TEST_ENV

ROWS: dict[str, Callable[[Bench], None]] = {
    "upload": upload_rows,
    "memory": memory_row,
    "latency": latency_row,
    "tus": tus_row,
    "resolve": resolve_rows,
    "servers": servers_row,
    "transfer": transfer_row,
    "transfer-many": transfer_many_row,
    "peer-pull": peer_pull_row,
    "state": state_row,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="draw the chart again from latest.json, measure nothing",
    )
    parser.add_argument("--only", action="append", choices=sorted(ROWS), help="run only these rows")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where results go (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.redraw:
        redraw(args.out)
        return 0
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
                for left in set(b.stack.services) - extra:  # its servers, still running
                    b.stop(left)
            # Written after every row: a run that dies keeps what it measured.
            write_results(b, started, args.out, charts=False)
        write_results(b, started, args.out)
    subprocess.run(["rm", "-rf", str(b.tmp)], check=False)
    return 1 if b.failed else 0


def _injected(b: Bench) -> None:
    raise RuntimeError("a row that fails on purpose (BENCH_INJECT_FAILURE)")
