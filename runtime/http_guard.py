"""What every request of `scops serve` passes before it reaches a route, and what it gets
back when it fails.

- `guard`: ASGI middleware: the Host check while bound to loopback (DNS rebinding), the
  API key on /v1/*, `nosniff` on every answer, one log line per request;
- `error_response`: every error (ours, Starlette's 404/405, an unexpected exception) as
  an OpenAI error body, after draining the unread request body (a client that sends
  all of it before reading would otherwise see a reset, not the answer);
- `guarded_protocol`: uvicorn's h11 protocol with a deadline for request headers, which
  uvicorn does not have (a client sending them a byte at a time held a connection forever).
"""
from __future__ import annotations

import hmac
import logging
import time

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_api import ApiError

log = logging.getLogger("scops")

# Unread request bodies up to this size are read and dropped before an error answer.
DRAIN_MAX_BYTES = 256 << 20
DRAIN_TIMEOUT_S = 5.0


def guard(app, server):
    """Wrap the Starlette app: host and key checks, nosniff, the request log."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t0, status = time.perf_counter(), [None]

        async def send_checked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-content-type-options", b"nosniff")]
            await send(message)
        try:
            problem = _check(scope, server)
            if problem is None:
                await app(scope, receive, send_checked)
            else:
                response = await error_response(Request(scope, receive), problem)
                await response(scope, receive, send_checked)
        finally:
            note = scope.get("state", {}).get("note")
            client = scope.get("client") or ("-",)
            log.info('%s "%s %s" %s %.0f ms%s', client[0], scope["method"], scope["path"], status[0] or "-",
                     (time.perf_counter() - t0) * 1e3, f" ({note})" if note else "")
    return asgi


def _check(scope, server) -> ApiError | None:
    headers = Headers(scope=scope)
    if server.allowed_hosts is not None:
        host = headers.get("host", "")
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if name.lower() not in server.allowed_hosts:
            return ApiError(403, f"Host {host!r} is not this server (DNS rebinding guard)", code="bad_host")
    key = server.opts.api_key
    if key and scope["path"].startswith("/v1/"):
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                            code="invalid_api_key")
    return None


async def error_response(request: Request, exc: Exception) -> Response:
    """Any exception of a request -> its OpenAI-shaped error answer."""
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        exc = ApiError(exc.status_code, message, code=code)
    elif not isinstance(exc, ApiError):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        exc = ApiError(500, "internal error", type="server_error", code="internal_error")
    request.state.note = exc.message
    if exc.status != 408:                # a body that does not arrive is not waited for again
        await drain(request)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def drain(request: Request) -> None:
    """Read and drop what is left of the request body (bounded in size and time)."""
    size = 0
    try:
        with anyio.move_on_after(DRAIN_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_MAX_BYTES:
                    break
    except (RuntimeError, ClientDisconnect):     # already read, or the client left
        pass


def guarded_protocol(header_timeout_s: float) -> type:
    """uvicorn's H11Protocol that closes a connection whose next request's headers have not
    all arrived `header_timeout_s` after it opened or after its last answer."""
    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(header_timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                self.transport.close()
    return GuardedH11Protocol
