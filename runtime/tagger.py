"""RAM tags of a picture, without torch. Twin of BuboGPT's tagging_model.py + ram.generate_tag.

TaggingModule: Resize((384, 384)) of the PIL picture (bilinear, aspect not kept), ToTensor,
ImageNet Normalize; generate_tag: sigmoid(logits) > class_threshold per tag, the tags in
list order (joined with ' | ' and split again by BuboGPT: the same list).
"""
from __future__ import annotations

import json

import numpy as np


def prepare_image(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [H, W, 3] -> pixel_values [1, 3, S, S] float32."""
    from PIL import Image

    size = int(spec["size"])
    small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return ((small - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)   # [S, S, 3] -> [1, 3, S, S]


def load_tag_table(path) -> tuple[list[str], np.ndarray]:
    """The bundle's tag file: {"tags": [...], "thresholds": [...]} (same length)."""
    data = json.loads(open(path, encoding="utf-8").read())
    tags, thr = list(data["tags"]), np.asarray(data["thresholds"], np.float32)
    if len(tags) != thr.shape[0]:
        raise ValueError(f"{path}: {len(tags)} tags but {thr.shape[0]} thresholds")
    return tags, thr


def select_tags(probs: np.ndarray, tags: list[str], thresholds: np.ndarray) -> list[str]:
    """probs [C] -> the tags whose probability is above their own threshold, in list order."""
    if probs.shape != thresholds.shape:
        raise ValueError(f"tagger gave {probs.shape[0]} probabilities for {thresholds.shape[0]} tags")
    return [tags[i] for i in np.flatnonzero(probs > thresholds)]


class Tagger:
    def __init__(self, session, spec: dict, tags: list[str], thresholds: np.ndarray):
        self.session, self.spec, self.tags, self.thresholds = session, spec, tags, thresholds

    def __call__(self, rgb: np.ndarray) -> list[str]:
        probs = self.session.run(None, {"pixel_values": prepare_image(rgb, self.spec)})[0][0]
        return select_tags(probs, self.tags, self.thresholds)
