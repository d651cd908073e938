"""The OpenAI images API (`POST /v1/images/generations`): request and response models.

Pure functions over bytes (no sockets, no session), as runtime/openai_api.py for chat.
`parse_image_request` validates a body against `ImageGenerationRequest` and the server's
limits and returns an `ImageJob` (the options `Session.generate_image` takes), or raises
`ApiError` (one 400 naming the field). The response is OpenAI's: `created` and `data` with
one `b64_json` PNG; the extra object `scops` carries the seed, steps, guidance and timings.

Fields: `prompt` (required), `model`, `n` (1), `size` ("WxH" or "auto"), `response_format`
("b64_json"; there is no file hosting for "url"), `output_format` ("png"); extensions:
`steps`, `guidance`, `seed`, and `image`, a reference picture as a data: URL ("in the
style of this picture"). Everything else OpenAI defines (quality, style, user, ...) is
accepted and ignored.
"""
from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .openai_api import ApiError

# DALL-E 3's prompt limit; Emu reads a few dozen tokens of it at most anyway.
MAX_PROMPT_CHARS = 4000
# Classifier-free guidance beyond this only saturates the picture (SD's UIs cap it at 30).
MAX_GUIDANCE = 30.0
SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


@dataclass(frozen=True)
class ImageLimits:
    max_side: int            # pixels per side (the server's --max-image-side)
    max_steps: int           # denoising steps (the server's --max-image-steps)
    max_image_pixels: int    # a reference picture's decoded size


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageGenerationRequest(_Strict):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str = ""
    n: Literal[1] | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    # scops extensions
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, gt=0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, lt=2**63)
    image: str | None = None                  # a reference picture: data:image/...;base64,...


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImageInfo(BaseModel):
    seed: int
    steps: int
    guidance: float
    size: str
    safety_checked: bool
    timings: dict


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    scops: ImageInfo


@dataclass(frozen=True)
class ImageJob:
    prompt: str
    model: str
    images: tuple               # reference pictures (encoded bytes)
    options: dict               # Session.generate_image options: steps, guidance, height, width, seed


def parse_image_request(raw: bytes, limits: ImageLimits, generation: dict) -> ImageJob:
    """A request body -> ImageJob, or ApiError (400) saying what is wrong and where.
    `generation`: the bundle's manifest "generation" record (defaults, size multiple)."""
    try:
        body = ImageGenerationRequest.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    if body.response_format == "url":
        raise ApiError(400, "response_format 'url' is not served (this server hosts no files): use b64_json",
                       param="response_format")
    if not body.prompt.strip() and body.image is None:
        raise ApiError(400, "prompt is empty (give text, or a reference picture in 'image')", param="prompt")
    defaults = generation.get("defaults", {})
    options: dict = {"height": int(defaults.get("height", 512)), "width": int(defaults.get("width", 512))}
    if body.size not in (None, "auto"):
        options["width"], options["height"] = parse_size(body.size, limits, int(generation["size_multiple"]))
    if body.steps is not None:
        if body.steps > limits.max_steps:
            raise ApiError(400, f"steps {body.steps} is over this server's cap of {limits.max_steps}", param="steps")
        options["steps"] = body.steps
    for name in ("guidance", "seed"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    images = (decode_data_url(body.image),) if body.image is not None else ()
    return ImageJob(body.prompt, body.model, images, options)


def parse_size(size: str, limits: ImageLimits, multiple: int) -> tuple[int, int]:
    """"WxH" -> (W, H): each side a multiple of the VAE's `multiple` up to the server's cap."""
    m = SIZE.match(size)
    if not m:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', not {size[:40]!r}",
                       param="size")
    sides = int(m.group(1)), int(m.group(2))
    if not all(multiple <= s <= limits.max_side and s % multiple == 0 for s in sides):
        raise ApiError(400, f"size {size}: each side must be a multiple of {multiple} in {multiple}.."
                            f"{limits.max_side} pixels on this server", param="size")
    return sides


def decode_data_url(url: str) -> bytes:
    """'data:image/png;base64,...' -> the encoded picture (decoded later, within the pixel limit)."""
    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ApiError(400, "image must be a data:image/...;base64, URL", param="image")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ApiError(400, "image: invalid base64 data", param="image") from None


def build_images_response(png: bytes, seed: int, options: dict, timings: dict, safety_checked: bool) -> ImagesResponse:
    info = ImageInfo(seed=seed, steps=int(options["steps"]), guidance=float(options["guidance"]),
                     size=f"{options['width']}x{options['height']}", safety_checked=safety_checked,
                     # 4 significant digits: a tiny model's s_per_step (< 5 ms) must not round to 0
                     timings={k: float(f"{float(v):.4g}") for k, v in timings.items()})
    return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=base64.b64encode(png).decode())],
                          scops=info)


def validation_error(e: ValidationError) -> ApiError:
    """pydantic's first complaint as one OpenAI error: param is the field, the message says why."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body ({err['msg'].removeprefix('Invalid JSON: ')})")
    if err["type"] == "model_type":
        return ApiError(400, "the body must be a JSON object")
    field = ".".join(str(part) for part in err["loc"]) or None
    return ApiError(400, f"{field or 'body'}: {err['msg']}", param=field)
