"""SAM box prompts -> masks in the picture's pixels, without torch (numpy + Pillow + scipy).

Twin of segment_anything's SamPredictor as BuboGPT calls it (grounding_model.py): set_image
(ResizeLongestSide to S, normalise with pixel mean/std, pad bottom-right to S x S), the boxes
scaled into that frame (apply_boxes_torch), predict_torch(multimask_output=False), then
Sam.postprocess_masks (bilinear to S x S, crop the padding, bilinear to H x W), logits > 0,
and amg.remove_small_regions(mask, 400, mode="holes").

The two bilinear resizes are linear maps along each axis: composed, each output row (column)
reads at most 3 neighbouring low-res rows (columns). upsample_logits applies them as dense
[H, S/4] and [S/4, W] matrices (the plain reference); upsample_mask applies the same weights
as taps, O(H W) instead of O(H W S/4), row stripes at a time, so a 50 MP picture never holds
more than one float stripe and one boolean mask per box. fill_small_holes labels only the
mask's bounding box plus a one-pixel ring of background; fill_small_holes_plain labels the
whole picture (the reference). tests/test_grounding_sam.py compares each pair on awkward sizes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

STRIPE_ROWS = 128          # float rows per stripe in upsample_mask (two [128, W] buffers stay in cache)


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """ResizeLongestSide.get_preprocess_shape: the long side becomes long_side (rounded)."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def prepare_image(rgb: np.ndarray, spec: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] -> (pixel_values [1, 3, S, S] float32, resized (h, w))."""
    from PIL import Image

    size = int(spec["size"])
    h, w = preprocess_shape(rgb.shape[0], rgb.shape[1], size)
    # apply_image: torchvision resize of a PIL image = PIL bilinear
    small = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), dtype=np.float32)
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    out = np.zeros((1, 3, size, size), np.float32)                       # Sam.preprocess pads with 0
    out[0, :, :h, :w] = ((small - mean) / std).transpose(2, 0, 1)        # [h, w, 3] -> [3, h, w]
    return out, (h, w)


