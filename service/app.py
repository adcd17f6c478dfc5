"""Ray Serve application: FastAPI ingress over the engine's continuous batching, in one deployment.

One deployment holds both the HTTP ingress and the engine: on this machine a separate ingress deployment halved the
requests/s Serve could route. Each model has one engine core whose step loop runs on a thread of its own
(engine/async_engine.py), or in a child process with ``engine_process`` (engine/process_engine.py); a request's
sentences are submitted to it as soon as they are tokenized, join the running decode at its next step beside every
other request's sentences whatever their options, and the request is answered when its last sentence finishes (or,
with ``stream``, sentence by sentence). Scheduling and fairness live in the engine (engine/core.py); this layer
only admits work, maps errors to HTTP and counts. Several models can be served side by side by one replica
(``models`` in the args); a request names one with ``model``.

Deploy with ``serve run deploy/serve_config.yaml`` (import path ``service.app:app_builder``).
"""


import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from typing import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from pydantic import ValidationError
import ray
from ray import serve
from ray.exceptions import TaskCancelledError

from engine import rich_text, segmentation
from engine.async_engine import AsyncEngine
from engine.process_engine import RESTART_RETRY_S, CoreSpec, ProcessEngine
from engine.core import Finished
from engine.explain import Explainer
from engine.heap import freeze_long_lived
from engine.errors import EngineUnavailableError, InputTooLongError, InvalidRequestError
from engine.options import DecodingOptions, check_target_lengths
from engine.runtime import EngineConfig
from engine.search import Hypothesis
from engine.translator import Translator
from service import http_security, request_texts, schemas
from service.access import LEDGER_TIMEOUT_S, KeyAccess
from service import compat
from service.compat import NATIVE, Dialect
from service.compat.languages import LanguageTable
from service.compat.routes import CompatRoutes
from service.config import PROJECT_ROOT, AppArgs, BatchConfig
from service.http_app import api
from service.page import PageRoutes
from service.errors import (BodyTimeoutError, NotConfiguredError, OverloadedError, RequestTimeoutError,
                            RequestTooLargeError, UnsupportedMediaTypeError, error_response, response_for,
                            validation_message)
from service.metrics import ServiceMetrics, StepMetrics, count_done

log = logging.getLogger("ray.serve")
# Requests of at most this many characters are split and tokenized on the event loop (about 1 ms): through
# asyncio.to_thread they would queue behind the splitting of bulk requests in the default executor.
INLINE_PREPARE_CHARS = 1000
# Answers of plain text of at most this many sentences are joined on the event loop; markup, or more sentences, are
# rendered through asyncio.to_thread (800 inline elements of one block took 0.03 s, 15.7 s before 2026-12-05).
INLINE_RENDER_SENTENCES = 16
# Source (and target) tokens /v1/explain takes: its weights grow with the square of the length (at 128 tokens,
# about 2 MB of JSON for the bundled model).
EXPLAIN_MAX_TOKENS = 128
# A busy replica admits a request only if the work ahead of it and its own drain within this share of the time to
# its deadline at the recent rate (the rest: the answer's rendering, the rate's error).
DEADLINE_SHARE = 0.8
# ... checked only once max_queued_work / 8 is queued: a small queue drains within any deadline at a sane rate, and
# a rate measured while a new replica warmed up on busy cores can be absurdly low (10 token-rows/s: it refused 24
# requests during the compose check's scale-out, "1056 token-rows queued, about 113 s"), and only once the engine
# has finished as much work itself: before, its rate counts the few sentences finished beside seconds of steps of
# sentences still decoding (a new replica under 48 clients refused 15 requests in a fresh-clone CI run here: "8448
# token-rows queued,
# about 12259 s").
DEADLINE_CHECK_FRACTION = 8


@dataclasses.dataclass
class _Model:
    translator: Translator
    metrics: ServiceMetrics
    explainer: Explainer
    engine: AsyncEngine | ProcessEngine | None = None
    warmup_seconds: float = 0.0

    def report_load_times(self) -> None:
        # Re-set on every health check: Ray's exporter may drop a gauge that was set only once, long ago.
        self.metrics.model_load_seconds.set(self.translator.load_seconds)
        self.metrics.warmup_seconds.set(self.warmup_seconds)


def _record(**fields) -> bytes:
    return (json.dumps(fields, ensure_ascii=False) + "\n").encode()


class _Outcome:
    """One request's end: its status counted once (model metrics, key metrics) and its key's admission released
    with it (service.api_keys.CHARGED_STATUSES: which statuses keep the characters charged)."""

    def __init__(self, metrics: ServiceMetrics, access: KeyAccess | None, api: str = NATIVE.name) -> None:
        self.metrics, self.access, self.api = metrics, access, api
        self.key_id: str | None = None
        self.ticket: int | None = None
        self.characters = 0
        self.on_finish: Callable[[int], None] | None = None  # a stream's log line, written with its final status

    def finish(self, status: int) -> concurrent.futures.Future | None:
        """Counts the request and releases its admission; returns the release's future (None without one), which
        the response should wait for (:func:`_released`) so that its client's next request finds the slot free."""
        self.metrics.request(status, self.api)
        if self.on_finish is not None:
            self.on_finish(status)
        if self.access is not None:
            self.access.metrics.request(self.key_id, status, self.characters)
            if self.ticket is not None:
                ticket, self.ticket = self.ticket, None
                return self.access.release(ticket, status)
        return None


