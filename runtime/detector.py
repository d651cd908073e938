"""GroundingDINO boxes for a caption, without torch. Twin of BuboGPT's grounding_model.py
prompt2mask2 + groundingdino.util.inference.predict:

- picture: RandomResize([800], max_size=1333) (short side 800 unless the long side would pass
  1333; PIL bilinear), ToTensor, ImageNet Normalize;
- caption: tags joined with ",", lower-cased, stripped, "." appended; BERT WordPiece with
  [CLS] ... [SEP], no truncation; the text self-attention mask and position ids of
  generate_masks_with_special_tokens_and_transfer_map ([CLS], [SEP], ".", "?" close a
  phrase), then everything cut to max_text_len (256);
- outputs: the graph ends in sigmoid (predict's pred_logits.sigmoid()); a query is kept when its best token scores above box_threshold;
  its phrase is the tokens above text_threshold (positions 1..254), decoded and stripped of
  "."; boxes cx, cy, w, h in 0-1 -> x0, y0, x1, y1 pixels of the original picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def resize_shape(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """transforms.resize get_size_with_aspect_ratio -> (new_h, new_w)."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def prepare_image(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [H, W, 3] -> pixel_values [1, 3, h, w] float32."""
    from PIL import Image

    h, w = resize_shape(rgb.shape[0], rgb.shape[1], int(spec["min_size"]), spec.get("max_size"))
    img = Image.fromarray(rgb)
    if (h, w) != rgb.shape[:2]:
        img = img.resize((w, h), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)      # [h, w, 3] -> [1, 3, h, w]


def caption_of(tags) -> str:
    """grounding_fn: ','.join(tags); prompt2mask2 / preprocess_caption: lower, strip, end with '.'."""
    caption = ",".join(tags).lower().strip()
    return caption if caption.endswith(".") else caption + "."


def text_masks(ids: np.ndarray, special_ids) -> tuple[np.ndarray, np.ndarray]:
    """generate_masks_with_special_tokens_and_transfer_map for one caption [T] ->
    (self-attention mask [T, T] bool, position ids [T] int64): each phrase closed by a special
    token attends within itself, positions restart at 0 in each phrase."""
    t = ids.shape[0]
    mask = np.eye(t, dtype=bool)
    pos = np.zeros(t, np.int64)
    prev = 0
    for col in np.flatnonzero(np.isin(ids, list(special_ids))):
        if col == 0 or col == t - 1:
            mask[col, col] = True
            pos[col] = 0
        else:
            mask[prev + 1:col + 1, prev + 1:col + 1] = True
            pos[prev + 1:col + 1] = np.arange(col - prev)
        prev = col
    return mask, pos


def text_inputs(ids: list[int], special_ids, max_len: int) -> dict:
    """Token ids of the caption -> the graph's five text inputs (batch 1), cut to max_len."""
    arr = np.asarray(ids, np.int64)
    mask, pos = text_masks(arr, special_ids)
    arr, mask, pos = arr[:max_len], mask[:max_len, :max_len], pos[:max_len]
    return {"input_ids": arr[None], "token_type_ids": np.zeros_like(arr)[None],
            "attention_mask": np.ones_like(arr)[None], "text_self_attention_masks": mask[None],
            "position_ids": pos[None]}


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]      # x0, y0, x1, y1 in pixels of the original picture
    score: float                                # the best token's probability
    phrase: str                                 # the caption words it scored (BuboGPT's label)


def select(probs: np.ndarray, boxes: np.ndarray, ids: list[int], decode, box_threshold: float,
           text_threshold: float, size: tuple[int, int], max_text_len: int = 256) -> list[Detection]:
    """predict() + prompt2mask2's box conversion for one picture: probs [Q, 256], boxes [Q, 4]."""
    h, w = size
    best = probs.max(axis=1)
    out = []
    for q in np.flatnonzero(best > box_threshold):
        posmap = probs[q] > text_threshold
        posmap[0:1] = False                        # get_phrases_from_posmap(left_idx=0, right_idx=255)
        posmap[max_text_len - 1:] = False
        tokens = [ids[i] for i in np.flatnonzero(posmap) if i < len(ids)]
        phrase = decode(tokens).replace(".", "")
        cx, cy, bw, bh = (float(v) for v in boxes[q])
        x0, y0 = (cx - bw / 2) * w, (cy - bh / 2) * h
        out.append(Detection((x0, y0, x0 + bw * w, y0 + bh * h), float(best[q]), phrase))
    return out


class Detector:
    def __init__(self, session, spec: dict, tokenizer):
        self.session, self.spec, self.tok = session, spec, tokenizer
        self.tok.no_truncation()
        self.tok.no_padding()

    def tokens(self, caption: str) -> list[int]:
        return list(self.tok.encode(caption).ids)                 # [CLS] ... [SEP]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def run(self, rgb: np.ndarray, caption: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """-> (token probabilities [Q, 256], boxes [Q, 4], caption ids)."""
        ids = self.tokens(caption)
        feeds = text_inputs(ids, self.spec["special_ids"], int(self.spec["max_text_len"]))
        feeds["pixel_values"] = prepare_image(rgb, self.spec)
        probs, boxes = self.session.run(["probs", "boxes"], feeds)   # by name: query_index is for the export check
        return probs[0], boxes[0], ids

    def __call__(self, rgb: np.ndarray, tags) -> list[Detection]:
        probs, boxes, ids = self.run(rgb, caption_of(tags))
        return select(probs, boxes, ids, self.decode, float(self.spec["box_threshold"]),
                      float(self.spec["text_threshold"]), rgb.shape[:2], int(self.spec["max_text_len"]))
