"""The service over HTTP: a closed-loop concurrency sweep and an open-loop run at a fixed arrival rate.

    .venv/bin/python -m loadtests.bench_http --artifact artifacts/en-de --threads 1 --clients 1,4,16,64,128 \
        --seconds 10 --json http.json

Starts Ray Serve in this process (one replica on loopback; its engine core in a child process, as
deploy/serve_config.yaml runs it, or on a thread of the replica with ``--engine thread``), sends one test sentence
per POST /translate and prints one JSON line per level: sentences/s, requests, errors (non-200 or exception),
latency p50/p90/p99 in seconds and the mean decoder rows per step (sentences x live beams, from the service's
metrics on Ray's metrics port). The open loop sends at ``--open-rate`` sentences/s (Poisson arrivals; 0 = 70% of
the best closed-loop rate) and measures latency from each request's scheduled send time, so a slow server cannot
slow the offered load down. The clients share the machine with the server: on 2 cores they take CPU from it, most
at 64 and 128 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from nmt.data import read_pairs

# Before Ray starts: no usage stats; token authentication on, as everywhere (a local ray.init makes the token,
# ~/.ray/auth_token, when none is given); HTTP through HAProxy to the replicas, as scripts/serve.sh and the images
# serve it (RAY_SERVE_ENABLE_HA_PROXY=0 in the environment measures Serve's Python proxy instead).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")

# Mean batch = delta(decoder rows) / delta(decoder steps), both counters. Not a histogram's _sum / _count: Ray
# exports _sum rebuilt from bucket midpoints (10 steps of 1 row export _sum 5.0), so only its _count is exact.
SENTENCES_COUNTER = "ray_nmt_decoder_rows_total"
BATCH_COUNT = "ray_nmt_decode_steps_total"
CLIENT_TIMEOUT_S = 60.0  # above the service's request_timeout_s (30 s): the server's 504 is what we count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(artifact: str, threads: int, max_batch_rows: int = 512, scheduling: str = "continuous",
                  device: str = "auto", replicas: int = 1, **args) -> tuple[str, str, Callable[[], None]]:
    """Starts a local Ray cluster and the service with ``replicas`` replicas of 1 reserved CPU each
    (``scheduling`` "continuous" or "static"; ``threads`` 0: one per reserved CPU, service.app.engine_threads;
    ``args``: more AppArgs); returns (base_url, metrics_url, shutdown)."""
    import ray
    from ray import serve

    from engine.contract import check_format
    from service.app import AppArgs, TranslatorDeployment

    # Checked here too: in a replica a stale artifact fails as Serve's bare "Failed to update the deployments".
    check_format(json.loads((Path(artifact) / "manifest.json").read_text()), artifact)
    metrics_port, http_port = _free_port(), _free_port()
    # Metrics every 1 s (default 10 s) so that the counts settle soon after a run.
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})

    def shutdown() -> None:
        serve.shutdown()
        ray.shutdown()

    # A queue limit above the largest level: the sweep measures capacity, not admission control (which would
    # answer the 128-client level's surplus with 503s by design).
    args = AppArgs(**{**dict(artifact_dir=str(Path(artifact).resolve()), device=device, intra_op_threads=threads,
                             scheduling=scheduling, max_queued_work=1 << 24), **args})
    # Every request of the replica in its engine at once; the proxy's queue holds the 128-client level.
    app = TranslatorDeployment.options(
        num_replicas=replicas, max_ongoing_requests=256, max_queued_requests=1024,
        user_config={"max_batch_rows": max_batch_rows},
    ).bind(args.model_dump())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": CLIENT_TIMEOUT_S})
        serve.run(app, name="bench", route_prefix="/")
    except Exception:  # the replica's own traceback is in the Serve logs (log_to_driver is off)
        shutdown()
        raise
    return f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics", shutdown


def batch_counts(metrics_url: str) -> tuple[float, float] | None:
    """(decoder rows, decoder steps) summed over label sets; None if the endpoint does not answer."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return None
    sentences = batches = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == SENTENCES_COUNTER:
                sentences += s.value
            elif s.name == BATCH_COUNT:
                batches += s.value
    return sentences, batches


def settled_counts(metrics_url: str | None, quiet_s: float = 2.5, timeout_s: float = 30.0):
    """batch_counts once they have not changed for ``quiet_s`` seconds: Ray exports them ~1 s late."""
    if metrics_url is None:
        return None
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = batch_counts(metrics_url)
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.5)
    return last


