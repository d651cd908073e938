"""`POST /v1/images/generations` of `scops serve`: Emu draws a picture (runtime/imagine.py).

One picture at a time (the UNet runs on every core); a request holds a place in the
server's queue like a chat request (429 past it). The body is read within the server's
limits, parsed by runtime/images_api.py (one 400 naming the field), a reference picture is
decoded within --max-image-pixels, and the generation runs on a worker thread; a client
that leaves cancels it at the next denoising step. A bundle that cannot draw (Emu-I, any
chat model) answers 400 `model_cannot_generate` before anything is queued.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

import anyio
from starlette.requests import Request
from starlette.responses import Response

from .errors import ScopsError
from .images_api import ImageJob, ImageLimits, build_images_response, parse_image_request
from .openai_api import ApiError, to_api_error

log = logging.getLogger("scops")

DEFAULT_MAX_IMAGE_SIDE = 1024       # pixels; SD 1.x draws 512, and 1024^2 is 4x its work per step
DEFAULT_MAX_IMAGE_STEPS = 150       # the original's 50, with room; each step is a UNet call


class ImageRoute:
    def __init__(self, server, limits: ImageLimits):
        self.server, self.limits = server, limits
        self.session = server.session
        self.generation = self.session.bundle.manifest.get("generation")
        self._lock = threading.Lock()               # one picture at a time

    @property
    def available(self) -> bool:
        return self.generation is not None

    async def handle(self, request: Request) -> Response:
        raw = await self.server.read_body(request)
        if not self.available:
            raise ApiError(400, f"this {self.session.bundle.family} bundle cannot generate pictures (a chat "
                                "model; serve a generation bundle, e.g. Emu exported from pretrain/)",
                           param="model", code="model_cannot_generate")
        engine = self.server.engine
        engine.admit()
        outcome = "failed"
        try:
            job = await anyio.to_thread.run_sync(parse_image_request, raw, self.limits, self.generation)
            del raw
            cancel = threading.Event()
            img = await run_unless_gone(request, lambda: self.draw(job, cancel), cancel)
            if img is None:
                outcome = "cancelled"
                return Response(status_code=499)          # nobody is there to read it
            png = await anyio.to_thread.run_sync(img.png)
            options = dataclasses.asdict(img.options)
            body = build_images_response(png, img.seed, options, img.timings, img.safety_checked)
            request.state.note = f"picture {options['width']}x{options['height']}, {options['steps']} steps"
            outcome = "served"
            return Response(body.model_dump_json(), media_type="application/json")
        except ApiError:
            outcome = "invalid"
            raise
        finally:
            engine.release(outcome)

    def draw(self, job: ImageJob, cancel: threading.Event):
        """Worker thread: the picture, or None when cancelled. Bad input -> ApiError (400)."""
        from .preprocess import decode_image

        try:
            refs = [decode_image(data, self.limits.max_image_pixels) for data in job.images]
            with self._lock:
                if cancel.is_set():
                    return None
                img = self.session.generate_image(job.prompt, images=refs, cancel=cancel.is_set, **job.options)
        except KeyboardInterrupt:                          # diffusion.sample: cancelled between steps
            if cancel.is_set():
                return None
            raise
        except ScopsError as e:
            if cancel.is_set():                            # gave up waiting for a sequence: client gone
                return None
            err = to_api_error(e)
            err.param = "image" if err.code == "invalid_media" else None     # not chat's `messages`
            raise err from None
        return img


async def run_unless_gone(request: Request, fn, cancel: threading.Event):
    """fn() on a worker thread; if the client disconnects first, `cancel` is set and None
    comes back once fn has stopped."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(gone())
    work = asyncio.ensure_future(anyio.to_thread.run_sync(fn))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            cancel.set()
            await asyncio.wait({work})
            return None
        return work.result()
    finally:
        watcher.cancel()
