"""The work behind `scops serve`: admission, media decoding, encoding and generation.

Order of a chat request, each step bounded:
1. `admit`: a place among `parallel + queue` (else 429) before anything is decoded;
2. `prepare`: every picture and clip decoded in a pool of `decode_workers` threads and at
   once reduced to its encoder input (`Session.prepare_media`): a burst of large photos
   costs `decode_workers` decoded originals at a time, not one per request;
3. `start`: one encode thread runs the encoders and builds the conversation (history
   answers recognised as generated, so their KV is reused), then queues the reply;
4. the engine thread steps the session's scheduler while any reply is active: the decode
   steps of all of them go into one llama_decode (runtime/batch.py).
A reply's listener is called from the engine thread as pieces arrive; the HTTP side reads
them with `Reply.take`.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import http.client
import logging
import threading
import time
import urllib.request
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from .errors import ScopsError
from .openai_api import ApiError, ChatRequest, Limits, MediaSpec, decode_media, to_api_error

log = logging.getLogger("scops")

REMOTE_TIMEOUT_S = 10.0             # --allow-remote-media: whole-download deadline
REMOTE_MAX_BYTES = 16 << 20         # --allow-remote-media: largest image fetched
IDLE_POLL_S = 0.2                   # how often an idle engine checks whether it should stop
# Encoder inputs kept by the exact bytes a client sent (a data: URL, a base64 clip): a chat
# client sends the picture again with every turn, and this skips decoding, hashing and
# resizing it again. MiniGPT-4's 1x3x224x224 fp32 is 0.6 MB, so ~50 pictures fit.
PREPARED_CACHE_BYTES = 32 << 20
ARG = {"image": "images", "audio": "audios", "video": "videos"}    # modality -> Conversation.send argument


class Engine:
    def __init__(self, session, limits: Limits, queue: int, decode_workers: int):
        self.session, self.limits = session, limits
        self.scheduler = session.scheduler
        self.capacity = session.llm.n_seq + queue          # requests admitted at once
        self.admitted = 0
        # served | cancelled (client gone) | invalid (a 4xx after admission) | failed (internal) | rejected (429)
        self.counts = {"served": 0, "cancelled": 0, "invalid": 0, "failed": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._prepared: OrderedDict = OrderedDict()       # sha256 of the sent bytes -> Prepared (LRU)
        self._prepared_bytes = 0
        self.media_hits = self.media_misses = 0           # requests' media found / not found in it
        self._decode = ThreadPoolExecutor(decode_workers, thread_name_prefix="scops-decode")
        self._encode = ThreadPoolExecutor(1, thread_name_prefix="scops-encode")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scops-engine", daemon=True)
        self._thread.start()

    # ---- admission ---------------------------------------------------------------------
    def admit(self) -> None:
        with self._lock:
            if self.admitted >= self.capacity:
                self.counts["rejected"] += 1
                raise ApiError(429, f"the server is busy ({self.admitted} requests in progress or waiting); "
                                    "retry later", type="rate_limit_error", code="queue_full")
            self.admitted += 1

    def release(self, outcome: str) -> None:
        """A request admitted earlier is over: outcome is a key of `counts`."""
        with self._lock:
            self.admitted -= 1
            self.counts[outcome] += 1
            idle = self.admitted == 0
        if idle:
            trim_heap()

    # ---- media and encoding ----------------------------------------------------------------
    async def prepare(self, request: ChatRequest) -> dict:
        """{MediaSpec: Prepared} of every picture and clip of the request, decoded in the pool."""
        loop = asyncio.get_running_loop()
        specs = list(dict.fromkeys(request.media()))
        futures = [loop.run_in_executor(self._decode, self._prepare_one, s) for s in specs]
        try:
            return dict(zip(specs, await asyncio.gather(*futures)))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _prepare_one(self, spec: MediaSpec):
        key = sent_key(spec)
        if key is not None and (hit := self._cached(key)) is not None:
            return hit
        data = decode_media(spec, self.limits, lambda url: fetch_remote(url, what=f"remote {spec.modality}"))
        try:
            prepared = self.session.prepare_media(spec.modality, data)
        except ScopsError as e:
            raise ApiError(400, f"{spec.param}: {e}", param=spec.param, code="invalid_media") from None
        if key is not None:
            self._keep(key, prepared)
        return prepared

    def _cached(self, key: str):
        grounder = self.session.grounder
        with self._lock:
            prepared = self._prepared.get(key)
            if prepared is not None:
                # BuboGPT grounds the decoded picture: once its grounding has left the grounder's
                # cache, the picture must be decoded again to ground it
                fut = grounder.future(prepared.key) if grounder is not None and prepared.modality == "image" else None
                if grounder is None or prepared.modality != "image" or (fut is not None and not fut.cancelled()):
                    self._prepared.move_to_end(key)
                    self.media_hits += 1
                    return prepared
            self.media_misses += 1
            return None

    def _keep(self, key: str, prepared) -> None:
        size = prepared.batch.nbytes
        with self._lock:
            if key in self._prepared or size > PREPARED_CACHE_BYTES:
                return
            self._prepared[key] = prepared
            self._prepared_bytes += size
            while self._prepared_bytes > PREPARED_CACHE_BYTES:
                _, old = self._prepared.popitem(last=False)
                self._prepared_bytes -= old.batch.nbytes

    async def start(self, request: ChatRequest, prepared: dict, listener):
        """Encode, build the conversation and queue its reply (-> Reply, generating)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encode, self._build, request, prepared, listener)

    def _build(self, request: ChatRequest, prepared: dict, listener):
        def media(turn) -> dict:
            out: dict = {}
            for spec in turn.media:
                out.setdefault(ARG[spec.modality], []).append(prepared[spec])
            return out
        try:
            conv = self.session.chat(system=request.system)
            for turn in request.history:
                conv.add(turn.role, turn.text, **media(turn))
            reply = conv.send(request.last.text, **media(request.last), **request.gen)
        except ScopsError as e:
            raise to_api_error(e) from None
        return reply.start(listener)

    # ---- generation --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.wait_for_work(IDLE_POLL_S):
                continue
            try:
                self.scheduler.pump()
            except Exception as e:            # never let the engine die; the step's jobs have failed
                log.error("engine step failed: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                time.sleep(IDLE_POLL_S)

    def stop(self) -> None:
        """Cancel what runs, stop the engine thread and the pools."""
        for job in list(self.scheduler.waiting) + [s.job for s in self.scheduler.slots if s.job is not None]:
            self.scheduler.cancel(job)
        self._stop.set()
        self._thread.join(timeout=10)
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._encode.shutdown(wait=False, cancel_futures=True)


def sent_key(spec: MediaSpec) -> str | None:
    """A key for media sent inline (data: URL, base64 audio): sha256 of what was sent; None for
    a remote URL (what it points at may change; it is fetched every time)."""
    if spec.modality != "audio" and not spec.source.startswith("data:"):
        return None
    return hashlib.sha256(f"{spec.modality}\n{spec.source}".encode()).hexdigest()


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, what: str):
        self.what = what

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise ApiError(400, f"{self.what} redirected to a non-http(s) URL", code="invalid_media")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote(url: str, limit: int = REMOTE_MAX_BYTES, timeout: float = REMOTE_TIMEOUT_S,
                 what: str = "remote image") -> bytes:
    """GET an http(s) picture or clip (`what` names it in errors) with a size limit and a
    whole-download deadline."""
    host = urlsplit(url).hostname or "?"
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects(what))
    chunks, size = [], 0
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "scops"}), timeout=timeout) as r:
            while block := r.read(64 << 10):
                size += len(block)
                if size > limit:
                    raise ApiError(400, f"{what} from {host} is over {limit >> 20} MiB", code="media_too_large")
                if time.monotonic() > deadline:
                    raise ApiError(400, f"{what} from {host} took over {timeout:g} s", code="media_timeout")
                chunks.append(block)
    except ApiError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ApiError(400, f"could not fetch the {what} from {host} ({e})", code="media_unreachable") from None
    return b"".join(chunks)


_LIBC = None


def trim_heap() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise): after a burst of large
    uploads the server returns to its idle size. No-op where malloc_trim is missing."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