def boxes_to_frame(boxes: np.ndarray, original: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """apply_boxes: xyxy pixels of the original picture -> the resized frame. [N, 4] float32."""
    (oh, ow), (nh, nw) = original, resized
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    b[:, 0::2] *= nw / ow
    b[:, 1::2] *= nh / oh
    return b.astype(np.float32)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's 1-D bilinear resize (align_corners=False, no antialias), n_in -> n_out, as two
    taps per output: (i0 [n_out], i1 = min(i0 + 1, n_in - 1), lam [n_out] float64): out =
    (1 - lam) * x[i0] + lam * x[i1]."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """bilinear_taps as a dense [n_out, n_in] float64 matrix (the plain reference; not cached:
    at 50 MP one is 70 MB)."""
    i0, i1, lam = bilinear_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def _axis_map(n_low: int, size: int, kept: int, n_out: int) -> np.ndarray:
    """low-res axis -> S (bilinear) -> first `kept` -> n_out (bilinear): one dense [n_out, n_low]
    matrix (the plain reference of _axis_taps)."""
    return (bilinear_matrix(kept, n_out) @ bilinear_matrix(n_low, size)[:kept]).astype(np.float32)


@lru_cache(maxsize=32)
def _axis_taps(n_low: int, size: int, kept: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """_axis_map as taps, built without it: (index [n_out, 3] int64, weight [n_out, 3] float32).
    Output o reads S-positions b0, b1 = b0 + 1 (clipped), each of which reads low-res a0, a0 + 1
    (clipped): at most 3 consecutive low-res indices. Unused taps have weight 0 (cached: every
    mask of a picture shares them; ~36 bytes per output row or column; read only)."""
    a0, a1, la = bilinear_taps(n_low, size)                              # S <- S/4
    b0, b1, lb = bilinear_taps(kept, n_out)                              # n_out <- first `kept` of S
    index = np.stack([a0[b0], a1[b0], a0[b1], a1[b1]], axis=1)           # [n_out, 4] low-res rows
    weight = np.stack([(1 - lb) * (1 - la[b0]), (1 - lb) * la[b0], lb * (1 - la[b1]), lb * la[b1]], axis=1)
    lo = index[:, :1]                                                    # = a0[b0], the smallest
    width = 3
    out = np.zeros((n_out, width), np.float64)
    np.add.at(out, (np.arange(n_out)[:, None], index - lo), weight)      # equal indices summed
    return np.minimum(lo + np.arange(width), n_low - 1), out.astype(np.float32)


def upsample_mask(low: np.ndarray, size: int, resized: tuple[int, int], original: tuple[int, int],
                  threshold: float = 0.0) -> np.ndarray:
    """Sam.postprocess_masks + (logits > threshold) for one mask: [S/4, S/4] -> bool [H, W].
    Twin of upsample_logits (dense matrices, the plain reference): the same weights as taps."""
    ri, rw = _axis_taps(low.shape[0], size, resized[0], original[0])    # [H, K]
    ci, cw = _axis_taps(low.shape[1], size, resized[1], original[1])    # [W, K]
    low = low.astype(np.float32)
    right = low[:, ci[:, 0]] * cw[:, 0]                                  # [S/4, W]
    for k in range(1, ci.shape[1]):
        right += low[:, ci[:, k]] * cw[:, k]
    right = np.ascontiguousarray(right)          # rows are gathered below: C order (10x faster)
    h, w = original
    out = np.empty(original, bool)
    acc = np.empty((min(STRIPE_ROWS, h), w), np.float32)                 # reused per stripe
    tap = np.empty_like(acc)
    for r0 in range(0, h, STRIPE_ROWS):
        n = min(STRIPE_ROWS, h - r0)
        a, b = acc[:n], tap[:n]
        np.take(right, ri[r0:r0 + n, 0], axis=0, out=a, mode="clip")    # [n, W]
        a *= rw[r0:r0 + n, 0, None]
        for k in range(1, ri.shape[1]):
            np.take(right, ri[r0:r0 + n, k], axis=0, out=b, mode="clip")
            b *= rw[r0:r0 + n, k, None]
            a += b
        np.greater(a, threshold, out=out[r0:r0 + n])
    return out


def upsample_logits(low: np.ndarray, size: int, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """The float logits postprocess_masks returns (for parity checks; small pictures only)."""
    rows = _axis_map(low.shape[0], size, resized[0], original[0])
    cols = _axis_map(low.shape[1], size, resized[1], original[1])
    return rows @ low.astype(np.float32) @ cols.T


_EIGHT = np.ones((3, 3), bool)     # cv2.connectedComponentsWithStats(..., 8)
COUNT_CHUNK = 1 << 20              # labels counted a chunk at a time: bincount copies int32 to int64


def _region_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per label 0..n of an int32 label image, without an 8-byte-a-pixel copy."""
    flat = labels.ravel()
    sizes = np.zeros(n + 1, np.int64)
    for i in range(0, flat.size, COUNT_CHUNK):
        sizes += np.bincount(flat[i:i + COUNT_CHUNK], minlength=n + 1)
    return sizes


def fill_small_holes_plain(mask: np.ndarray, area: int) -> np.ndarray:
    """amg.remove_small_regions(mask, area, mode="holes")[0]: every 8-connected region of
    background smaller than `area` pixels becomes foreground (border regions included).
    The plain reference of fill_small_holes: labels the whole picture."""
    from scipy import ndimage

    labels, n = ndimage.label(~mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = _region_sizes(labels, n)
    small = sizes < area
    small[0] = False                      # label 0 is the foreground itself
    if not small.any():
        return mask
    return mask | small[labels]


def fill_small_holes(mask: np.ndarray, area: int) -> np.ndarray:
    """fill_small_holes_plain (its twin), labelling only the box B around the foreground grown
    by one pixel (clipped to the picture). Each side of B with picture pixels past it is all
    background, and every pixel past B joins a region touching such a side, so the regions
    touching none of them are the same as in the whole picture. A region touching the ring is at least its size inside B; when each of
    them has >= area pixels there, none is a hole in either computation. Otherwise (a mask
    nearly filling a small picture) the whole picture is labelled."""
    from scipy import ndimage

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return fill_small_holes_plain(mask, area)
    h, w = mask.shape
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    crop = mask[r0:r1, c0:c1]                                            # [h', w'] view
    labels, n = ndimage.label(~crop, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = _region_sizes(labels, n)
    small = sizes < area
    small[0] = False
    if not small.any():
        return mask
    beyond = (r0 > 0, r1 < h, c0 > 0, c1 < w)              # sides of B with picture pixels past them
    ring = [side for side, b in zip((labels[0], labels[-1], labels[:, 0], labels[:, -1]), beyond) if b]
    if ring and small[np.concatenate(ring)].any():         # a region reaching past B is small inside B
        return fill_small_holes_plain(mask, area)
    out = mask.copy()
    out[r0:r1, c0:c1] |= small[labels]
    return out


class Segmenter:
    """Runs the two SAM graphs: embed a picture once, then one mask per box."""

    def __init__(self, encoder, decoder, spec: dict):
        self.encoder, self.decoder, self.spec = encoder, decoder, spec
        self.size = int(spec["size"])

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        pixels, resized = prepare_image(rgb, self.spec)
        return self.encoder.run(None, {"pixel_values": pixels})[0], resized

    def finish(self, low: np.ndarray, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
        """One low-res mask [S/4, S/4] -> bool [H, W]: upsampled, thresholded, small holes filled."""
        mask = upsample_mask(low, self.size, resized, original, float(self.spec.get("mask_threshold", 0.0)))
        hole = int(self.spec.get("hole_area", 0))
        return fill_small_holes(mask, hole) if hole > 0 else mask

    def masks(self, rgb: np.ndarray, boxes: np.ndarray, embedded=None):
        """xyxy boxes [N, 4] in pixels -> (bool masks, one [H, W] per box (generator), iou [N])."""
        emb, resized = embedded if embedded is not None else self.embed(rgb)
        original = rgb.shape[:2]
        frame = boxes_to_frame(boxes, original, resized)
        low, iou = self.decoder.run(None, {"image_embeddings": emb, "boxes": frame})
        return (self.finish(m, resized, original) for m in low), iou
