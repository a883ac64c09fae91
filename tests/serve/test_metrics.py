"""/metrics with prometheus_client: every process of a node summed, each metric with its
HELP, the names the Grafana dashboard in deploy/ uses."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from qproxy.compose import Stores
from qproxy.dev.devstack import Stack, free_port
from tests.conftest import wait_state

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "qproxy-dashboard.json"


def scrape(url: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], set[str]]:
    """The samples (by name and labels), and qproxy's families that have no HELP."""
    text = httpx.get(url + "/metrics", timeout=30).text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    unhelped = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("qproxy_") and not family.documentation:
            unhelped.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, unhelped


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_an_upload_shows_in_every_metric_it_should(stack: Stack) -> None:
    resolver = stack.url("resolver")
    before, _ = scrape(resolver)
    data = b"counted bytes\n" * 1000
    answer = httpx.post(f"{stack.front}/upload", files={"file": ("m.bin", data)}, timeout=30)
    assert answer.status_code == 201, answer.text
    (key,) = answer.json()["keys"]
    wait_state(Stores(stack.config), key, "remote")
    assert httpx.get(f"{stack.files_url}/media/{key}", follow_redirects=True).content == data
    after, unhelped = scrape(resolver)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The app server's process, the worker's and the resolver's: one sum.
    assert grew("qproxy_uploads_total", outcome="kept") == 1
    assert grew("qproxy_upload_bytes_total", outcome="kept") == len(data)
    assert grew("qproxy_upload_duration_seconds_count") == 1
    assert grew("qproxy_transfers_total", outcome="remote") == 1
    assert grew("qproxy_s3_sent_bytes_total") == len(data)
    assert grew("qproxy_transfer_size_bytes_count") == 1
    assert grew("qproxy_transfer_duration_seconds_count") >= 1
    assert sum(grew("qproxy_resolve_total", decision=d) for d in ("local", "redirect")) >= 1
    assert grew("qproxy_resolve_duration_seconds_count") >= 1
    # Read from Redis at scrape time.
    assert ("qproxy_records", (("state", "local"),)) in after
    assert value(after, "qproxy_state_reachable") == 1
    assert ("qproxy_oldest_unsent_seconds", ()) in after
    # Every family has its HELP.
    assert unhelped == set()


def test_a_counter_never_goes_back_whichever_process_answers(stack: Stack) -> None:
    # Two resolver processes behind one port: each scrape may reach either.
    port = free_port()
    name = f"resolver-2w-{port}"
    argv = [sys.executable, "-m", "qproxy", "resolver", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "2", "--server", "uvicorn"]  # fmt: skip
    stack.spawn(name, argv)
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_for(name, lambda: httpx.get(url + "/healthz").status_code == 200)
        start, _ = scrape(url)
        for i in range(40):
            with httpx.Client() as fresh:  # a new connection each: both processes answer
                assert fresh.get(f"{url}/resolve/2026/01/01/none-{i}.txt").status_code == 404
        seen = []
        for _ in range(12):
            with httpx.Client() as fresh:
                text = fresh.get(url + "/metrics").text
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            seen.append(value(samples, "qproxy_resolve_total", decision="missing"))
        base = value(start, "qproxy_resolve_total", decision="missing")
        assert seen == [seen[0]] * len(seen) and seen[0] >= base + 40, (base, seen)

        # Answers are added up per turn of each process's event loop (200 at once here):
        # every one is counted, in the counter and in the histogram, by the next scrape.
        async def burst() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                tasks = (client.get(f"/resolve/2026/01/01/burst-{i}.txt") for i in range(200))
                assert {r.status_code for r in await asyncio.gather(*tasks)} == {404}

        before, _ = scrape(url)
        asyncio.run(burst())
        after, _ = scrape(url)

        def grew(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert grew("qproxy_resolve_total", decision="missing") == 200
        assert grew("qproxy_resolve_duration_seconds_count") == 200
        assert grew("qproxy_resolve_duration_seconds_bucket", le="+Inf") == 200
        assert 0 < grew("qproxy_resolve_duration_seconds_sum") < 200 * 2.5
    finally:
        stack.services.pop(name).stop()


def test_every_dashboard_query_names_a_real_metric(stack: Stack) -> None:
    text = httpx.get(stack.url("resolver") + "/metrics", timeout=30).text
    known = set()
    for family in text_string_to_metric_families(text):
        known.add(family.name)  # (a labelled counter not counted yet has no samples)
        known |= {sample.name for sample in family.samples}
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        used = set(re.findall(r"\bqproxy_[a-z0-9_]+\b", expr))
        assert used, expr
        for name in used:
            family = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert name in known or family in known, (expr, name)
