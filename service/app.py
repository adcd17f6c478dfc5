"""Ray Serve application: FastAPI ingress and dynamic batching over the engine, in one deployment.

One deployment holds both the HTTP ingress and the batcher (service/batcher.py, which forms a batch when the
engine is free; Ray's @serve.batch formed 3-sentence batches with 64 sentences waiting): on this machine a separate
ingress deployment halved the requests/s Serve could route (DESIGN.md section 6). Each sentence of a request becomes one
batch item, so sentences of different requests share a batch; items are grouped by model and decoding options
inside the batch. Several models can be served side by side by one replica (``models`` in the args); a request
names one with ``model``.

Deploy with ``serve run deploy/serve_config.yaml`` (import path ``service.app:app_builder``).
"""


import asyncio
import dataclasses
import hmac
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
import ray
from ray import serve

from engine import segmentation
from engine.errors import InvalidRequestError
from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.search import Hypothesis, StepStats
from engine.translator import Translator
from service import schemas
from service.batcher import DynamicBatcher, Settle
from service.errors import (OverloadedError, RequestTimeoutError, RequestTooLargeError, UnauthorizedError,
                            error_response, install_handlers, response_for, validation_message)
from service.metrics import ServiceMetrics

log = logging.getLogger("ray.serve")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class AppArgs(BaseModel):
    """Application arguments (the ``args`` of the Serve config). Relative paths are relative to the project."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: str = "artifacts/en-de"
    model_id: str = Field("en-de", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the default model's id")
    models: dict[str, str] = Field(default_factory=dict, description="more models served side by side: id -> "
                                                                     "artifact folder")
    device: str = "auto"
    intra_op_threads: int = Field(0, ge=0)
    max_batch_tokens: int = Field(1024, ge=1)
    max_texts_per_request: int = Field(64, ge=1)
    max_chars_per_text: int = Field(2000, ge=1)
    max_chars_per_request: int = Field(50_000, ge=1, description="characters in all texts of one request")
    max_body_bytes: int = Field(1_000_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one request in the replica (504 past it)")
    max_sentences_per_request: int = Field(256, ge=1, description="sentences after splitting (413 beyond): bounds "
                                           "how long one request can hold a replica")
    max_queued_sentences: int = Field(256, ge=1, description="sentences waiting for a batch in this replica beyond "
                                      "which a request gets a JSON 503 with Retry-After (admission control)")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of that 503, seconds")
    api_key: str | None = Field(None, min_length=16, description="if set, /translate needs X-API-Key or Bearer")
    warmup: bool = True

    def artifact_paths(self) -> dict[str, Path]:
        """Model id -> artifact folder, the default model first."""
        folders = {self.model_id: self.artifact_dir, **self.models}
        return {mid: Path(f) if Path(f).is_absolute() else PROJECT_ROOT / f for mid, f in folders.items()}


class BatchConfig(BaseModel):
    """Live batch settings (the deployment's ``user_config``; changed at runtime through reconfigure)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=1024, description="sentences per batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0, description="wait for a fuller batch, s")


@dataclasses.dataclass
class _Model:
    translator: Translator
    metrics: ServiceMetrics
    warmup_seconds: float = 0.0

    def report_load_times(self) -> None:
        # Re-set on every health check: Ray's exporter may drop a gauge that was set only once, long ago.
        self.metrics.model_load_seconds.set(self.translator.load_seconds)
        self.metrics.warmup_seconds.set(self.warmup_seconds)


@dataclasses.dataclass
class _Item:
    model: str
    src_ids: list[int]
    options: DecodingOptions
    enqueued_at: float
    prefix: tuple[int, ...] | None = None  # forced target prefix ids
    cancelled: bool = False  # set by the request when its client leaves or its deadline passes



api = FastAPI(title="Translation service", version="0.1.0",
              description="English->German Transformer on ONNX Runtime, batched by Ray Serve.")
install_handlers(api)


@serve.deployment(name="Translator", max_ongoing_requests=64, graceful_shutdown_timeout_s=60)
@serve.ingress(api)
class TranslatorDeployment:
    """One replica: loads and warms the artifact, then serves /translate, /health and /v1/models."""

    def __init__(self, args: dict | None = None) -> None:
        self.args = AppArgs(**(args or {}))
        engine_config = EngineConfig(device=self.args.device, intra_op_threads=self.args.intra_op_threads,
                                     max_batch_tokens=self.args.max_batch_tokens)
        self.models: dict[str, _Model] = {}
        for model_id, folder in self.args.artifact_paths().items():
            model = _Model(Translator(folder, engine_config), ServiceMetrics(model_id))
            if self.args.warmup:
                model.warmup_seconds = model.translator.warmup()
            model.report_load_times()
            log.info("model %s loaded from %s on %s", model_id, folder, model.translator.provider)
            self.models[model_id] = model
        self.default = self.models[self.args.model_id]
        defaults = BatchConfig()
        self.batcher = DynamicBatcher(self._translate_batch, defaults.max_batch_size, defaults.batch_wait_timeout_s)
        self._configured = False  # set by the first valid reconfigure

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
            log.error("user_config %r rejected, keeping max_batch_size=%d batch_wait_timeout_s=%s: %s", user_config,
                      self.batcher.max_batch_size, self.batcher.batch_wait_timeout_s, validation_message(e.errors()))
            return
        self.batcher.configure(config.max_batch_size, config.batch_wait_timeout_s)
        self._configured = True

    def check_health(self) -> None:
        """Serve's liveness probe: raises if an engine cannot run (then Serve restarts the replica)."""
        for model in self.models.values():
            model.translator.translate_ids([[model.translator.eos_id]], DecodingOptions(beam_size=1, max_length=1))
            model.report_load_times()

    @api.get("/health", response_model=schemas.Health)
    async def health(self) -> schemas.Health:
        translator = self.default.translator
        return schemas.Health(status="ok", model=self.args.model_id, provider=translator.provider,
                              max_src_tokens=translator.max_src_tokens,
                              max_texts_per_request=self.args.max_texts_per_request,
                              max_chars_per_text=self.args.max_chars_per_text,
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
                            d_model=t.manifest.get("model_config", {}).get("d_model")))
        return {"models": out}

    @api.post("/translate", response_model=schemas.TranslateResponse,
              responses={413: {"model": schemas.ErrorResponse}, 422: {"model": schemas.ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": schemas.TranslateRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def translate(self, request: Request) -> JSONResponse:
        """Translates one text or a list of texts; the body is size-checked before it is parsed."""
        # Serve gives every request an id (the client's X-Request-ID or a fresh one), returns it in the response
        # headers and stamps it on every "ray.serve" log record of the request, so these lines carry it.
        started = time.perf_counter()
        texts: list[str] = []
        metrics = self.default.metrics  # until the request names a valid model
        try:
            self._authorize(request)
            body = await self._read_body(request)
            req = schemas.TranslateRequest.model_validate_json(body)
            texts = req.texts()
            metrics = self._model(req.model).metrics
            response = await self._translate(req)
        except ValidationError as e:
            response = error_response(422, "validation_error", validation_message(e.errors()))
        except asyncio.CancelledError:
            log.info("request cancelled (client gone or proxy timeout)")
            metrics.request(499)
            raise
        except Exception as e:  # noqa: BLE001 - the edge: never a stack trace to the client
            response = response_for(e)
        metrics.request(response.status_code)
        log.info("translate status %d texts %d chars %d latency_ms %.1f", response.status_code, len(texts),
                 sum(len(t) for t in texts), 1000 * (time.perf_counter() - started))
        if log.isEnabledFor(logging.DEBUG):  # request text only when debugging: it may be confidential
            log.debug("translate texts %r", texts)
        return response

    def _authorize(self, request: Request) -> None:
        key = self.args.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise UnauthorizedError("missing or wrong API key: send it in the X-API-Key header")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestTooLargeError(f"body of {declared} bytes > limit {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestTooLargeError(f"body > limit {limit} bytes")
        return bytes(body)

    async def _translate(self, req: schemas.TranslateRequest) -> JSONResponse:
        model_id = req.model or self.args.model_id
        model = self._model(model_id)
        translator = model.translator
        options = req.decoding_options(translator.default_options)
        texts, prefixes = req.texts(), req.prefixes()
        if len(texts) > self.args.max_texts_per_request:
            raise RequestTooLargeError(f"{len(texts)} texts > limit {self.args.max_texts_per_request} per request")
        for i, text in enumerate(texts):
            if len(text) > self.args.max_chars_per_text:
                raise RequestTooLargeError(f"text[{i}] has {len(text)} characters > limit "
                                           f"{self.args.max_chars_per_text}")
        for i, prefix in enumerate(prefixes):
            if prefix is not None and len(prefix) > self.args.max_chars_per_text:
                raise RequestTooLargeError(f"target_prefix[{i}] has {len(prefix)} characters > limit "
                                           f"{self.args.max_chars_per_text}")
        # Everything is split and tokenized before anything is queued: a bad sentence fails its request alone.
        # In a thread: up to max_texts_per_request x max_chars_per_text of sentence splitting must not stall
        # the event loop that serves every other request of this replica.
        if sum(len(t) for t in texts) > self.args.max_chars_per_request:
            raise RequestTooLargeError(f"{sum(len(t) for t in texts)} characters in all texts > limit "
                                       f"{self.args.max_chars_per_request} per request")
        # One deadline for the whole request: splitting, queueing and decoding share request_timeout_s.
        deadline = time.monotonic() + self.args.request_timeout_s
        try:
            segmented, items = await asyncio.wait_for(asyncio.to_thread(
                self._prepare, model_id, translator, texts, prefixes, options, req.split_sentences),
                timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            model.metrics.timeouts.inc(1)
            raise RequestTimeoutError(f"splitting and tokenizing took longer than request_timeout_s="
                                      f"{self.args.request_timeout_s}") from None
        if len(items) > self.args.max_sentences_per_request:
            raise RequestTooLargeError(f"{len(items)} sentences > limit {self.args.max_sentences_per_request} per "
                                       f"request")
        outcomes = await self._run_items(items, model.metrics, deadline)
        translations, cursor = [], 0
        for seg in segmented:
            per_sentence = outcomes[cursor:cursor + len(seg.sentences)]
            cursor += len(seg.sentences)
            unknowns = ([translator.unknown_pieces(s) for s in seg.sentences] if req.replace_unknowns
                        else [None] * len(seg.sentences))
            translation = self._render(translator, seg, per_sentence, unknowns, req.return_scores)
            if req.return_attention:
                translation.attention = [self._attention(translator, sentence, h[0]) for sentence, h in
                                         zip(seg.sentences, per_sentence)]
            translations.append(translation)
        body = schemas.TranslateResponse(model=model_id, translations=translations)
        return JSONResponse(body.model_dump(exclude_none=True))

    @staticmethod
    def _prepare(model_id: str, translator: Translator, texts: list[str], prefixes: list[str | None],
                 options: DecodingOptions, split_sentences: bool) -> tuple[list[segmentation.Segmented], list[_Item]]:
        """Splits texts into sentences and tokenizes them. Raises InputTooLongError for an over-long sentence."""
        segmented = [segmentation.split(text, split_sentences) for text in texts]
        now = time.perf_counter()
        items = []
        limit = translator.max_positions - 2  # room for the decoder start and eos
        for i, (seg, prefix) in enumerate(zip(segmented, prefixes)):
            prefix_ids = tuple(translator.tokenizer.encode_target(prefix)) if prefix else None
            if prefix_ids and len(prefix_ids) > limit:
                raise InvalidRequestError(f"target_prefix[{i}] has {len(prefix_ids)} tokens > limit {limit}")
            for j, sentence in enumerate(seg.sentences):
                items.append(_Item(model_id, translator.tokenize(sentence), options, now,
                                   prefix_ids if j == 0 else None))
        return segmented, items

    async def _run_items(self, items: list[_Item], metrics: ServiceMetrics,
                         deadline: float) -> list[list[Hypothesis]]:
        """Queues items on the batcher until ``deadline`` (time.monotonic(), seconds); marks the request's work
        abandoned when it is cancelled, times out, or one of its sentences fails (then the others stop too).

        Raises:
            OverloadedError: the replica's queue is full (a request is always admitted into an empty queue, so
                one larger than the limit is still served; max_sentences_per_request bounds it).
            RequestTimeoutError: past the deadline.
        """
        if not items:  # nothing to decode (empty texts): asyncio.wait refuses an empty set
            return []
        queued = self.batcher.queued
        if queued and queued + len(items) > self.args.max_queued_sentences:
            metrics.rejected.inc(1)
            raise OverloadedError(f"{queued} sentences are waiting in this replica (limit "
                                  f"{self.args.max_queued_sentences}); retry later", self.args.retry_after_s)

        def abandon() -> None:  # the batch drops these sentences at its next decoding step
            metrics.count(metrics.cancelled, sum(not item.cancelled for item in items))
            for item in items:
                item.cancelled = True
            for task in tasks:
                task.cancel()

        metrics.add_pending(len(items))
        tasks = [asyncio.ensure_future(self.batcher.submit(item)) for item in items]
        try:
            done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0),
                                               return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            abandon()
            raise
        finally:
            metrics.add_pending(-len(items))
        if pending:
            abandon()
            failed = [t.exception() for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0]
            metrics.timeouts.inc(1)
            raise RequestTimeoutError(f"request not finished within request_timeout_s="
                                      f"{self.args.request_timeout_s}; its work was dropped")
        # Retrieve every exception, so none is logged as never retrieved.
        errors = [None if task.cancelled() else task.exception() for task in tasks]
        outcomes = []
        for task, error in zip(tasks, errors):
            if error is not None:
                raise error
            if task.cancelled() or not task.result():  # dropped as cancelled: cannot happen for a live request
                raise RequestTimeoutError("translation was cancelled")
            outcomes.append(task.result())
        return outcomes

    @staticmethod
    def _render(translator: Translator, seg: segmentation.Segmented, hyps: list[list[Hypothesis]], unknowns: list,
                return_scores: bool) -> schemas.Translation:
        """Joins sentence translations into the text's layout. n_best[k] joins each sentence's k-th hypothesis
        (its last one if it has fewer); its score is the sum over sentences."""
        if not seg.sentences:
            return schemas.Translation(text="", score=0.0 if return_scores else None,
                                       n_best=[schemas.Hypothesis(text="", score=0.0)] if return_scores else None)
        n = max(len(h) for h in hyps) if return_scores else 1
        joined = []
        for k in range(n):
            picks = [h[min(k, len(h) - 1)] for h in hyps]
            text = seg.join([translator.detokenize(p.tokens, u) for p, u in zip(picks, unknowns)])
            joined.append(schemas.Hypothesis(text=text, score=sum(p.score for p in picks)))
        if not return_scores:
            return schemas.Translation(text=joined[0].text)
        return schemas.Translation(text=joined[0].text, score=joined[0].score, n_best=joined)

    @staticmethod
    def _attention(translator: Translator, sentence: str, hyp: Hypothesis) -> schemas.SentenceAttention:
        tokenizer = translator.tokenizer
        return schemas.SentenceAttention(
            source_tokens=tokenizer.source_pieces(sentence) + tokenizer.target_pieces([translator.eos_id]),
            target_tokens=tokenizer.target_pieces(hyp.tokens),
            weights=[[round(float(w), 5) for w in row] for row in hyp.attention or []])

    async def _translate_batch(self, items: list[_Item], settle: Settle) -> list[list[Hypothesis] | Exception]:
        """Decodes one formed batch; each (model, options) group's items are settled as soon as the group is done.
        Never raises: a failure becomes the outcome of the items it concerns."""
        started = time.perf_counter()
        for item in items:
            self.models[item.model].metrics.queue_seconds.observe(started - item.enqueued_at)
        try:
            return await asyncio.to_thread(self._decode_groups, items, settle)
        except Exception as e:  # noqa: BLE001 - a bug here must not fail the batch loop itself
            log.exception("batch of %d sentences failed", len(items))
            return [e] * len(items)

    def _decode_groups(self, items: list[_Item], settle: Settle | None = None) -> list[list[Hypothesis] | Exception]:
        """Decodes the items of one batch, one engine call per (model, options) group, the cheapest group first,
        calling ``settle(index, outcome)`` after each group: a default request batched with a beam-16 one of 200
        tokens is answered after its own group, not after the whole batch (measured before: both took 20 s). If a
        group fails, its sentences are retried one by one, so that only the sentence that fails gets an error."""
        groups: dict[tuple[str, DecodingOptions], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.model, item.options].append(index)
        outcomes: list[list[Hypothesis] | Exception] = [RuntimeError("not decoded")] * len(items)
        for (model_id, options), indices in sorted(groups.items(), key=lambda group: self._cost(items, *group)):
            try:
                results = self._decode_group(model_id, options, [items[i] for i in indices])
            except Exception:  # noqa: BLE001 - isolate: retry alone, each failure stays with its sentence
                log.exception("decode failed for a group of %d sentences; retrying them one by one", len(indices))
                results = []
                for i in indices:
                    try:
                        results.extend(self._decode_group(model_id, options, [items[i]]))
                    except Exception as e:  # noqa: BLE001
                        results.append(e)
            for i, result in zip(indices, results):
                outcomes[i] = result
                if settle is not None:
                    settle(i, result)
        return outcomes

    def _cost(self, items: list[_Item], key: tuple[str, DecodingOptions], indices: list[int]) -> int:
        """A group's worst-case decoder work, in beam-steps: beam_size x length limit, summed over its sentences."""
        model_id, options = key
        max_positions = self.models[model_id].translator.max_positions
        return sum(options.beam_size * options.length_limit(len(items[i].src_ids), max_positions) for i in indices)

    def _decode_group(self, model_id: str, options: DecodingOptions, items: list[_Item]) -> list[list[Hypothesis]]:
        model, stats, started = self.models[model_id], StepStats(), time.perf_counter()
        src = [item.src_ids for item in items]
        prefixes = [list(item.prefix or ()) for item in items]
        hyps = model.translator.translate_ids(src, options, stats,
                                              is_cancelled=lambda j: items[j].cancelled,
                                              target_prefixes=prefixes if any(prefixes) else None)
        m = model.metrics
        m.batch_sentences.observe(len(items))
        m.batch_tokens.observe(sum(len(ids) for ids in src))
        m.compute_seconds.observe(time.perf_counter() - started)
        m.count(m.sentences, sum(1 for h in hyps if h))
        m.count(m.source_tokens, sum(len(ids) for ids, h in zip(src, hyps) if h))
        m.count(m.generated_tokens, sum(len(h[0].tokens) for h in hyps if h))
        m.count(m.decode_steps, stats.steps)
        return hyps


def app_builder(args: dict | None = None) -> serve.Application:
    """Serve application builder; ``args`` are validated by :class:`AppArgs`."""
    return TranslatorDeployment.bind(AppArgs(**(args or {})).model_dump())
