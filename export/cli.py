"""`scops export`: checkpoint -> bundle, with progress on stderr."""
from __future__ import annotations

import sys

from scops.runtime.errors import ScopsError

FAMILIES = ("minigpt4",)


class ExportError(ScopsError):
    """An export that cannot proceed (bad source, unsupported model, failed parity)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_export(args) -> int:
    from .minigpt4 import export_minigpt4

    if args.family not in FAMILIES:
        raise ExportError(f"unknown family {args.family!r} (have: {', '.join(FAMILIES)})")
    try:
        export_minigpt4(args.src, args.out, args.quant, log=_log)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ExportError(f"export failed: {e}") from None
    return 0
