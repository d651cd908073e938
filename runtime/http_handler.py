"""HTTP side of `scops serve`: routing, auth, body limits, SSE, client-gone detection.

Every answer is JSON in the OpenAI error shape when it is an error (even the ones
`http.server` makes itself, like a malformed request line); a failure inside is one log
line here and a plain "internal error" there. One log line per request.
"""
from __future__ import annotations

import hmac
import http.client
import json
import logging
import queue
import select
import socket
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .openai_api import (ApiError, build_chunk, build_completion, build_usage_chunk, make_completion_id,
                         parse_chat_request)

log = logging.getLogger("scops")

REMOTE_TIMEOUT_S = 10.0             # --allow-remote-media: whole-download deadline
REMOTE_MAX_BYTES = 16 << 20         # --allow-remote-media: largest image fetched
SOCKET_TIMEOUT_S = 30               # a client silent this long is dropped (slow-loris guard)
# An over-limit body up to this size is read and dropped before the 413, so that the
# client (which sends it all before reading) sees the answer; larger ones: connection closed.
DRAIN_MAX_BYTES = 256 << 20
POLL_S = 0.2                        # how often a waiting handler checks that its client is still there
CHAT_PATH = "/v1/chat/completions"
GET_PATHS = ("/", "/index.html", "/health", "/v1/models")
# The page runs inline script and style only and talks to this server only.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src data: blob:; media-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


