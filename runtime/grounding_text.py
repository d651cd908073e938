"""Grounding written in the answer's own text (LEGO / GroundingGPT): boxes and time spans.

LEGO answers point by writing coordinates into the sentence:

    "A dog [0.12, 0.40, 0.55, 0.93] is lying on a sofa [0.0, 0.3, 1.0, 1.0]."
    "A person opens the washing machine {0.09,0.15}."

Boxes are x1, y1, x2, y2 as fractions of the PADDED SQUARE the model saw (the picture
centred on a max(W, H) square, see preprocess.py "pad_square"); time spans are fractions
of the clip's duration (the project page's format: braces, two decimals).

`parse_answer` turns them into the shared `Entity` / `Region` records (grounding.py) in
the ORIGINAL input's units: pixels of the picture, seconds of the clip. Box mapping is the
original's `postprocess_output` (lego/mm_utils.py) step for step:

    square = round(v * max(W, H))            (Python round: to the nearest even integer)
    minus the padding offset (max - min) // 2 on the short axis
    / W or / H, rounded to 3 decimals, clipped to [0, 1]

and the pixel box is those fractions x W / H, which is where the original's demo draws it
(`postprocess_image_answer_gradio`). Text the model garbles (a missing number, "0.3.2", a
box with x2 < x1, an unclosed bracket) is skipped, never raised.

Phrase rule (the original has none; its demo numbers boxes without naming them): the
phrase of a box is the text before it back to the previous box / span or clause boundary
(. ! ? ; : , newline), from its first determiner or number word on ("is riding a horse"
-> "a horse"), at most 8 words. A span's phrase is the clause before it (commas kept,
trailing "at/from/during/..." dropped), or the clause after it when it opens a sentence.
Boxes separated only by spaces, commas or semicolons ("two dogs [..] [..]") form one
entity with several regions, as the demo groups "][".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .grounding import Entity, Region, color_of

# A box: four numbers in brackets. The model writes "[0.12, 0.4, 0.55, 0.93]"; spacing
# variants are accepted, anything that float() refuses makes the match skipped.
BOX = re.compile(r"\[\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*,\s*([0-9.]+)\s*\]")
SPAN = re.compile(r"\{\s*([0-9.]+)\s*,\s*([0-9.]+)\s*\}")
# Text between two boxes of one entity.
GROUP_GAP = re.compile(r"[\s,;]*")
BOX_BOUNDARY = re.compile(r"[.!?;:,\n]")
SPAN_BOUNDARY = re.compile(r"[.!?;\n]")
DETERMINERS = frozenset((
    "a an the this that these those his her its their my your our some several many few both each "
    "every another all one two three four five six seven eight nine ten"
).split())
# Words a span's clause is trimmed of at either end ("Then {..} the man leaves", "... happens at {..}").
SPAN_TRIM = frozenset(("at from during between within in around over for to of is was are then and first next "
                       "finally later afterwards after before while when so also").split())
MAX_PHRASE_WORDS = 8
DECIMALS = 3             # mm_utils.postprocess_output: round(..., 3)


@dataclass(frozen=True)
class MediaGeometry:
    """What the mapping needs of each input of the conversation, in media order."""
    modality: str                      # "image" | "video" | "audio"
    width: int = 0                     # pixels of the original picture
    height: int = 0
    duration: float = 0.0              # seconds of the original clip


def map_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, ...]:
    """Padded-square fractions -> fractions of the original picture (3 decimals, in [0, 1]),
    exactly as lego/mm_utils.py postprocess_output + postprocess_box compute them."""
    side = max(width, height)
    x1, y1, x2, y2 = (round(v * side) for v in box)                # Python round, as the original
    if width > height:                                           # padded above and below
        y1, y2 = y1 - (width - height) // 2, y2 - (width - height) // 2
    elif height > width:                                         # padded left and right
        x1, x2 = x1 - (height - width) // 2, x2 - (height - width) // 2
    out = (round(x1 / width, DECIMALS), round(y1 / height, DECIMALS),
           round(x2 / width, DECIMALS), round(y2 / height, DECIMALS))
    return tuple(min(max(v, 0.0), 1.0) for v in out)


def unmap_box(frac: tuple[float, float, float, float], width: int, height: int) -> tuple[float, ...]:
    """The inverse direction (original-picture fractions -> padded-square fractions), for
    tests and for prompts that quote a region back to the model."""
    side = max(width, height)
    dx = (side - width) // 2 if height > width else 0
    dy = (side - height) // 2 if width > height else 0
    x1, y1, x2, y2 = frac
    return ((x1 * width + dx) / side, (y1 * height + dy) / side, (x2 * width + dx) / side, (y2 * height + dy) / side)


def _numbers(match: re.Match) -> tuple[float, ...] | None:
    try:
        values = tuple(float(g) for g in match.groups())
    except ValueError:
        return None
    return values


def _box_phrase(text: str, start: int, stop: int) -> tuple[int, int]:
    """[start, stop) of the phrase for a box whose markup begins at `stop`."""
    cut = max((m.end() for m in BOX_BOUNDARY.finditer(text, start, stop)), default=start)
    words = list(re.finditer(r"\S+", text[cut:stop]))
    if not words:
        return stop, stop
    first = next((i for i, w in enumerate(words) if w.group().lower().strip("\"'(") in DETERMINERS), 0)
    first = max(first, len(words) - MAX_PHRASE_WORDS)
    return cut + words[first].start(), cut + words[-1].end()


def _span_phrase(text: str, start: int, stop: int, after_end: int) -> tuple[int, int]:
    """The clause before a time span (markup at `stop`), or after it (from `after_end`)."""
    def words_of(lo: int, hi: int) -> list:
        words = list(re.finditer(r"[^\s,]+", text[lo:hi]))
        while words and words[-1].group().lower() in SPAN_TRIM:
            words.pop()
        while words and words[0].group().lower() in SPAN_TRIM:
            words.pop(0)
        return [(lo + w.start(), lo + w.end()) for w in words]

    cut = max((m.end() for m in SPAN_BOUNDARY.finditer(text, start, stop)), default=start)
    words = words_of(cut, stop)
    if not words:
        words = words_of(after_end, next((m.start() for m in SPAN_BOUNDARY.finditer(text, after_end)), len(text)))
    return (words[0][0], words[-1][1]) if words else (stop, stop)


def _markup(text: str) -> list[tuple[str, re.Match, tuple[float, ...]]]:
    """Every well-formed box / span in text order (malformed ones dropped)."""
    found = []
    for kind, pattern, n in (("box", BOX, 4), ("span", SPAN, 2)):
        for m in pattern.finditer(text):
            values = _numbers(m)
            if values is None or len(values) != n or any(v != v for v in values):
                continue
            lo, hi = values[:n // 2], values[n // 2:]
            if any(b < a for a, b in zip(lo, hi)):          # inverted box / span: garbled
                continue
            found.append((kind, m, values))
    return sorted(found, key=lambda f: f[1].start())


def parse_answer(text: str, media: list[MediaGeometry]) -> list[Entity]:
    """Boxes -> the LAST picture of the conversation, spans -> the last video (else the
    last audio clip); markup with no such input is left out. Entities in text order."""
    image = next((i for i in range(len(media) - 1, -1, -1) if media[i].modality == "image"), None)
    clip = next((i for i in range(len(media) - 1, -1, -1) if media[i].modality == "video"), None)
    if clip is None:
        clip = next((i for i in range(len(media) - 1, -1, -1) if media[i].modality == "audio"), None)
    entities: list[Entity] = []
    groups: list[list] = []                    # [[kind, [matches...], [values...]], ...]
    for kind, m, values in _markup(text):
        prev = groups[-1] if groups else None
        if (kind == "box" and prev and prev[0] == "box"
                and GROUP_GAP.fullmatch(text, prev[1][-1].end(), m.start())):
            prev[1].append(m)
            prev[2].append(values)
        else:
            groups.append([kind, [m], [values]])
    last_end = 0
    for g, (kind, matches, values) in enumerate(groups):
        start = matches[0].start()
        after = matches[-1].end()
        regions: list[Region] = []
        if kind == "box" and image is not None:
            geo = media[image]
            for v in values:
                frac = map_box(v, geo.width, geo.height)
                if frac[2] <= frac[0] or frac[3] <= frac[1]:       # nothing left inside the picture
                    continue
                px = (frac[0] * geo.width, frac[1] * geo.height, frac[2] * geo.width, frac[3] * geo.height)
                regions.append(Region(media=image, box=px))
            span = _box_phrase(text, last_end, start)
        elif kind == "span" and clip is not None:
            dur = media[clip].duration
            t0, t1 = (round(min(max(v, 0.0), 1.0) * dur, DECIMALS) for v in values[0])
            regions.append(Region(media=clip, time=(t0, t1)))
            next_start = groups[g + 1][1][0].start() if g + 1 < len(groups) else len(text)
            span = _span_phrase(text[:next_start], last_end, start, after)
        last_end = after
        if not regions:
            continue
        if span[0] == span[1]:                  # nothing to name it by: the markup itself
            span = (start, after)
        extra = {"markup": [[m.start(), m.end()] for m in matches],
                 "text": [m.group() for m in matches]}
        if kind == "box":
            extra["box_fraction"] = [list(map_box(v, media[image].width, media[image].height)) for v in values]
        else:
            extra["fraction"] = list(values[0])
        entities.append(Entity(phrase=text[span[0]:span[1]], span=span, regions=tuple(regions),
                               color=color_of(len(entities)), extra=extra))
    return entities


def strip_markup(text: str) -> str:
    """The answer without its boxes and spans (e.g. for text-to-speech or a plain view)."""
    return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s*(?:%s|%s)" % (BOX.pattern, SPAN.pattern), "", text)).strip()
