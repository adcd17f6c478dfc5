"""The web page at / (files in service/web/, no CDN): translate, see which source words each target word attends
to, and every layer's and head's attention through /v1/explain. Served by the replica itself, so the page and the
API share one origin (its CSP, service/http_security.py, allows scripts, styles and requests from 'self' only)."""

from pathlib import Path

from fastapi.responses import FileResponse, JSONResponse

from service.errors import error_response
from service.http_app import api

WEB_DIR = Path(__file__).resolve().parent / "web"
# A fixed table of files, so that no request path reaches the disk.
STATIC_FILES = {"page.js": "text/javascript", "page.css": "text/css"}


class PageRoutes:
    """Mixin of the replica's deployment class: the page's routes."""

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @api.get("/static/{name}", include_in_schema=False, response_model=None)
    async def static(self, name: str) -> FileResponse | JSONResponse:
        if name not in STATIC_FILES:
            return error_response(404, "not_found", f"no static file {name[:100]!r}")
        return FileResponse(WEB_DIR / name, media_type=STATIC_FILES[name])
