"""`scops export`: checkpoint -> bundle, with progress on stderr."""
from __future__ import annotations

import sys

from scops.runtime.errors import ScopsError

FAMILIES = ("minigpt4", "instructblip", "pandagpt", "bubogpt")


class ExportError(ScopsError):
    """An export that cannot proceed (bad source, unsupported model, failed parity)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_export(args) -> int:
    from .bubogpt import export_bubogpt
    from .instructblip import export_instructblip
    from .minigpt4 import export_minigpt4
    from .pandagpt import export_pandagpt

    exporters = {"minigpt4": export_minigpt4, "instructblip": export_instructblip, "pandagpt": export_pandagpt,
                 "bubogpt": export_bubogpt}
    if args.family not in exporters:
        raise ExportError(f"unknown family {args.family!r} (have: {', '.join(FAMILIES)})")
    try:
        exporters[args.family](args.src, args.out, args.quant, log=_log,
                               encoder_precision=getattr(args, "encoder_precision", "fp32"))
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ExportError(f"export failed: {e}") from None
    return 0