class ClientGone(Exception):
    """The HTTP client closed its connection; its job is cancelled."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "scops"
    timeout = SOCKET_TIMEOUT_S

    # ---- routing ------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:       # no CORS: other sites' pages cannot call this server
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        self._t0, self._status, self._note, self._body_read = time.perf_counter(), 0, "", False
        path = urlsplit(self.path).path
        try:
            self._check_host(app)
            if (method, path) in (("GET", "/"), ("GET", "/index.html")):
                self._send(200, app.page, "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})
            elif (method, path) == ("GET", "/health"):
                self._send_json(200, app.report_health())
            elif path.startswith("/v1/") and path in (CHAT_PATH, "/v1/models"):
                self._check_key(app)
                if (method, path) == ("GET", "/v1/models"):
                    self._send_json(200, {"object": "list", "data": [
                        {"id": app.model_id, "object": "model", "created": 0, "owned_by": "scops"}]})
                elif (method, path) == ("POST", CHAT_PATH):
                    self._chat(app)
                else:
                    raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            elif path in GET_PATHS:
                raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            else:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
        except ApiError as e:
            self._send_error_body(e)
        except ClientGone:
            self._note = "client went away"
            self.close_connection = True
        except OSError:
            self._note = "connection lost"
            self.close_connection = True
        except Exception as e:
            log.error("internal error on %s %s: %s: %s", method, path, type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self._send_error_body(ApiError(500, "internal error", type="server_error", code="internal_error"))
        finally:
            ms = (time.perf_counter() - self._t0) * 1e3
            log.info('%s "%s %s" %s %.0f ms%s', self.client_address[0], method, path, self._status or "-", ms,
                     f" ({self._note})" if self._note else "")

    def _check_host(self, app) -> None:
        if app.allowed_hosts is None:
            return
        host = self.headers.get("Host", "")
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name.lower() not in app.allowed_hosts:
            raise ApiError(403, f"Host {host!r} is not this server (DNS rebinding guard)", code="bad_host")

    def _check_key(self, app) -> None:
        key = app.opts.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    # ---- chat completions -------------------------------------------------------------
    def _chat(self, app) -> None:
        raw = self._read_body(app.max_body)
        request = parse_chat_request(raw, app.limits, app.session.bundle.modalities, fetch_remote)
        job = app.engine.submit(request)
        cid, model = make_completion_id(), request.model or app.model_id
        first = self._next_event(job)
        if first[0] == "error":
            raise first[1]
        if request.stream:
            self._stream(job, first, cid, model)
            return
        event = first
        while event[0] == "piece":
            event = self._next_event(job)
        if event[0] == "error":
            raise event[1]
        self._note = _describe(event[1])
        self._send_json(200, build_completion(cid, model, event[1]))

    def _stream(self, job, event, cid: str, model: str) -> None:
        self._status, self.close_connection = 200, True
        try:
            self.send_response(200)
            for k, v in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                         ("Connection", "close"), ("X-Accel-Buffering", "no")):
                self.send_header(k, v)
            self.end_headers()
            self._write_event(build_chunk(cid, model, {"role": "assistant", "content": ""}))
            while event[0] == "piece":
                self._write_event(build_chunk(cid, model, {"content": event[1]}))
                event = self._next_event(job)
            if event[0] == "error":
                self._note = event[1].message
                self._write_event(event[1].body())
                return
            result = event[1]
            self._note = "stream, " + _describe(result)
            self._write_event(build_chunk(cid, model, {}, result["finish_reason"], usage=result["usage"],
                                         scops=result["scops"]))
            if job.request.include_usage:
                self._write_event(build_usage_chunk(cid, model, result["usage"]))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            job.cancel.set()
            raise ClientGone() from None

    def _write_event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _next_event(self, job) -> tuple:
        """The job's next event; cancels the job if the client leaves while we wait."""
        while True:
            try:
                return job.out.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    job.cancel.set()
                    raise ClientGone() from None

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length (chunked uploads are not accepted)")
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required") from None
        if size < 0:
            raise ApiError(400, "invalid Content-Length")
        if size > limit:
            raise ApiError(413, f"request body of {size / 2**20:.1f} MiB is over this server's "
                                f"{limit / 2**20:g} MiB limit (--max-body-mb)", code="body_too_large")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise ClientGone()
        self._body_read = True
        return raw

    def _discard_body(self) -> None:
        """Read an unused request body so that the client sees our answer (closing a socket
        with unread data resets it) and the connection stays in step; huge ones: just close."""
        self._body_read = True
        try:
            size = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            size = -1
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not 0 <= size <= DRAIN_MAX_BYTES:
            self.close_connection = True
            return
        try:
            while size > 0:
                got = self.rfile.read(min(size, 1 << 16))
                if not got:
                    break
                size -= len(got)
        except OSError:
            pass
        if size > 0:
            self.close_connection = True

    # ---- responses ----------------------------------------------------------------------
    def _send(self, status: int, payload: bytes, ctype: str, headers: dict | None = None) -> None:
        self._status = status
        if not self._body_read:
            self._discard_body()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode(), "application/json", headers)

    def _send_error_body(self, e: ApiError) -> None:
        if self._status:                  # headers already out (a stream): nothing more to say
            self.close_connection = True
            return
        self._note = self._note or e.message
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        try:
            self._send_json(e.status, e.body(), headers)
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method...) in the OpenAI shape."""
        self._t0, self._status, self._note, self._body_read = time.perf_counter(), 0, "", True
        self.close_connection = True      # the request was not understood: nothing more on this socket
        try:
            kind = "invalid_request_error" if code < 500 else "server_error"
            self._send_error_body(ApiError(code, message or http.client.responses.get(code, "error"), type=kind))
        finally:
            log.info('%s "%s" %d (%s)', self.client_address[0], getattr(self, "requestline", "")[:80], code,
                     message or "")

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:
        pass                              # _dispatch logs one line per request itself


def _describe(result: dict) -> str:
    s = result["scops"]
    return (f"{result['usage']['completion_tokens']} tokens, {result['finish_reason']}, "
            f"reused {s['reused_cells']} decoded {s['decoded_cells']} cells")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise ApiError(400, "remote image redirected to a non-http(s) URL", code="invalid_media")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_remote(url: str, limit: int = REMOTE_MAX_BYTES, timeout: float = REMOTE_TIMEOUT_S) -> bytes:
    """GET an http(s) image with a size limit and a whole-download deadline."""
    host = urlsplit(url).hostname or "?"
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    chunks, size = [], 0
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "scops"}), timeout=timeout) as r:
            while block := r.read(64 << 10):
                size += len(block)
                if size > limit:
                    raise ApiError(400, f"remote image from {host} is over {limit >> 20} MiB", code="media_too_large")
                if time.monotonic() > deadline:
                    raise ApiError(400, f"remote image from {host} took over {timeout:g} s", code="media_timeout")
                chunks.append(block)
    except ApiError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ApiError(400, f"could not fetch the remote image from {host} ({e})", code="media_unreachable") from None
    return b"".join(chunks)


class ScopsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog: socketserver's default 5 drops SYNs when a burst of clients connects
    # at once; they would retry seconds later instead of getting their 200 or 429 now.
    request_queue_size = 128

    def __init__(self, app, address: tuple):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)
