"""`scops imagine BUNDLE --prompt ... [--image REF] --out img.png`: Emu's image generation.

A progress bar per denoising step on stderr; the picture is written atomically; the last
stderr line gives the seed (re-run with --seed for the same picture) and the timings.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

BAR = 30


def progress_bar(stream=sys.stderr):
    last = [time.perf_counter()]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        step_s, last[0] = now - last[0], now
        filled = BAR * done // total
        rate = f" {step_s:.2f} s/step" if done else ""
        stream.write(f"\r  denoise [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total}{rate}")
        if done == total:
            stream.write("\n")
        stream.flush()
    return show


def cmd_imagine(args) -> int:
    from .errors import OptionError
    from .session import Session

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise OptionError(f"--out {out}: give a .png, .jpg, .webp or .bmp file name")
    if not out.parent.is_dir():
        raise OptionError(f"--out {out}: folder {out.parent} does not exist")
    session = Session.open(args.bundle, n_ctx=args.n_ctx, threads=args.threads, verify=not args.no_verify)
    try:
        img = session.generate_image(args.prompt, images=args.image or (), steps=args.steps, guidance=args.guidance,
                                     height=args.height, width=args.width, seed=args.seed,
                                     progress=progress_bar())
        img.save(out)
    finally:
        session.close()
    t = img.timings
    print(f"wrote {out} ({img.pixels.shape[1]}x{img.pixels.shape[0]}) seed {img.seed}; regress "
          f"{t['regress_ms'] / 1e3:.1f} s, denoise {t['denoise_ms'] / 1e3:.1f} s ({t['s_per_step']:.3f} s/step), "
          f"VAE {t['vae_ms'] / 1e3:.2f} s; not safety-checked", file=sys.stderr)
    return 0


def add_imagine_parser(sub) -> None:
    p = sub.add_parser("imagine", help="Emu: prompt (+ reference pictures) -> a generated picture")
    p.add_argument("bundle", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", metavar="PATH",
                   help="reference picture placed before the prompt (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="where the picture goes (.png, .jpg, ...)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's, 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="initial noise seed (default: random, printed)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    p.set_defaults(fn=cmd_imagine)
