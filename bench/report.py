"""Writing the results: latest.json, latest.md and the chart of ratios."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.common import (
    Bench,
    Row,
)


def write_results(b: Bench, started: float, out: Path, *, charts: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "rounds": b.rounds,
        "quick": b.quick,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "latest.json").write_text(
        json.dumps(
            {"meta": meta, "rows": [r.as_dict() for r in b.rows], "failed": b.failed}, indent=2
        )
    )
    lines = _table(meta, b.rows, b.failed)
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    if charts:
        print("\n".join(lines))
        _charts(b.rows, _title(meta), out)


def _table(meta: dict[str, Any], rows: list[Row], failed: list[dict[str, str]]) -> list[str]:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, "
        f"{meta['rounds']} rounds each, more where a row says so (medians; spread min-max).",
        "",
        "| what | candidate | baseline | candidate | baseline | ratio | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = _cell(r.cand, r.unit)
        base = _cell(r.base, r.unit) if r.base else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        verdict = "" if r.met is None else ("met" if r.met else "**missed**")
        note = f" {r.note}" if r.note else ""
        lines.append(
            f"| {r.name} | {r.candidate} | {r.baseline} | {c} | {base} | {ratio} | {r.target} | {verdict}{note} |"
        )
    for failure in failed:
        lines.append(
            f"| {failure['row']} | - | - | - | - | - | - | **failed**: {failure['error']} |"
        )
    return lines


def _cell(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    digits = 1 if max(values) < 10 else 0  # (ms of CPU per file: 3.2-3.4, not 3-3)
    spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{med:.1f} {unit}{spread}"


def _charts(rows: list[Row], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.ratio is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.42 * len(rows)))
    names = [r.name for r in rows]
    ratios = [r.ratio or 0 for r in rows]
    colors = ["#999" if r.met is None else "#2a7" if r.met else "#c33" for r in rows]
    ax.barh(names, ratios, color=colors)
    for i, r in enumerate(rows):
        ax.text((r.ratio or 0) + 0.03, i, f"{r.ratio:.2f}x", va="center", fontsize=8)
        if r.target_ratio:
            ax.plot(
                [r.target_ratio, r.target_ratio], [i - 0.4, i + 0.4], color="black", linewidth=2
            )
    ax.axvline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel(
        "candidate / baseline, measured in the same run\n"
        "black: target; green met, red missed, grey no target; latency: lower is better"
    )
    ax.set_title(title, fontsize=10)
    fig.savefig(out / "ratios.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def redraw(out: Path) -> None:
    """The table and the chart again from ``latest.json`` (no measuring)."""
    data = json.loads((out / "latest.json").read_text())
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
    (out / "latest.md").write_text(
        "\n".join(_table(data["meta"], rows, data.get("failed", []))) + "\n"
    )
    _charts(rows, _title(data["meta"]), out)


def _title(meta: dict[str, Any]) -> str:
    return f"qproxy benchmarks, {meta['date']}, {meta['machine']}, Python {meta['python']}"