def _mean_rows(before, after) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def _stats(latencies: list[float], ok_in_window: int, requests_: int, errors: int, seconds: float) -> dict:
    # One test sentence per request, so sentences/s = answered requests/s (the server may split a line in two,
    # which the mean rows per step do count).
    q = [round(float(v), 4) for v in np.percentile(latencies, [50, 90, 99])] if latencies else [None] * 3
    return dict(requests=requests_, errors=errors, sentences_per_s=round(ok_in_window / seconds, 2),
                latency_p50_s=q[0], latency_p90_s=q[1], latency_p99_s=q[2])


def _session(url: str, connections: int) -> aiohttp.ClientSession:
    """aiohttp rather than httpx: at 64 clients httpx took 0.67 of this machine's 2 cores from the server under
    test (6.9 ms of client CPU per request)."""
    return aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))


async def _post(client: aiohttp.ClientSession, text: str, body_options: dict) -> bool:
    try:
        async with client.post("/translate", json={"text": text, **body_options}) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def _closed(url: str, sentences: list[str], clients: int, seconds: float,
                  body_options: dict | Callable[[int], dict], metrics_url: str | None, warmup_s: float) -> dict:
    async with _session(url, clients) as client:
        async def worker(k: int, until: float, record: list | None) -> None:
            i = k  # clients start at different sentences, so that batches mix lengths
            while time.perf_counter() < until:
                started = time.perf_counter()
                j = i % len(sentences)
                ok = await _post(client, sentences[j], body_options(j) if callable(body_options) else body_options)
                if record is not None:
                    done = time.perf_counter()
                    record.append((done, done - started, ok))
                i += clients

        if warmup_s > 0:  # opens the connections and fills the server's queue before we measure
            until = time.perf_counter() + warmup_s
            await asyncio.gather(*(worker(k, until, None) for k in range(clients)))
        before = await asyncio.to_thread(settled_counts, metrics_url)
        record: list = []
        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*(worker(k, end, record) for k in range(clients)))
    after = await asyncio.to_thread(settled_counts, metrics_url)
    # Throughput counts what finished inside the window; latency and errors count every request started in it.
    ok_in_window = sum(1 for done, _, ok in record if ok and done <= end)
    latencies = [lat for _, lat, ok in record if ok]
    errors = sum(1 for _, _, ok in record if not ok)
    return dict(mode="closed", clients=clients, seconds=seconds,
                **_stats(latencies, ok_in_window, len(record), errors, seconds),
                mean_rows_per_step=_mean_rows(before, after))


def closed_loop(url: str, sentences: list[str], clients: int, seconds: float,
                body_options: dict | Callable[[int], dict] | None = None, *, metrics_url: str | None = None,
                warmup_s: float = 2.0) -> dict:
    """``clients`` workers each POST one sentence to ``url``/translate and wait for the answer, for ``seconds`` s
    after ``warmup_s`` s of warm-up. ``body_options``: the request body's options beside "text", one dict for every
    request or a function of the sentence's index in ``sentences`` (options per sentence, e.g. a beam_size mix).
    Returns sentences/s, requests, errors, latency p50/p90/p99 (s) and the mean decoder rows per step (None
    without ``metrics_url``)."""
    return asyncio.run(_closed(url, sentences, clients, seconds, body_options or {}, metrics_url, warmup_s))


async def _open(url: str, sentences: list[str], rate_per_s: float, seconds: float, body_options: dict,
                metrics_url: str | None, seed: int) -> dict:
    rng, arrivals, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate_per_s)) < seconds:
        arrivals.append(t)
    before = await asyncio.to_thread(settled_counts, metrics_url)
    async with _session(url, 0) as client:  # no connection limit: in flight grows under overload
        async def one(text: str, scheduled: float) -> tuple[float, float, bool]:
            ok = await _post(client, text, body_options)
            done = time.perf_counter()
            return done, done - scheduled, ok  # from the schedule, not the send

        start, tasks = time.perf_counter() + 0.05, []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(sentences[i % len(sentences)], start + at)))
        record = await asyncio.gather(*tasks)
    after = await asyncio.to_thread(settled_counts, metrics_url)
    ok = [(done, lat) for done, lat, good in record if good]
    wall = max((done for done, _, _ in record), default=start + seconds) - start
    result = _stats([lat for _, lat in ok], len(ok), len(record), len(record) - len(ok), max(wall, seconds))
    return dict(mode="open", rate_per_s=rate_per_s, seconds=seconds, offered_per_s=round(len(arrivals) / seconds, 2),
                **result, mean_rows_per_step=_mean_rows(before, after))


