"""`scops serve`: an OpenAI-compatible local server and a chat page, safe by default.

Standard library only. `ThreadingHTTPServer` threads read and check requests (JSON,
limits, image decoding) in parallel; one engine thread owns the Session and runs jobs
one at a time from a bounded queue (full: 429). Handlers wait for their job's events
and notice a client that went away (a failed write, or a closed socket while waiting),
which cancels its job. KV state of interleaved conversations is kept by `StateCache`.

Binds 127.0.0.1 by default, checks the Host header against DNS rebinding while bound to
loopback, never reads local files for media, and only fetches http(s) images when
started with --allow-remote-media.
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OptionError, ScopsError
from .http_handler import ScopsHTTPServer
from .openai_api import ApiError, ChatRequest, Limits, to_api_error
from .states import DEFAULT_SNAPSHOTS

log = logging.getLogger("scops")

DEFAULT_QUEUE = 8                   # requests waiting behind the one generating
DEFAULT_MAX_TOKENS_CAP = 1024       # half of the default 2k context
DEFAULT_MAX_BODY_MB = 32            # a few base64 photos (base64 adds a third)
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000   # 16 MP: any phone photo; a decoded one is 48 MB of RGB
DEFAULT_MAX_AUDIO_SECONDS = 30.0    # the audio encoders of this family take clips of seconds
STOP_POLL_S = 0.2                   # how often an idle engine checks whether it should stop
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("web") / "index.html"


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
    snapshots: int = DEFAULT_SNAPSHOTS

    def check(self) -> None:
        for name in ("queue", "max_tokens_cap", "max_body_mb", "max_image_pixels", "max_audio_seconds"):
            if getattr(self, name) <= 0:
                raise OptionError(f"--{name.replace('_', '-')} must be > 0")
        if self.snapshots < 0:
            raise OptionError("--snapshots must be >= 0")


@dataclass
class Job:
    request: ChatRequest
    out: queue.Queue = field(default_factory=queue.Queue)     # ("piece", str) ... ("done", dict) | ("error", ApiError)
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class Engine:
    """The one thread that owns the session: jobs run one at a time, in arrival order."""

    def __init__(self, session, opts: ServerOptions):
        self.session = session
        self.states = session.scheduler.snapshots
        self.states.capacity = opts.snapshots
        self.jobs: queue.Queue = queue.Queue(maxsize=opts.queue)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="scops-engine", daemon=True)
        self._thread.start()

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request; its events arrive on the returned job's `out` (429 when full)."""
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            with self._count_lock:        # handler threads reject concurrently: += is not atomic
                self.counts["rejected"] += 1
            raise ApiError(429, f"the server is busy ({self.jobs.maxsize} requests already waiting); retry later",
                           type="rate_limit_error", code="queue_full") from None
        return job

    def stop(self) -> None:
        self._stop.set()
        current = self._current
        if current is not None:           # a generation in progress ends at its next token
            current.cancel.set()
        self._thread.join(timeout=10)
        while True:                       # whoever still waits gets an answer, not a hang
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.out.put(("error", ApiError(503, "the server is shutting down", type="server_error",
                                           code="shutting_down")))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=STOP_POLL_S)
            except queue.Empty:
                continue
            self._current = job
            try:
                self.run_job(job)
            finally:
                self._current = None

    def run_job(self, job: Job) -> None:
        if job.cancel.is_set():
            self.counts["cancelled"] += 1
            return
        try:
            result = self._generate(job)
        except ScopsError as e:
            job.out.put(("error", to_api_error(e)))
        except Exception as e:        # never a traceback to the client; one line here
            self.counts["failed"] += 1
            log.error("internal error: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
            job.out.put(("error", ApiError(500, "internal error", type="server_error", code="internal_error")))
        else:
            self.counts["cancelled" if result["finish_reason"] == "cancelled" else "served"] += 1
            job.out.put(("done", result))

    def _generate(self, job: Job) -> dict:
        req = job.request
        waited_ms = (time.perf_counter() - job.queued_at) * 1e3
        conv = self.session.chat(system=req.system)
        for turn in req.history:
            conv.add(turn.role, turn.text, **turn.media())
        reply = conv.send(req.last.text, **req.last.media(), **req.gen)
        try:
            for piece in reply:
                if job.cancel.is_set():
                    break
                job.out.put(("piece", piece))
        finally:
            reply.close()
        t = reply.timings
        timings = {k: round(t[k], 2) for k in ("preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms",
                                                 "decode_tok_s") if k in t}
        timings["queue_ms"] = round(waited_ms, 2)
        prompt, completion = len(reply.cells), len(reply.token_ids)
        return {"text": reply.text, "finish_reason": reply.finish_reason,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
                "scops": {"timings": timings, "reused_cells": t.get("reused_cells", 0),
                          "decoded_cells": t.get("decoded_cells", 0),
                          "snapshot_restored": reply.snapshot_restored}}


class Server:
    """The HTTP server and its engine; `start()` runs it in a thread (tests), `serve_forever()` in this one."""

    def __init__(self, session, opts: ServerOptions = ServerOptions(), model_id: str | None = None):
        opts.check()
        self.session, self.opts = session, opts
        self.model_id = model_id or session.bundle.path.name
        self.limits = Limits(opts.max_tokens_cap, opts.max_image_pixels, opts.max_audio_seconds,
                             opts.allow_remote_media)
        self.max_body = int(opts.max_body_mb * 2**20)
        self.page = PAGE.read_bytes() if PAGE.is_file() else b"<p>scops: the chat page is missing from this install</p>"
        loopback = opts.host in LOOPBACK_NAMES
        self.allowed_hosts = set(LOOPBACK_NAMES) | {opts.host} if loopback else None   # None: any Host
        try:
            self.httpd = ScopsHTTPServer(self, (opts.host, opts.port))
        except OSError as e:
            raise OptionError(f"cannot listen on {opts.host}:{opts.port} ({e.strerror or e})") from None
        self.port = self.httpd.server_address[1]
        self.engine = Engine(session, opts)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        return f"http://{host}:{self.port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="scops-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()
        self.engine.stop()

    def report_health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "modalities": sorted(self.session.bundle.modalities),
                "queued": self.engine.jobs.qsize(), "queue": self.opts.queue, "counts": dict(self.engine.counts),
                "snapshots": len(self.engine.states), "max_tokens_cap": self.opts.max_tokens_cap}


