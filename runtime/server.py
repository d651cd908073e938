"""`scops serve`: an OpenAI-compatible local server and a chat page, safe by default.

Starlette on uvicorn; request and response bodies are the pydantic models of
runtime/openai_api.py, streams are server-sent events (sse-starlette). The work behind a
chat request (admission, decoding, encoding, batched generation) is runtime/engine.py.

Binds 127.0.0.1 by default, checks the Host header against DNS rebinding while bound to
loopback, never reads local files for media, and only fetches http(s) images when
started with --allow-remote-media. A client gets `client_timeout_s` to send its request
headers and body and, while it streams, to take each event; past that it is dropped, and a
client that disconnects cancels its generation.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from .engine import Engine
from .images_api import ImageLimits
from .server_images import DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_IMAGE_STEPS, ImageRoute
from .errors import OptionError
from .grounding import describe_media, grounding_json
from .http_guard import DRAIN_MAX_BYTES, error_response, guard, guarded_protocol
from .openai_api import (ApiError, ChatRequest, Delta, Limits, ModelCard, ModelList, ScopsInfo, Usage, build_chunk,
                         build_completion, make_completion_id, parse_chat_request)
from .states import DEFAULT_SNAPSHOTS

log = logging.getLogger("scops")

DEFAULT_QUEUE = 8                   # requests waiting behind the ones generating
DEFAULT_MAX_TOKENS_CAP = 1024       # half of the default 2k context
DEFAULT_MAX_BODY_MB = 32            # a few base64 photos (base64 adds a third)
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000   # 16 MP: any phone photo; a decoded one is 48 MB of RGB
DEFAULT_MAX_AUDIO_SECONDS = 30.0    # the audio encoders of this family take clips of seconds
DEFAULT_CLIENT_TIMEOUT_S = 30.0     # to send headers + body, and to take each streamed event
DEFAULT_DECODE_WORKERS = 2          # pictures decoded at once (each up to 48 MB while decoding)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("web") / "index.html"
# The page runs inline script and style only and talks to this server only.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src data: blob:; media-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080                  # 0: any free port
    api_key: str | None = None
    allow_remote_media: bool = False
    queue: int = DEFAULT_QUEUE
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    snapshots: int = DEFAULT_SNAPSHOTS    # sets the session's snapshot store
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    decode_workers: int = DEFAULT_DECODE_WORKERS
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE      # /v1/images/generations: pixels per side
    max_image_steps: int = DEFAULT_MAX_IMAGE_STEPS    # /v1/images/generations: denoising steps

    def check(self) -> None:
        for name in ("queue", "max_tokens_cap", "max_body_mb", "max_image_pixels", "max_audio_seconds",
                     "client_timeout_s", "decode_workers", "max_image_side", "max_image_steps"):
            if getattr(self, name) <= 0:
                raise OptionError(f"--{name.replace('_', '-')} must be > 0")
        if self.snapshots < 0:
            raise OptionError("--snapshots must be >= 0")


class Server:
    """The app, its engine and uvicorn; `start()` serves from a thread (tests), `serve_forever()` here."""

    def __init__(self, session, opts: ServerOptions = ServerOptions(), model_id: str | None = None):
        import uvicorn

        opts.check()
        self.session, self.opts = session, opts
        self.model_id = model_id or session.bundle.path.name
        self.limits = Limits(opts.max_tokens_cap, opts.max_image_pixels, opts.max_audio_seconds,
                             opts.allow_remote_media)
        self.max_body = int(opts.max_body_mb * 2**20)
        self.page = PAGE.read_bytes() if PAGE.is_file() else b"<p>scops: the chat page is missing from this install</p>"
        self.allowed_hosts = set(LOOPBACK_NAMES) | {opts.host} if opts.host in LOOPBACK_NAMES else None
        session.scheduler.snapshots.capacity = opts.snapshots
        try:
            family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((opts.host, opts.port))
            self.sock.listen(128)       # a burst of clients is answered, not SYN-dropped
        except OSError as e:
            raise OptionError(f"cannot listen on {opts.host}:{opts.port} ({e.strerror or e})") from None
        self.port = self.sock.getsockname()[1]
        self.engine = Engine(session, self.limits, opts.queue, opts.decode_workers)
        self.images = ImageRoute(self, ImageLimits(opts.max_image_side, opts.max_image_steps, opts.max_image_pixels))
        self.app = Starlette(routes=[
            Route("/", self.page_view, methods=["GET"]),
            Route("/index.html", self.page_view, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/images/generations", self.images.handle, methods=["POST"]),
        ], exception_handlers={ApiError: error_response, HTTPException: error_response, Exception: error_response})
        config = uvicorn.Config(guard(self.app, self), log_level="warning", access_log=False, lifespan="off",
                                server_header=False, http=guarded_protocol(opts.client_timeout_s), timeout_keep_alive=5,
                                timeout_graceful_shutdown=3, limit_concurrency=max(64, 4 * self.engine.capacity))
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{host}:{self.port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="scops-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OptionError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.sock])          # Ctrl-C / SIGTERM end it

    def close(self) -> None:
        self.engine.stop()
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()

    def report_health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_id, "modalities": sorted(self.session.bundle.modalities),
                "generates_images": self.images.available,
                "parallel": self.session.llm.n_seq, "active": e.scheduler.active(), "admitted": e.admitted,
                "capacity": e.capacity, "queue": self.opts.queue, "counts": dict(e.counts),
                "media_cache": {"hits": e.media_hits, "misses": e.media_misses},
                "snapshots": len(e.scheduler.snapshots), "max_tokens_cap": self.opts.max_tokens_cap,
                "steps": e.scheduler.steps, "steps_cut_short": e.scheduler.aborted}

    # ---- routes ------------------------------------------------------------------------------
    async def page_view(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP})

    async def health(self, request: Request) -> Response:
        return JSONResponse(self.report_health())

    async def models(self, request: Request) -> Response:
        return Response(ModelList(data=[ModelCard(id=self.model_id)]).model_dump_json(),
                        media_type="application/json")

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()        # the request's headers are in: its TTFT counts from here
        raw = await self.read_body(request)
        self.engine.admit()
        outcome = "failed"                   # what the place in the queue ends as (see Engine.counts)
        try:
            req = await anyio.to_thread.run_sync(parse_chat_request, raw, self.limits, self.session.bundle.modalities)
            del raw
            prepared = await self.engine.prepare(req)
            loop, ready = asyncio.get_running_loop(), asyncio.Event()

            def listener():                  # engine thread: pieces arrived or the reply ended
                try:
                    loop.call_soon_threadsafe(ready.set)
                except RuntimeError:         # the loop is gone (shutting down)
                    pass
            reply = await self.engine.start(req, prepared, listener)
            del prepared
            cid, model = make_completion_id(), req.model or self.model_id
            if req.stream:
                outcome = None               # the stream gives its place back when it ends
                return _Stream(self.events(reply, ready, req, cid, model, arrival), self.finish(request, reply),
                               sep="\n", send_timeout=self.opts.client_timeout_s,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            if not await wait_unless_gone(request, reply, ready):
                outcome = "cancelled"
                return Response(status_code=499)          # nobody is there to read it
            if reply.error is not None:
                raise reply.error
            outcome = "cancelled" if reply.finish_reason == "cancelled" else "served"
            grounding, extra = await self.ground(reply)
            usage, info = summarize(reply, extra, arrival)
            request.state.note = describe(reply)
            body = build_completion(cid, model, reply.text, reply.finish_reason, usage, info, grounding)
            return Response(body.model_dump_json(), media_type="application/json")
        except ApiError:
            outcome = "invalid"
            raise
        finally:
            if outcome is not None:
                self.engine.release(outcome)

    async def events(self, reply, ready: asyncio.Event, req: ChatRequest, cid: str, model: str, arrival: float):
        """The SSE stream: a role chunk, one chunk per piece, the finish chunk (usage, scops)."""
        yield build_chunk(cid, model, Delta(role="assistant", content=""))
        while True:
            await ready.wait()
            ready.clear()
            done = reply.finished
            for piece in reply.take():
                yield build_chunk(cid, model, Delta(content=piece))
            if done:
                break
        if reply.error is not None:
            log.error("generation failed: %s: %s", type(reply.error).__name__, reply.error)
            yield json.dumps(ApiError(500, "internal error", type="server_error", code="internal_error").body())
            return
        grounding, extra = await self.ground(reply)
        usage, info = summarize(reply, extra, arrival)
        delta = Delta() if grounding is None else Delta(grounding=grounding)
        yield build_chunk(cid, model, delta, reply.finish_reason, usage, info)
        if req.include_usage:
            yield build_chunk(cid, model, None, usage=usage)
        yield "[DONE]"

    async def ground(self, reply) -> tuple[list | None, dict]:
        """A grounding family's answer -> (its entities as JSON, scops extras: the chat's media in
        prompt order and BuboGPT's grounding facts); (None, {}) for other families. BuboGPT's may
        wait for its picture's stages and run the matcher: in a worker thread, off the loop."""
        if not self.session.bundle.manifest.get("grounding") or reply.finish_reason == "cancelled":
            return None, {}

        def work():
            extra = {"media": describe_media(reply.conv)}
            if self.session.grounder is not None:
                extra["grounding"] = reply.grounding_facts
            return grounding_json(reply.grounding), extra
        return await anyio.to_thread.run_sync(work)

    def finish(self, request: Request, reply):
        def done() -> None:              # the stream ended: finished, client gone, or too slow a reader
            if not reply.finished:
                reply.cancel()
            outcome = "failed" if reply.error is not None else \
                "served" if reply.finished and reply.finish_reason != "cancelled" else "cancelled"
            request.state.note = "stream, " + describe(reply)
            self.engine.release(outcome)
        return done

    async def read_body(self, request: Request) -> bytes:
        """The body, within the size limit and the client deadline (411/413/415/408 otherwise)."""
        headers = request.headers
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if length is None and not chunked:
            raise ApiError(411, "a Content-Length header is required")
        if length is not None and not length.isdigit():
            raise ApiError(400, "invalid Content-Length")
        too_big = length is not None and int(length) > self.max_body
        wrong_type = headers.get("content-type", "").split(";")[0].strip().lower() != "application/json"
        chunks, size = [], 0
        try:
            with anyio.fail_after(self.opts.client_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    too_big = too_big or size > self.max_body
                    if too_big or wrong_type:           # read on (up to a bound) so the client sees the answer
                        if size > DRAIN_MAX_BYTES:
                            break
                        continue
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.opts.client_timeout_s:g} s",
                           code="request_timeout") from None
        if too_big:
            raise ApiError(413, f"request body of {max(size, int(length or 0)) / 2**20:.1f} MiB is over this "
                                f"server's {self.max_body / 2**20:g} MiB limit (--max-body-mb)", code="body_too_large")
        if wrong_type:
            raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
        return b"".join(chunks)


