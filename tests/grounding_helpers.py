"""Planted grounding for the server and web tests, and a check of drawn pixels.

The tiny bundles have random weights: LEGO's LLM never writes a box and BuboGPT's answer
never names what the detector found. These helpers plant the LAST step only, on the real
answer text and the runtime's real geometry: LEGO's `parse_answer` gets an answer whose
first part points at a box of the picture and whose last part at a time span of the clip;
BuboGPT's matcher links the answer's first part to the detector's first label, so its
entity carries the real boxes and SAM masks the grounding stages found.
"""
from __future__ import annotations

import numpy as np

BOX = (0.15, 0.2, 0.6, 0.75)         # fractions of the picture's width / height
SPAN = (0.5, 1.25)                   # seconds of the clip
MAX_PHRASE = 12


def thirds(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two non-empty spans of the answer (code points, as Python indexes str), each at most
    MAX_PHRASE long (labels drawn with them stay narrower than half a small picture)."""
    n = len(text)
    assert n >= 3, f"the answer is too short to plant phrases in: {text!r}"
    k = min(MAX_PHRASE, max(1, n // 3))
    return (0, k), (n - k, n)


def plant_lego(monkeypatch) -> None:
    from scops.runtime import grounding_text
    from scops.runtime.grounding import Entity, Region, color_of

    def planted(text, media):
        first, last = thirds(text)
        out = []
        pic = [i for i, g in enumerate(media) if g.modality == "image"]
        if pic:
            g = media[pic[-1]]
            box = (BOX[0] * g.width, BOX[1] * g.height, BOX[2] * g.width, BOX[3] * g.height)
            out.append(Entity(text[first[0]:first[1]], first, (Region(pic[-1], box=box),), color=color_of(0)))
        clip = [i for i, g in enumerate(media) if g.modality in ("video", "audio")]
        if clip:
            out.append(Entity(text[last[0]:last[1]], last, (Region(clip[-1], time=SPAN),), color=color_of(1)))
        return out
    monkeypatch.setattr(grounding_text, "parse_answer", planted)


def plant_bubo(monkeypatch) -> None:
    """The matcher links the answer's first part to the detector label whose masks cover the
    least of the picture (random weights make most of them cover nearly all of it)."""
    from scops.runtime import grounding_pipeline
    from scops.runtime.grounding import rle_decode
    from scops.runtime.matcher import Match

    cover: dict = {}
    real = grounding_pipeline.Grounder.entities

    def entities(self, picture, answer, media=0):
        cover.clear()
        for d, m in zip(picture.detections, picture.masks):
            cover[d.phrase] = cover.get(d.phrase, 0) | rle_decode(m)
        return real(self, picture, answer, media)

    def planted(labels, answer, llm_matcher):
        if not labels or len(answer) < 3:
            return [], "none"
        return [Match(thirds(answer)[0], min(labels, key=lambda lab: cover[lab].sum()))], "planted"
    monkeypatch.setattr(grounding_pipeline.Grounder, "entities", entities)
    monkeypatch.setattr(grounding_pipeline, "match", planted)


def py_round(v: float) -> int:
    return int(round(v))


def check_drawn(shot: np.ndarray, picture: np.ndarray, entity: dict, font_px: int, tol: int = 3) -> dict:
    """The pixels of `shot` (the page's drawing of one entity over `picture`, same size) are
    the entity's colours where its boxes and masks say and the picture everywhere else:
    box outlines (clear of the labels) and the labels' corners in the darker shade, mask
    insides away from the outline blended 50 % with the lighter shade, all else untouched.
    Returns how many pixels were checked of each kind (outline, label, mask, plain)."""
    from scops.runtime.draw import box_width
    from scops.runtime.grounding import rle_decode

    h, w = picture.shape[:2]
    assert shot.shape[:2] == (h, w), (shot.shape, picture.shape)
    dark = np.array([int(entity["rgb"][i:i + 2], 16) for i in (1, 3, 5)])
    light = np.array([int(entity["rgb_light"][i:i + 2], 16) for i in (1, 3, 5)])
    stroke = box_width(w, h)
    pic, img = picture.astype(int), shot.astype(int)
    covered = np.zeros((h, w), bool)
    for r in entity["regions"]:
        if r.get("mask"):
            covered |= rle_decode(r["mask"])
    near = np.zeros((h, w), bool)                       # outlines and labels: not checked as plain
    labels = np.zeros((h, w), bool)
    boxes = []
    yy, xx = np.mgrid[0:h, 0:w]
    m, tall = 3, 2 * font_px + 8                        # margin; more than a label's height
    for r in entity["regions"]:
        if not r.get("box"):
            continue
        x0, y0, x1, y1 = (py_round(v) for v in r["box"])
        x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)       # [x0, x1) -> last pixel x1 - 1
        boxes.append((x0, y0, x1, y1))
        near |= (yy >= y0 - m) & (yy <= y1 + m) & (xx >= x0 - m) & (xx <= x1 + m) & ~(
            (yy >= y0 + stroke + m) & (yy <= y1 - stroke - m) & (xx >= x0 + stroke + m) & (xx <= x1 - stroke - m))
        top = min(y0, h - tall) - m                     # the label: at the corner, kept inside the picture
        labels |= (yy >= top) & (yy <= top + tall + 2 * m)
    near |= labels
    ring = np.zeros((h, w), bool)                       # the outlines: stroke px inside each box
    corners = []
    for x0, y0, x1, y1 in boxes:
        box = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
        ring |= box & ~((yy >= y0 + stroke) & (yy <= y1 - stroke) & (xx >= x0 + stroke) & (xx <= x1 - stroke))
        if 0 <= x0 < w // 2 and 0 <= y0 < h - tall:     # the label starts at the corner (not pushed inside)
            corners.append((y0 + 1, x0 + 1))
    outline = ring & ~labels
    checked = {"outline": int(outline.sum()), "label": len(corners), "mask": 0, "plain": 0}

    def drawn_dark(where, what):                        # darker shade (blended where a mask covers it)
        want = np.where(covered[where][:, None], np.floor((dark + light) * 0.5 + 0.5), dark)
        assert np.abs(img[where] - want).max() <= tol, f"{what} is not the entity's colour where the box says"
    if outline.any():
        drawn_dark(outline, "a box outline")
    if corners:
        drawn_dark(tuple(np.array(corners).T), "a label")
    inside = covered & ~near
    if inside.any():
        want = np.floor((pic[inside] + light) * 0.5 + 0.5)
        assert np.abs(img[inside] - want).max() <= tol, "the mask is not blended with the lighter shade"
        checked["mask"] = int(inside.sum())
    plain = ~covered & ~near
    if plain.any():
        assert np.abs(img[plain] - pic[plain]).max() <= tol, "the picture is changed outside the entity's regions"
    checked["plain"] = int(plain.sum())
    return checked
