"""`scops bench`: shape-faithful benchmarks against peers (filled in by the bench issue)."""
from __future__ import annotations


def add_bench_parser(sub) -> None:
    """Register `scops bench --shape NAME ...` on the CLI's subparsers."""