class _Stream(EventSourceResponse):
    """An SSE response that calls `on_close` however it ends (done, disconnect, timeout)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:             # a reader that stopped reading: dropped, not an error
            scope.setdefault("state", {})["note"] = "the client took no data for the send timeout: dropped"
        finally:
            self._on_close()


async def wait_unless_gone(request: Request, reply, ready: asyncio.Event) -> bool:
    """Wait for the reply to end; False (and the reply cancelled) if the client leaves first."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(gone())
    try:
        while not reply.finished:
            waiter = asyncio.ensure_future(ready.wait())
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                waiter.cancel()
                reply.cancel()
                return False
            ready.clear()
        return True
    finally:
        watcher.cancel()


def summarize(reply, extra: dict | None = None, arrival: float | None = None) -> tuple[Usage, ScopsInfo]:
    """The reply's usage and scops extras. Its timings are the Python API's (`ttft_ms` from
    the conversation's send), plus `arrival_ttft_ms`: from the request's arrival (headers read)
    to its first token, which adds reading and parsing the body and decoding its media."""
    t = reply.timings
    timings = {k: round(t[k], 2) for k in ("preprocess_ms", "encode_ms", "queue_ms", "prefill_ms", "ttft_ms",
                                             "decode_tok_s") if k in t}
    if arrival is not None and reply.first_token_at is not None:
        timings["arrival_ttft_ms"] = round((reply.first_token_at - arrival) * 1e3, 2)
    prompt, completion = len(reply.cells), len(reply.token_ids)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    return usage, ScopsInfo(timings=timings, reused_cells=t.get("reused_cells", 0),
                            decoded_cells=t.get("decoded_cells", 0), snapshot_restored=reply.snapshot_restored,
                            dropped_turns=reply.dropped_turns, **(extra or {}))