def open_loop(url: str, sentences: list[str], rate_per_s: float, seconds: float, body_options: dict | None = None,
              *, metrics_url: str | None = None, seed: int = 0) -> dict:
    """Sends one sentence per request at Poisson arrivals of ``rate_per_s`` requests/s for ``seconds`` s, whether or
    not earlier ones have finished, then waits for all. Latency (s) runs from each scheduled send time;
    sentences_per_s is the achieved rate (successes over the time until the last answer)."""
    return asyncio.run(_open(url, sentences, rate_per_s, seconds, body_options or {}, metrics_url, seed))


def run_http_benchmark(artifact: str, corpus: str, threads: int, clients_levels: list[int], seconds: float,
                       open_rate: float = 0.0, *, max_batch_rows: int = 512, scheduling: str = "continuous",
                       body_options: dict | None = None, on_level: Callable[[dict], None] | None = None,
                       engine_process: bool = False, replicas: int = 1, intra_op_spinning: bool = False) -> dict:
    """Starts the service, runs the closed-loop sweep and one open-loop run, stops the service. ``open_rate`` in
    sentences/s; 0 = 70% of the best closed-loop sentences/s. ``on_level`` is called with each level's result;
    ``engine_process``: the replica's engine core in a child process (AppArgs.engine_process); ``replicas`` and
    ``intra_op_spinning`` (AppArgs) for the measurement of threads per replica (README.md, Deploy and scale)."""
    sentences = [en for en, _ in read_pairs(Path(corpus) / "test.tsv.gz")]
    base_url, metrics_url, shutdown = start_service(artifact, threads, max_batch_rows, scheduling,
                                                  engine_process=engine_process, replicas=replicas,
                                                  intra_op_spinning=intra_op_spinning)
    levels: list[dict] = []
    setting = dict(threads=threads, replicas=replicas, intra_op_spinning=intra_op_spinning)
    try:
        for clients in clients_levels:
            levels.append(dict(setting, **closed_loop(base_url, sentences, clients, seconds, body_options,
                                                      metrics_url=metrics_url)))
            if on_level:
                on_level(levels[-1])
        best = max((lv["sentences_per_s"] for lv in levels), default=0.0)
        rate = open_rate or round(0.7 * best, 2)
        if rate > 0:
            levels.append(dict(setting, **open_loop(base_url, sentences, rate, seconds, body_options,
                                                    metrics_url=metrics_url)))
            if on_level:
                on_level(levels[-1])
    finally:
        shutdown()
    return dict(artifact=artifact, threads=threads, max_batch_rows=max_batch_rows, scheduling=scheduling,
                engine_process=engine_process, replicas=replicas, intra_op_spinning=intra_op_spinning,
                body_options=body_options or {}, levels=levels)


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    """``--engine process|thread`` for the benchmarks that start the service: the replica's engine core in a child
    process (AppArgs.engine_process; the default, as deploy/serve_config.yaml runs the CPU replica) or on a thread."""
    p.add_argument("--engine", choices=["process", "thread"], default="process",
                   help="the replica's engine core in a child process (AppArgs.engine_process, as the shipped "
                        "deploy/serve_config.yaml runs it) or on a thread of the replica")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of each replica's engine "
                   "(0: one per CPU the replica reserves, 1)")
    p.add_argument("--replicas", type=int, default=1, help="replicas behind the ingress, 1 reserved CPU each")
    p.add_argument("--intra-op-spinning", action="store_true", help="the engine's threads busy-wait between kernels "
                   "(ONNX Runtime's default; the service's is off)")
    p.add_argument("--clients", default="1,4,16,64,128", help="closed-loop concurrency levels, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--open-rate", type=float, default=0.0, help="open-loop sentences/s; 0 = 70%% of the best closed")
    p.add_argument("--max-batch-rows", type=int, default=512)
    p.add_argument("--scheduling", choices=["continuous", "static"], default="continuous")
    p.add_argument("--beam-size", type=int, help="beam size per request (default: the model's)")
    add_engine_argument(p)
    p.add_argument("--json", help="write the list of levels here")
    args = p.parse_args(argv)
    result = run_http_benchmark(args.artifact, args.corpus, args.threads,
                                [int(c) for c in args.clients.split(",") if c.strip()], args.seconds, args.open_rate,
                                max_batch_rows=args.max_batch_rows, scheduling=args.scheduling,
                                body_options={"beam_size": args.beam_size} if args.beam_size else None,
                                on_level=lambda level: print(json.dumps(level), flush=True),
                                engine_process=args.engine == "process", replicas=args.replicas,
                                intra_op_spinning=args.intra_op_spinning)
    if args.json:
        Path(args.json).write_text(json.dumps(result["levels"], indent=1) + "\n")
    return result["levels"]


if __name__ == "__main__":
    main()
