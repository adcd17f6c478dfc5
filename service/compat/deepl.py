"""The DeepL API v2 (https://developers.deepl.com/api-reference), served under /deepl so that a client's server URL
is ``http://host:8000/deepl/`` (with the slash: the deepl Python library joins paths with urljoin):
POST /v2/translate, GET /v2/languages, GET /v2/usage.

Bodies are JSON (what the deepl libraries send) or form-encoded (``text`` repeated). The key comes in
``Authorization: DeepL-Auth-Key <key>`` and is this service's API key. Errors are DeepL's: ``{"message": ...}`` with
400 for a bad request, 403 for a bad key, 413 for a request over a limit, 429 past a key's per-minute or
concurrency limit, 456 past its per-day characters (DeepL's "quota exceeded"). ``tag_handling`` xml or html
translates the text of the markup and keeps the markup (/translate's ``format``); DeepL's tag options
(splitting_tags, ignore_tags, ...) are not read: inline and block elements are told apart by /translate's rules. Not
supported, each a 400 with its reason: glossaries, and ``formality`` other than default/prefer_* (no served target
has formality levels; prefer_* falls back to default as DeepL's does).
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from service.compat import Backend, Dialect, native_error, parse_body, translate_request
from service.compat.languages import language_name
from service.errors import RateLimitedError

QUOTA_EXCEEDED = 456  # DeepL's status for a used-up character quota
UNLIMITED = 1_000_000_000_000  # DeepL's character_limit of an account without one
# Our status -> DeepL's.
_STATUS = {401: 403, 415: 400, 422: 400}
FORMALITIES = ("default", "more", "less", "prefer_more", "prefer_less")  # DeepL's values


def render_error(exc: Exception) -> JSONResponse:
    """DeepL's error body ``{"message": ...}`` with its status for ``exc``."""
    status, message, headers = native_error(exc)
    headers.pop("www-authenticate", None)
    if isinstance(exc, RateLimitedError) and exc.limit == "characters_per_day":
        status = QUOTA_EXCEEDED
    return JSONResponse({"message": message}, status_code=_STATUS.get(status, status), headers=headers or None)


DIALECT = Dialect("deepl", render_error, form_bodies=True)


class TranslateRequest(BaseModel):
    """POST /deepl/v2/translate. Lax types: form fields arrive as strings ("1", "0")."""

    model_config = ConfigDict(extra="ignore")

    text: str | list[str] = Field(description="texts to translate (a form repeats the field)")
    source_lang: str | None = Field(None, description="EN, DE, ...; omitted: detected per text")
    target_lang: str = Field(description="DE, EN-GB, ... (a variant translates into its base language)")
    split_sentences: Literal["0", "1", "nonewlines"] = "1"
    preserve_formatting: bool = False
    tag_handling: Literal["xml", "html"] | None = None
    formality: str | None = None
    glossary_id: str | None = None
    show_billed_characters: bool = False


def parse_translate(body: bytes, media_type: str) -> tuple[TranslateRequest, list[str], None]:
    req = TranslateRequest.model_validate(parse_body(body, media_type))
    return req, _texts(req), None


def _texts(req: TranslateRequest) -> list[str]:
    return [req.text] if isinstance(req.text, str) else list(req.text)


def _check_supported(req: TranslateRequest) -> None:
    """Raises InvalidRequestError (400) for what this service does not do."""
    if not _texts(req):
        raise InvalidRequestError("Parameter 'text' not specified.")
    if req.glossary_id is not None:
        raise InvalidRequestError("glossaries are not supported by this service")
    if req.formality not in (None, *FORMALITIES):
        raise InvalidRequestError(f"Value for 'formality' not supported: {req.formality!r} is none of "
                                  f"{', '.join(FORMALITIES)}")
    if req.formality in ("more", "less"):
        raise InvalidRequestError(f"'formality' is not supported for target_lang {req.target_lang!r}")


async def translate(backend: Backend, req: TranslateRequest) -> JSONResponse:
    """Translates every text into ``target_lang``. ``split_sentences`` "0" translates each text as one sentence;
    "1" and "nonewlines" split it into sentences (this service always keeps the text's line breaks and spacing,
    which is what ``preserve_formatting`` asks for).

    Raises:
        InvalidRequestError: an unsupported option or language pair (rendered as 400).
    """
    _check_supported(req)
    texts, table = _texts(req), backend.languages
    target = req.target_lang.split("-")[0].lower()
    if req.source_lang is not None:
        sources = [req.source_lang.lower()] * len(texts)
    else:
        sources = [(table.detect(t) or [None])[0] for t in texts]
        sources = [d.language if d is not None else "" for d in sources]
    if target not in table.targets:
        raise InvalidRequestError(f"Value for 'target_lang' not supported: {req.target_lang!r} (served: "
                                  f"{', '.join(c.upper() for c in table.targets)})")
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        model_id = table.model_for(source, target)
        if model_id is None:
            raise InvalidRequestError(f"Value for 'source_lang' not supported: {source.upper()!r} into "
                                      f"{target.upper()} (served: {', '.join(s.upper() for s in table.sources)})")
        groups.setdefault(model_id, []).append(i)
    out: list = [None] * len(texts)
    for model_id, indices in groups.items():
        translations = await backend.translate_texts(translate_request(
            backend, [texts[i] for i in indices], model_id, split_sentences=req.split_sentences != "0",
            format=req.tag_handling or "text"))
        for i, translation in zip(indices, translations):
            out[i] = translation
    return JSONResponse({"translations": [
        {"detected_source_language": source.upper(), "text": t.text, "billed_characters": len(text)}
        for source, t, text in zip(sources, out, texts)]})


def languages(backend: Backend, kind: str) -> JSONResponse:
    """GET /v2/languages?type=source|target (DeepL's default: source).

    Raises:
        InvalidRequestError: another type (400).
    """
    table = backend.languages
    if kind == "source":
        return JSONResponse([{"language": c.upper(), "name": language_name(c)} for c in table.sources])
    if kind == "target":
        return JSONResponse([{"language": c.upper(), "name": language_name(c), "supports_formality": False}
                             for c in table.targets])
    raise InvalidRequestError(f"Value for 'type' not supported: {kind[:20]!r} (source or target)")


async def usage(backend: Backend, key_id: str | None) -> JSONResponse:
    """The key's characters today (UTC) and its per-day limit; without API keys the service counts no usage, so 0
    of an unlimited quota."""
    used = await backend.key_usage(key_id)
    if used is None:
        return JSONResponse({"character_count": 0, "character_limit": UNLIMITED})
    limit = used["limits"].get("characters_per_day")
    return JSONResponse({"character_count": used["characters_today"],
                         "character_limit": limit if limit is not None else UNLIMITED})
