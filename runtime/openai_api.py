"""The OpenAI chat-completions wire format: request checking and response bodies.

Pure functions over parsed JSON (no sockets, no session): `parse_chat_request` turns a
request body into a `ChatRequest` or raises `ApiError` (an HTTP status and an
OpenAI-shaped error object); the `build_*` helpers make what goes back. Fetching a remote
image is the caller's business, passed in as `fetch(url) -> bytes`.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from .errors import InputError, OptionError, PromptTooLong, ScopsError, UnsupportedModality
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


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def to_api_error(e: ScopsError) -> ApiError:
    """A runtime error (bad media, too long, unsupported, bad option) -> a 400."""
    codes = {PromptTooLong: "context_length_exceeded", UnsupportedModality: "unsupported_modality",
             InputError: "invalid_media", OptionError: "invalid_value"}
    code = next((c for t, c in codes.items() if isinstance(e, t)), "invalid_request")
    message = f"unsupported modality: {e}" if isinstance(e, UnsupportedModality) else str(e)
    return ApiError(400, message, param="messages" if code != "invalid_value" else None, code=code)


@dataclass(frozen=True)
class Limits:
    max_tokens_cap: int
    max_image_pixels: int
    max_audio_seconds: float
    allow_remote_media: bool


@dataclass(frozen=True)
class Turn:
    role: str                 # "user" | "assistant"
    text: str
    images: tuple = ()        # decoded RGB uint8 arrays
    audios: tuple = ()        # WAV files (bytes), checked for length

    def media(self) -> dict:
        """Keyword arguments of Conversation.add/send for this turn's media (none: {})."""
        return {k: list(v) for k, v in (("images", self.images), ("audios", self.audios)) if v}


@dataclass(frozen=True)
class ChatRequest:
    system: str | None
    history: tuple            # Turn, ...: everything before the last user message
    last: Turn
    gen: dict                 # keyword options for Conversation.send
    stream: bool
    include_usage: bool
    model: str


