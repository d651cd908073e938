"""Chat templates as data: a conversation -> text segments and media slots -> cells.

Rendering keeps user text apart from markup: a literal "<ImageHere>" typed by a user
stays text, only the template's own media wrap makes a media slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaRef:
    modality: str
    key: str            # content hash (+ modality): the media-cache key and the KV cell identity


@dataclass
class Message:
    role: str                         # "user" | "assistant"
    text: str
    media: list = field(default_factory=list)


def _wrap(template: dict, ref: MediaRef) -> list:
    wrap = template["media"][ref.modality]
    head, _, tail = wrap.partition(template["placeholder"])
    return [head, ref, tail]


def render(template: dict, messages: list[Message], system: str | None = None) -> list:
    """-> [str | MediaRef, ...] for the whole conversation, ending with the assistant cue."""
    parts: list = [template["system"] if system is None else system]
    for msg in messages:
        if msg.role == "user":
            content: list = []
            for i, ref in enumerate(msg.media):
                if i:       # BuboGPT: every medium is its own "###Human:" message
                    content.append(template.get("media_join", ""))
                content += _wrap(template, ref)
            if msg.text:
                if msg.media:
                    content.append(template.get("media_sep", " "))
                content.append(msg.text)
            head, _, tail = template["user"].partition("{content}")
            parts += [head, *content, tail]
        else:
            parts.append(template["assistant"] + template["answer"].format(answer=msg.text))
    parts.append(template["assistant"])
    merged: list = []
    for p in parts:                   # adjacent strings -> one segment
        if isinstance(p, str):
            if not p:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += p
                continue
        merged.append(p)
    return merged


def to_cells(segments: list, tokenize, rows_of, add_bos: bool) -> list:
    """Text segments are tokenized one by one, BOS only before the first text segment
    (MiniGPT-4: the system text; InstructBLIP: after the image rows); a media slot
    becomes its rows: (key, 0) ... (key, n-1)."""
    cells: list = []
    first_text = True
    for seg in segments:
        if isinstance(seg, MediaRef):
            cells += [(seg.key, i) for i in range(rows_of(seg))]
        else:
            cells += tokenize(seg, add_bos and first_text)
            first_text = False
    return cells


def clean_answer(text: str) -> str:
    """What the history keeps of an answer (generation already cut it at the stop string):
    stripped, as MiniGPT-4's Chat.answer stores it."""
    return text.strip()