def describe(reply) -> str:
    t = reply.timings
    return (f"{len(reply.token_ids)} tokens, {reply.finish_reason}, reused {t.get('reused_cells', 0)} "
            f"decoded {t.get('decoded_cells', 0)} cells")


# ---- command line ---------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    """Register `scops serve BUNDLE ...` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible local server + chat page")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off: data: URLs only)")
    p.add_argument("--parallel", type=int, default=1, help="conversations generating at once (one KV each)")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    p.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS)
    p.add_argument("--snapshots", type=int, default=DEFAULT_SNAPSHOTS, help="KV snapshots kept for other chats")
    p.add_argument("--client-timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT_S,
                   help="seconds a client gets to send its request, and to take each streamed event")
    p.add_argument("--decode-workers", type=int, default=DEFAULT_DECODE_WORKERS, help="pictures decoded at once")
    p.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_IMAGE_SIDE,
                   help="/v1/images/generations (Emu): largest width or height drawn")
    p.add_argument("--max-image-steps", type=int, default=DEFAULT_MAX_IMAGE_STEPS,
                   help="/v1/images/generations (Emu): most denoising steps a request may ask for")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prompt cells per step while others stream (0: default)")
    p.add_argument("--history", choices=["ids", "text"], default="ids",
                   help="earlier answers in a prompt: as generated (ids) or re-tokenized like the originals (text)")
    p.add_argument("--overflow", choices=["drop", "error"], default="drop",
                   help="a conversation outgrowing the context: drop its oldest turns, or answer 400")
    p.add_argument("--n-ctx", type=int, default=2048, help="positions per conversation")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    from .cli import add_device_args, add_memory_args
    add_memory_args(p)
    add_device_args(p)
    p.set_defaults(fn=run_serve)


