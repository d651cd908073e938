"""The grounding surface every family shares: what an answer points at.

An answer's entities are `Entity` records: the phrase, its character span in
`Reply.text`, and one or more `Region`s, each a box in pixels of the original picture,
a mask (run-length encoded, COCO's uncompressed RLE), or a time span in seconds of the
original clip. LEGO fills them by parsing its own answer; BuboGPT from its tagger ->
detector -> segmenter -> matcher stages. The CLI (`--draw`, `--json`), the server (the
assistant message's `grounding` field) and the web page all read this one shape.

Pure numpy: no torch, no drawing (see draw.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# BuboGPT's palette (constants/constant.py): named colours, a darker shade for boxes and
# label fills and a lighter one for masks. grounding_model.py gives the k-th distinct label
# COLORS[k % 11]: the cycle skips the last name, grey, which marks unmatched detections.
DARKER = {"red": (220, 38, 38), "pink": (236, 64, 122), "orange": (234, 88, 12), "yellow": (234, 179, 8),
          "blue": (37, 99, 235), "teal": (38, 166, 154), "indigo": (92, 107, 192), "green": (22, 163, 74),
          "purple": (171, 71, 188), "deep_purple": (126, 87, 194), "brown": (141, 110, 99),
          "grey": (189, 189, 189)}
LIGHTER = {"red": (254, 226, 226), "pink": (248, 187, 208), "orange": (255, 237, 213), "yellow": (254, 249, 195),
           "blue": (219, 234, 254), "teal": (128, 203, 196), "indigo": (159, 168, 218), "green": (220, 252, 231),
           "purple": (206, 147, 216), "deep_purple": (179, 157, 219), "brown": (188, 170, 164),
           "grey": (238, 238, 238)}
COLORS = tuple(DARKER)
UNMATCHED = "grey"


def color_of(index: int) -> str:
    """The palette name of the index-th entity (0-based), as BuboGPT cycles it."""
    return COLORS[index % (len(COLORS) - 1)]


@dataclass(frozen=True)
class Region:
    """Where an entity points, in the coordinates of the ORIGINAL input (not the model's)."""
    media: int = 0                                     # index of the input: Conversation.media() order
                                                       # (every input of the chat in prompt order; one
                                                       # turn alone: that turn's order)
    box: tuple[float, float, float, float] | None = None   # x1, y1, x2, y2 in pixels
    mask: dict | None = None                           # {"size": [h, w], "counts": [...]} (rle_encode)
    time: tuple[float, float] | None = None            # t0, t1 in seconds
    score: float | None = None

    def to_json(self) -> dict:
        out: dict = {"media": self.media}
        if self.box is not None:
            out["box"] = [round(float(v), 2) for v in self.box]
        if self.mask is not None:
            out["mask"] = self.mask
        if self.time is not None:
            out["time"] = [round(float(v), 3) for v in self.time]
        if self.score is not None:
            out["score"] = round(float(self.score), 4)
        return out


@dataclass(frozen=True)
class Entity:
    phrase: str                                  # the words of the answer it belongs to
    span: tuple[int, int]                        # [start, end) character offsets in Reply.text
    regions: tuple[Region, ...] = ()
    tag: str | None = None                       # BuboGPT: the tagger's label the phrase matched
    color: str = COLORS[0]                       # a palette name (DARKER / LIGHTER shades)
    extra: dict = field(default_factory=dict)    # family-specific facts (e.g. the raw box text)

    def to_json(self) -> dict:
        out = {"phrase": self.phrase, "span": list(self.span), "regions": [r.to_json() for r in self.regions],
               "color": self.color, "rgb": "#%02x%02x%02x" % DARKER[self.color],
               "rgb_light": "#%02x%02x%02x" % LIGHTER[self.color]}
        if self.tag is not None:
            out["tag"] = self.tag
        if self.extra:
            out["extra"] = self.extra
        return out


def grounding_json(entities) -> list[dict]:
    return [e.to_json() for e in entities]


MEDIA_FACTS = ("modality", "width", "height", "duration")


def describe_media(conv) -> list[dict]:
    """What a Region's `media` index points at: the conversation's inputs in prompt order,
    with the facts a client needs to place regions (size in pixels, duration in seconds)."""
    return [{k: m[k] for k in MEDIA_FACTS if k in m} for m in conv.media()]


def rle_encode(mask: np.ndarray) -> dict:
    """Binary mask [h, w] -> COCO uncompressed RLE: run lengths in column-major order,
    starting with a run of zeros (possibly 0 long)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    flat = m.ravel(order="F")                              # [h, w] -> [h * w] column-major
    if flat.size == 0:
        return {"size": list(m.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1     # where a new run starts
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(m.shape), "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """The inverse of rle_encode -> bool [h, w]."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.sum() != h * w):
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, mask has {h * w} pixels")
    values = np.arange(counts.size) % 2 == 1               # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T if flat.size else np.zeros((h, w), bool)   # column-major -> [h, w]
