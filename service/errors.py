"""One table from error types to HTTP status, and FastAPI handlers that render the one error body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import (EngineError, EngineUnavailableError, InputTooLongError, InvalidRequestError,
                           NotAvailableError)

log = logging.getLogger(__name__)


class RequestTooLargeError(InvalidRequestError):
    """Too many texts, too many characters, or too many body bytes. HTTP 413."""


class RequestTimeoutError(EngineError):
    """The request did not finish within request_timeout_s; its work was dropped. HTTP 504."""


class OverloadedError(EngineError):
    """The replica's queue is full. HTTP 503 with a Retry-After header of ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthorizedError(EngineError):
    """Missing or wrong API key. HTTP 401."""


class RateLimitedError(EngineError):
    """The API key is past one of its limits (characters per minute or day, concurrent requests). HTTP 429 with a
    Retry-After header of ``retry_after_s`` seconds; ``limit`` names the limit (service.api_keys.KeyLimits' field)."""

    def __init__(self, message: str, retry_after_s: int, limit: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class BodyTimeoutError(InvalidRequestError):
    """The request body did not arrive within body_timeout_s (a client sending it byte by byte holds one of the
    replica's max_ongoing_requests slots meanwhile). HTTP 408."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """A body that is not JSON by its Content-Type. HTTP 415."""


class NotConfiguredError(EngineError):
    """A route whose feature this deployment does not have configured (e.g. /v1/usage without API keys). HTTP 404."""


# Most specific first: the first matching class wins.
STATUS_BY_ERROR: list[tuple[type[Exception], int, str]] = [
    (InputTooLongError, 413, "input_too_long"),
    (RequestTooLargeError, 413, "request_too_large"),
    (UnsupportedMediaTypeError, 415, "unsupported_media_type"),
    (BodyTimeoutError, 408, "body_timeout"),
    (InvalidRequestError, 422, "invalid_request"),
    (EngineUnavailableError, 503, "unavailable"),
    (OverloadedError, 503, "overloaded"),
    (RequestTimeoutError, 504, "timeout"),
    (UnauthorizedError, 401, "unauthorized"),
    (RateLimitedError, 429, "rate_limited"),
    (NotConfiguredError, 404, "not_configured"),
    (NotAvailableError, 404, "not_available"),
    (EngineError, 500, "engine_error"),
]


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def response_for(exc: Exception) -> JSONResponse:
    """Maps an exception to the error body; unknown exceptions become a 500 without internals."""
    for cls, status, type_ in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            headers = {}
            if getattr(exc, "retry_after_s", None) is not None:
                headers["Retry-After"] = str(exc.retry_after_s)
            if status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="translation"'
            return error_response(status, type_, str(exc), headers or None)
    log.exception("internal error", exc_info=exc)
    return error_response(500, "internal_error", "internal error; see the server log")


LONE_SURROGATE = ("a \\uD800-\\uDFFF escape that is not half of a surrogate pair: the text is not valid Unicode "
                  "(encode characters beyond U+FFFF as a high-low pair, or send them as UTF-8)")


def validation_message(errors: list[dict]) -> str:
    """pydantic/FastAPI error dicts -> "field: message; ..." (first five), without echoing the input. A JSON
    parser's message about a surrogate escape ("lone leading surrogate", "unexpected end of hex escape", which
    pydantic's parser also says of a lone trailing one) is followed by what it means."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        message = err.get("msg", "invalid")
        if err.get("type") == "json_invalid" and ("surrogate" in message or "hex escape" in message):
            message += f" ({LONE_SURROGATE})"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


# The compatible APIs' error bodies (service/compat): DeepL's {"message": ...}, LibreTranslate's {"error": ...}, so
# that their clients read the message of a 404 or 405 under their prefix too.
COMPAT_ERROR_KEYS = {"/deepl/": "message", "/libretranslate/": "error"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        """What the router raises itself (404: no such route, 405: another method; its Allow header kept), in the
        error shape of the API the path belongs to."""
        path, root = request.url.path, request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # under Serve's route prefix
        for prefix, key in COMPAT_ERROR_KEYS.items():
            if path.startswith(prefix):
                return JSONResponse({key: str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        return error_response(exc.status_code, "http_error", str(exc.detail), exc.headers)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return response_for(exc)
