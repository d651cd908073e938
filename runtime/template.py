"""Chat templates as data: a conversation -> text segments and media slots -> cells.

Rendering keeps user text apart from markup: a literal "<ImageHere>" typed by a user
stays text, only the template's own media wrap makes a media slot; likewise the template's
special tokens ("special": {text: id}, e.g. LLaMA-2's "<s>", LEGO's "<im_start>") become
their ids only where the template's own markup writes them. An answer that carries the
token ids it was generated as is rendered as those ids, right after the assistant cue, as
the model produced them (the text after it starts a new segment, as the text after a
picture does); without ids it is rendered as text, as the originals do.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaRef:
    modality: str
    key: str            # content hash (+ modality): the media-cache key and the KV cell identity


@dataclass(frozen=True)
class Special:
    text: str
    id: int             # a single token of the LLM's vocabulary


@dataclass(frozen=True)
class TokenIds:
    """A segment that is already token ids (an answer as generated)."""
    ids: tuple


@dataclass
class Message:
    role: str                         # "user" | "assistant"
    text: str
    media: list = field(default_factory=list)
    token_ids: tuple | None = None    # assistant: the ids it was generated as (None: render the text)


def _markup(template: dict, text: str) -> list:
    """Template text -> [str | Special]: the template's special strings become their ids."""
    special = template.get("special") or {}
    if not special or not text:
        return [text]
    out: list = []
    i = start = 0
    while i < len(text):
        hit = next((s for s in sorted(special, key=len, reverse=True) if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        out += [text[start:i], Special(hit, int(special[hit]))]
        i = start = i + len(hit)
    return out + [text[start:]]


def _wrap(template: dict, ref: MediaRef) -> list:
    wrap = template["media"][ref.modality]
    head, _, tail = wrap.partition(template["placeholder"])
    return [*_markup(template, head), ref, *_markup(template, tail)]


def _ordered(template: dict, media: list) -> list:
    """A turn's media in the template's "media_order" (LEGO: sound, video, image), else as given."""
    order = template.get("media_order")
    if not order:
        return list(media)
    return sorted(media, key=lambda ref: order.index(ref.modality) if ref.modality in order else len(order))


def _system(template: dict, messages: list[Message]) -> str:
    """The template's system text; "system_media" picks another by the first turn's media
    (Emu: the video system message)."""
    first = next((m for m in messages if m.role == "user"), None)
    for ref in first.media if first else ():
        if ref.modality in template.get("system_media", {}):
            return template["system_media"][ref.modality]
    return template["system"]


def render(template: dict, messages: list[Message], system: str | None = None, cue: bool = True) -> list:
    """-> [str | MediaRef | Special | TokenIds, ...] for the whole conversation, ending with the
    assistant cue (cue=False: without it, e.g. the system prompt alone)."""
    mark = lambda text: _markup(template, text)  # noqa: E731
    parts: list = mark(_system(template, messages)) if system is None else [system]
    for msg in messages:
        if msg.role == "user":
            content: list = []
            for i, ref in enumerate(_ordered(template, msg.media)):
                if i:       # BuboGPT: every medium is its own "###Human:" message
                    content += mark(template.get("media_join", ""))
                content += _wrap(template, ref)
            if msg.text:
                if msg.media:
                    content += mark(template.get("media_sep", " "))
                content.append(msg.text)                 # user text: never markup
            head, _, tail = template["user"].partition("{content}")
            parts += [*mark(head), *content, *mark(tail)]
        else:
            before, _, after = template["answer"].partition("{answer}")
            if msg.token_ids is not None:    # the ids follow the cue directly, as when generated
                parts += [*mark(template["assistant"]), TokenIds(tuple(msg.token_ids)), *mark(after)]
            else:
                parts += [*mark(template["assistant"] + before), msg.text, *mark(after)]
    if cue:
        parts += mark(template["assistant"])
    merged: list = []
    for p in parts:                   # adjacent strings -> one segment
        if isinstance(p, str):
            if not p:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += p
                continue
        merged.append(p)
    if template.get("special_strip"):
        strip_around_specials(merged)
    return [p for p in merged if not isinstance(p, str) or p]


def strip_around_specials(segments: list) -> None:
    """transformers 4.29-4.33 (Emu's) dropped the whitespace on both sides of an added token
    when tokenizing; each text chunk between two of them is then encoded on its own."""
    for i, p in enumerate(segments):
        if isinstance(p, Special):
            if i > 0 and isinstance(segments[i - 1], str):
                segments[i - 1] = segments[i - 1].rstrip()
            if i + 1 < len(segments) and isinstance(segments[i + 1], str):
                segments[i + 1] = segments[i + 1].lstrip()


def to_cells(segments: list, tokenize, rows_of, add_bos) -> list:
    """Text segments are tokenized one by one, BOS only before the first text segment
    (MiniGPT-4: the system text; InstructBLIP: after the image rows), or first of all with
    add_bos "first" (Emu: the tokenizer's BOS, whatever the prompt starts with); a media slot
    becomes its rows: (key, 0) ... (key, n-1); a special token its id."""
    cells: list = tokenize("", True) if add_bos == "first" else []
    first_text = add_bos != "first"
    for seg in segments:
        if isinstance(seg, MediaRef):
            cells += [(seg.key, i) for i in range(rows_of(seg))]
        elif isinstance(seg, Special):
            cells.append(seg.id)
        elif isinstance(seg, TokenIds):
            cells += seg.ids
        else:
            cells += tokenize(seg, add_bos and first_text)
            first_text = False
    return cells


def history_answer(template: dict, text: str, token_ids: list[int], piece) -> str:
    """What the history keeps of an answer, as each original builds it.

    Default: the text, already cut at the stop string, stripped (MiniGPT-4's Chat.answer).
    "history_drop": n (PandaGPT: openllama.py's decode(outputs[0][:-2])): the generated ids as
    the original's generate returns them (the stop or EOS token included) without the last n,
    decoded without special tokens; the first piece's sentencepiece space is not kept."""
    drop = int(template.get("history_drop", 0))
    if not drop:
        return text.strip()
    kept = token_ids[:-drop]
    decoded = b"".join(piece(t) for t in kept).decode("utf-8", errors="replace")
    return decoded[1:] if decoded.startswith(" ") else decoded
