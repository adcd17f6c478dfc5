"""The service's own metrics, exported by Ray on its metrics port (ray.util.metrics; Ray prefixes "ray_").

Labels are bounded: ``model`` (the deployment's model id), ``status_class`` (2xx/4xx/5xx), ``api`` (nmt,
libretranslate, deepl: service.compat.Dialect.name), ``key_id`` (the ids of the API-key file) and ``limit`` (the
three limit names); never request ids, texts, paths or key material.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ray.util import metrics

from engine.core import CoreStats, EngineCore, Finished

_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
_SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class ServiceMetrics:
    """Counters, histograms and gauges of one replica, tagged with its model id."""

    def __init__(self, model_id: str) -> None:
        tags = ("model",)
        self.requests = metrics.Counter("nmt_requests_total", "HTTP requests by API (nmt: this service's own; "
                                        "libretranslate, deepl: their dialects) and status class",
                                        tag_keys=("model", "api", "status_class"))
        self.sentences = metrics.Counter("nmt_sentences_total", "sentences translated", tag_keys=tags)
        self.source_tokens = metrics.Counter("nmt_source_tokens_total", "source tokens (eos included)", tag_keys=tags)
        self.generated_tokens = metrics.Counter("nmt_generated_tokens_total", "generated target tokens (best "
                                                "hypothesis, eos excluded)", tag_keys=tags)
        self.decode_steps = metrics.Counter("nmt_decode_steps_total", "decoder-step graph runs", tag_keys=tags)
        self.decoder_rows = metrics.Counter("nmt_decoder_rows_total", "decoder rows computed, summed over steps "
                                            "(/ nmt_decode_steps_total = mean rows per step)", tag_keys=tags)
        self.step_rows = metrics.Histogram("nmt_step_rows", "decoder rows (sentences x live beams) per step",
                                           boundaries=_ROWS, tag_keys=tags)
        self.step_sentences = metrics.Histogram("nmt_step_sentences",
                                                "live sentences (of every running batch) at a step",
                                                boundaries=_ROWS, tag_keys=tags)
        self.joined = metrics.Counter("nmt_joined_sentences_total", "sentences that joined the running decode",
                                      tag_keys=tags)
        self.left = metrics.Counter("nmt_left_sentences_total", "sentences that left the running decode (finished, "
                                    "failed or aborted)", tag_keys=tags)
        self.live_rows = metrics.Gauge("nmt_live_rows", "decoder rows of the running decode", tag_keys=tags)
        self.waiting = metrics.Gauge("nmt_waiting_sentences", "sentences waiting to join the running decode",
                                     tag_keys=tags)
        self.queue_seconds = metrics.Histogram("nmt_queue_seconds", "time a sentence waited before joining the "
                                               "running decode, s", boundaries=_SECONDS, tag_keys=tags)
        self.compute_seconds = metrics.Histogram("nmt_compute_seconds", "time a sentence spent in the running "
                                                 "decode, s", boundaries=_SECONDS, tag_keys=tags)
        self.pending = metrics.Gauge("nmt_pending_sentences", "sentences of open requests, queued or decoding, in this "
                                     "replica",
                                     tag_keys=tags)
        self.rejected = metrics.Counter("nmt_rejected_requests_total", "requests refused before queueing (4xx; 503 "
                                        "when the replica queue is full)", tag_keys=tags)
        self.timeouts = metrics.Counter("nmt_timed_out_requests_total", "requests past request_timeout_s (504)",
                                        tag_keys=tags)
        self.cancelled = metrics.Counter("nmt_cancelled_sentences_total", "sentences dropped because their client "
                                         "left or their request timed out", tag_keys=tags)
        self.model_load_seconds = metrics.Gauge("nmt_model_load_seconds", "artifact load time, s", tag_keys=tags)
        self.warmup_seconds = metrics.Gauge("nmt_warmup_seconds", "warm-up time before ready, s", tag_keys=tags)
        for m in (self.pending, self.rejected, self.timeouts, self.cancelled, self.sentences, self.source_tokens,
                  self.generated_tokens, self.decode_steps, self.decoder_rows, self.step_rows, self.step_sentences,
                  self.joined, self.left, self.live_rows, self.waiting, self.queue_seconds, self.compute_seconds,
                  self.model_load_seconds, self.warmup_seconds):
            m.set_default_tags({"model": model_id})
        self.model_id = model_id

        self._pending = 0
        self.pending.set(0)

    def request(self, status: int, api: str = "nmt") -> None:
        self.requests.inc(1, tags={"model": self.model_id, "api": api, "status_class": f"{status // 100}xx"})
        if 400 <= status < 500 and status not in (408, 499):
            self.rejected.inc(1)

    @staticmethod
    def count(counter: metrics.Counter, n: int | float) -> None:
        """Counter.inc for any n >= 0 (Ray's counters reject 0, which a fully cancelled batch produces)."""
        if n > 0:
            counter.inc(n)

    def add_pending(self, n: int) -> None:
        self._pending += n
        self.pending.set(self._pending)


class KeyMetrics:
    """Per-API-key counters of one replica. ``key_id`` takes the ids of the key file (bounded by it) or "none" for a
    request that presented no valid key; never key material."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("nmt_key_requests_total", "translate requests by API key id and status class",
                                        tag_keys=("key_id", "status_class"))
        self.characters = metrics.Counter("nmt_key_characters_total", "source characters of successful "
                                          "translations by API key id", tag_keys=("key_id",))
        self.limited = metrics.Counter("nmt_key_limited_requests_total", "requests refused by a key's limit (429) "
                                       "by API key id and limit", tag_keys=("key_id", "limit"))

    def request(self, key_id: str | None, status: int, characters: int = 0) -> None:
        key_id = key_id or "none"
        self.requests.inc(1, tags={"key_id": key_id, "status_class": f"{status // 100}xx"})
        if status == 200 and characters > 0:
            self.characters.inc(characters, tags={"key_id": key_id})

    def refused(self, key_id: str, limit: str) -> None:
        self.limited.inc(1, tags={"key_id": key_id, "limit": limit})


class StepMetrics:
    """The engine loop's on_step callback: per-step rows and sentences, joins/leaves, and the queue and decode times
    of the sentences that left, into the model's metrics (called on the engine's thread). Sentences and generated
    tokens are counted per request instead (``_submit``), so that health probes do not count."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.last = None

    def __call__(self, core: EngineCore, finished: list[Finished]) -> None:
        m, stats = self.metrics, core.stats
        last = self.last or CoreStats()
        if stats.steps > last.steps:
            m.step_rows.observe((stats.rows - last.rows) / (stats.steps - last.steps))
            m.step_sentences.observe(core.live_sentences + len(finished))
        m.count(m.decode_steps, stats.steps - last.steps)
        m.count(m.decoder_rows, stats.rows - last.rows)
        m.count(m.joined, stats.joined - last.joined)
        m.count(m.left, stats.left - last.left)
        for f in finished:
            if not f.hypotheses:
                continue
            m.queue_seconds.observe(f.queue_seconds)
            m.compute_seconds.observe(f.decode_seconds)
        m.live_rows.set(core.live_rows)
        m.waiting.set(core.waiting)
        self.last = dataclasses.replace(stats)



def count_done(metrics: ServiceMetrics, future: asyncio.Future) -> None:
    metrics.add_pending(-1)
    if not future.cancelled() and future.exception() is None and future.result().hypotheses:
        metrics.count(metrics.sentences, 1)
        metrics.count(metrics.generated_tokens, len(future.result().hypotheses[0].tokens))
