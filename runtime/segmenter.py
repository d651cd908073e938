"""SAM box prompts -> masks in the picture's pixels, without torch (numpy + Pillow + scipy).

Twin of segment_anything's SamPredictor as BuboGPT calls it (grounding_model.py): set_image
(ResizeLongestSide to S, normalise with pixel mean/std, pad bottom-right to S x S), the boxes
scaled into that frame (apply_boxes_torch), predict_torch(multimask_output=False), then
Sam.postprocess_masks (bilinear to S x S, crop the padding, bilinear to H x W), logits > 0,
and amg.remove_small_regions(mask, 400, mode="holes").

The two bilinear resizes are linear maps along each axis, so they are applied as one
[H, S/4] and one [S/4, W] matrix; rows are produced in stripes, so a 50 MP picture never
holds more than one float stripe and one boolean mask per box.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

STRIPE_ROWS = 512          # float rows materialised at a time by upsample_mask


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


@lru_cache(maxsize=32)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1-D bilinear resize (align_corners=False, no antialias)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


@lru_cache(maxsize=32)
def _axis_map(n_low: int, size: int, kept: int, n_out: int) -> np.ndarray:
    """low-res axis -> S (bilinear) -> first `kept` -> n_out (bilinear): one [n_out, n_low] matrix
    (cached: every mask of a picture shares it; read only)."""
    return (bilinear_matrix(kept, n_out) @ bilinear_matrix(n_low, size)[:kept]).astype(np.float32)


def upsample_mask(low: np.ndarray, size: int, resized: tuple[int, int], original: tuple[int, int],
                  threshold: float = 0.0) -> np.ndarray:
    """Sam.postprocess_masks + (logits > threshold) for one mask: [S/4, S/4] -> bool [H, W]."""
    rows = _axis_map(low.shape[0], size, resized[0], original[0])      # [H, S/4]
    cols = _axis_map(low.shape[1], size, resized[1], original[1])      # [W, S/4]
    right = low.astype(np.float32) @ cols.T                             # [S/4, W]
    out = np.empty(original, bool)
    for r0 in range(0, original[0], STRIPE_ROWS):
        out[r0:r0 + STRIPE_ROWS] = rows[r0:r0 + STRIPE_ROWS] @ right > threshold
    return out


def upsample_logits(low: np.ndarray, size: int, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """The float logits postprocess_masks returns (for parity checks; small pictures only)."""
    rows = _axis_map(low.shape[0], size, resized[0], original[0])
    cols = _axis_map(low.shape[1], size, resized[1], original[1])
    return rows @ low.astype(np.float32) @ cols.T


_EIGHT = np.ones((3, 3), bool)     # cv2.connectedComponentsWithStats(..., 8)


def fill_small_holes(mask: np.ndarray, area: int) -> np.ndarray:
    """amg.remove_small_regions(mask, area, mode="holes")[0]: every 8-connected region of
    background smaller than `area` pixels becomes foreground (border regions included)."""
    from scipy import ndimage

    labels, n = ndimage.label(~mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < area
    small[0] = False                      # label 0 is the foreground itself
    if not small.any():
        return mask
    return mask | small[labels]


class Segmenter:
    """Runs the two SAM graphs: embed a picture once, then one mask per box."""

    def __init__(self, encoder, decoder, spec: dict):
        self.encoder, self.decoder, self.spec = encoder, decoder, spec
        self.size = int(spec["size"])

    def embed(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        pixels, resized = prepare_image(rgb, self.spec)
        return self.encoder.run(None, {"pixel_values": pixels})[0], resized

    def masks(self, rgb: np.ndarray, boxes: np.ndarray, embedded=None):
        """xyxy boxes [N, 4] in pixels -> (bool masks, one [H, W] per box (generator), iou [N])."""
        emb, resized = embedded if embedded is not None else self.embed(rgb)
        original = rgb.shape[:2]
        frame = boxes_to_frame(boxes, original, resized)
        low, iou = self.decoder.run(None, {"image_embeddings": emb, "boxes": frame})
        thr, hole = float(self.spec.get("mask_threshold", 0.0)), int(self.spec.get("hole_area", 0))

        def each():
            for m in low:
                mask = upsample_mask(m, self.size, resized, original, thr)
                yield fill_small_holes(mask, hole) if hole > 0 else mask
        return each(), iou
