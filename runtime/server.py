"""`scops serve`: OpenAI-compatible local server (filled in by the serve issue)."""
from __future__ import annotations


def add_serve_parser(sub) -> None:
    """Register `scops serve BUNDLE ...` on the CLI's subparsers."""
