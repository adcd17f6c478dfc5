"""The APIs that translation clients already speak (LibreTranslate, DeepL v2), each a dialect mapped onto this
service's engine, decoding options and limits.

A dialect parses its own request bodies (form-encoded or JSON) into this service's schemas.TranslateRequest, and
renders its own answers and errors. The replica (service/app.py) runs every dialect's requests through the same edge
as /translate: API keys, the keys' limits, admission, request limits, deadlines, metrics (``api`` label) and logs. A
dialect sees the replica only through :class:`Backend`, so it knows nothing of Ray.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from typing import Callable, Protocol

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.errors import InvalidRequestError
from engine.options import DecodingOptions
from service import schemas
from service.compat.languages import LanguageTable
from service.errors import LONE_SURROGATE, response_for, validation_message

FORM = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 1024  # a form of more fields is refused (each text of a DeepL request is one field)


class Backend(Protocol):
    """What a dialect needs of the replica."""

    languages: LanguageTable
    keys_required: bool
    max_chars_per_request: int

    def default_options(self, model_id: str) -> DecodingOptions:
        """The model's decoding defaults. Raises InvalidRequestError for an unknown model id."""

    async def translate_texts(self, req: schemas.TranslateRequest) -> list[schemas.Translation]:
        """Translates ``req`` (never streamed) under the replica's limits and admission; one Translation per text.
        Raises what /translate's errors are made of (service/errors.py)."""

    async def key_usage(self, key_id: str | None) -> dict | None:
        """The key's usage (service.api_keys.UsageLimiter.usage), or None when no API keys are configured."""


@dataclasses.dataclass(frozen=True)
class Dialect:
    """How one API answers.

    Attributes:
        name: its value of the ``api`` metric label ("nmt", "libretranslate", "deepl"): a fixed, bounded set.
        render_error: an exception -> that API's error response (status and body).
        form_bodies: whether it takes application/x-www-form-urlencoded bodies besides JSON.
    """

    name: str
    render_error: Callable[[Exception], JSONResponse] = response_for
    form_bodies: bool = False


NATIVE = Dialect("nmt")


def native_error(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers (Retry-After, WWW-Authenticate) /translate would answer for ``exc``; a
    pydantic ValidationError is a 422 with the fields' messages (never the input)."""
    if isinstance(exc, ValidationError):
        return 422, validation_message(exc.errors()), {}
    response = response_for(exc)
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return response.status_code, json.loads(response.body)["error"]["message"], headers


def parse_body(body: bytes, media_type: str) -> dict:
    """A form-encoded or JSON body as a dict. A form field sent once maps to its value, one sent several times to
    the list of its values (DeepL repeats ``text``), so that forms and JSON bodies validate alike.

    Raises:
        InvalidRequestError: not UTF-8 (percent-escapes included), not a JSON object, bad form encoding or more than MAX_FORM_FIELDS fields.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the body is not UTF-8 (byte {e.start})") from None
    if media_type == FORM:
        try:
            # strict: a percent-escape that is not UTF-8 ("%FF") is refused, not silently turned into U+FFFD
            fields = urllib.parse.parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                                           errors="strict")
        except ValueError as e:
            raise InvalidRequestError(f"bad form body: {e}") from None
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("the body must be a JSON object")
    try:  # Python's json module decodes a lone "\ud800" escape to a string no tokenizer can take
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"the body holds {LONE_SURROGATE}") from None
    return parsed


def translate_request(backend: Backend, texts: list[str], model_id: str, *, n_best: int = 1,
                      split_sentences: bool = True, format: str = "text") -> schemas.TranslateRequest:
    """This service's request for ``texts`` on ``model_id`` (``format``: text, html or xml): the model's own
    decoding defaults, widened to a beam of at least ``n_best`` when a dialect asks for alternatives."""
    fields: dict = dict(text=texts, model=model_id, split_sentences=split_sentences, format=format)
    if n_best > 1:
        fields.update(n_best=n_best, return_scores=True,
                      beam_size=max(n_best, backend.default_options(model_id).beam_size))
    return schemas.TranslateRequest.model_validate(fields, strict=False)
