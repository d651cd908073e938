"""`scops export`: checkpoint -> bundle, with progress on stderr."""
from __future__ import annotations

import sys

from scops.runtime.errors import ExportError, ScopsError
from scops.runtime.families import family

__all__ = ["ExportError", "run_export"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_export(args) -> int:
    fam = family(args.family)
    options = {"log": _log, "encoder_precision": getattr(args, "encoder_precision", "fp32")}
    if getattr(args, "llm", None):
        options["llm"] = str(args.llm)
    if getattr(args, "grounding", None) or getattr(args, "sam", None):
        if args.family != "bubogpt":
            raise ExportError("--grounding / --sam are for --family bubogpt (its RAM + GroundingDINO + SAM stages)")
        options.update(grounding=args.grounding, sam=args.sam)
    try:
        fam.export_fn()(args.src, args.out, args.quant, **options)
    except ScopsError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError, RuntimeError) as e:
        # what a source folder can be wrong about: name it, in one line
        raise ExportError(f"export failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return 0