async def _released(release: concurrent.futures.Future | None) -> None:
    """Waits for a key's release to reach the ledger (KeyAccess.release); a ledger that fails or does not answer
    is logged, not the client's error: the slot's lease ends it anyway."""
    if release is None:
        return
    try:
        await asyncio.wait_for(asyncio.wrap_future(release), timeout=LEDGER_TIMEOUT_S + 1)
    except Exception:  # noqa: BLE001 - the answer is ready; the lease frees the slot if the release was lost
        log.warning("API key release not confirmed by the usage ledger", exc_info=True)




def engine_threads(requested: int, assigned: dict[str, float]) -> int:
    """ONNX Runtime intra-op threads for each engine of a replica: ``requested`` when > 0; for 0 the CPUs Ray
    reserved for the replica (``assigned``, ray.get_runtime_context().get_assigned_resources(), e.g. {"CPU": 1.0},
    from ray_actor_options.num_cpus), rounded down, at least 1; 0 (ONNX Runtime's choice) where Ray reserved none.

    ONNX Runtime's own choice is every physical core of the host for every replica, so replicas that share a host
    oversubscribe it (measured over HTTP: README.md, Deploy and scale)."""
    if requested > 0:
        return requested
    cpus = assigned.get("CPU", 0.0)
    return max(1, int(cpus)) if cpus > 0 else 0


