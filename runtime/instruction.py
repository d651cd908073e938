"""The instruction input of a text-conditioned Q-Former (InstructBLIP): BERT WordPiece ids.

The bundle ships the tokenizer as tokenizer.json (read with the `tokenizers` library).
LAVIS tokenizes with [CLS] ... [SEP], at most max_len ids, truncating on the left (the
end of a long instruction is what the question is about).
"""
from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .errors import BundleError


class InstructionTokenizer:
    def __init__(self, bundle: Bundle, spec: dict):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(bundle.file(spec["tokenizer"])))
        except Exception as e:
            raise BundleError(f"{spec['tokenizer']}: unreadable tokenizer ({e})") from None
        self.tok.no_truncation()
        self.tok.no_padding()
        self.max_len = int(spec["max_len"])
        self.cls, self.sep = int(spec["cls_id"]), int(spec["sep_id"])
        self.left = spec.get("truncation", "left") == "left"

    def encode(self, text: str) -> dict:
        """-> {"instruction_ids": [1, T] int64, "instruction_mask": [1, T] int64}."""
        body = self.tok.encode(text, add_special_tokens=False).ids
        keep = self.max_len - 2                                   # room for [CLS] and [SEP]
        if len(body) > keep:
            body = body[-keep:] if self.left else body[:keep]
        ids = np.asarray([[self.cls, *body, self.sep]], dtype=np.int64)
        return {"instruction_ids": ids, "instruction_mask": np.ones_like(ids)}
