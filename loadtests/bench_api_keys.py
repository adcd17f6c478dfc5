"""What API keys cost a request: the same one-sentence request to two applications of one Serve instance, one
without keys and one with keys (a key lookup, the usage ledger's acquire awaited, its release sent), alternated so
both see the same machine; prints p50/p99 latency in ms and the difference.

    .venv/bin/python -m loadtests.bench_api_keys --artifact artifacts/en-de --requests 300
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from loadtests.bench_http import _free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="artifacts/en-de")
    parser.add_argument("--requests", type=int, default=300, help="requests per application")
    args = parser.parse_args()

    import ray
    from ray import serve

    from service.api_keys import digest, new_key
    from service.app import TranslatorDeployment

    key = new_key()
    keys_file = Path(tempfile.mkdtemp()) / "keys.yaml"
    keys_file.write_text(json.dumps({"keys": [{"id": "bench", "sha256": digest(key).hex(),
                                              "characters_per_minute": 10**9, "max_concurrent_requests": 64}]}))
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"artifact_dir": str(Path(args.artifact).resolve()), "device": "cpu", "intra_op_threads": 1}
    for name, extra in (("open", {}), ("keyed", {"api_keys_file": str(keys_file)})):
        app = TranslatorDeployment.options(ray_actor_options={"num_cpus": 0.5}).bind({**common, **extra,
                                                                                      "model_id": name})
        serve.run(app, name=name, route_prefix=f"/{name}")
    base = f"http://127.0.0.1:{port}"
    body = {"text": "The file could not be opened.", "beam_size": 1}
    headers = {"open": {}, "keyed": {"Authorization": f"Bearer {key}"}}
    latencies = {"open": [], "keyed": []}
    with requests.Session() as session:
        for i in range(args.requests * 2 + 20):
            name = ("open", "keyed")[i % 2]
            started = time.perf_counter()
            r = session.post(f"{base}/{name}/translate", json=body, headers=headers[name], timeout=30)
            elapsed = time.perf_counter() - started
            assert r.status_code == 200, (name, r.status_code, r.text)
            if i >= 20:  # warm-up
                latencies[name].append(1000 * elapsed)
    for name, values in latencies.items():
        print(f"{name:6s} requests {len(values)}  p50 {np.percentile(values, 50):6.2f} ms  "
              f"p99 {np.percentile(values, 99):6.2f} ms")
    print(f"keyed - open: p50 {np.percentile(latencies['keyed'], 50) - np.percentile(latencies['open'], 50):+.2f} ms")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