def parse_chat_request(raw: bytes, limits: Limits, modalities, fetch: Callable[[str], bytes]) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    gen = parse_sampling(body, limits.max_tokens_cap)
    stream = body.get("stream", False)
    _require(isinstance(stream, bool) or stream is None, "stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    _require(isinstance(options, dict), "stream_options must be an object", "stream_options")
    model = body.get("model") or ""
    _require(isinstance(model, str), "model must be a string", "model")
    system, turns = parse_messages(body.get("messages"), limits, modalities, fetch)
    return ChatRequest(system, tuple(turns[:-1]), turns[-1], gen, bool(stream),
                       bool(options.get("include_usage", False)), model)


def parse_sampling(body: dict, cap: int) -> dict:
    """OpenAI sampling fields (plus llama.cpp's top_k / repeat_penalty / ignore_eos) -> send() options."""
    gen: dict = {}
    t = body.get("temperature")
    if t is not None:
        _require(_is_number(t) and 0 <= t <= MAX_TEMPERATURE, f"temperature must be in [0, {MAX_TEMPERATURE:g}]",
                 "temperature")
        gen["temperature"] = float(t)
    p = body.get("top_p")
    if p is not None:
        _require(_is_number(p) and 0 < p <= 1, "top_p must be in (0, 1]", "top_p")
        gen["top_p"] = float(p)
    k = body.get("top_k")
    if k is not None:
        _require(_is_int(k) and k >= 0, "top_k must be a non-negative integer", "top_k")
        gen["top_k"] = k
    rp = body.get("repeat_penalty")
    if rp is not None:
        _require(_is_number(rp) and rp > 0, "repeat_penalty must be > 0", "repeat_penalty")
        gen["repeat_penalty"] = float(rp)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = body.get(name)
    if n is None:
        n = min(DEFAULT_MAX_TOKENS, cap)
    _require(_is_int(n) and n > 0, f"{name} must be a positive integer", name)
    _require(n <= cap, f"{name} {n} is over this server's cap of {cap}", name, "max_tokens_cap")
    gen["max_tokens"] = n
    seed = body.get("seed")
    if seed is not None:
        _require(_is_int(seed), "seed must be an integer", "seed")
        gen["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        _require(isinstance(stops, list) and len(stops) <= MAX_STOPS
                 and all(isinstance(s, str) and s for s in stops),
                 f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
        gen["stop"] = tuple(stops)
    ignore_eos = body.get("ignore_eos")        # llama.cpp server's extension: fixed-length decode
    if ignore_eos is not None:
        _require(isinstance(ignore_eos, bool), "ignore_eos must be a boolean", "ignore_eos")
        gen["ignore_stop"] = ignore_eos
    count = body.get("n")
    _require(count is None or count == 1, "only n=1 is supported", "n")
    return gen


def parse_messages(messages, limits: Limits, modalities, fetch) -> tuple[str | None, list[Turn]]:
    _require(isinstance(messages, list) and messages, "messages must be a non-empty list", "messages")
    systems: list[str] = []
    turns: list[Turn] = []
    n_media = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        _require(isinstance(m, dict), f"{where} must be an object", where)
        role = m.get("role")
        _require(role in ROLES, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        text, images, audios = parse_content(content, where, limits, modalities, fetch)
        if role in ("system", "developer"):
            _require(not images and not audios, f"{where}: a {role} message takes text only", f"{where}.content")
            systems.append(text)
            continue
        _require(role == "user" or not (images or audios), f"{where}: an assistant message takes text only",
                 f"{where}.content")
        n_media += len(images) + len(audios)
        _require(n_media <= MAX_MEDIA_PER_REQUEST, f"at most {MAX_MEDIA_PER_REQUEST} images and clips per request",
                 where)
        turns.append(Turn(role, text, tuple(images), tuple(audios)))
    _require(bool(turns) and turns[-1].role == "user", "the last message must be a user message", "messages")
    return ("\n".join(systems) if systems else None), turns


def parse_content(content, where: str, limits: Limits, modalities, fetch) -> tuple[str, list, list]:
    """-> (text, images, audios) of a message's content."""
    if isinstance(content, str):
        return content, [], []
    _require(isinstance(content, list), f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts: list[str] = []
    images: list = []
    audios: list = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        _require(isinstance(part, dict), f"{at} must be an object", at)
        kind = part.get("type")
        if kind == "text":
            _require(isinstance(part.get("text"), str), f"{at}.text must be a string", at)
            texts.append(part["text"])
        elif kind == "image_url":
            _require_modality("image", modalities, at)
            images.append(parse_image(part.get("image_url"), at, limits, fetch))
        elif kind == "input_audio":
            _require_modality("audio", modalities, at)
            audios.append(parse_audio(part.get("input_audio"), at, limits))
        else:
            raise ApiError(400, f"{at}.type {kind!r} is not supported (text, image_url, input_audio)", param=at)
    return "\n".join(texts), images, audios


def parse_image(spec, at: str, limits: Limits, fetch):
    _require(isinstance(spec, dict) and isinstance(spec.get("url"), str), f"{at}.image_url.url must be a string", at)
    url = spec["url"]
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        _require(bool(sep) and head.endswith(";base64"), f"{at}: data URL must be base64 (data:image/...;base64,...)",
                 at)
        data = _b64(payload, at)
    elif url.startswith(("http://", "https://")):
        _require(limits.allow_remote_media, f"{at}: remote image URLs are off on this server "
                 "(send a data: URL, or start it with --allow-remote-media)", at, "remote_media_disabled")
        data = fetch(url)
    else:
        raise ApiError(400, f"{at}: image URL must be a data: URL (or http(s) with --allow-remote-media); "
                       "local paths and file: URLs are never read", param=at)
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels)
    except InputError as e:
        raise ApiError(400, f"{at}: {e}", param=at, code="invalid_media") from None


def parse_audio(spec, at: str, limits: Limits) -> bytes:
    """Base64 WAV -> its bytes, refused when not a WAV or over the server's length limit."""
    _require(isinstance(spec, dict) and isinstance(spec.get("data"), str), f"{at}.input_audio.data must be a string",
             at)
    _require(spec.get("format", "wav") == "wav", f"{at}.input_audio.format must be 'wav'", at)
    data = _b64(spec["data"], at)
    seconds = measure_wav_seconds(data)
    _require(seconds is not None, f"{at}: not a readable WAV file", at, "invalid_media")
    _require(seconds <= limits.max_audio_seconds, f"{at}: {seconds:.1f} s of audio is over the "
             f"{limits.max_audio_seconds:g} s limit", at, "audio_too_long")
    return data


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


# ---- responses ----------------------------------------------------------------------
def make_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def build_completion(cid: str, model: str, result: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": result["usage"], "scops": result["scops"]}


def build_chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    body.update(extra)
    return body


def build_usage_chunk(cid: str, model: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}


# ---- helpers ------------------------------------------------------------------------
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
