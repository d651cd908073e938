"""Drawing the grounding of an answer: one module for every family (LEGO, BuboGPT).

BuboGPT's look (magic-research/bubogpt grounding_model.py `GroundingModule.draw` with
constants/constant.py's palette), reproduced on the shared `Entity` / `Region` records:

- each entity has a palette colour (grounding.color_of): its boxes are outlined in the
  DARKER shade, `int(min(H, W) / 512 * 10)` px wide, drawn inside the box's bounds;
- its label (the entity's number and phrase) is white text on a DARKER fill at the box's
  top-left corner, the font `int(min(H, W) / 512 * 30)` px high;
- its masks paint the LIGHTER shade over the drawn picture, blended at 50 %
  (`PIL.Image.blend(drawn, painted, 0.5)`: pixels outside every mask stay as drawn).

Video (time spans) is drawn as a sheet: one row per entity, the frames at the start,
middle and end of its span, each under a bar with the time in seconds, the row headed
by the entity's number and phrase. The caller decodes the frames (`timeline_times` says
which): this module does no I/O. Pure numpy + Pillow.
"""
from __future__ import annotations

import io

import numpy as np

from .grounding import DARKER, LIGHTER, Entity, rle_decode

# BuboGPT scales its strokes to a 512 px reference side: 10 px boxes, 30 px text.
REFERENCE_SIDE = 512.0
BOX_PX_AT_REFERENCE = 10
FONT_PX_AT_REFERENCE = 30
MIN_FONT_PX = 11
MAX_LABEL_CHARS = 40
THUMB_HEIGHT = 160          # video sheet: frame height in px
SHEET_GAP = 6


def box_width(width: int, height: int) -> int:
    return max(1, int(min(height, width) / REFERENCE_SIDE * BOX_PX_AT_REFERENCE))


def font_px(width: int, height: int) -> int:
    return max(MIN_FONT_PX, int(min(height, width) / REFERENCE_SIDE * FONT_PX_AT_REFERENCE))


def _font(px: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)          # Pillow's bundled scalable font
    except TypeError:                                   # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def label_of(number: int, entity: Entity) -> str:
    text = f"{number} {entity.phrase}".strip()
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 1] + "…"


def _label(draw, xy: tuple[int, int], text: str, font, fill: tuple, limit: tuple[int, int]) -> None:
    """White text on a filled box at xy, shifted to stay inside the picture."""
    x0, y0 = xy
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x0 = max(0, min(x0, limit[0] - w))
    y0 = max(0, min(y0, limit[1] - h))
    draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=fill)
    draw.text((x0 + 2 - left, y0 + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_picture(rgb: np.ndarray, entities: list[Entity], media: int = 0) -> np.ndarray:
    """The picture [H, W, 3] uint8 with the boxes, labels and masks of every region on
    input `media` -> a new [H, W, 3] uint8 array."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    stroke, font = box_width(w, h), _font(font_px(w, h))
    painted = np.zeros((h, w, 3), np.float32)
    covered = np.zeros((h, w), bool)
    labels = []
    for number, ent in enumerate(entities, 1):
        dark, light = DARKER[ent.color], LIGHTER[ent.color]
        for region in ent.regions:
            if region.media != media:
                continue
            if region.mask is not None:
                m = rle_decode(region.mask)
                if m.shape != (h, w):
                    raise ValueError(f"mask of entity {number} is {m.shape[1]}x{m.shape[0]}, picture {w}x{h}")
                painted[m] = light
                covered |= m
            if region.box is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in region.box)
                x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)        # [x0, x1) -> last pixel x1 - 1
                draw.rectangle([x0, y0, x1, y1], outline=dark, width=stroke)
                labels.append(((x0, y0), label_of(number, ent), dark))
    for xy, text, fill in labels:                         # labels over every box
        _label(draw, xy, text, font, fill, (w, h))
    out = np.asarray(img, dtype=np.uint8).copy()
    if covered.any():
        # Image.blend(drawn, painted, 0.5) where painted = LIGHTER on the masks, drawn elsewhere
        mixed = (out[covered].astype(np.float32) + painted[covered]) * 0.5
        out[covered] = np.clip(np.floor(mixed + 0.5), 0, 255).astype(np.uint8)
    return out


def timeline_times(entities: list[Entity], media: int) -> list[float]:
    """The instants (seconds) draw_timeline shows for input `media`: start, middle, end of each span."""
    times = []
    for ent in entities:
        for r in ent.regions:
            if r.media == media and r.time is not None:
                t0, t1 = r.time
                times += [t0, (t0 + t1) / 2, t1]
    return sorted(set(round(t, 3) for t in times))


def _thumb(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image
    h, w = rgb.shape[:2]
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def draw_timeline(frames: dict, entities: list[Entity], media: int, duration: float) -> np.ndarray | None:
    """A sheet of the frames at each span of input `media`: `frames` maps the instants of
    `timeline_times` (rounded to ms) to RGB frames. None when no entity has a span there."""
    from PIL import Image, ImageDraw

    rows = []
    font = _font(16)
    for number, ent in enumerate(entities, 1):
        for r in ent.regions:
            if r.media != media or r.time is None:
                continue
            t0, t1 = r.time
            dark = DARKER[ent.color]
            thumbs = []
            for t in (t0, (t0 + t1) / 2, t1):
                frame = frames.get(round(t, 3))
                if frame is None:
                    continue
                th = Image.fromarray(_thumb(frame))
                _label(ImageDraw.Draw(th), (0, THUMB_HEIGHT), f"{t:.2f} s", font, dark, th.size)
                thumbs.append(np.asarray(th))
            if not thumbs:
                continue
            strip = _hstack(thumbs)
            head = Image.new("RGB", (strip.shape[1], 26), (255, 255, 255))
            _label(ImageDraw.Draw(head), (0, 0),
                   f"{label_of(number, ent)}  {t0:.2f}-{t1:.2f} s of {duration:.2f} s", font, dark, head.size)
            rows += [np.asarray(head), strip]
    return vstack(rows) if rows else None


def _hstack(images: list[np.ndarray]) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    gap = np.full((h, SHEET_GAP, 3), 255, np.uint8)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(gap)
        parts.append(np.pad(im, ((0, h - im.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def vstack(images: list[np.ndarray]) -> np.ndarray:
    """Panels one under the other on white, left-aligned."""
    w = max(i.shape[1] for i in images)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(np.full((SHEET_GAP, w, 3), 255, np.uint8))
        parts.append(np.pad(im, ((0, 0), (0, w - im.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
