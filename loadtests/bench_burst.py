"""A burst of bulk clients that retry on 503 as told (Retry-After), against a running service: how many answers
arrive, how many time out (504) after their work, and whether every answer is translated.

    bash scripts/serve.sh &                                  # then, once GET /health answers 200:
    .venv/bin/python -m loadtests.bench_burst --clients 200  # about 2-3 minutes on 2 cores

Each client sends one text of 60 sentences (six test-like sentences in turn, then "Number i.") once, at the same
moment as the others, and sends it again after Retry-After for as long as it gets 503. Printed (one JSON object):
status counts, each status's client-side seconds (first try to answer: min / p50 / max), tries in all, answers
holding an English source sentence untranslated, /health's slowest answer meanwhile. The break-it run that this
reproduces (2026-12-06, 200 clients) ended 126 of 200 in 504; docs/performance.md, Continuous batching, has the figures
before and after deadline-ordered joins and deadline-aware admission.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

SENTENCES = ["Select the cell.", "Click the button to save the document.", "The printer is not available.",
             "The file could not be opened.", "Please restart the computer.", "Enter your password."]


def _post(url: str, body: dict, timeout_s: float) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def run(url: str, clients: int, timeout_s: float = 300.0) -> dict:
    """Runs the burst against ``url`` (the service's base URL); returns the figures printed by main."""
    text = " ".join(SENTENCES[k % len(SENTENCES)] for k in range(60))
    results: list[tuple[int, float, int, bytes]] = []  # status, seconds, tries, body
    lock = threading.Lock()
    health: list[float] = []
    stop = threading.Event()

    def client(i: int) -> None:
        started, tries = time.monotonic(), 0
        while True:
            status, headers, body = _post(url + "/translate", {"text": f"{text} Number {i}."}, timeout_s)
            tries += 1
            if status != 503:
                break
            time.sleep(float({k.lower(): v for k, v in headers.items()}.get("retry-after", 1)))
        with lock:
            results.append((status, time.monotonic() - started, tries, body))

    def probe_health() -> None:
        while not stop.is_set():
            started = time.monotonic()
            urllib.request.urlopen(url + "/health", timeout=60).read()
            health.append(time.monotonic() - started)
            stop.wait(0.5)

    prober = threading.Thread(target=probe_health)
    prober.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    prober.join()
    untranslated = sum(1 for status, _, _, body in results if status == 200
                       and any(s in json.loads(body)["translations"][0]["text"] for s in SENTENCES))
    seconds = {}
    for status in sorted({r[0] for r in results}):
        times = sorted(r[1] for r in results if r[0] == status)
        seconds[str(status)] = [round(times[0], 2), round(statistics.median(times), 2), round(times[-1], 2)]
    return {"clients": clients, "wall_s": round(time.monotonic() - started, 1),
            "statuses": dict(Counter(str(r[0]) for r in results)), "seconds_min_p50_max": seconds,
            "tries": sum(r[2] for r in results), "answers_with_untranslated_sentences": untranslated,
            "health_max_s": round(max(health, default=0.0), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://localhost:8000")
    p.add_argument("--clients", type=int, default=200)
    args = p.parse_args()
    print(json.dumps(run(args.url, args.clients)))


if __name__ == "__main__":
    main()
