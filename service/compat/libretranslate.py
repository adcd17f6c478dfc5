"""The LibreTranslate API (https://libretranslate.com/docs), served under /libretranslate so that a client's base URL
is ``http://host:8000/libretranslate``: POST /translate, GET /languages, POST /detect, GET /frontend/settings.

Bodies are form-encoded (what libretranslatepy and LibreTranslate's own page send) or JSON (where ``q`` may be a
list). Errors are LibreTranslate's: ``{"error": message}`` with 400 for a bad request (our 413/415/422 included),
403 for a bad API key, 429 past a key's limit; ours otherwise (503, 504). ``format: html`` translates the text of
HTML and keeps its markup, as /translate's ``format`` does.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from engine.options import MAX_BEAM_SIZE
from service.compat import Backend, Dialect, native_error, parse_body, translate_request
from service.compat.languages import LanguageTable, language_name

# Our status -> LibreTranslate's (its server answers 400, 403, 429 and 500).
_STATUS = {401: 403, 413: 400, 415: 400, 422: 400}


def render_error(exc: Exception) -> JSONResponse:
    """LibreTranslate's error body ``{"error": message}`` with its status for ``exc``."""
    status, message, headers = native_error(exc)
    headers.pop("www-authenticate", None)
    if status == 401:
        message = f"Invalid API key: {message}"
    return JSONResponse({"error": message}, status_code=_STATUS.get(status, status), headers=headers or None)


DIALECT = Dialect("libretranslate", render_error, form_bodies=True)


class TranslateRequest(BaseModel):
    """POST /libretranslate/translate. Lax types: form fields arrive as strings."""

    model_config = ConfigDict(extra="ignore")

    q: str | list[str] = Field(description="a text or (JSON bodies) a list of texts")
    source: str = Field("auto", description="ISO 639-1 code, or auto to detect it")
    target: str = Field(description="ISO 639-1 code")
    format: Literal["text", "html"] = "text"
    alternatives: int = Field(0, ge=0, le=MAX_BEAM_SIZE - 1, description="extra translations per text (n-best)")
    api_key: str | None = None


class DetectRequest(BaseModel):
    """POST /libretranslate/detect."""

    model_config = ConfigDict(extra="ignore")

    q: str
    api_key: str | None = None


def parse_translate(body: bytes, media_type: str) -> tuple[TranslateRequest, list[str], None]:
    req = TranslateRequest.model_validate(parse_body(body, media_type))
    return req, [req.q] if isinstance(req.q, str) else list(req.q), None


def parse_detect(body: bytes, media_type: str) -> tuple[DetectRequest, list[str], None]:
    req = DetectRequest.model_validate(parse_body(body, media_type))
    return req, [req.q], None


def _source(table: LanguageTable, req_source: str, text: str) -> tuple[str, dict | None]:
    """The source language of ``text`` and, for ``auto``, LibreTranslate's detectedLanguage record."""
    if req_source.lower() != "auto":
        return req_source.lower(), None
    detections = table.detect(text)
    if not detections:
        raise InvalidRequestError("cannot detect the language: this service serves no language it can identify")
    best = detections[0]
    return best.language, {"confidence": round(100 * best.confidence, 1), "language": best.language}


async def translate(backend: Backend, req: TranslateRequest) -> JSONResponse:
    """Translates ``q`` (one text or a list); ``alternatives`` asks for that many more hypotheses per text.

    Raises:
        InvalidRequestError: a language pair no model serves (rendered as 400).
    """
    texts = [req.q] if isinstance(req.q, str) else list(req.q)
    table = backend.languages
    sources = [_source(table, req.source, t) for t in texts]
    groups: dict[str, list[int]] = {}  # model id -> indices of its texts
    for i, (source, _) in enumerate(sources):
        model_id = table.model_for(source, req.target)
        if model_id is None:
            served = ", ".join(f"{s}->{t}" for s, t in sorted(table.pairs)) or "none"
            raise InvalidRequestError(f"{source}->{req.target.lower()} is not supported (served: {served})")
        groups.setdefault(model_id, []).append(i)
    out: list = [None] * len(texts)
    for model_id, indices in groups.items():
        translations = await backend.translate_texts(translate_request(
            backend, [texts[i] for i in indices], model_id, n_best=req.alternatives + 1, format=req.format))
        for i, translation in zip(indices, translations):
            out[i] = translation
    body: dict = {"translatedText": [t.text for t in out]}
    if req.alternatives:
        body["alternatives"] = [[h.text for h in t.n_best[1:req.alternatives + 1]] if t.n_best else [] for t in out]
    if req.source.lower() == "auto":
        body["detectedLanguage"] = [detected for _, detected in sources]
    if isinstance(req.q, str):
        body = {k: v[0] for k, v in body.items()}
    return JSONResponse(body)


def detect(backend: Backend, req: DetectRequest) -> JSONResponse:
    """[{"confidence": 0-100, "language": code}], best first, over the languages this service serves."""
    return JSONResponse([{"confidence": round(100 * d.confidence, 1), "language": d.language}
                         for d in backend.languages.detect(req.q)])


def languages(backend: Backend) -> JSONResponse:
    """Every served language with the targets it translates into."""
    table = backend.languages
    return JSONResponse([{"code": code, "name": language_name(code), "targets": table.targets_of(code)}
                         for code in table.languages])


def frontend_settings(backend: Backend) -> JSONResponse:
    """What LibreTranslate's web page reads at start: limits, whether keys are needed, the default pair."""
    table = backend.languages
    source = table.sources[0] if table.sources else None
    target = table.targets_of(source)[0] if source else None

    def language(code: str | None) -> dict | None:
        return {"code": code, "name": language_name(code)} if code else None

    return JSONResponse({"charLimit": backend.max_chars_per_request, "frontendTimeout": 500,
                         "apiKeys": backend.keys_required, "keyRequired": backend.keys_required,
                         "suggestions": False, "filesTranslation": False, "supportedFilesFormat": [],
                         "language": {"source": language(source), "target": language(target)}})
