"""Conversations and streamed replies.

`Conversation.send` checks and encodes eagerly (bad media, unknown options and an
over-long prompt fail right there, touching nothing); the returned `Reply` prefills and
decodes lazily as it is iterated, yielding text pieces, and can be cancelled.
"""
from __future__ import annotations

import codecs
import dataclasses
import logging
import threading
import time

from .errors import OptionError, PromptTooLong
from .llm import Sampling
from .modalities import SEND_ARGS
from .template import MediaRef, Message, history_answer, render, to_cells

DEFAULT_MAX_TOKENS = 256
log = logging.getLogger("scops")


@dataclasses.dataclass(frozen=True)
class GenOptions:
    sampling: Sampling = Sampling()
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple = ()
    ignore_stop: bool = False      # fixed-length decode: EOS and the template's stops ignored

    @classmethod
    def from_kwargs(cls, **kw) -> "GenOptions":
        names = {f.name for f in dataclasses.fields(Sampling)}
        unknown = set(kw) - names - {"max_tokens", "stop", "ignore_stop"}
        if unknown:
            raise OptionError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        s = Sampling(**{k: v for k, v in kw.items() if k in names and v is not None})
        checks = [(s.temperature >= 0, "temperature must be >= 0"), (s.top_k >= 0, "top_k must be >= 0"),
                  (0 < s.top_p <= 1, "top_p must be in (0, 1]"), (s.repeat_penalty > 0, "repeat_penalty must be > 0")]
        max_tokens = DEFAULT_MAX_TOKENS if kw.get("max_tokens") is None else kw["max_tokens"]
        checks.append((isinstance(max_tokens, int) and max_tokens > 0, "max_tokens must be a positive integer"))
        for ok, msg in checks:
            if not ok:
                raise OptionError(msg)
        stop = kw.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(s, max_tokens, stop, bool(kw.get("ignore_stop", False)))


class Conversation:
    def __init__(self, session, system: str | None = None):
        self.session = session
        self.system = system
        self.messages: list[Message] = []
        self._media: dict = {}          # key -> (modality, rows): this chat's media, never evicted
        self._facts: dict = {}          # key -> decoding facts (size, duration, source)
        self.picture = None              # grounding of the latest picture (a Future): what BuboGPT answers point into

    def reset(self) -> None:
        self.messages, self._media, self._facts, self.picture = [], {}, {}, None

    def media(self) -> list[dict]:
        """Every input of the conversation in prompt order, with its facts: the `media`
        index of a grounding Region points into this list."""
        from .template import _ordered
        out = []
        for msg in self.messages:
            for ref in _ordered(self.session.bundle.template, msg.media):
                if ref.modality != "mix":
                    out.append({"modality": ref.modality, "key": ref.key, **self._facts.get(ref.key, {})})
        return out

    def ground(self, text: str) -> list:
        """The entities an answer points at, for families whose answers carry their own
        grounding (manifest "grounding": "answer_text", LEGO); [] otherwise."""
        if self.session.bundle.manifest.get("grounding") != "answer_text":
            return []
        from .grounding_text import MediaGeometry, parse_answer
        geo = [MediaGeometry(m["modality"], int(m.get("width", 0)), int(m.get("height", 0)),
                             float(m.get("duration", 0.0))) for m in self.media()]
        return parse_answer(text, geo)

    def add(self, role: str, text: str, **media) -> None:
        """Put an earlier turn into the history without generating (e.g. a replayed chat)."""
        if role not in ("user", "assistant"):
            raise OptionError(f"role must be 'user' or 'assistant', not {role!r}")
        refs = self._encode(media, text)[0]
        self.messages.append(Message(role, text if role == "user" else text.strip(), refs))

    def _encode(self, media: dict, instruction: str) -> tuple[list, dict]:
        """media: {"images": [...], "audios": [...], ...} -> refs (in SEND_ARGS order), timings."""
        unknown = set(media) - set(SEND_ARGS)
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(sorted(unknown))}")
        refs, timings = [], {"preprocess_ms": 0.0, "encode_ms": 0.0}
        for arg, modality in SEND_ARGS.items():
            sources = media.get(arg) or ()
            if isinstance(sources, (str, bytes)) or not hasattr(sources, "__iter__"):
                sources = [sources]
            sources = list(sources)
            if not sources:
                continue
            got, t = self.session.encode_media(modality, sources, instruction)
            for r in got:
                self._media[r.key] = self.session.media_rows(r.key)
                self._facts[r.key] = self.session.facts.get(r.key, {})
            if modality == "image" and self.session.grounder is not None:
                self.picture = self.session.grounder.future(got[-1].key)
            refs += got
            for k in ("preprocess_ms", "encode_ms"):
                timings[k] += t[k]
            timings[f"encode_{modality}_ms"] = t["encode_ms"]
        combine = self.session.bundle.manifest.get("combine")
        if combine and len(refs) > 1:
            # PandaGPT: the inputs of one turn become one row, the sum of their projections
            key = "mix:" + "+".join(sorted(r.key for r in refs))
            self._media[key] = ("mix", [self._media[r.key] for r in refs])
            refs = [MediaRef("mix", key)]
        return refs, timings

    def _forget_unused_media(self, extra: list[Message]) -> None:
        """Drop the rows of media no message refers to any more (a caller that trims
        `messages` to a window would otherwise keep every picture of the chat alive)."""
        used = {r.key for m in self.messages + extra for r in m.media}
        for key in [k for k in self._media if k not in used]:
            del self._media[key]

    def _cells(self, messages: list[Message]) -> list:
        tpl = self.session.bundle.template
        segments = render(tpl, messages, self.system)
        llm = self.session.llm
        return to_cells(segments, llm.tokenize, lambda ref: _n_rows(self._media[ref.key]), tpl.get("bos", True))

    def send(self, text: str, **options) -> "Reply":
        """send(text, images=[...], audios=[...], videos=..., thermals=..., depths=..., imus=...,
        temperature=..., top_k=..., top_p=..., repeat_penalty=..., seed=..., max_tokens=...,
        stop=[...], ignore_stop=False)"""
        media = {k: options.pop(k) for k in list(options) if k in SEND_ARGS}
        opts = GenOptions.from_kwargs(**options)
        if not isinstance(text, str):
            raise OptionError("text must be a string")
        t0 = time.perf_counter()
        refs, timings = self._encode(media, text)
        user = Message("user", text, refs)
        self._forget_unused_media([user])
        cells = self._cells(self.messages + [user])
        if len(cells) >= self.session.llm.n_ctx_max:
            raise PromptTooLong(f"the conversation needs {len(cells)} positions but the context holds "
                                f"{self.session.llm.n_ctx_max}; shorten the prompt or start a new chat")
        return Reply(self, user, cells, opts, timings, time.perf_counter() - t0)


