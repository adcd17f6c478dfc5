"""Soak run against a running service: steady mixed load for N minutes, the replica's RSS over time, errors.

    bash scripts/serve.sh &                       # or any running deployment on this machine
    .venv/bin/python -m loadtests.soak --minutes 10 --clients 4 --out soak.json

The replica's process id comes from GET /health and its RSS from /proc (with its child processes': the engine
process of ``engine_process: true``; each sample also keeps every process's own), so the service must run on this
machine.
Memory growth is measured from the first sample after ``--warmup-min`` to the last; the run prints a table of
samples and a JSON summary (requests, errors by status, latency p50/p99 in seconds, RSS in MiB, growth %).
Traffic goes only to ``--url`` (default loopback) and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from nmt.data import read_pairs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def descendants(pid: int) -> list[int]:
    """The process ids of ``pid``'s children, theirs, and so on (an engine process of the replica: engine_process)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            out += [child] + descendants(child)
    return out


def tree_rss_mib(pid: int) -> dict[int, float]:
    """RSS of ``pid`` and of each of its descendants, MiB, by process id (a process that ends while counted is
    left out)."""
    out = {}
    for p in [pid] + descendants(pid):
        try:
            out[p] = round(rss_mib(p), 1)
        except (OSError, RuntimeError):
            pass
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-min", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample-every-s", type=float, default=15.0)
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--out", help="write the summary and samples as JSON here")
    args = p.parse_args(argv)

    sentences = [en for en, _ in read_pairs(Path(args.corpus) / "test.tsv.gz")]
    pid = requests.get(args.url + "/health", timeout=10).json()["pid"]
    stop = threading.Event()
    lock = threading.Lock()
    statuses: Counter = Counter()
    latencies: list[float] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            # Mixed work: 1-8 sentences, greedy or beam 4, now and then a long paragraph-sized text.
            texts = rng.sample(sentences, rng.randint(1, 8))
            if rng.random() < 0.1:
                texts = [" ".join(rng.sample(sentences, 6))]
            body = {"text": texts, "beam_size": rng.choice([1, 4])}
            started = time.perf_counter()
            try:
                status = requests.post(args.url + "/translate", json=body, timeout=60).status_code
            except requests.RequestException as e:
                status = type(e).__name__
            with lock:
                statuses[status] += 1
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    samples = []
    started = time.monotonic()
    print(f"{'minute':>7} {'rss_mib':>8} {'requests':>9} {'errors':>7}  rss_mib by process (the replica first)")

    def sample(elapsed: float) -> dict:
        with lock:
            total, errors = sum(statuses.values()), sum(v for k, v in statuses.items() if k != 200)
        by_process = tree_rss_mib(pid)
        return dict(minute=round(elapsed / 60, 2), rss_mib=round(sum(by_process.values()), 1), requests=total,
                    errors=errors, rss_mib_by_process={str(p): v for p, v in by_process.items()})

    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        samples.append(sample(elapsed))
        s = samples[-1]
        print(f"{s['minute']:>7} {s['rss_mib']:>8} {s['requests']:>9} {s['errors']:>7}  "
              f"{' '.join(map(str, s['rss_mib_by_process'].values()))}", flush=True)
        time.sleep(args.sample_every_s)
    stop.set()
    for t in threads:
        t.join(timeout=70)
    samples.append(sample(time.monotonic() - started))
    after_warmup = next(s for s in samples if s["minute"] >= args.warmup_min)
    q = statistics.quantiles(latencies, n=100)
    summary = dict(minutes=args.minutes, clients=args.clients, requests=sum(statuses.values()),
                   errors=sum(v for k, v in statuses.items() if k != 200),
                   statuses={str(k): v for k, v in statuses.items()}, latency_p50_s=round(q[49], 3),
                   latency_p99_s=round(q[98], 3), rss_after_warmup_mib=after_warmup["rss_mib"],
                   rss_end_mib=samples[-1]["rss_mib"], rss_max_mib=max(s["rss_mib"] for s in samples),
                   rss_growth_pct=round(100 * (samples[-1]["rss_mib"] / after_warmup["rss_mib"] - 1), 2),
                   same_replica=requests.get(args.url + "/health", timeout=10).json()["pid"] == pid)
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary=summary, samples=samples), indent=2) + "\n")


if __name__ == "__main__":
    main()
