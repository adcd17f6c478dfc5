"""One client over HTTP through each of Serve's ingresses: HAProxy (the project's default) and the Python proxy.

    .venv/bin/python -m loadtests.bench_ingress            # ~2 min on 2 cores; --requests N

For each ingress (RAY_SERVE_ENABLE_HA_PROXY=1, then 0), in a process of its own (Ray reads the variable when it
starts), this starts the service (loadtests/bench_http.start_service: local Ray, one replica, 1 ONNX Runtime
thread) and sends, one at a time: ``GET /health``, and ``POST /translate`` with one short sentence, greedy and
beam 4; then the engine alone (Translator.translate, same threads, the service stopped) on the same sentence.
Prints p50 latencies (ms) per ingress and the ratio HTTP / engine alone. The client shares the machine with the
server: compare the two ingresses within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SENTENCE = "Save the file."
INGRESSES = {"haproxy": "1", "python-proxy": "0"}


def _p50_ms(call, n: int) -> float:
    for _ in range(max(3, n // 10)):  # warm-up
        call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _listener(port: int) -> str:
    """The name of the process listening on ``port`` (`ss -ltnp`), e.g. "haproxy" or "ray::ProxyActor"."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[3].endswith(f":{port}") and '(("' in line:
            return line.split('(("', 1)[1].split('"', 1)[0]
    return "?"


def measure(artifact: str, requests: int) -> dict:
    """In this process: the service through the ingress RAY_SERVE_ENABLE_HA_PROXY names, then the engine alone.
    Returns p50 latencies in ms."""
    from engine.options import DecodingOptions
    from engine.runtime import EngineConfig
    from engine.translator import Translator
    from loadtests.bench_http import start_service

    def post(url: str, beam: int) -> None:
        body = json.dumps({"text": SENTENCE, "beam_size": beam}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            response.read()

    def get(url: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()

    out = {}
    base, _, shutdown = start_service(artifact, threads=1)
    try:
        out["listener"] = _listener(int(base.rsplit(":", 1)[1]))
        out["health_ms"] = _p50_ms(lambda: get(base + "/health"), requests)
        for beam in (1, 4):
            out[f"http_beam{beam}_ms"] = _p50_ms(lambda: post(base + "/translate", beam), requests)
    finally:
        shutdown()
    translator = Translator(artifact, EngineConfig(device="cpu", intra_op_threads=1))
    for beam in (1, 4):
        options = DecodingOptions(beam_size=beam)
        out[f"engine_beam{beam}_ms"] = _p50_ms(lambda: translator.translate([SENTENCE], options), requests)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="artifacts/en-de")
    p.add_argument("--requests", type=int, default=100, help="requests per figure (p50 over them)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process's part
    args = p.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.artifact, args.requests)), flush=True)
        return {}
    results = {}
    for name, flag in INGRESSES.items():
        child = subprocess.run([sys.executable, "-m", "loadtests.bench_ingress", "--measure", "--artifact",
                                args.artifact, "--requests", str(args.requests)],
                               env=dict(os.environ, RAY_SERVE_ENABLE_HA_PROXY=flag), capture_output=True,
                               text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
        line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: no result (exit {child.returncode}):\n{child.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
    print(f"one client, '{SENTENCE}', p50 ms over {args.requests} requests")
    print(f"{'ingress':<14}{'listener':<17}{'/health':>9}{'greedy':>9}{'beam 4':>9}{'engine greedy':>15}{'engine beam 4':>15}"
          f"{'HTTP/engine beam 4':>20}")
    for name, r in results.items():
        print(f"{name:<14}{r['listener']:<17}{r['health_ms']:>9.1f}{r['http_beam1_ms']:>9.1f}{r['http_beam4_ms']:>9.1f}"
              f"{r['engine_beam1_ms']:>15.1f}{r['engine_beam4_ms']:>15.1f}"
              f"{r['http_beam4_ms'] / r['engine_beam4_ms']:>20.2f}")
    return results


if __name__ == "__main__":
    main()