def _n_rows(entry) -> int:
    modality, rows = entry
    return len(rows[0][1]) if modality == "mix" else len(rows)


class Reply:
    """Iterate for text pieces; afterwards .text, .token_ids, .finish_reason, .timings."""

    def __init__(self, conv: Conversation, user: Message, cells: list, opts: GenOptions,
                 timings: dict, setup_s: float):
        self.conv, self.user, self.cells, self.opts = conv, user, cells, opts
        self.timings = dict(timings)
        self._setup_s = setup_s
        self.text = ""
        self.token_ids: list[int] = []
        # end offset in .text of each generated token (clipped to the text): answer spans stay
        # addressable, e.g. for grounding phrases back to tokens
        self.offsets: list[int] = []
        # what the answer points at (grounding.Entity), filled when generation ends
        self.grounding: list = []
        self.finish_reason: str | None = None
        self.picture = conv.picture
        self._grounding = None
        self._eog: int | None = None       # the end-of-generation token that ended it, if one did
        self._cancel = threading.Event()
        self._gen = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        self._gen.close()

    def result(self) -> "Reply":
        for _ in self:
            pass
        return self

    @property
    def grounding(self) -> list:
        """The answer's entities (runtime/grounding.py) once it is complete: BuboGPT bundles
        link its phrases to what the grounding stages found in the conversation's latest
        picture (waiting for them if they are still running); [] otherwise."""
        return self._ground()[0]

    @property
    def grounding_facts(self) -> dict:
        """Tags, detector labels, how phrases were matched, dropped detections, stage timings."""
        return self._ground()[1]

    @grounding.setter
    def grounding(self, entities) -> None:
        """Families whose answers carry their own grounding (LEGO) set it as generation ends."""
        self._text_grounding = list(entities)

    def _ground(self) -> tuple:
        if getattr(self, "_text_grounding", None):
            return self._text_grounding, {}
        if self._grounding is None:
            grounder = self.conv.session.grounder
            if grounder is None or self.picture is None or self.finish_reason is None:
                return [], {}
            try:
                picture = self.picture.result()
            except Exception as e:               # a failed stage costs the entities, not the answer
                log.warning("grounding failed: %s", e)
                self._grounding = ([], {"error": f"{type(e).__name__}: {e}"})
                return self._grounding
            self._grounding = grounder.entities(picture, self.text)
        return self._grounding

    def _run(self):
        session, llm = self.conv.session, self.conv.session.llm
        if session.active is not None and session.active is not self:
            session.active.close()
        session.active = self
        stops = list(self.opts.stop)
        if not self.opts.ignore_stop:
            stops += session.bundle.template.get("stop", [])
        sampler = None
        added = False
        try:
            t0 = time.perf_counter()
            fill = _fill_from(session, self.conv._media)
            llm.reserve(min(len(self.cells) + self.opts.max_tokens, llm.n_ctx_max))   # prompt + answer
            reused, decoded = llm.sync(self.cells, fill)
            session.stats.cells_reused += reused
            session.stats.cells_decoded += decoded
            t1 = time.perf_counter()
            self.timings.update(prefill_ms=(t1 - t0) * 1e3, reused_cells=reused, decoded_cells=decoded)
            self.conv.messages.append(self.user)
            added = True
            sampler = llm.make_sampler(self.opts.sampling, [c for c in self.cells if isinstance(c, int)])
            yield from self._generate(llm, sampler, stops, t0)
        finally:
            if sampler is not None:
                llm.free_sampler(sampler)
            if added:
                answer = history_answer(session.bundle.template, self.text,
                                        self.token_ids + ([self._eog] if self._eog is not None else []), llm.piece)
                self.conv.messages.append(Message("assistant", answer))
            if self.finish_reason is None:
                self.finish_reason = "cancelled"
            if session.active is self:
                session.active = None

    def _generate(self, llm, sampler, stops, t0):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        full, emitted = "", 0
        holdback = max((len(s) for s in stops), default=1) - 1
        t_first = t_last = None
        # e.g. Emu's min_length=1: EOS is banned until this many tokens are out
        min_new = 0 if self.opts.ignore_stop else int(self.conv.session.bundle.template.get("min_new_tokens", 0))
        while True:
            if self._cancel.is_set():
                self.finish_reason = "cancelled"
                break
            if len(self.token_ids) < min_new:
                llm.suppress_eog()
            tok = llm.sample(sampler)
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                self.timings["ttft_ms"] = (self._setup_s + t_first - t0) * 1e3
            if llm.is_eog(tok) and not self.opts.ignore_stop:
                self.finish_reason, self._eog = "stop", tok
                break
            self.token_ids.append(tok)
            seen = max(0, len(full) - holdback)      # text before this can hold no stop string
            full += decoder.decode(llm.piece(tok))
            if emitted == 0:
                full = full.lstrip()
            self.offsets.append(len(full))
            cut = min((i for i in (full.find(s, seen) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                full = full[:cut]
                self.finish_reason = "stop"
            end = len(full) if cut >= 0 else max(emitted, len(full) - holdback)
            if end > emitted:
                self.text = full[:end]
                yield full[emitted:end]
                emitted = end
            if cut >= 0:
                break
            if len(self.token_ids) >= self.opts.max_tokens or len(llm.cells) + 1 >= llm.n_ctx:
                self.finish_reason = "length"
                break
            llm.decode_tokens([tok], True)
        if emitted < len(full) and self.finish_reason != "cancelled":
            yield full[emitted:]
        self.text = full
        self.offsets = [min(o, len(full)) for o in self.offsets]
        self.grounding = self.conv.ground(full)
        n = len(self.token_ids)
        self.timings["n_tokens"] = n
        if t_first is not None and n > 1 and t_last > t_first:
            self.timings["decode_tok_s"] = (n - 1) / (t_last - t_first)


def _fill_from(session, media: dict):
    """The splice callback: project a media item's rows straight into llama's batch memory."""
    projectors = session.projectors

    def fill(out, key, start):
        modality, rows = media[key]
        if modality != "mix":
            projectors[modality].forward(rows[start:start + len(out)], out=out)
            return
        (m0, r0), *others = rows                                 # sum of the parts' projections
        projectors[m0].forward(r0[start:start + len(out)], out=out)
        for m, r in others:
            out += projectors[m].forward(r[start:start + len(out)])
    return fill