# ---- command line ---------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    """Register `scops serve BUNDLE ...` on the CLI's subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible local server + chat page")
    p.add_argument("bundle", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs (off: data: URLs only)")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE, help="requests that may wait; more get HTTP 429")
    p.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP)
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    p.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS)
    p.add_argument("--snapshots", type=int, default=DEFAULT_SNAPSHOTS, help="KV snapshots kept for other chats")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    from .cli import add_memory_args
    add_memory_args(p)
    p.set_defaults(fn=run_serve)


def run_serve(args) -> int:
    from .session import Session
    opts = ServerOptions(args.host, args.port, args.api_key, args.allow_remote_media, args.queue,
                         args.max_tokens_cap, args.max_body_mb, args.max_image_pixels, args.max_audio_seconds,
                         args.snapshots)
    opts.check()
    session = Session.open(args.bundle, n_ctx=args.n_ctx, threads=args.threads, verify=not args.no_verify,
                           kv_type=args.kv_type, low_memory=args.low_memory)
    try:
        server = Server(session, opts, model_id=Path(args.bundle).resolve().name)
        if opts.host not in LOOPBACK_NAMES and not opts.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach it can use it", opts.host)
        log.info("serving %s at %s  (chat page /, OpenAI API %s/v1; Ctrl-C stops)", server.model_id, server.url,
                 server.url)
        signal.signal(signal.SIGTERM, _interrupt)        # `kill` stops it as cleanly as Ctrl-C
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("stopping")
        server.close()
    finally:
        session.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
