"""Two models served side by side: in every replica (one deployment) versus one deployment per model.

    .venv/bin/python -m loadtests.bench_models --seconds 12 --clients 16,64

Issue 3 asks for whichever layout measures better. Both layouts here get the same two replicas and the same
traffic (half the requests name the float32 model, half its int8 copy, one test sentence each, beam 4):
    shared       one deployment, 2 replicas, each loads both models; the body's "model" picks one
    per-model    one Serve application per model (route prefixes /fp32 and /int8), 1 replica each
Serve's proxy is the ingress in both, so neither pays an extra hop. Prints sentences/s, p50/p99 latency (s),
errors and the replicas' resident memory (MiB, from their pid in /health and /proc).
Ray Serve's model multiplexing (@serve.multiplexed) is not a third candidate: it routes on a request header, loads
models lazily per replica, and exists for more models than a replica can hold; two small models fit in every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import requests

from loadtests.bench_http import CLIENT_TIMEOUT_S, _free_port
from nmt.data import read_pairs


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _mixed_load(targets: list[tuple[str, dict]], sentences: list[str], clients: int, seconds: float) -> dict:
    """Closed loop: each client alternates between the targets (url, extra body); returns the statistics."""
    record, end = [], time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as session:
        async def client(k: int) -> None:
            for i in itertools.count(k, clients):
                if time.perf_counter() >= end:
                    return
                url, extra = targets[i % len(targets)]
                started = time.perf_counter()
                try:
                    async with session.post(url, json={"text": sentences[i % len(sentences)], **extra}) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                record.append((time.perf_counter(), time.perf_counter() - started, ok))

        await asyncio.gather(*(client(k) for k in range(clients)))
    good = [lat for done, lat, ok in record if ok]
    p50, p99 = np.percentile(good, [50, 99]) if good else (float("nan"),) * 2
    return dict(clients=clients, sentences_per_s=round(sum(1 for d, _, ok in record if ok and d <= end) / seconds, 2),
                p50_s=round(float(p50), 4), p99_s=round(float(p99), 4), errors=sum(1 for *_, ok in record if not ok))


def _replica_rss(url: str, probes: int = 40) -> dict[int, float]:
    """RSS of the replicas that answer /health at ``url`` (several probes reach every replica)."""
    pids = {requests.get(url + "/health", timeout=10).json()["pid"] for _ in range(probes)}
    return {pid: round(_rss_mib(pid), 1) for pid in pids}


def run(artifact: str, int8_artifact: str, corpus: str, clients_levels: list[int], seconds: float,
        threads: int, order: list[str]) -> list[dict]:
    import ray
    from ray import serve

    from service.app import TranslatorDeployment

    sentences = [en for en, _ in read_pairs(Path(corpus) / "test.tsv.gz")]
    port = _free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    common = dict(device="cpu", intra_op_threads=threads, max_queued_work=1 << 24)
    options = dict(max_ongoing_requests=256, user_config={"max_batch_rows": 512})
    layouts = {
        "shared": ({"shared": dict(route="/shared", replicas=2,
                                   args=dict(artifact_dir=artifact, model_id="fp32", models={"int8": int8_artifact}))},
                   [(f"{base}/shared/translate", {"model": "fp32"}), (f"{base}/shared/translate", {"model": "int8"})]),
        "per-model": ({"fp32": dict(route="/fp32", replicas=1, args=dict(artifact_dir=artifact, model_id="fp32")),
                       "int8": dict(route="/int8", replicas=1, args=dict(artifact_dir=int8_artifact, model_id="int8"))},
                      [(f"{base}/fp32/translate", {}), (f"{base}/int8/translate", {})]),
    }
    results = []
    try:
        for layout in order:  # both orders, to see what running first costs
            apps, targets = layouts[layout]
            for name, app in apps.items():
                deployment = TranslatorDeployment.options(num_replicas=app["replicas"], **options)
                serve.run(deployment.bind({**common, **app["args"]}), name=name, route_prefix=app["route"])
            asyncio.run(_mixed_load(targets, sentences, 8, 3.0))  # warm-up
            rss = {pid: mib for app in apps.values() for pid, mib in _replica_rss(base + app["route"]).items()}
            for clients in clients_levels:
                row = dict(layout=layout, **asyncio.run(_mixed_load(targets, sentences, clients, seconds)),
                           replica_rss_mib=sorted(rss.values()))
                print(json.dumps(row), flush=True)
                results.append(row)
            for name in apps:
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--int8-artifact", default="artifacts/bench/bundled-en-de-int8")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--clients", default="16,64")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--order", default="shared,per-model,shared,per-model", help="layouts, in the order run")
    args = p.parse_args(argv)
    run(str(Path(args.artifact).resolve()), str(Path(args.int8_artifact).resolve()), args.corpus,
        [int(c) for c in args.clients.split(",")], args.seconds, args.threads, args.order.split(","))


if __name__ == "__main__":
    main()
