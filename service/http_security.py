"""HTTP hardening of every route the service serves, as one ASGI middleware (pure ASGI, so streamed responses and
client disconnects pass through untouched, unlike Starlette's BaseHTTPMiddleware):

- security headers on every response (OWASP's secure-headers list for an API): no MIME sniffing, no framing, no
  referrer, no caching of translations (they may be confidential), and a Content-Security-Policy that allows
  nothing (JSON needs nothing; /docs and /redoc load Swagger UI and ReDoc from their CDN, so they get none; the
  web page at / and /static/ gets one that allows its own scripts, styles and API calls, from 'self' only);
- a declared request body larger than ``max_body_bytes`` is refused with 413 on every route, before any handler
  reads it (/translate also counts the bytes of chunked bodies as they arrive); request headers of more than
  ``max_header_bytes`` in all get 431 (the limit h11 and common proxies apply; Serve's proxy, on httptools, applies
  none and holds whatever it was sent, so a reverse proxy in front should bound it there too);
- CORS closed unless origins are configured: no Access-Control-Allow-* header is sent, so browsers block
  cross-origin reads; with ``cors_allow_origins`` set, Starlette's CORSMiddleware answers for those origins only.
"""

from __future__ import annotations

import dataclasses

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
# The web page (service/page.py): no inline script or style, nothing from another origin.
PAGE_CSP = (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                        b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                        b"form-action 'none'; frame-ancestors 'none'")
PAGE_PATHS = ("/", "/static/")
# FastAPI's documentation pages load their scripts and styles from a CDN.
DOCS_PATHS = ("/docs", "/redoc")


@dataclasses.dataclass
class HttpSettings:
    """What the replica configures (AppArgs): body limit in bytes and the origins allowed by CORS ("*" for any;
    empty: CORS closed)."""

    max_body_bytes: int = 1_000_000
    max_header_bytes: int = 16 * 1024
    cors_allow_origins: list[str] = dataclasses.field(default_factory=list)


_settings = HttpSettings()


def configure(settings: HttpSettings) -> None:
    """Sets this process's settings (a replica's __init__; one replica per process under Serve). A module global
    rather than app state: Serve may run a copy of the module-level FastAPI app, but this module is the same."""
    global _settings
    _settings = settings


class SecurityMiddleware:
    """Security headers, the body-size limit and configured CORS for every HTTP response of ``app``, with the
    settings given to ``configure`` (read at each request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: tuple[tuple[str, ...], ASGIApp] | None = None

    def _with_cors(self, origins: list[str]) -> ASGIApp:
        if not origins:
            return self.app
        key = tuple(origins)
        if self._cors is None or self._cors[0] != key:
            self._cors = (key, CORSMiddleware(self.app, allow_origins=list(origins), allow_methods=["GET", "POST"],
                                              allow_headers=["Content-Type", "Authorization", "X-API-Key"],
                                              expose_headers=["Retry-After", "X-Request-Id"], max_age=600))
        return self._cors[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = _settings
        headers = list(SECURITY_HEADERS)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # Serve's route prefix
            path = path[len(root):]
        if path == PAGE_PATHS[0] or path.startswith(PAGE_PATHS[1]):
            headers.append(PAGE_CSP)
        elif not path.startswith(DOCS_PATHS):
            headers.append(CSP)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + headers
            await send(message)

        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
        if header_bytes > settings.max_header_bytes:
            refusal = error_response(431, "request_header_fields_too_large", f"request headers of {header_bytes} "
                                     f"bytes > limit {settings.max_header_bytes} bytes")
            await refusal(scope, receive, send_with_headers)  # sent without reading the request
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            refusal = error_response(413, "request_too_large", f"body of {int(declared)} bytes > limit "
                                     f"{settings.max_body_bytes} bytes")
            await refusal(scope, receive, send_with_headers)
            return
        await self._with_cors(settings.cors_allow_origins)(scope, receive, send_with_headers)
