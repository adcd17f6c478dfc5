"""Continuous vs static batching over HTTP: six scenarios, both schedulings, one run.

    .venv/bin/python -m loadtests.bench_scheduling --artifact artifacts/en-de --threads 1 \
        --json loadtests/results/scheduling.json          # ~6-10 min on 2 cores; --quick: ~3-4 min

For each scheduling ("static": a batch decodes to completion before the next forms; "continuous": sentences join the
running decode between steps) this starts the service once (loadtests/bench_http.start_service: local Ray, one
replica, device cpu, ``--threads`` ONNX Runtime threads, max_batch_rows 512, the service's default admission limit
max_queued_work; the engine core in a child process of the replica, as deploy/serve_config.yaml runs it, or with
``--engine thread`` on a thread of the replica) and runs, in this order:

    5 saturation        64 closed-loop clients, 1 test sentence per request, beam 4, for N s: sentences/s, and the
                        engine alone (Translator.translate_ids, same scheduling, same threads, this process, the
                        service idle) on the same sentences in one call: sentences/s.
      capacity          the same 64 clients, each sentence's beam_size drawn from scenario 1's mix (fixed per
                        sentence): sentences/s at saturation under the traffic scenario 1 sends. Static's is the
                        capacity that scenario 1 loads to a fraction of (before 2026-12-07 it was scenario 5's
                        beam-4 rate, of which the mix reaches 0.82-0.94 with the engine alone: "70%" was 75-85%).
    1 open loop         Poisson arrivals at 50, 70 and 90% of capacity (static's, the same offered load for both
                        schedulings), one test sentence per request, beam drawn per
                        request (50% beam 4, 40% beam 1, 10% beam 16: on average 4 rows per sentence, like scenario
                        5; fixed seed): sentences/s, latency p50/p99 (s, from each request's scheduled send time).
    2 head of line      3 requests of beam 16, min_length = max_length = 200 (one long test sentence each), then
                        0.5 s later one default 1-sentence request: its latency (s).
    4 single sentence   one client, sequential, default options (beam 4): HTTP latency p50 (s) vs the engine alone
                        translating the same sentences one by one in this process (the service idle), the two
                        alternating sentence by sentence, so that both see the same minutes of this machine.
    6 streaming         5 texts of 100 sentences each (other test lines each time), one after another, with
                        "stream": true: seconds to the first "sentence" record, their median vs scenario 4's HTTP
                        p50 (a p50 beside a p50); each text's figure is kept, the first one being the replica's
                        first long text.
    3 bulk+interactive  32 closed-loop clients each sending a 60-sentence text (60 test lines joined by spaces; the
                        service splits them), sleeping Retry-After on a 503 then retrying, for N s, plus a
                        1-sentence probe every 0.5 s: probes' latency p50/p99 (s) and 503s, bulk sentences/s and
                        bulk 503s. Last, as it fills the admission queue.

One JSON line is printed per scenario result ("scheduling", "scenario" and its figures), then a table with static and
continuous side by side, then each target (evaluated on the continuous run, against static where it says so) with
met / not met. Every figure also goes to ``--json``. The texts of scenarios 3 and 6 are longer than the service's
default max_chars_per_text (2000), so the service is started with max_chars_per_text 20000; nothing else differs from
the defaults except what start_service sets (queue sizes, one replica).

How to read it: all clients, the engine-alone runs and the server share this machine (on 2 cores the clients take
CPU from the server, most at 64 clients), so the ratios matter more than the absolute figures; a run under other
load is noisy, the p99 of a 6-second window (--quick) rests on a few hundred requests at most.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import operator
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

from loadtests.bench_http import _session, _stats, add_engine_argument, closed_loop, start_service
from nmt.data import read_pairs

SCHEDULINGS = ("static", "continuous")
BEAM_MIX = ((4, 0.5), (1, 0.4), (16, 0.1))  # (beam_size, probability): mean rows per sentence 4.0
LOAD_FRACTIONS = (0.5, 0.7, 0.9)
SATURATION_CLIENTS = 64
BULK_CLIENTS = 32
BULK_SENTENCES = 60
PROBE_INTERVAL_S = 0.5
HOL_REQUESTS = 3
HOL_OPTIONS = dict(beam_size=16, min_length=200, max_length=200)
HOL_DELAY_S = 0.5
MAX_CHARS_PER_TEXT = 20_000
SEED = 1234


@dataclasses.dataclass(frozen=True)
class Durations:
    """Sizes of one run. Seconds are measured windows; counts are requests or sentences."""

    saturation_s: float  # scenario 5's measured window (s)
    warmup_s: float  # scenario 5's warm-up before it (s)
    open_s: float  # each open-loop level's sending window (s); the run then waits for every answer
    bulk_s: float  # scenario 3's window (s)
    single_requests: int  # scenario 4's sequential requests
    engine_sentences: int  # sentences of scenario 5 (HTTP cycles through them; the engine alone does them once)
    stream_sentences: int  # test lines in each of scenario 6's texts
    stream_requests: int  # scenario 6's texts


FULL = Durations(saturation_s=15, warmup_s=2, open_s=15, bulk_s=20, single_requests=50, engine_sentences=500,
                 stream_sentences=100, stream_requests=5)
QUICK = Durations(saturation_s=6, warmup_s=1, open_s=6, bulk_s=8, single_requests=20, engine_sentences=200,
                  stream_sentences=100, stream_requests=3)
SMOKE = Durations(saturation_s=2, warmup_s=0.5, open_s=2, bulk_s=3, single_requests=5, engine_sentences=40,
                  stream_sentences=20, stream_requests=2)  # checks that the script runs, not the service


# ----------------------------------------------------------------------------------------------- pure parts


def poisson_arrivals(rate_per_s: float, seconds: float, seed: int) -> list[float]:
    """Send times (s from the start, increasing, all < ``seconds``) of a Poisson process of ``rate_per_s``
    requests/s; the same seed gives the same times."""
    if rate_per_s <= 0:
        return []
    rng, out, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate_per_s)) < seconds:
        out.append(t)
    return out


def beam_sizes(n: int, seed: int, mix: tuple[tuple[int, float], ...] = BEAM_MIX) -> list[int]:
    """``n`` beam sizes drawn independently from ``mix`` ((beam_size, probability), ...); deterministic per seed."""
    rng = random.Random(seed)
    return rng.choices([b for b, _ in mix], weights=[w for _, w in mix], k=n)


def mixed_beams(n_sentences: int, seed: int = SEED) -> Callable[[int], dict]:
    """Request options for the capacity run: sentence index -> {"beam_size": b}, b drawn from BEAM_MIX once per
    sentence (so the clients' traffic has scenario 1's mix whichever sentences they reach)."""
    beams = beam_sizes(n_sentences, seed)
    return lambda i: {"beam_size": beams[i]}


def joined_texts(sentences: list[str], per_text: int, start: int) -> str:
    """``per_text`` consecutive sentences from ``start`` (cyclic), joined by single spaces into one text. A test line
    without final punctuation (a UI label) gets a period, so that the service's splitter sees ``per_text``
    sentences rather than merging labels into their neighbours."""
    picked = (sentences[(start + i) % len(sentences)].rstrip() for i in range(per_text))
    return " ".join(line if line[-1:] in ".!?:;" else line + "." for line in picked)


def _get(results: dict, scheduling: str, scenario: str, key: str):
    return results.get(scheduling, {}).get(scenario, {}).get(key)


def _ratio(a, b) -> float | None:
    """a / b unrounded (None if either is missing or b is 0): a target is judged on the exact ratio, the report
    prints three decimals (43.38 / 43.39 sentences/s is 1.000 there and not >= 1)."""
    return None if a is None or b is None or b == 0 else a / b


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, "==": operator.eq}


def evaluate_targets(results: dict) -> list[dict]:
    """The targets from ``results`` ({scheduling: {scenario: figures}}): dicts of target, op, goal, value and met
    (True / False; None when a figure is missing). Latencies in seconds, throughputs in sentences/s."""
    c = "continuous"
    rows = [
        ("1 open 70%: p99 continuous / p99 static", "<=", 0.5,
         _ratio(_get(results, c, "open_70", "latency_p99_s"), _get(results, "static", "open_70", "latency_p99_s"))),
        ("1 open 70%: sent/s continuous / sent/s static", ">=", 1.0,
         _ratio(_get(results, c, "open_70", "sentences_per_s"),
                _get(results, "static", "open_70", "sentences_per_s"))),
        ("2 head of line: short request latency (s)", "<=", 0.2, _get(results, c, "head_of_line", "short_latency_s")),
        ("3 bulk+interactive: probe p99 (s)", "<", 1.0, _get(results, c, "bulk_interactive", "probe_latency_p99_s")),
        ("3 bulk+interactive: probes refused (503)", "==", 0, _get(results, c, "bulk_interactive", "probe_refused")),
        ("4 single sentence: HTTP p50 / engine p50", "<=", 1.3, _get(results, c, "single", "ratio")),
        ("5 saturation: HTTP sent/s / engine sent/s", ">=", 0.9, _get(results, c, "saturation", "ratio")),
        ("6 stream: median first sentence / single-sentence p50", "<=", 2.0, _get(results, c, "stream", "ratio")),
    ]
    return [dict(target=t, op=op, goal=goal, value=value, met=None if value is None else bool(_OPS[op](value, goal)))
            for t, op, goal, value in rows]


def comparison_rows(results: dict) -> list[tuple[str, object, object]]:
    """(label, static figure, continuous figure) for the side-by-side table; None where not measured."""
    spec = [("5 saturation, HTTP sent/s", "saturation", "sentences_per_s"),
            ("5 engine alone sent/s", "saturation", "engine_sentences_per_s"),
            ("5 HTTP / engine", "saturation", "ratio"),
            ("5 p99 s (64 clients)", "saturation", "latency_p99_s"),
            ("1 capacity (beam mix) sent/s", "capacity", "sentences_per_s")]
    for f in LOAD_FRACTIONS:
        key = f"open_{round(100 * f)}"
        spec += [(f"1 open {round(100 * f)}%: offered/s", key, "offered_per_s"),
                 (f"1 open {round(100 * f)}%: sent/s", key, "sentences_per_s"),
                 (f"1 open {round(100 * f)}%: p50 s", key, "latency_p50_s"),
                 (f"1 open {round(100 * f)}%: p99 s", key, "latency_p99_s"),
                 (f"1 open {round(100 * f)}%: errors", key, "errors")]
    spec += [("2 head of line: short s", "head_of_line", "short_latency_s"),
             ("2 head of line: long max s", "head_of_line", "long_latency_max_s"),
             ("3 probes p50 s", "bulk_interactive", "probe_latency_p50_s"),
             ("3 probes p99 s", "bulk_interactive", "probe_latency_p99_s"),
             ("3 probes refused", "bulk_interactive", "probe_refused"),
             ("3 bulk sent/s", "bulk_interactive", "bulk_sentences_per_s"),
             ("3 bulk 503s", "bulk_interactive", "bulk_refused"),
             ("4 HTTP p50 s", "single", "http_latency_p50_s"),
             ("4 engine p50 s", "single", "engine_latency_p50_s"),
             ("4 HTTP / engine", "single", "ratio"),
             ("6 stream first sentence s (median)", "stream", "first_sentence_s"),
             ("6 stream total s", "stream", "total_s"),
             ("6 first / 4 HTTP p50", "stream", "ratio")]
    return [(label, _get(results, "static", scen, key), _get(results, "continuous", scen, key))
            for label, scen, key in spec]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def format_report(results: dict, checks: list[dict]) -> str:
    """The side-by-side table and the targets, as printed at the end of a run."""
    lines = [f"{'figure':<32} {'static':>10} {'continuous':>11}"]
    lines += [f"{label:<32} {_cell(s):>10} {_cell(c):>11}" for label, s, c in comparison_rows(results)]
    lines += ["", f"{'target (continuous)':<48} {'goal':>8} {'value':>9} {'met':>8}"]
    for t in checks:
        met = "n/a" if t["met"] is None else "met" if t["met"] else "NOT MET"
        lines.append(f"{t['target']:<48} {t['op'] + ' ' + _cell(t['goal']):>8} {_cell(t['value']):>9} {met:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- HTTP parts


async def _send(client: aiohttp.ClientSession, body: dict) -> tuple[int, float | None]:
    """POSTs one /translate body; returns (HTTP status, Retry-After in s or None). Status 0: no answer."""
    try:
        async with client.post("/translate", json=body) as r:
            await r.read()
            retry = r.headers.get("Retry-After")
            return r.status, float(retry) if retry else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return 0, None


async def _open_mixed(url: str, sentences: list[str], rate_per_s: float, seconds: float, seed: int) -> dict:
    arrivals = poisson_arrivals(rate_per_s, seconds, seed)
    beams = beam_sizes(len(arrivals), seed)
    async with _session(url, 0) as client:
        async def one(body: dict, scheduled: float) -> tuple[float, float, int]:
            status, _ = await _send(client, body)
            done = time.perf_counter()
            return done, done - scheduled, status

        start, tasks = time.perf_counter() + 0.05, []
        for i, (at, beam) in enumerate(zip(arrivals, beams)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"text": sentences[(seed + i) % len(sentences)], "beam_size": beam}
            tasks.append(asyncio.create_task(one(body, start + at)))
        record = await asyncio.gather(*tasks)
    ok = [(done, lat) for done, lat, status in record if status == 200]
    wall = max((done for done, _, _ in record), default=start + seconds) - start
    stats = _stats([lat for _, lat in ok], len(ok), len(record), len(record) - len(ok), max(wall, seconds))
    return dict(rate_per_s=round(rate_per_s, 2), seconds=seconds, offered_per_s=round(len(arrivals) / seconds, 2),
                refused=sum(1 for *_, s in record if s == 503), **stats)


def open_mixed(url: str, sentences: list[str], rate_per_s: float, seconds: float, seed: int = SEED) -> dict:
    """Scenario 1: one sentence per request at Poisson arrivals of ``rate_per_s`` requests/s for ``seconds`` s, beam
    per request from BEAM_MIX, then waits for every answer. Latency (s) from each scheduled send time;
    sentences_per_s = successes / time until the last answer; errors count every non-200 (refused: the 503s)."""
    return asyncio.run(_open_mixed(url, sentences, rate_per_s, seconds, seed))


async def _head_of_line(url: str, long_texts: list[str], short_text: str) -> dict:
    async with _session(url, 0) as client:
        async def timed(body: dict) -> tuple[float, int]:
            started = time.perf_counter()
            status, _ = await _send(client, body)
            return time.perf_counter() - started, status

        longs = [asyncio.create_task(timed({"text": t, **HOL_OPTIONS})) for t in long_texts]
        await asyncio.sleep(HOL_DELAY_S)
        short, short_status = await timed({"text": short_text})
        long_results = await asyncio.gather(*longs)
    return dict(short_latency_s=round(short, 4), short_status=short_status,
                long_latency_max_s=round(max(lat for lat, _ in long_results), 4),
                long_statuses=[s for _, s in long_results])


def head_of_line(url: str, long_texts: list[str], short_text: str) -> dict:
    """Scenario 2: one request per ``long_texts`` (HOL_OPTIONS: beam 16, exactly 200 tokens), HOL_DELAY_S s later
    ``short_text`` with default options; its latency (s), and the longest of the long ones (s)."""
    return asyncio.run(_head_of_line(url, long_texts, short_text))


async def _bulk_interactive(url: str, sentences: list[str], clients: int, seconds: float) -> dict:
    bulk: list[tuple[float, float, int]] = []  # (done, latency, status) of each bulk attempt
    probes: list[tuple[float, int]] = []  # (latency, status)
    async with _session(url, 0) as client:
        start = time.perf_counter()
        end = start + seconds

        async def bulk_worker(k: int) -> None:
            r = 0
            while time.perf_counter() < end:
                text = joined_texts(sentences, BULK_SENTENCES, (k + r * clients) * BULK_SENTENCES)
                sent = time.perf_counter()
                status, retry_after = await _send(client, {"text": text})
                done = time.perf_counter()
                bulk.append((done, done - sent, status))
                if status == 503:  # honour Retry-After, then send the same text again
                    wait = retry_after if retry_after is not None else 1.0
                    if done + wait >= end:
                        break
                    await asyncio.sleep(wait)
                    continue
                r += 1

        async def probe(text: str) -> None:
            sent = time.perf_counter()
            status, _ = await _send(client, {"text": text})
            probes.append((time.perf_counter() - sent, status))

        workers = [asyncio.create_task(bulk_worker(k)) for k in range(clients)]
        probe_tasks, i = [], 0
        while (at := start + PROBE_INTERVAL_S * (i + 1)) < end:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            probe_tasks.append(asyncio.create_task(probe(sentences[(7 * i) % len(sentences)])))
            i += 1
        await asyncio.gather(*workers, *probe_tasks)
    ok_probes = [lat for lat, s in probes if s == 200]
    p = _stats(ok_probes, len(ok_probes), len(probes), len(probes) - len(ok_probes), seconds)
    # A 60-sentence request can take longer than a short window: the bulk rate counts every answered request over
    # the time until the last answer (the requests in flight at the window's end are awaited, none sent after it).
    bulk_ok = [done for done, _, s in bulk if s == 200]
    bulk_wall = max(max(bulk_ok, default=end), end) - start
    bulk_lat = [lat for _, lat, s in bulk if s == 200]
    return dict(seconds=seconds, clients=clients, sentences_per_request=BULK_SENTENCES,
                probes=len(probes), probe_errors=p["errors"], probe_refused=sum(1 for _, s in probes if s == 503),
                probe_latency_p50_s=p["latency_p50_s"], probe_latency_p99_s=p["latency_p99_s"],
                bulk_requests=len(bulk), bulk_ok=len(bulk_ok),
                bulk_refused=sum(1 for *_, s in bulk if s == 503),
                bulk_errors=sum(1 for *_, s in bulk if s not in (200, 503)),
                bulk_sentences_per_s=round(len(bulk_ok) * BULK_SENTENCES / bulk_wall, 2),
                bulk_wall_s=round(bulk_wall, 2),
                bulk_latency_p50_s=_quantile(bulk_lat, 50))


def bulk_interactive(url: str, sentences: list[str], clients: int, seconds: float) -> dict:
    """Scenario 3: ``clients`` closed-loop bulk clients (BULK_SENTENCES lines joined into one text per request; on
    a 503 they sleep Retry-After s and resend) for ``seconds`` s, plus a 1-sentence probe every PROBE_INTERVAL_S s.
    Probes' latency p50/p99 (s, of the answered ones), their 503s; bulk sentences/s (test lines of every answered
    bulk request over the seconds until the last answer: requests in flight at the window's end are awaited, none
    is sent after it), bulk 503s."""
    return asyncio.run(_bulk_interactive(url, sentences, clients, seconds))


async def _sequential(url: str, texts: list[str], engine_alone: Callable[[str], object] | None = None
                      ) -> tuple[list[float], list[float]]:
    """One client's HTTP latencies (s, 200s only) for ``texts`` one after another; with ``engine_alone(text)``,
    each request is followed by that call on the same text (timed too), so that both lists see the same minutes of a
    machine whose speed drifts (the engine alone ran after all the requests before, and their ratio moved 1.2-1.4
    between runs). Returns (HTTP latencies, engine-alone latencies)."""
    http, alone = [], []
    async with _session(url, 1) as client:
        for text in texts[:2]:  # warm the connection and the engine alone
            await _send(client, {"text": text})
            if engine_alone is not None:
                engine_alone(text)
        for text in texts:
            started = time.perf_counter()
            status, _ = await _send(client, {"text": text})
            if status == 200:
                http.append(time.perf_counter() - started)
            if engine_alone is not None:
                started = time.perf_counter()
                engine_alone(text)
                alone.append(time.perf_counter() - started)
    return http, alone


async def _stream_first(url: str, text: str) -> dict:
    """Scenario 6: POSTs ``text`` with "stream": true and reads the NDJSON answer to its end. Seconds to the first
    "sentence" record and to the end; the number of sentence records, the last record's type, and the error (an
    "error" record's, or the client's when the stream broke off), None if none."""
    async with _session(url, 1) as client:
        started = time.perf_counter()
        first, sentences, last_type, status, error = None, 0, None, 0, None
        try:
            async with client.post("/translate", json={"text": text, "stream": True}) as r:
                status = r.status
                async for line in r.content:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    last_type = record.get("type")
                    if last_type == "sentence":
                        sentences += 1
                        if first is None:
                            first = time.perf_counter() - started
                    elif last_type == "error":
                        error = record.get("error")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # a broken stream is a result too
            error = repr(e)
        total = time.perf_counter() - started
    return dict(status=status, first_sentence_s=None if first is None else round(first, 4),
                total_s=round(total, 4), sentence_records=sentences, last_record=last_type, error=error)


def stream_summary(streams: list[dict], lines: int, http_p50: float | None) -> dict:
    """Scenario 6's figures from each text's (_stream_first): the median seconds to the first sentence and to the
    end, each text's first-sentence seconds in order, and the worst outcome (a non-200 status, a stream that did
    not end with "done", the first error); ratio = median first sentence / ``http_p50``."""
    firsts = [s["first_sentence_s"] for s in streams]
    measured = [f for f in firsts if f is not None]
    bad = next((s for s in streams if s["status"] != 200 or s["last_record"] != "done" or s["error"]), streams[0])
    median = _quantile(measured, 50) if len(measured) == len(firsts) else None
    return dict(lines=lines, requests=len(streams), first_sentence_s=median, first_sentence_each_s=firsts,
                total_s=_quantile([s["total_s"] for s in streams], 50),
                sentence_records=min(s["sentence_records"] for s in streams), status=bad["status"],
                last_record=bad["last_record"], error=bad["error"], ratio=_ratio(median, http_p50))


# ----------------------------------------------------------------------------------------------- the run


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, rounded to 0.1 ms; None when empty."""
    return round(float(np.percentile(values, q)), 4) if values else None


