"""The OpenAI chat-completions wire format: request and response models, declared once.

Pure functions over bytes (no sockets, no session). `parse_chat_request` validates a body
against the pydantic models (JSON, Unicode, nesting, types and ranges in one pass) and
the server's limits, and returns a `ChatRequest` whose pictures and clips are still
undecoded `MediaSpec`s, or raises `ApiError` (an HTTP status and an OpenAI-shaped error
body): the server decodes media only once the request holds a place in its queue
(`decode_media`, in a bounded pool). The response models carry one extra object,
`scops` (timings, KV reuse, turns left out); extra fields (e.g. grounding) go there.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError, OptionError, PromptTooLong, ScopsError, SlotsBusy, UnsupportedModality
from .preprocess import decode_image

# OpenAI documents temperature in [0, 2]; above that sampling is noise.
MAX_TEMPERATURE = 2.0
# OpenAI accepts up to 4 stop sequences.
MAX_STOPS = 4
# More media than this in one request would not fit a 2k context anyway (32 rows each
# plus text) and only cost decode time and memory before PromptTooLong says so.
MAX_MEDIA_PER_REQUEST = 16
# What a request without max_tokens gets (capped by the server's --max-tokens-cap).
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "developer", "user", "assistant")
INT32_MAX = 2**31 - 1          # llama.cpp's top_k is an int32
# Penalties are divisors of logits: past 100 every seen token is simply banned.
MAX_REPEAT_PENALTY = 100.0


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                           code=self.code)).model_dump()


def to_api_error(e: ScopsError) -> ApiError:
    """A runtime error (bad media, too long, unsupported, bad option) -> a 400; every sequence
    busy for too long -> 503."""
    if isinstance(e, SlotsBusy):
        return ApiError(503, str(e), type="server_error", code="slots_busy")
    codes = {PromptTooLong: "context_length_exceeded", UnsupportedModality: "unsupported_modality",
             InputError: "invalid_media", OptionError: "invalid_value"}
    code = next((c for t, c in codes.items() if isinstance(e, t)), "invalid_request")
    message = f"unsupported modality: {e}" if isinstance(e, UnsupportedModality) else str(e)
    return ApiError(400, message, param="messages" if code != "invalid_value" else None, code=code)


# ---- request models -----------------------------------------------------------------------
class _Strict(BaseModel):
    # Strict types (no "5" for 5, no 1.0 for an int), no NaN or infinity, unknown fields ignored.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Strict):
    data: str
    format: Literal["wav"] = "wav"


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoUrl(_Strict):
    url: str


class VideoPart(_Strict):                     # vLLM's and llama.cpp's part for a clip
    type: Literal["video_url"]
    video_url: VideoUrl


Part = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]
PART_TYPES = "text, image_url, input_audio, video_url"


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)           # llama.cpp's extension
    repeat_penalty: float | None = Field(None, gt=0, le=MAX_REPEAT_PENALTY)   # llama.cpp's extension
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    ignore_eos: bool | None = None                                  # llama.cpp's: fixed-length decode
    n: Literal[1] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


# ---- response models ------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ScopsInfo(BaseModel):
    """scops' extra object on a completion (and on a stream's last chunk)."""
    model_config = ConfigDict(extra="allow")
    timings: dict[str, float]
    reused_cells: int
    decoded_cells: int
    snapshot_restored: bool
    dropped_turns: int               # earlier turns left out: the conversation outgrew the context


class AnswerMessage(BaseModel):
    # extra: `grounding` (grounding families only): what the answer points at, grounding_json's list
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    scops: ScopsInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    grounding: list[dict] | None = None          # the finish chunk of a grounding family (set only there)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    scops: ScopsInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "scops"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- parsing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int
    max_image_pixels: int
    max_audio_seconds: float
    allow_remote_media: bool


@dataclass(frozen=True)
class MediaSpec:
    """A picture or clip of a request, not decoded yet."""
    modality: str             # "image" | "audio" | "video"
    source: str               # image, video: a data: or http(s) URL; audio: base64 WAV
    param: str                # where it was in the request, for errors


@dataclass(frozen=True)
class Turn:
    role: str                 # "user" | "assistant"
    text: str
    media: tuple = ()         # MediaSpec, ...


@dataclass(frozen=True)
class ChatRequest:
    system: str | None
    history: tuple            # Turn, ...: everything before the last user message
    last: Turn
    gen: dict                 # keyword options for Conversation.send
    stream: bool
    include_usage: bool
    model: str

    def media(self) -> list[MediaSpec]:
        return [m for t in self.history + (self.last,) for m in t.media]


def parse_chat_request(raw: bytes, limits: Limits, modalities) -> ChatRequest:
    """A request body -> ChatRequest, or ApiError (400) saying what is wrong and where."""
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise _validation_error(e) from None
    gen = _sampling(body, limits.max_tokens_cap)
    system, turns = _turns(body.messages, limits, modalities)
    return ChatRequest(system, tuple(turns[:-1]), turns[-1], gen, bool(body.stream),
                       bool(body.stream_options and body.stream_options.include_usage), body.model)


def _sampling(body: ChatCompletionRequest, cap: int) -> dict:
    """-> Conversation.send options (ranges and types were checked by the model)."""
    gen = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "repeat_penalty", "seed")
           if getattr(body, k) is not None}
    if "seed" in gen:
        gen["seed"] &= 0xFFFFFFFF                 # llama.cpp seeds are 32-bit
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    n = getattr(body, name)
    n = min(DEFAULT_MAX_TOKENS, cap) if n is None else n
    _require(n <= cap, f"{name} {n} is over this server's cap of {cap}", name, "max_tokens_cap")
    gen["max_tokens"] = n
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        _require(len(stops) <= MAX_STOPS and all(stops),
                 f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
        gen["stop"] = tuple(stops)
    if body.ignore_eos is not None:
        gen["ignore_stop"] = body.ignore_eos
    return gen


def _turns(messages: list[ChatMessage], limits: Limits, modalities) -> tuple[str | None, list[Turn]]:
    systems: list[str] = []
    turns: list[Turn] = []
    n_media = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        content = m.content
        if content is None:
            _require(m.role == "assistant", f"{where}.content is required", f"{where}.content")
            content = ""
        texts, media = ([content], []) if isinstance(content, str) else ([], [])
        for j, part in enumerate(content if isinstance(content, list) else ()):
            at = f"{where}.content[{j}]"
            if isinstance(part, TextPart):
                texts.append(part.text)
                continue
            modality, source = (("image", part.image_url.url) if isinstance(part, ImagePart) else
                                ("video", part.video_url.url) if isinstance(part, VideoPart) else
                                ("audio", part.input_audio.data))
            _require_modality(modality, modalities, at)
            _require(m.role == "user", f"{where}: a {m.role} message takes text only", f"{where}.content")
            if modality != "audio":
                _check_media_url(source, at, limits, modality)
            media.append(MediaSpec(modality, source, at))
        text = "\n".join(texts)
        if m.role in ("system", "developer"):
            systems.append(text)
            continue
        n_media += len(media)
        _require(n_media <= MAX_MEDIA_PER_REQUEST, f"at most {MAX_MEDIA_PER_REQUEST} images and clips per request",
                 where)
        turns.append(Turn(m.role, text, tuple(media)))
    _require(bool(turns) and turns[-1].role == "user", "the last message must be a user message", "messages")
    return ("\n".join(systems) if systems else None), turns


def _check_media_url(url: str, at: str, limits: Limits, modality: str = "image") -> None:
    if url.startswith("data:"):
        head, sep, _ = url.partition(",")
        _require(bool(sep) and head.endswith(";base64"),
                 f"{at}: data URL must be base64 (data:{modality}/...;base64,...)", at)
    elif url.startswith(("http://", "https://")):
        _require(limits.allow_remote_media, f"{at}: remote {modality} URLs are off on this server "
                 "(send a data: URL, or start it with --allow-remote-media)", at, "remote_media_disabled")
    else:
        raise ApiError(400, f"{at}: {modality} URL must be a data: URL (or http(s) with --allow-remote-media); "
                       "local paths and file: URLs are never read", param=at)


# ---- media (run by the server in its decode pool) ---------------------------------------
def decode_media(spec: MediaSpec, limits: Limits, fetch: Callable[[str], bytes]):
    """-> decoded RGB array (image), WAV bytes (audio, length-checked) or the video file's
    bytes (decoded by the session: PyAV reads only the frames it samples), or ApiError."""
    at = spec.param
    if spec.modality == "audio":
        data = _b64(spec.source, at)
        seconds = measure_wav_seconds(data)
        _require(seconds is not None, f"{at}: not a readable WAV file", at, "invalid_media")
        _require(seconds <= limits.max_audio_seconds, f"{at}: {seconds:.1f} s of audio is over the "
                 f"{limits.max_audio_seconds:g} s limit", at, "audio_too_long")
        return data
    data = _b64(spec.source.partition(",")[2], at) if spec.source.startswith("data:") else fetch(spec.source)
    if spec.modality == "video":
        _require(len(data) > 0, f"{at}: empty video", at, "invalid_media")
        return data
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels)
    except InputError as e:
        raise ApiError(400, f"{at}: {e}", param=at, code="invalid_media") from None


def measure_wav_seconds(data: bytes) -> float | None:
    """Duration of a RIFF/WAVE file from its header (any sample format); None if not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate, size = 12, 0, None
    while pos + 8 <= len(data):
        chunk, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and length >= 16:
            byte_rate = int.from_bytes(data[pos + 16:pos + 20], "little")    # bytes per second
        elif chunk == b"data":
            size = min(length, len(data) - pos - 8)
            break
        pos += 8 + length + (length & 1)
    if not byte_rate or size is None:
        return None
    return size / byte_rate


