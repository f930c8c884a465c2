"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every route and every failure:
ApiError (what a route raises), the exception handlers that turn everything else into that shape, and the
BodyLimit middleware that refuses an oversized body before the app reads it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MegamemError
from .jobs import Conflict, QueueFull

log = logging.getLogger("megamem.server")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        """The JSON answer: OpenAI's shape, so an OpenAI client raises its own exception for it."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", **fields: str | dict | None
) -> JSONResponse:
    """The JSON answer of an error (fields: param, code, headers, as ApiError takes them), for the places that
    answer rather than raise (middleware, handlers, /healthz)."""
    return ApiError(status, message, type_, **fields).response()


def not_found(what: str, ident: object) -> ApiError:
    """404 for something the caller may not see: a missing one and another tenant's answer alike."""
    return ApiError(404, f"no {what} {str(ident)[:200]!r}", code="not_found")


def invalid(exc: MegamemError, param: str | None = None) -> ApiError:
    """422 for input the library's checks refused, with their message."""
    return ApiError(422, str(exc), param=param, code="invalid_value")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    """A route's own error, as it raised it."""
    return exc.response()


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body or parameter pydantic refused: 400 if it is not JSON at all (as OpenAI answers), else 422 naming
    the first field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    return error_response(422, msg, param=where or None, code="invalid_request")


# OpenAI's APIs this server does not serve, by path prefix: a 404 that says so and what to use instead
NOT_SERVED = {
    "/v1/responses": "the Responses API is not served by megamem; use POST /v1/chat/completions",
    "/v1/completions": "the legacy completions API is not served by megamem; use POST /v1/chat/completions",
    "/v1/assistants": "the Assistants API is not served by megamem; use POST /v1/chat/completions",
    "/v1/threads": "the Assistants API is not served by megamem; use POST /v1/chat/completions",
    "/v1/audio": "megamem serves text only: no audio",
    "/v1/images": "megamem serves text only: no images",
}


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown route, a method not allowed) in the same shape; an OpenAI API this
    server does not serve is named with what to use instead."""
    path = request.url.path.rstrip("/")
    if exc.status_code == 404:
        for prefix, why in NOT_SERVED.items():
            if path == prefix or path.startswith(prefix + "/"):
                return error_response(404, why, code="not_served")
    return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)


async def _megamem(request: Request, exc: MegamemError) -> JSONResponse:
    """A library error that reached the app: a full job queue (429, Retry-After), a conflicting add (409), or
    input the library refused (400)."""
    if isinstance(exc, QueueFull):
        return error_response(
            429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, Conflict):
        return error_response(409, str(exc), code="conflict")
    return error_response(400, str(exc), code="invalid_value")


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is a bug: logged with its traceback, answered 500 without one."""
    log.exception("unexpected error")
    return error_response(500, f"internal error ({type(exc).__name__})", "server_error")


def install(app: FastAPI) -> None:
    """Answer every error of the app in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(MegamemError, _megamem)
    app.add_exception_handler(Exception, _crash)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before the app reads it whole."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        """Pass non-HTTP traffic through; check an HTTP request's declared and actual size, then replay it."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = error_response(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        try:
            if declared is not None and int(declared) > self.limit:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error_response(400, "bad Content-Length header")(scope, receive, send)
        # Read the body first (it is at most `limit` bytes, or refused), then replay it to the app: an exception
        # raised while the app reads would reach FastAPI's body parser and come back as a 400.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
        replayed = False

        async def replay() -> dict:
            """The body once, whole; then whatever the client sends next (a disconnect)."""
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