def run_serve(args) -> int:
    from .session import Session
    opts = ServerOptions(args.host, args.port, args.api_key, args.allow_remote_media, args.queue,
                         args.max_tokens_cap, args.max_body_mb, args.max_image_pixels, args.max_audio_seconds,
                         args.snapshots, args.client_timeout, args.decode_workers,
                         max_image_side=args.max_image_side, max_image_steps=args.max_image_steps)
    opts.check()
    extra = {"prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}
    session = Session.open(args.bundle, n_ctx=args.n_ctx, threads=args.threads, verify=not args.no_verify,
                           kv_type=args.kv_type, low_memory=args.low_memory, device=args.device,
                           n_gpu_layers=args.n_gpu_layers, parallel=args.parallel, snapshots=args.snapshots,
                           history=args.history, overflow=args.overflow, **extra)
    try:
        server = Server(session, opts, model_id=Path(args.bundle).resolve().name)
        if opts.host not in LOOPBACK_NAMES and not opts.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach it can use it", opts.host)
        log.info("serving %s at %s with %d parallel slots  (chat page /, OpenAI API %s/v1; Ctrl-C stops)",
                 server.model_id, server.url, session.llm.n_seq, server.url)
        # uvicorn stops on SIGINT/SIGTERM, then re-raises the signal to the handlers it found:
        # ours turn both into KeyboardInterrupt, so that the session is closed cleanly here
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        log.info("stopping")
        server.engine.stop()
    finally:
        session.close()
    return 0



def _interrupt(signum, frame):
    raise KeyboardInterrupt