# ---- responses ----------------------------------------------------------------------------
def make_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def build_completion(cid: str, model: str, text: str, finish_reason: str, usage: Usage,
                     info: ScopsInfo, grounding: list | None = None) -> ChatCompletion:
    extra = {} if grounding is None else {"grounding": grounding}
    return ChatCompletion(id=cid, created=int(time.time()), model=model, usage=usage, scops=info,
                          choices=[Choice(message=AnswerMessage(content=text, **extra), finish_reason=finish_reason)])


def build_chunk(cid: str, model: str, delta: Delta | None, finish_reason: str | None = None,
                usage: Usage | None = None, info: ScopsInfo | None = None) -> str:
    """One stream event's JSON: a delta with only the fields it was given (and usage / scops
    when given), or, with delta None, a usage-only chunk (no choices)."""
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)]
    extra = {k: v for k, v in (("usage", usage), ("scops", info)) if v is not None}
    chunk = ChatCompletionChunk(id=cid, object="chat.completion.chunk", created=int(time.time()), model=model,
                                choices=choices, **extra)
    return chunk.model_dump_json(exclude_unset=True)


# ---- helpers ------------------------------------------------------------------------------
def _validation_error(e: ValidationError) -> ApiError:
    """The most specific of pydantic's errors as one OpenAI error: param is the field's path
    (messages[0].content[1].image_url.url), the message says what is wrong with it."""
    errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body ({errors[0]['msg'].removeprefix('Invalid JSON: ')})")
    paths = [(_param(err["loc"]), err) for err in errors]
    deepest = max(len(p) for p, _ in paths)
    path, err = next((p, err) for p, err in paths if len(p) == deepest)
    messages = list(dict.fromkeys(err["msg"] for p, err in paths if p == path))
    if err["type"] == "union_tag_invalid":
        messages = [f"type must be one of {PART_TYPES}"]
    elif path.endswith("content") and len(messages) > 1:
        messages = [f"must be a string or a list of parts ({PART_TYPES})"]
    return ApiError(400, f"{path or 'body'}: {' or '.join(messages)}", param=path or None)


def _param(loc: tuple) -> str:
    """pydantic's loc -> a path of the request's own names (union branch labels and tags dropped)."""
    path = ""
    for el in loc:
        if isinstance(el, int):
            path += f"[{el}]"
        elif el in _FIELDS and not path.endswith("." + el) and path != el:
            path += ("." if path else "") + el
    return path


_FIELDS = {name for m in (TextPart, ImageUrl, ImagePart, InputAudio, AudioPart, VideoUrl, VideoPart, ChatMessage,
                          StreamOptions, ChatCompletionRequest) for name in m.model_fields}


def _require(ok: bool, message: str, param: str | None = None, code: str | None = None) -> None:
    if not ok:
        raise ApiError(400, message, param=param, code=code)


def _require_modality(modality: str, modalities, at: str) -> None:
    if modality not in modalities:
        served = ", ".join(sorted(modalities)) or "text only"
        raise ApiError(400, f"unsupported modality: {at}: this bundle takes no {modality} (it serves {served})",
                       param=at, code="unsupported_modality")


def _b64(payload: str, at: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{at}: invalid base64 data", param=at, code="invalid_media") from None
