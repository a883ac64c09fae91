"""Hooks the tests configure by dotted path (QPROXY_ON_TRANSFERRED / QPROXY_ON_FAILED)."""

from __future__ import annotations

CALLS: list[dict[str, object]] = []


def remember(record: dict[str, object]) -> None:
    CALLS.append(record)
