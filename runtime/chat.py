"""Conversations and streamed replies.

`Conversation.send` checks and encodes eagerly (bad media, unknown options and an
over-long prompt fail right there, touching nothing); the returned `Reply` is read
lazily, yielding text pieces, and can be cancelled. Replies of several conversations of
one session are made together (runtime/batch.py): read them from several threads, or
interleave them from one; whichever reader asks steps all of them.

History: a conversation keeps each answer's generated token ids (`history="ids"`, the
default), so the next turn decodes only what is new, as llama.cpp's server does. The
originals (MiniGPT-4, PandaGPT, ...) re-tokenize the answer text into the next prompt;
`history="text"` does that, at the cost of decoding the answer again. The two can give
different tokens at the answer's borders, and so a different turn 2.

Long conversations: when a turn would leave less than `min(max_tokens, n_ctx / 4)`
positions for the answer, the oldest whole turns are left out of the prompt (never the
system prompt, never part of a picture's rows), in blocks of about half the context so
that the prompt's start moves rarely and its KV is reused in between; the reply reports
how many (`Reply.dropped_turns`). `overflow="error"` refuses instead (PromptTooLong).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref
from concurrent.futures import CancelledError

from .errors import OptionError
from .llm import Sampling
from .modalities import SEND_ARGS
from .stream import Job
from .template import MediaRef, Message, history_answer, render, to_cells

HISTORY_MODES = ("ids", "text")
OVERFLOW_MODES = ("drop", "error")
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
        checks = [(s.temperature >= 0, "temperature must be >= 0"), (0 <= s.top_k < 2**31, "top_k must be in [0, 2**31)"),
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
    def __init__(self, session, system: str | None = None, history: str | None = None,
                 overflow: str | None = None):
        self.session = session
        self.system = system
        self.history = history or session.opts.history
        self.overflow = overflow or session.opts.overflow
        if self.history not in HISTORY_MODES:
            raise OptionError(f"history must be one of {', '.join(HISTORY_MODES)}, not {self.history!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise OptionError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, not {self.overflow!r}")
        self.messages: list[Message] = []
        self._media: dict = {}          # key -> (modality, rows): this chat's media, never evicted
        self._facts: dict = {}          # key -> decoding facts (size, duration, source)
        self._job: Job | None = None    # the reply in progress, if any
        self.picture = None              # grounding of the latest picture (a Future): what BuboGPT answers point into

    def reset(self) -> None:
        self._stop_active()
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

    def add(self, role: str, text: str, token_ids=None, **media) -> None:
        """Put an earlier turn into the history without generating (e.g. a replayed chat).
        An answer this session generated is recognised by its text and position and kept
        as its token ids (history="ids"); `token_ids` gives them explicitly."""
        if role not in ("user", "assistant"):
            raise OptionError(f"role must be 'user' or 'assistant', not {role!r}")
        self._stop_active()
        refs = self._encode(media, text)[0]
        if role == "user":
            self.messages.append(Message("user", text, refs))
            return
        answer = text.strip()
        if token_ids is None and self.history == "ids":
            token_ids = self.session.recall_answer(self._answer_key(self.messages, answer))
        self.messages.append(Message("assistant", answer, refs,
                                     tuple(token_ids) if token_ids is not None and self.history == "ids" else None))

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
            got, rows, t = self.session.encode_media_rows(modality, sources, instruction)
            self._media.update(rows)
            for r in got:
                self._facts[r.key] = self.session.media_facts(r.key)
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
        stop=[...], ignore_stop=False). A reply of this conversation still in progress is
        cancelled first (its partial answer stays in the history)."""
        media = {k: options.pop(k) for k in list(options) if k in SEND_ARGS}
        opts = GenOptions.from_kwargs(**options)
        if not isinstance(text, str):
            raise OptionError("text must be a string")
        self._stop_active()
        t0 = time.perf_counter()
        refs, timings = self._encode(media, text)
        user = Message("user", text, refs)
        self._forget_unused_media([user])
        cells, dropped = self._fit(user, opts)
        stops = list(opts.stop)
        if not opts.ignore_stop:
            stops += self.session.bundle.template.get("stop", [])
        history = list(self.messages)

        def done(job: Job) -> None:          # the scheduler ends the job: the turn joins the history
            if job.t_first is None:          # cancelled before its prompt was read: as if never sent
                return
            ids = job.answer_ids() if self.history == "ids" else None
            if ids is not None:
                answer = job.text.strip()
                self.session.remember_answer(self._answer_key(history + [user], answer), ids)
                self.messages += [user, Message("assistant", answer, [], tuple(ids))]
            else:   # as the original builds its history (PandaGPT: its ids less the last two, decoded)
                generated = job.token_ids + ([job.eog] if job.eog is not None else [])
                answer = history_answer(self.session.bundle.template, job.text, generated, self.session.llm.piece)
                self.messages += [user, Message("assistant", answer)]
            job.grounding = self.ground(job.text)
            if self.picture is not None:       # BuboGPT: regions point at the chat's latest picture
                pictures = [i for i, m in enumerate(self.media()) if m["modality"] == "image"]
                job.picture_at = pictures[-1] if pictures else 0
        # e.g. Emu's min_length=1: EOS is banned until this many tokens are out
        min_new = 0 if opts.ignore_stop else int(self.session.bundle.template.get("min_new_tokens", 0))
        job = Job(self.session.llm, cells, opts, stops, _fill_from(self.session, self._media),
                  time.perf_counter() - t0, timings, done, min_new)
        self._job = job
        return Reply(self, user, job, dropped)

    def _stop_active(self) -> None:
        if self._job is not None and not self._job.finished:
            self.session.scheduler.cancel(self._job)
        self._job = None

    def _fit(self, user: Message, opts: GenOptions) -> tuple[list, int]:
        """The prompt's cells, leaving out the oldest turns if the prompt outgrows the context
        (see the module doc); -> (cells, turns left out)."""
        llm = self.session.llm
        msgs = self.messages + [user]
        cells = self._cells(msgs)
        reserve = min(opts.max_tokens, llm.n_ctx_max // 4)      # room for the answer
        starts = [i for i, m in enumerate(msgs) if m.role == "user" and i > 0]
        if len(cells) + reserve <= llm.n_ctx_max or self.overflow == "error" or not starts:
            llm.check_fits(len(cells))
            return cells, 0
        block = max(1, llm.n_ctx_max // 2)
        target = -(-(len(cells) + reserve - llm.n_ctx_max) // block) * block     # whole blocks
        for start in starts:
            window = self._cells(msgs[start:])
            if len(cells) - len(window) >= target:
                break
        llm.check_fits(len(window))
        return window, sum(m.role == "user" for m in msgs[:start])

    def _answer_key(self, before: list[Message], answer: str) -> str:
        """Identity of an answer: the conversation before it and its text."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.system, [(m.role, m.text, [r.key for r in m.media], m.token_ids) for m in before],
                       answer)).encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def _n_rows(entry) -> int:
    modality, rows = entry
    return len(rows[0][1]) if modality == "mix" else len(rows)


class Reply:
    """Iterate for text pieces; afterwards .text, .token_ids, .finish_reason, .timings."""

    def __init__(self, conv: Conversation, user: Message, job: Job, dropped_turns: int = 0):
        self.conv, self.user, self._job = conv, user, job
        self.cells, self.opts = job.cells, job.opts
        self.dropped_turns = dropped_turns      # earlier turns left out of this prompt (context full)
        self._scheduler = conv.session.scheduler
        self.picture = conv.picture             # BuboGPT: the grounding of the latest picture (a Future)
        self._grounding = None
        weakref.finalize(self, job.cancel_requested.set)   # a reply nobody holds frees its slot

    def start(self, listener=None) -> "Reply":
        """Queue it for generation now (reading it does so too); `listener()` is then called
        from the generating thread whenever pieces arrive or it ends."""
        self._job.listener = listener
        self._scheduler.submit(self._job)
        return self

    def __iter__(self):
        return self

    def __next__(self) -> str:
        job = self._job
        while True:
            if job.pieces:
                return job.pieces.popleft()
            if job.finished:
                if job.error is not None:
                    raise job.error
                raise StopIteration
            self._scheduler.submit(job)
            self._scheduler.pump(job)

    def take(self) -> list[str]:
        """The pieces generated so far and not yet read (never blocks)."""
        out = []
        while self._job.pieces:
            out.append(self._job.pieces.popleft())
        return out

    @property
    def finished(self) -> bool:
        return self._job.finished

    def cancel(self) -> None:
        self._job.cancel_requested.set()

    def close(self) -> None:
        self._scheduler.cancel(self._job)

    def result(self) -> "Reply":
        for _ in self:
            pass
        return self

    text = property(lambda self: self._job.text)
    token_ids = property(lambda self: self._job.token_ids)
    # end offset in .text of each generated token: answer spans stay addressable (grounding)
    offsets = property(lambda self: self._job.offsets)

    @property
    def grounding(self) -> list:
        """The answer's entities (runtime/grounding.py) once it is complete: LEGO's answers carry
        their own (set as generation ends); BuboGPT bundles link its phrases to what the
        grounding stages found in the conversation's latest picture (waiting for them if they
        are still running); [] otherwise."""
        return self._ground()[0]

    @property
    def grounding_facts(self) -> dict:
        """Tags, detector labels, how phrases were matched, dropped detections, stage timings."""
        return self._ground()[1]

    @grounding.setter
    def grounding(self, entities) -> None:
        self._job.grounding = list(entities)

    def _ground(self) -> tuple:
        if self._job.grounding:
            return self._job.grounding, {}
        if self._grounding is None:
            grounder = self.conv.session.grounder
            if grounder is None or self.picture is None or not self._job.finished:
                return [], {}
            try:
                picture = self.picture.result()
            except CancelledError:               # still queued when newer pictures pushed it out
                self._grounding = ([], {"error": "grounding skipped: too many newer pictures were queued"})
                return self._grounding
            except Exception as e:               # a failed stage costs the entities, not the answer
                log.warning("grounding failed: %s", e)
                self._grounding = ([], {"error": f"{type(e).__name__}: {e}"})
                return self._grounding
            self._grounding = grounder.entities(picture, self.text, self._job.picture_at)
        return self._grounding

    finish_reason = property(lambda self: self._job.finish_reason)
    timings = property(lambda self: self._job.timings)
    first_token_at = property(lambda self: self._job.t_first)     # time.perf_counter() of the first token
    snapshot_restored = property(lambda self: self._job.snapshot_restored)
    error = property(lambda self: self._job.error)


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
