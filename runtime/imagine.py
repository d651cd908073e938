"""Image generation with Emu: prompt (+ reference pictures) -> 32 regressed embeddings -> picture.

    img = session.generate_image("An image of a dog wearing a pair of glasses.", seed=1)
    img.save("dog.png")

The prompt goes through the LLM as the pretrained Emu reads it (Emu1/models/pipeline.py):
reference pictures first, each `[IMG]` + its 32 rows + `[/IMG]`, then the text, then `[IMG]`;
the LLM regresses 32 embeddings (runtime/regress.py). The empty prompt goes through the same
loop (its rows are computed once per session) for classifier-free guidance, then the UNet and
the VAE decoder draw the picture (runtime/diffusion.py).

Safety: the original runs Stable Diffusion's safety checker (a CLIP ViT-L/14 classifier) and
refuses to save a flagged picture. scops does not: the checker is a content policy of the
original demo, not part of the model; it would add a 1.2 GB encoder to every bundle, and an
edge runtime leaves that policy to the application. GeneratedImage.safety_checked is False
so applications can tell; docs/emu.md says the same.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from .errors import OptionError, UnsupportedModality
from .template import MediaRef, Special, strip_around_specials, to_cells

MAX_SIDE = 2048                     # pixels; SD 1.x is trained at 512


@dataclass(frozen=True)
class ImageOptions:
    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    seed: int | None = None


@dataclass
class GeneratedImage:
    pixels: np.ndarray              # [H, W, 3] uint8
    seed: int
    timings: dict
    embeddings: np.ndarray          # the 32 regressed rows that conditioned the UNet [32, n_embd]
    safety_checked: bool = False    # see the module docstring
    options: ImageOptions | None = None   # what drew it (steps, guidance, size; seed as used above)

    def save(self, path) -> None:
        """Write the picture (format from the suffix) atomically."""
        import os
        import tempfile
        from pathlib import Path

        from PIL import Image

        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                   suffix=path.suffix or ".png")
        os.close(fd)
        try:
            Image.fromarray(self.pixels).save(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def png(self) -> bytes:
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(self.pixels).save(buf, format="PNG")
        return buf.getvalue()


class Imaginer:
    """Per-session state: the regression head, the image decoder, the empty prompt's rows."""

    def __init__(self, session):
        from .diffusion import ImageDecoder
        from .project import load_projector

        gen = session.bundle.manifest["generation"]
        self.session = session
        self.gen = gen
        self.head = load_projector(session.bundle, gen["regress_head"], session.opts.projector_backend,
                                   session.opts.threads)
        self.decoder = ImageDecoder(session.bundle, session.providers, session.opts.threads)
        self.special = {t: Special(t, int(i)) for t, i in gen["special"].items()}
        self.uncond: np.ndarray | None = None
        from .pndm import PNDM
        self.max_steps = PNDM(self.decoder.scheduler).max_steps()      # 999 for SD's leading + offset 1

    def close(self) -> None:
        self.head.close()

    def check(self, prompt, images, o: ImageOptions) -> None:
        size = int(self.gen["size_multiple"])
        checks = [
            (isinstance(prompt, str), "prompt must be a string"),
            (isinstance(prompt, str) and (prompt.strip() or images), "the prompt is empty (give text, or a picture)"),
            (isinstance(o.steps, int) and 1 <= o.steps <= self.max_steps,
             f"steps must be an integer in 1..{self.max_steps}"),
            (isinstance(o.guidance, (int, float)) and math.isfinite(o.guidance) and o.guidance > 0,
             "guidance must be a number > 0 (<= 1 turns classifier-free guidance off)"),
        ]
        for side in ("height", "width"):
            v = getattr(o, side)
            checks.append((isinstance(v, int) and size <= v <= MAX_SIDE and v % size == 0,
                           f"{side} must be a multiple of {size} in {size}..{MAX_SIDE} pixels, not {v!r}"))
        checks.append((o.seed is None or isinstance(o.seed, int) and 0 <= o.seed < 2 ** 63,
                       "seed must be a non-negative integer"))
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)

    def embed(self, prompt: str, refs: list[MediaRef], media: dict, cancel=None) -> np.ndarray:
        """The 32 regressed rows of `refs` pictures followed by `prompt`. With every LLM sequence
        busy it waits for a reply to end (SlotsBusy after the scheduler's BORROW_WAIT_S)."""
        from .regress import regress

        s, llm = self.session, self.session.llm
        segments: list = []
        for ref in refs:
            segments += [self.special["[IMG]"], ref, self.special["[/IMG]"]]
        segments.append(prompt)                              # user text: never parsed for specials
        strip_around_specials(segments)                      # as the original's tokenizer, [IMG] follows
        segments[-1] = segments[-1].rstrip()
        cells = to_cells([p for p in segments if not isinstance(p, str) or p], llm.tokenize,
                         lambda r: len(media[r.key][1]), "first")

        def fill(out, key, start):
            modality, rows = media[key]
            s.projectors[modality].forward(rows[start:start + len(out)], out=out)
        with s.scheduler.borrow(cancelled=cancel) as seq:   # no chat step runs on the LLM meanwhile
            return regress(llm, cells, self.special[self.gen["boi"]].id, self.head, int(self.gen["n_embeds"]),
                           fill, seq=seq)

    def generate(self, prompt: str, images=(), options: ImageOptions = ImageOptions(),
                 latents: np.ndarray | None = None, progress=None, cancel=None) -> GeneratedImage:
        images = [images] if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__") else list(images)
        self.check(prompt, images, options)
        s = self.session
        t0 = time.perf_counter()
        refs, media = [], {}
        if images:
            refs, _ = s.encode_media("image", images)
            media = {r.key: s.media_rows(r.key) for r in refs}
        t1 = time.perf_counter()
        cond = self.embed(prompt, refs, media, cancel)
        uncond = None
        if options.guidance > 1:                     # pipeline.py: do_classifier_free_guidance
            if self.uncond is None:
                self.uncond = self.embed("", [], {}, cancel)
            uncond = self.uncond
        t2 = time.perf_counter()
        seed = options.seed if options.seed is not None else int.from_bytes(__import__("os").urandom(4), "little")
        shape = self.decoder.latent_shape(options.height, options.width)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        elif tuple(latents.shape) != shape:
            raise OptionError(f"latents must have shape {shape}, not {tuple(latents.shape)}")
        x = self.decoder.sample(cond, uncond, options.steps, options.guidance, latents, progress, cancel)
        pixels = self.decoder.decode(x)
        timings = {"encode_ms": (t1 - t0) * 1e3, "regress_ms": (t2 - t1) * 1e3, **self.decoder.timings,
                   "total_ms": (time.perf_counter() - t0) * 1e3}
        timings["s_per_step"] = timings["denoise_ms"] / 1e3 / options.steps
        return GeneratedImage(pixels, seed, timings, cond, options=dataclasses.replace(options, seed=seed))


def generate_image(session, prompt: str, images=(), latents=None, progress=None, cancel=None,
                   **options) -> GeneratedImage:
    if "generation" not in session.bundle.manifest:
        raise UnsupportedModality(f"this {session.bundle.family} bundle cannot generate pictures (a chat model; "
                                  "export the pretrained Emu, e.g. --from BAAI/Emu/pretrain, for generation)")
    names = {f.name for f in dataclasses.fields(ImageOptions)}
    unknown = set(options) - names
    if unknown:
        raise OptionError(f"unknown image option(s): {', '.join(sorted(unknown))}")
    gen = session.bundle.manifest["generation"]
    defaults = {k: v for k, v in gen.get("defaults", {}).items() if k in names}
    opts = ImageOptions(**{**defaults, **{k: v for k, v in options.items() if v is not None}})
    if getattr(session, "_imaginer", None) is None:
        session._imaginer = Imaginer(session)
    return session._imaginer.generate(prompt, images, opts, latents, progress, cancel)
