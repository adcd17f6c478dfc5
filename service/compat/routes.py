"""The LibreTranslate and DeepL routes of the replica, each a thin call into its dialect module. Both run through the
replica's edge (``_handle`` for translations: keys, limits, admission, metrics; ``_lookup`` for read-only routes),
so every limit and key of /translate applies to them unchanged."""

from fastapi import Request
from fastapi.responses import JSONResponse

from service import compat
from service.compat import deepl, libretranslate
from service.http_app import api


class CompatRoutes:
    """Mixin of the replica's deployment class (service.app.TranslatorDeployment), which provides ``_handle``,
    ``_lookup``, ``_read_body`` and service.compat.Backend."""

    # LibreTranslate (service/compat/libretranslate.py): base URL http://host:8000/libretranslate
    @api.post("/libretranslate/translate", tags=["LibreTranslate"])
    async def libretranslate_translate(self, request: Request) -> JSONResponse:
        """LibreTranslate's translate: q (text or list), source (or auto), target, format, alternatives, api_key."""
        return await self._handle(request, "translate", libretranslate.parse_translate,
                                  lambda req, _: libretranslate.translate(self, req), libretranslate.DIALECT)

    @api.post("/libretranslate/detect", tags=["LibreTranslate"])
    async def libretranslate_detect(self, request: Request) -> JSONResponse:
        """LibreTranslate's detect: the served languages ranked for q, confidence 0-100."""
        async def run(req, _):
            return libretranslate.detect(self, req)

        return await self._handle(request, "detect", libretranslate.parse_detect, run, libretranslate.DIALECT)

    @api.get("/libretranslate/languages", tags=["LibreTranslate"])
    async def libretranslate_languages(self) -> JSONResponse:
        """LibreTranslate's languages: code, name and targets of every served language."""
        return await self._lookup(libretranslate.DIALECT, lambda: libretranslate.languages(self))

    @api.get("/libretranslate/frontend/settings", tags=["LibreTranslate"])
    async def libretranslate_settings(self) -> JSONResponse:
        """LibreTranslate's frontend settings: character limit, whether a key is needed, the default pair."""
        return await self._lookup(libretranslate.DIALECT, lambda: libretranslate.frontend_settings(self))

    # DeepL v2 (service/compat/deepl.py): server URL http://host:8000/deepl/
    @api.post("/deepl/v2/translate", tags=["DeepL"])
    async def deepl_translate(self, request: Request) -> JSONResponse:
        """DeepL's translate: text (repeated or a list), source_lang, target_lang, split_sentences,
        preserve_formatting; key in Authorization: DeepL-Auth-Key."""
        return await self._handle(request, "translate", deepl.parse_translate,
                                  lambda req, _: deepl.translate(self, req), deepl.DIALECT)

    @api.api_route("/deepl/v2/languages", methods=["GET", "POST"], tags=["DeepL"])  # DeepL takes both
    async def deepl_languages(self, request: Request) -> JSONResponse:
        """DeepL's languages: type=source (default) or target, in the query or (as the deepl library sends it) in
        a form or JSON body."""
        async def run(_: str | None) -> JSONResponse:
            kind = request.query_params.get("type")
            if kind is None and request.headers.get("content-type", "").startswith((compat.FORM, "application/json")):
                body, media_type = await self._read_body(request, form_ok=True)
                kind = compat.parse_body(body, media_type).get("type")
            return deepl.languages(self, str(kind or "source"))

        return await self._lookup(deepl.DIALECT, run, request)

    @api.api_route("/deepl/v2/usage", methods=["GET", "POST"], tags=["DeepL"])
    async def deepl_usage(self, request: Request) -> JSONResponse:
        """DeepL's usage: the key's characters today (UTC) and its per-day limit."""
        return await self._lookup(deepl.DIALECT, lambda key_id: deepl.usage(self, key_id), request)
