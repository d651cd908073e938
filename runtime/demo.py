"""`scops demo`: build the tiny bundle into a cache dir on first use, ask one question."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

QUESTION = "What is in this picture?"


def cache_root(override: Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    if os.environ.get("SCOPS_CACHE"):
        return Path(os.environ["SCOPS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "scops"


def sample_photo(root: Path) -> Path:
    """A real photo shipped with scikit-image (Chelsea the cat), saved once as PNG."""
    path = root / "chelsea.png"
    if not path.exists():
        from PIL import Image
        from skimage import data
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(data.chelsea()).save(tmp)
        os.replace(tmp, path)
    return path


def ensure_bundle(root: Path) -> Path:
    bundle = root / "minigpt4-tiny.bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    from scops.export.fixtures import build_minigpt4_tiny
    from scops.export.minigpt4 import export_minigpt4

    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    log(f"demo: first run, building the tiny MiniGPT-4-shaped bundle in {root}")
    src = build_minigpt4_tiny(root / "minigpt4-tiny-src")
    return export_minigpt4(str(src), bundle, "Q4_K_M", log=log)


def run_demo(args) -> int:
    from .cli import GIBBERISH_NOTE, format_timings
    from .session import Session

    root = cache_root(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(root)
    photo = sample_photo(root)
    t0 = time.perf_counter()
    with Session.open(bundle) as session:
        t_open = (time.perf_counter() - t0) * 1e3
        reply = session.chat().send(QUESTION, images=[photo], temperature=0.0, max_tokens=32)
        print(f"image:    {photo}")
        print(f"question: {QUESTION}")
        print("answer:   ", end="", flush=True)
        for piece in reply:
            print(piece, end="", flush=True)
        print()
        print(GIBBERISH_NOTE)
        print(f"timings:  open {t_open:.0f} ms, {format_timings(reply.timings)} "
              f"({reply.timings.get('n_tokens', 0)} tokens, finish: {reply.finish_reason})")
    return 0