def run_scheduling(scheduling: str, artifact: str, threads: int, sentences: list[str], d: Durations,
                   emit, capacity: float | None = None, engine_process: bool = False) -> dict:
    """Starts the service with ``scheduling`` (and its engine in a process of its own with ``engine_process``),
    runs scenarios 5, 1 (after its capacity run), 2, 4, 6, 3 (``emit`` gets each result dict), stops it. Scenario 1
    loads ``capacity`` sentences/s times each fraction (None: this run's own capacity under the beam mix). Returns
    {scenario: figures}."""
    from dataclasses import replace

    from engine.runtime import EngineConfig
    from engine.translator import Translator
    from service.app import AppArgs

    out: dict = {}

    def record(scenario: str, figures: dict) -> None:
        out[scenario] = figures
        emit(dict(scheduling=scheduling, scenario=scenario, **figures))

    translator = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=threads, max_batch_rows=512,
                                                   scheduling=scheduling))
    options = translator.default_options
    base_url, metrics_url, shutdown = start_service(
        artifact, threads, 512, scheduling, device="cpu",
        max_queued_work=AppArgs.model_fields["max_queued_work"].default, max_chars_per_text=MAX_CHARS_PER_TEXT,
        engine_process=engine_process)
    try:
        # 5: saturation, HTTP then the engine alone on the same sentences (service idle)
        sat_sentences = sentences[:d.engine_sentences]
        http = closed_loop(base_url, sat_sentences, SATURATION_CLIENTS, d.saturation_s, {"beam_size": 4},
                           metrics_url=metrics_url,
                           warmup_s=d.warmup_s)
        src = [translator.tokenize(s) for s in sat_sentences]
        beam4 = replace(options, beam_size=4)
        # The service's policy, not translate_ids' own default (refill): the ratio is the cost of HTTP and Serve.
        translator.translate_ids(src[:8], beam4, policy=scheduling)
        started = time.perf_counter()
        translator.translate_ids(src, beam4, policy=scheduling)
        engine_sps = len(src) / (time.perf_counter() - started)
        record("saturation", dict(http, engine_sentences=len(src), engine_sentences_per_s=round(engine_sps, 2),
                                  ratio=_ratio(http["sentences_per_s"], engine_sps)))
        # 1: capacity under scenario 1's own traffic, then the open loop at fractions of it
        record("capacity", dict(beam_mix=BEAM_MIX, **closed_loop(
            base_url, sat_sentences, SATURATION_CLIENTS, d.saturation_s, mixed_beams(len(sat_sentences)),
            metrics_url=metrics_url, warmup_s=d.warmup_s)))
        capacity = capacity or out["capacity"]["sentences_per_s"]
        for k, f in enumerate(LOAD_FRACTIONS):
            if capacity > 0:
                record(f"open_{round(100 * f)}", dict(load_fraction=f, capacity_per_s=capacity,
                                                      **open_mixed(base_url, sentences, f * capacity, d.open_s,
                                                                   SEED + k)))

        # 2: head of line
        by_length = sorted(sentences, key=len)
        record("head_of_line", head_of_line(base_url, by_length[-HOL_REQUESTS:], by_length[len(by_length) // 2]))

        # 4: one client, one sentence at a time, vs the engine alone (service idle)
        step = max(1, len(sentences) // d.single_requests)
        single_texts = sentences[::step][:d.single_requests]
        http_lat, engine_lat = asyncio.run(_sequential(base_url, single_texts,
                                                       lambda text: translator.translate([text], options)))
        http_p50, engine_p50 = _quantile(http_lat, 50), _quantile(engine_lat, 50)
        record("single", dict(requests=len(single_texts), http_ok=len(http_lat), http_latency_p50_s=http_p50,
                              http_latency_p99_s=_quantile(http_lat, 99),
                              engine_latency_p50_s=engine_p50, ratio=_ratio(http_p50, engine_p50),
                              note="client, server and engine-alone share this machine"))

        # 6: streaming long texts, one after another
        streams = [asyncio.run(_stream_first(base_url, joined_texts(sentences, d.stream_sentences,
                                                                    k * d.stream_sentences)))
                   for k in range(d.stream_requests)]
        record("stream", stream_summary(streams, d.stream_sentences, http_p50))

        # 3: bulk and interactive, default admission (last: it fills the queue)
        record("bulk_interactive", bulk_interactive(base_url, sentences, BULK_CLIENTS, d.bulk_s))
    finally:
        shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (replica and engine alone)")
    p.add_argument("--quick", action="store_true", help="shorter windows and fewer requests (~4 min)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds-long windows: runs, no figures
    p.add_argument("--schedulings", default=",".join(SCHEDULINGS), help="comma-separated, default both")
    p.add_argument("--json", help="write every figure here")
    add_engine_argument(p)
    args = p.parse_args(argv)
    d = SMOKE if args.smoke else QUICK if args.quick else FULL
    schedulings = [s.strip() for s in args.schedulings.split(",") if s.strip()]
    sentences = [en for en, _ in read_pairs(Path(args.corpus) / "test.tsv.gz")]
    started = time.perf_counter()
    results: dict = {}
    capacity = None  # one offered load for both: fractions of the first run's (static's) capacity
    for s in schedulings:
        results[s] = run_scheduling(s, args.artifact, args.threads, sentences, d,
                                    lambda r: print(json.dumps(r), flush=True), capacity, args.engine == "process")
        capacity = capacity or results[s]["capacity"]["sentences_per_s"]
    checks = evaluate_targets(results)
    print()
    print(format_report(results, checks))
    print(f"\n{time.perf_counter() - started:.0f} s; clients, server and engine-alone runs share this machine")
    report = dict(artifact=args.artifact, threads=args.threads, engine_process=args.engine == "process",
                  durations=dataclasses.asdict(d),
                  beam_mix=BEAM_MIX, load_fractions=LOAD_FRACTIONS, max_chars_per_text=MAX_CHARS_PER_TEXT,
                  results=results, targets=checks)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