@serve.deployment(name="Translator", max_ongoing_requests=64, graceful_shutdown_timeout_s=60)
@serve.ingress(api)
class TranslatorDeployment(PageRoutes, CompatRoutes):
    """One replica: loads and warms the artifact, then serves /translate, /health and /v1/models."""

    def __init__(self, args: dict | None = None) -> None:
        self.args = AppArgs(**(args or {}))
        http_security.configure(http_security.HttpSettings(max_body_bytes=self.args.max_body_bytes,
                                                           cors_allow_origins=self.args.cors_allow_origins))
        self.access: KeyAccess | None = None
        if self.args.api_keys_file is not None:
            keys_file = Path(self.args.api_keys_file)
            self.access = KeyAccess(keys_file if keys_file.is_absolute() else PROJECT_ROOT / keys_file,
                                    serve.get_replica_context().app_name)
        self.threads = engine_threads(self.args.intra_op_threads, ray.get_runtime_context().get_assigned_resources())
        engine_config = EngineConfig(device=self.args.device, intra_op_threads=self.threads,
                                     intra_op_spinning=self.args.intra_op_spinning,
                                     max_batch_tokens=self.args.max_batch_tokens,
                                     max_batch_rows=self.args.max_batch_rows, scheduling=self.args.scheduling,
                                     max_batches=self.args.max_batches)
        self.models: dict[str, _Model] = {}
        for model_id, folder in self.args.artifact_paths().items():
            metrics = ServiceMetrics(model_id)
            if self.args.engine_process:
                # The model is loaded (and warmed up) once, in the child; the replica's Translator only tokenizes.
                engine = ProcessEngine(CoreSpec(str(folder), engine_config, self.args.warmup), model_id,
                                       StepMetrics(metrics))
                translator = Translator(folder, engine_config, model=engine.model)
                translator.load_seconds = engine.model.load_seconds
            else:
                translator, engine = Translator(folder, engine_config), None
            model = _Model(translator, metrics, Explainer(folder, translator.bos_id))
            if self.args.warmup and engine is None:
                model.warmup_seconds = translator.warmup()
            elif self.args.warmup:  # the child warmed its model up; the replica's own part is the splitter
                started = time.perf_counter()
                segmentation.warmup()
                model.warmup_seconds = engine.model.warmup_seconds + time.perf_counter() - started
            model.report_load_times()
            model.engine = engine or AsyncEngine(translator.new_core(), model_id, StepMetrics(metrics))
            log.info("model %s loaded from %s on %s, %s scheduling, intra-op threads: %s", model_id, folder,
                     model.translator.provider, self.args.scheduling, self.threads or "every core")
            self.models[model_id] = model
        self.default = self.models[self.args.model_id]
        self._configured = False  # set by the first valid reconfigure
        # service.compat.Backend: what the LibreTranslate and DeepL dialects see of this replica.
        self.languages = LanguageTable.from_models([(mid, m.translator.manifest.get("languages", {}))
                                                    for mid, m in self.models.items()])
        self.keys_required = self.access is not None
        self.max_chars_per_request = self.args.max_chars_per_request
        # The replica's heap (Ray, FastAPI, the models) is long-lived: a full collection of it paused every request
        # for about 55 ms (engine/heap.py).
        freeze_long_lived()

    def _model(self, model_id: str | None) -> _Model:
        if model_id is None:
            return self.default
        if model_id not in self.models:
            raise InvalidRequestError(f"unknown model {model_id!r}; served: {sorted(self.models)} (GET /v1/models)")
        return self.models[model_id]

    def reconfigure(self, user_config: dict) -> None:
        """Applies the deployment's user_config (BatchConfig). An invalid one fails a replica's first configuration
        (the deploy fails loudly) but not a live update of a serving replica: that keeps its settings and logs the
        error, so a typo in a config push cannot take a healthy service down.

        Raises:
            pydantic.ValidationError: invalid user_config on the replica's first configuration.
        """
        try:
            config = BatchConfig(**user_config)
        except ValidationError as e:
            if not self._configured:
                raise
            settings = self.default.engine.settings
            log.error("user_config %r rejected, keeping max_batch_rows=%d max_batch_tokens=%d: %s", user_config,
                      settings["max_batch_rows"], settings["max_batch_tokens"], validation_message(e.errors()))
            return
        settings = {name: value for name, value in (("max_batch_rows", config.max_batch_rows),
                                                    ("max_batch_tokens", config.max_batch_tokens)) if value is not None}
        for model in self.models.values():
            model.engine.configure(**settings)  # read by the engine loop at its next schedule
        self._configured = True

    def _engine_down(self) -> str | None:
        """Why an engine cannot serve (its loop or process ended, or it has held work without finishing a step for
        ``engine_stall_s`` seconds, the args), or None."""
        for model_id, model in self.models.items():
            if not model.engine.alive:
                return f"the engine of model {model_id} is not running"
            stalled = model.engine.stalled_s
            if stalled > self.args.engine_stall_s:
                return f"the engine of model {model_id} has not finished a decoder step in {stalled:.0f} s"
        return None

    async def check_health(self) -> None:
        """Serve's liveness probe: raises if an engine is down (:meth:`_engine_down`) or cannot decode a one-token
        sentence within 30 s (then Serve restarts the replica)."""
        down = self._engine_down()
        if down:
            raise RuntimeError(down)
        for model_id, model in self.models.items():
            future = model.engine.submit([model.translator.eos_id], DecodingOptions(beam_size=1, max_length=1),
                                         group="health")
            try:
                done = await asyncio.wait_for(future, 30)
            except asyncio.TimeoutError:
                model.engine.abort(future)
                raise RuntimeError(f"the engine of model {model_id} did not decode a health probe in 30 s") from None
            if done.error is not None:
                raise RuntimeError(f"the engine of model {model_id} failed a health probe: {done.error}")
            model.report_load_times()

    @api.api_route("/health", methods=["GET", "HEAD"], response_model=schemas.Health)  # HEAD: uptime checkers
    async def health(self) -> schemas.Health:
        """The replica's limits; 503 while an engine is down or hung (:meth:`_engine_down`: until Serve's own check,
        every 10 s, has replaced the replica, translations get 503 or wait: an uptime checker must see it too)."""
        down = self._engine_down()
        if down:
            raise EngineUnavailableError(f"{down}; this replica is being replaced", RESTART_RETRY_S)
        translator = self.default.translator
        return schemas.Health(status="ok", model=self.args.model_id, provider=translator.provider,
                              max_src_tokens=translator.max_src_tokens,
                              max_texts_per_request=self.args.max_texts_per_request,
                              max_chars_per_text=self.args.max_chars_per_text,
                              intra_op_threads=self.threads,
                              replica=serve.get_replica_context().replica_id.unique_id,
                              node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid())

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        """The models this replica serves: language pair, precision, provider, limits."""
        out = []
        for model_id, model in self.models.items():
            t = model.translator
            languages = t.manifest.get("languages", {})
            out.append(dict(id=model_id, default=model is self.default, source_language=languages.get("source"),
                            target_language=languages.get("target"), precision=t.manifest.get("precision", "float32"),
                            provider=t.provider, max_src_tokens=t.max_src_tokens,
                            max_texts_per_request=self.args.max_texts_per_request,
                            max_chars_per_text=self.args.max_chars_per_text,
                            max_chars_per_request=self.args.max_chars_per_request,
                            max_sentences_per_request=self.args.max_sentences_per_request,
                            request_timeout_s=self.args.request_timeout_s, formats=["text", "html", "xml"],
                            d_model=t.manifest.get("model_config", {}).get("d_model")))
        return {"models": out}

    @api.post("/translate", response_model=schemas.TranslateResponse,
              responses={413: {"model": schemas.ErrorResponse}, 422: {"model": schemas.ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": schemas.TranslateRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def translate(self, request: Request) -> JSONResponse:
        """Translates one text or a list of texts; the body is size-checked before it is parsed."""
        def parse(body: bytes, _: str) -> tuple[schemas.TranslateRequest, list[str], str | None]:
            req = schemas.TranslateRequest.model_validate_json(body)
            return req, req.texts(), req.model

        return await self._handle(request, "translate", parse, self._translate)

    @api.post("/v1/explain", response_model=schemas.ExplainResponse,
              responses={404: {"model": schemas.ErrorResponse}, 413: {"model": schemas.ErrorResponse},
                         422: {"model": schemas.ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": schemas.ExplainRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def explain(self, request: Request) -> JSONResponse:
        """Every layer's and head's attention (encoder self-attention, masked decoder self-attention,
        encoder-decoder attention) for one sentence and its translation (or a given target): the web page's
        attention view. Serving graphs do not compute it; the artifact's explain graph does, on request."""
        def parse(body: bytes, _: str) -> tuple[schemas.ExplainRequest, list[str], str | None]:
            req = schemas.ExplainRequest.model_validate_json(body)
            return req, [req.text], req.model

        return await self._handle(request, "explain", parse, self._explain)

    async def _handle(self, request: Request, route: str, parse, run,
                      dialect: Dialect = NATIVE) -> JSONResponse | StreamingResponse:
        """One request's edge: key, body, validation, the key's admission, ``run(parsed, finish)``, errors mapped to
        their status (``dialect``'s way), the outcome counted once and a log line. ``parse(body, media_type)``
        returns (request, texts, model id); a request's ``api_key`` field (LibreTranslate's) is a key too."""
        # Serve gives every request an id (the client's X-Request-ID or a fresh one), returns it in the response
        # headers and stamps it on every "ray.serve" log record of the request, so these lines carry it.
        started = time.perf_counter()
        texts: list[str] = []
        characters = 0
        # The default model's metrics until one is named.
        outcome = _Outcome(self.default.metrics, self.access, dialect.name)
        try:
            if self.access is not None and not dialect.form_bodies:  # 401 before the body is read
                outcome.key_id = self.access.identify(request.headers)
            body, media_type = await self._read_body(request, dialect.form_bodies)
            req, texts, model_id = parse(body, media_type)
            if self.access is not None and outcome.key_id is None:
                outcome.key_id = self.access.identify(request.headers, getattr(req, "api_key", None))
            characters = sum(len(t) for t in texts)
            outcome.metrics = self._model(model_id).metrics
            if self.access is not None:
                outcome.characters = characters
                outcome.ticket = await self.access.admit(outcome.key_id, characters,
                                                         self.args.request_timeout_s + 30)
            response = await run(req, outcome.finish)
        except ValidationError as e:
            response = (error_response(422, "validation_error", validation_message(e.errors()))
                        if dialect is NATIVE else dialect.render_error(e))
        except ClientDisconnect:  # the client left while its body was being read
            response = error_response(499, "client_closed_request", "the client closed the connection before its "
                                                                    "body arrived")
        except (asyncio.CancelledError, TaskCancelledError):
            log.info("%s request cancelled (client gone or proxy timeout)", route)
            outcome.finish(499)
            raise
        except Exception as e:  # noqa: BLE001 - the edge: never a stack trace to the client
            response = dialect.render_error(e)

        def log_line(status: int) -> None:  # the key's id, never the key
            log.info("%s %s status %d texts %d chars %d latency_ms %.1f key %s", dialect.name, route, status,
                     len(texts), characters, 1000 * (time.perf_counter() - started), outcome.key_id or "-")

        if isinstance(response, StreamingResponse):  # its status (499, 504...) and time are known when it ends
            outcome.on_finish = log_line
        else:
            await _released(outcome.finish(response.status_code))
            log_line(response.status_code)
        if log.isEnabledFor(logging.DEBUG):  # request text only when debugging: it may be confidential
            log.debug("%s texts %r", route, texts)
        return response

    async def _explain(self, req: schemas.ExplainRequest,
                       finish: Callable[[int], concurrent.futures.Future | None]) -> JSONResponse:
        model = self._model(req.model)
        translator = model.translator
        model.explainer.check_available()  # before any decoding
        if len(req.text) > self.args.max_chars_per_text:
            raise RequestTooLargeError(f"text has {len(req.text)} characters > limit {self.args.max_chars_per_text}")
        too_long = f"> limit {EXPLAIN_MAX_TOKENS} for explain (its weights grow with the square of the length)"
        try:
            src = translator.tokenize(req.text)
        except InputTooLongError as e:  # past the model's own limit, which is not this route's
            raise RequestTooLargeError(f"text has {e.n_tokens} tokens {too_long}") from None
        if not src:
            raise InvalidRequestError("text is empty")
        if len(src) > EXPLAIN_MAX_TOKENS:
            raise RequestTooLargeError(f"text has {len(src)} tokens {too_long}")
        if req.target is None and len(sentences := segmentation.split(req.text).sentences) > 1:
            # The model translates sentence by sentence; given several at once it tends to stop after the first.
            raise InvalidRequestError(f"explain translates one sentence and the text has {len(sentences)}: send "
                                      f"them one at a time, or give the translation to explain as 'target'")
        if req.target is not None:
            tgt = translator.tokenizer.encode_target(req.target)
            if len(tgt) + 1 > EXPLAIN_MAX_TOKENS:
                raise RequestTooLargeError(f"target has {len(tgt)} tokens > limit {EXPLAIN_MAX_TOKENS - 1}")
        else:
            self._admit(model, [request_texts.Sentence(src)], translator.default_options, self.args.request_timeout_s)
            futures = self._submit(model, [request_texts.Sentence(src)], translator.default_options)
            [hyps] = await self._await_sentences(model, futures, time.monotonic() + self.args.request_timeout_s)
            tgt = hyps[0].tokens
        maps = await asyncio.to_thread(model.explainer.explain, src, tgt)
        tokenizer = translator.tokenizer

        def rounded(weights) -> list:
            return np.round(weights.astype(np.float64), 5).tolist()

        body = schemas.ExplainResponse(
            model=req.model or self.args.model_id, translation=translator.detokenize(tgt),
            source_tokens=tokenizer.source_pieces(req.text) + tokenizer.target_pieces([translator.eos_id]),
            target_tokens=tokenizer.target_pieces(tgt), decoder_input_tokens=["<s>"] + tokenizer.target_pieces(tgt),
            encoder_self_attention=rounded(maps.encoder), decoder_self_attention=rounded(maps.decoder),
            cross_attention=rounded(maps.cross))
        return JSONResponse(body.model_dump())

    @api.get("/v1/usage")
    async def usage(self, request: Request) -> JSONResponse:
        """The calling key's usage (characters in the last minute, today (UTC) and in all, requests, requests in
        flight) and its limits."""
        try:
            if self.access is None:
                raise NotConfiguredError("this deployment has no API keys configured (api_keys_file), so there is "
                                         "no per-key usage")
            return JSONResponse(await self.access.usage(self.access.identify(request.headers)))
        except Exception as e:  # noqa: BLE001 - the edge: never a stack trace to the client
            return response_for(e)

    async def _lookup(self, dialect: Dialect, run, request: Request | None = None) -> JSONResponse:
        """A dialect's read-only route: ``run()`` (or, given the ``request``, ``run(key id)`` after the key is
        checked when keys are configured), errors in the dialect's form, counted under its api label."""
        outcome = _Outcome(self.default.metrics, None, dialect.name)
        try:
            if request is None:
                response = run()
            else:
                key_id = self.access.identify(request.headers) if self.access is not None else None
                response = run(key_id)
            if asyncio.iscoroutine(response):
                response = await response
        except Exception as e:  # noqa: BLE001 - the edge: never a stack trace to the client
            response = dialect.render_error(e)
        outcome.finish(response.status_code)
        return response

    async def _read_body(self, request: Request, form_ok: bool = False) -> tuple[bytes, str]:
        """The JSON body (or, with ``form_ok``, a form-encoded one), at most max_body_bytes, and its media type.

        Raises:
            UnsupportedMediaTypeError: a Content-Type other than JSON (or form with ``form_ok``), or none. Those a
                browser may send cross-origin without a CORS preflight (text/plain, form-urlencoded, multipart,
                none) are among them, so a web page cannot make its visitors' browsers send requests to this
                service's own API. The LibreTranslate and DeepL dialects take forms, as their clients send them:
                a cross-site form can reach those, but it carries no key (keys travel in headers or in the body,
                never in cookies) and cannot read the answer.
            RequestTooLargeError: a chunked body that grows past the limit (a declared Content-Length over it is
                refused by service/http_security.py on every route, before this runs).
            BodyTimeoutError: the body took longer than body_timeout_s (a slow client holds a request slot).
        """
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if form_ok and media_type == compat.FORM:
            pass
        elif media_type != "application/json" and not media_type.endswith("+json"):
            # A missing type is refused too: a browser's no-cors fetch of an untyped body sends none.
            raise UnsupportedMediaTypeError(f"Content-Type {media_type[:100]!r} is not JSON: send the body with "
                                            f"Content-Type: application/json" +
                                            (f" or {compat.FORM}" if form_ok else ""))
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedMediaTypeError(f"Content-Encoding {encoding[:50]!r} is not supported: send the body "
                                            f"uncompressed")
        limit = self.args.max_body_bytes
        body = bytearray()
        try:
            async with asyncio.timeout(self.args.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise RequestTooLargeError(f"body > limit {limit} bytes")
        except TimeoutError:
            raise BodyTimeoutError(f"the body did not arrive within body_timeout_s={self.args.body_timeout_s} "
                                   f"({len(body)} bytes received)") from None
        # A UTF-8 byte order mark, which JSON parsers may ignore (RFC 8259, section 8.1), and some editors write.
        return bytes(body).removeprefix(b"\xef\xbb\xbf"), media_type

    async def _translate(self, req: schemas.TranslateRequest,
                         finish: Callable[[int], concurrent.futures.Future | None]) -> JSONResponse | StreamingResponse:
        """Translates a validated request; a stream calls ``finish(status)`` when it ends."""
        model_id = req.model or self.args.model_id
        model = self._model(model_id)
        options, segmented, sentences, deadline = await self._accept(model, req)
        if req.stream:
            # The first sentence decodes alone (on an otherwise idle engine) and the rest join once it is done: on a
            # CPU a step costs more the more rows it holds, so the first sentence shows after about one sentence's
            # latency instead of a full batch's (the stream as a whole takes about one sentence longer).
            futures = self._submit(model, sentences[:1], options, deadline)
            return StreamingResponse(self._stream(model_id, model, req, segmented, futures, deadline,
                                                  lambda: self._submit(model, sentences[1:], options, deadline),
                                                  finish),
                                     media_type="application/x-ndjson")
        translations = await self._decode(model, req, segmented, sentences, options, deadline)
        body = schemas.TranslateResponse(model=model_id, translations=translations)
        return JSONResponse(body.model_dump(exclude_none=True))

    async def translate_texts(self, req: schemas.TranslateRequest) -> list[schemas.Translation]:
        """service.compat.Backend: ``req`` translated like /translate does (limits, admission, deadline), never
        streamed."""
        model = self._model(req.model)
        options, segmented, sentences, deadline = await self._accept(model, req)
        return await self._decode(model, req, segmented, sentences, options, deadline)

    def default_options(self, model_id: str) -> DecodingOptions:
        """service.compat.Backend: the model's decoding defaults."""
        return self._model(model_id).translator.default_options

    async def key_usage(self, key_id: str | None) -> dict | None:
        """service.compat.Backend: the key's usage, None without API keys."""
        return None if self.access is None else await self.access.usage(key_id)

    async def _accept(self, model: _Model, req: schemas.TranslateRequest
                      ) -> tuple[DecodingOptions, list[rich_text.Prepared], list[request_texts.Sentence], float]:
        """Checks a request's limits, splits and tokenizes its texts and admits its work: its options, texts,
        sentences and deadline (time.monotonic(), seconds). Nothing is queued when this raises.

        Raises:
            RequestTooLargeError, InputTooLongError, InvalidRequestError: 413/422.
            RequestTimeoutError: splitting took past request_timeout_s.
            OverloadedError: admission refused (503).
        """
        translator = model.translator
        # Scores the client will not see need not be computed (greedy steps then skip the log-softmax).
        options = dataclasses.replace(req.decoding_options(translator.default_options), return_scores=req.return_scores)
        check_target_lengths(options, translator.max_positions)
        texts, prefixes = req.texts(), req.prefixes()
        if len(texts) > self.args.max_texts_per_request:
            raise RequestTooLargeError(f"{len(texts)} texts > limit max_texts_per_request="
                                       f"{self.args.max_texts_per_request}")
        for i, text in enumerate(texts):
            if len(text) > self.args.max_chars_per_text:
                raise RequestTooLargeError(f"text[{i}] has {len(text)} characters > limit max_chars_per_text="
                                           f"{self.args.max_chars_per_text}")
        for i, prefix in enumerate(prefixes):
            if prefix is not None and len(prefix) > self.args.max_chars_per_text:
                raise RequestTooLargeError(f"target_prefix[{i}] has {len(prefix)} characters > limit "
                                           f"{self.args.max_chars_per_text}")
        if sum(len(t) for t in texts) > self.args.max_chars_per_request:
            raise RequestTooLargeError(f"{sum(len(t) for t in texts)} characters in all texts > limit "
                                       f"max_chars_per_request={self.args.max_chars_per_request}")
        # One deadline for the whole request: splitting, queueing and decoding share request_timeout_s (plus
        # timeout_s_per_sentence for each of its sentences).
        deadline = time.monotonic() + self.args.request_timeout_s
        # Everything is split and tokenized before anything is queued: a bad sentence fails its request alone.
        # In a thread: up to max_texts_per_request x max_chars_per_text of sentence splitting must not stall
        # the event loop that serves every other request of this replica.
        try:
            if sum(len(t) for t in texts) <= INLINE_PREPARE_CHARS:  # a thread hop could wait behind bulk requests
                segmented, sentences = request_texts.prepare(translator, texts, prefixes, req, options)
            else:
                segmented, sentences = await asyncio.wait_for(asyncio.to_thread(
                    request_texts.prepare, translator, texts, prefixes, req, options),
                    timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            model.metrics.timeouts.inc(1)
            raise RequestTimeoutError(f"splitting and tokenizing took longer than request_timeout_s="
                                      f"{self.args.request_timeout_s}") from None
        if len(sentences) > self.args.max_sentences_per_request:
            raise RequestTooLargeError(f"{len(sentences)} sentences > limit max_sentences_per_request="
                                       f"{self.args.max_sentences_per_request} "
                                       f"per request")
        deadline += self.args.timeout_s_per_sentence * len(sentences)  # a document gets time for its size
        self._admit(model, sentences, options, deadline - time.monotonic())
        if any(p.needs_attention for p in segmented) and not options.return_attention:
            # Markup, masks and casing are put back by alignment; the answer shows attention only when asked.
            options = dataclasses.replace(options, return_attention=True)
        return options, segmented, sentences, deadline

    async def _decode(self, model: _Model, req: schemas.TranslateRequest, segmented: list[rich_text.Prepared],
                      sentences: list[request_texts.Sentence], options: DecodingOptions,
                      deadline: float) -> list[schemas.Translation]:
        """Submits the sentences, waits for all of them and joins each text's back into its layout."""
        futures = self._submit(model, sentences, options, deadline)
        outcomes = await self._await_sentences(model, futures, deadline)
        # Off the event loop: a document's markup placement and n_best joins are Python work of up to seconds,
        # which the loop (other requests, health checks) should not wait on. Plain text of a few sentences is joined
        # in microseconds, less than a hand-off to a thread costs.
        if len(sentences) <= INLINE_RENDER_SENTENCES and all(seg.format == "text" for seg in segmented):
            return request_texts.translations(model.translator, req, segmented, outcomes)
        return await asyncio.to_thread(request_texts.translations, model.translator, req, segmented, outcomes)

    def _admit(self, model: _Model, sentences: list[request_texts.Sentence], options: DecodingOptions,
               time_left_s: float | None = None) -> None:
        """Admission by work (token-rows, AsyncEngine.work): a bulk request is refused past max_queued_work of all
        queued work; an interactive one (at most interactive_max_sentences sentences) only past twice that of the
        interactive work queued, so that interactive requests still get in while bulk ones (a document) fill the
        queue, and then join the running decode first under the engine's fairness; an idle engine admits anything
        (max_sentences_per_request bounds a request). A busy engine with at least max_queued_work /
        DEADLINE_CHECK_FRACTION queued, which has finished as much work since it started, also refuses a request
        that the work ahead of it and its own would not let finish within DEADLINE_SHARE of ``time_left_s``
        (seconds to its deadline; the rest for the answer's rendering and the rate's error) at the replica's
        recent rate (AsyncEngine.work_per_s): admitted, it would only be dropped at its deadline, a 504 after all
        that work (a burst of clients retrying on 503 ended 113 of 200 requests so, with replicas sharing cores).

        Raises:
            OverloadedError: the replica has too much work queued (HTTP 503 with Retry-After).
        """
        work = sum(AsyncEngine.work(s.src_ids, options) for s in sentences)
        interactive = self._interactive(sentences)
        queued = model.engine.interactive_work if interactive else model.engine.queued_work
        limit = self.args.max_queued_work * (2 if interactive else 1)
        if not queued:
            return
        # Retry-After: when the queue will have drained enough at the engine's recent rate (at least
        # retry_after_s, at most 60 s), so that refused clients do not come back every second and spend the
        # CPU the engine needs on more refusals.
        rate = model.engine.work_per_s
        if queued + work > limit:
            wait = (queued + work - limit) / rate if rate > 0 else 0
            reason = f"{queued} token-rows of work queued (limit {limit} for a request of {len(sentences)} sentences)"
        elif (time_left_s is not None and rate > 0 and queued * DEADLINE_CHECK_FRACTION >= self.args.max_queued_work
              and model.engine.finished_work * DEADLINE_CHECK_FRACTION >= self.args.max_queued_work
              and (queued + work) / rate > DEADLINE_SHARE * time_left_s):
            wait = (queued + work) / rate - DEADLINE_SHARE * time_left_s
            reason = (f"{queued} token-rows of work queued, about {(queued + work) / rate:.0f} s with this request's "
                      f"at its recent rate, past the request's deadline in {time_left_s:.0f} s")
        else:
            return
        model.metrics.rejected.inc(1)
        retry_after = min(60, max(self.args.retry_after_s, math.ceil(wait)))
        raise OverloadedError(f"this replica has {reason}; retry in {retry_after} s", retry_after)

    def _interactive(self, sentences: list[request_texts.Sentence]) -> bool:
        return len(sentences) <= self.args.interactive_max_sentences

    def _submit(self, model: _Model, sentences: list[request_texts.Sentence], options: DecodingOptions,
                deadline: float | None = None) -> list[asyncio.Future]:
        """Queues a request's sentences as one group (the engine's fairness unit) with its ``deadline``
        (time.monotonic() seconds), which orders it among running requests (engine/core.py, policy point 2)."""
        group = object()
        interactive = self._interactive(sentences)
        model.metrics.add_pending(len(sentences))
        model.metrics.count(model.metrics.source_tokens, sum(len(s.src_ids) for s in sentences))
        futures = [model.engine.submit(s.src_ids, options, target_prefix=s.prefix, group=group,
                                       interactive=interactive, deadline=deadline) for s in sentences]
        for future in futures:
            future.add_done_callback(functools.partial(count_done, model.metrics))
        return futures

    def _abandon(self, model: _Model, futures: list[asyncio.Future]) -> None:
        """Aborts the request's unfinished sentences (client gone, deadline passed, a sibling failed): the engine
        drops them at its next step."""
        unfinished = [f for f in futures if not f.done()]
        model.metrics.count(model.metrics.cancelled, len(unfinished))
        for future in unfinished:
            model.engine.abort(future)

    async def _await_sentences(self, model: _Model, futures: list[asyncio.Future],
                               deadline: float) -> list[list[Hypothesis]]:
        """Waits for every sentence until ``deadline`` (time.monotonic(), seconds); aborts the rest when the
        request is cancelled, times out, or one of its sentences fails.

        Raises:
            RequestTimeoutError: past the deadline.
            EngineError (or what failed a sentence): the first failure among the sentences.
        """
        try:
            pending = set(futures)
            while pending:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    model.metrics.timeouts.inc(1)
                    raise RequestTimeoutError(self._timeout_message())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    if future.result().error is not None:
                        raise future.result().error
        except BaseException:
            self._abandon(model, futures)
            raise
        return [self._hypotheses(f.result()) for f in futures]

    def _timeout_message(self) -> str:
        """The 504's message: the deadline's parts (a stream of 64 sentences said "within request_timeout_s=30.0"
        and ended at 36.4 s, its deadline grown by timeout_s_per_sentence)."""
        per_sentence = (f" + timeout_s_per_sentence={self.args.timeout_s_per_sentence} per sentence"
                        if self.args.timeout_s_per_sentence else "")
        return (f"request not finished within its deadline (request_timeout_s={self.args.request_timeout_s}"
                f"{per_sentence}); its work was dropped")

    @staticmethod
    def _hypotheses(done: Finished) -> list[Hypothesis]:
        if done.aborted:  # only a request that abandoned its own work sees this, and it has already left
            raise RequestTimeoutError("translation was cancelled")
        return done.hypotheses

    async def _stream(self, model_id: str, model: _Model, req: schemas.TranslateRequest,
                      segmented: list[rich_text.Prepared], futures: list[asyncio.Future], deadline: float,
                      submit_rest, finish: Callable[[int], concurrent.futures.Future | None]):
        """Newline-delimited JSON records (schemas.StreamRecord), in order: each sentence of each text as soon as
        it and those before it are done, then each text's whole translation, then "done". ``futures`` holds the
        first sentence's; ``submit_rest()`` submits the others (called once the first is done) and returns their
        futures. An error ends the stream with an "error" record (the HTTP status was 200 when the stream
        began). ``finish(status)`` is called once when the stream ends."""
        translator, cursor = model.translator, 0
        try:
            for index, (seg, prefix) in enumerate(zip(segmented, req.prefixes())):
                hyps, unknowns = [], request_texts.unknowns(translator, req, seg, prefix)
                for j in range(len(seg.sentences)):
                    if cursor + j == len(futures):
                        futures += submit_rest()
                    future = futures[cursor + j]
                    timeout = deadline - time.monotonic()
                    try:
                        done = await asyncio.wait_for(asyncio.shield(future), max(timeout, 0))
                    except asyncio.TimeoutError:
                        model.metrics.timeouts.inc(1)
                        raise RequestTimeoutError(self._timeout_message()) from None
                    if done.error is not None:
                        raise done.error
                    hyps.append(self._hypotheses(done))
                    yield _record(type="sentence", index=index, sentence=j,
                                  text=seg.render_sentence(j, hyps[-1][0], translator.tokenizer, unknowns[j]))
                cursor += len(seg.sentences)
                translation = request_texts.translation(translator, req, seg, prefix, hyps)
                yield _record(type="translation", index=index, **translation.model_dump(exclude_none=True))
            await _released(finish(200))  # before "done": the client may send its next request on reading it
            yield _record(type="done", model=model_id)
        except (asyncio.CancelledError, TaskCancelledError, GeneratorExit):  # the client left: Serve cancels the
            self._abandon(model, futures)                                     # stream's task or closes it
            finish(499)
            raise
        except Exception as e:  # noqa: BLE001 - the stream's status is sent: end it with an error record
            self._abandon(model, futures)
            response = response_for(e)
            finish(response.status_code)
            yield _record(type="error", status=response.status_code, **json.loads(response.body))

def app_builder(args: dict | None = None) -> serve.Application:
    """Serve application builder; ``args`` are validated by :class:`AppArgs`."""
    return TranslatorDeployment.bind(AppArgs(**(args or {})).model_dump())
