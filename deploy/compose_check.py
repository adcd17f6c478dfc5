"""The checks of deploy/compose_check.sh on a running compose project (standard library only: the host's python3).

  python3 deploy/compose_check.py            # after `docker compose up -d ray-head ray-worker prometheus`

Checks, in order, and prints what it saw with the figures:
  1. /health answers and the README's curl translates through port 8000;
  2. Prometheus has every Ray node's target up and returns the service's ray_nmt_ series after traffic;
  3. `--scale ray-worker=3`: under load, Serve's autoscaling places replicas on the workers, no request fails;
  4. a worker container that holds a replica is killed mid-load: only requests in flight then fail, the cluster
     recovers, later requests succeed; then back to one worker;
  (5. `down -v` leaving nothing is checked by the shell script, which owns the project's lifetime.)
Exits 1 at the first check that fails. Traffic goes to 127.0.0.1 only, in bounded loops.
Environment: COMPOSE (the compose command, e.g. "docker-compose"), COMPOSE_PROJECT_NAME.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

API = "http://127.0.0.1:8000"
PROMETHEUS = "http://127.0.0.1:9090"
COMPOSE = shlex.split(os.environ.get("COMPOSE", "docker-compose"))
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "nmt-serve")
SERVICES = ["ray-head", "ray-worker", "prometheus"]  # Grafana's image cannot be had here (see docs/compose.md)
# Four sentences a request: a request lasts long enough on two cores for replicas to hold several at once.
BODY = json.dumps({"text": ["The file could not be opened.", "Click the button to save the document.",
                            "The server is not responding.", "Please restart the application."]}).encode()

# Run inside the head container: Serve's replicas and Ray's nodes from the dashboard's state API.
PLACEMENT = r"""
import json
from ray.util.state import list_actors, list_nodes
nodes = list_nodes(address="http://127.0.0.1:8265", filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
actors = list_actors(address="http://127.0.0.1:8265", filters=[("state", "=", "ALIVE")], limit=1000,
                     raise_on_missing_output=False)
ip = {n.node_id: n.node_ip for n in nodes}
print(json.dumps({"nodes": {n.node_ip: n.is_head_node for n in nodes},
                  "replicas": [ip.get(a.node_id, "?") for a in actors
                               if a.class_name.startswith("ServeReplica:translation:Translator")]}))
"""


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[compose_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def http(url: str, body: bytes | None = None, timeout_s: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, urllib.error.URLError, HTTPException) as error:
        # refused, reset, timed out, or cut mid-body (IncompleteRead: a replica killed while answering)
        return 0, repr(error).encode()


def wait_for(what: str, test, timeout_s: float, every_s: float = 3):
    """Calls test() until it returns something true; CheckFailed after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = test()
        except Exception as error:  # noqa: BLE001 - a check still settling; retried until the deadline
            value, last = None, error
        else:
            last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")
        time.sleep(every_s)


def compose(*args: str, check: bool = True) -> str:
    result = subprocess.run([*COMPOSE, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise CheckFailed(f"{' '.join(COMPOSE + list(args))} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def containers(service: str) -> list[str]:
    return compose("ps", "-q", service).split()


def container_ip(container: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                          container], capture_output=True, text=True, check=True).stdout
    return out.split()[0]


def placement() -> dict:
    """{"nodes": {ip: is_head}, "replicas": [ip of each alive Translator replica]}."""
    head = containers("ray-head")[0]
    out = subprocess.run(["docker", "exec", "-i", head, "python", "-"], input=PLACEMENT, capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise CheckFailed(f"state API in the head: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def translate_ok() -> bool:
    status, body = http(f"{API}/translate", BODY)
    return status == 200 and len(json.loads(body)["translations"]) == 4


class Load:
    """`concurrency` clients posting BODY in a loop for `seconds` or until stop() (bounded); every request's (start,
    end, status, the start of a failure's body)."""

    def __init__(self, concurrency: int, seconds: float) -> None:
        self.concurrency, self.seconds = concurrency, seconds
        self.records: list[tuple[float, float, int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = []

    def _client(self) -> None:
        stop = time.monotonic() + self.seconds
        while time.monotonic() < stop and not self._stop.is_set():
            start = time.monotonic()
            status, body = http(f"{API}/translate", BODY, timeout_s=120)
            with self._lock:
                self.records.append((start, time.monotonic(), status, "" if status == 200 else body[:200].decode(
                    errors="replace")))

    def start(self) -> "Load":
        self.t0 = time.monotonic()
        self._futures = [self._pool.submit(self._client) for _ in range(self.concurrency)]
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> list[tuple[float, float, int, str]]:
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self.records


def summary(records) -> str:
    failed = [r for r in records if r[2] != 200]
    latencies = sorted(r[1] - r[0] for r in records if r[2] == 200)
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    return f"{len(records)} requests, {len(failed)} failed, p50 {p50:.2f} s"


def check_health_and_readme_curl() -> None:
    wait_for("GET /health answers 200", lambda: http(f"{API}/health", timeout_s=10)[0] == 200, 600, every_s=5)
    status, body = http(f"{API}/health")
    log(f"1. GET /health -> {status} {body[:200].decode()}")
    # The README's example, as a user types it.
    curl = ["curl", "-s", "localhost:8000/translate", "-H", "Content-Type: application/json", "-d",
            '{"text": ["The file could not be opened.", "Click the button to save the document."]}']
    out = subprocess.run(curl, capture_output=True, text=True, timeout=120).stdout
    log(f"1. README curl -> {out}")
    texts = [t["text"] for t in json.loads(out)["translations"]]
    if len(texts) != 2 or not all(texts):
        raise CheckFailed(f"README curl: expected two translations, got {out!r}")
    head = containers("ray-head")[0]
    health = wait_for("the head container's HEALTHCHECK reports healthy", lambda: subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", head], capture_output=True, text=True
    ).stdout.strip() == "healthy", 240, every_s=5)
    log(f"1. HEALTHCHECK of the head container: healthy ({health})")


def check_prometheus(n_nodes: int) -> None:
    for _ in range(20):
        http(f"{API}/translate", BODY)

    # Workers join the head when they have started, which may come after the head answers (a CI run failed here
    # when step 1 passed within a second): wait for them.
    nodes = sorted(wait_nodes(n_nodes)["nodes"])

    def targets_up():
        # Ray's service-discovery file lists each node's metrics agent (port 8080 here) and, on the head, the
        # dashboard's and autoscaler's own ports: every one must be up, and every node's 8080 among them.
        status, body = http(f"{PROMETHEUS}/api/v1/targets")
        active = [t for t in json.loads(body)["data"]["activeTargets"] if t["labels"]["job"] == "ray"]
        up = {t["labels"]["instance"] for t in active if t["health"] == "up"}
        return sorted(up) if len(up) == len(active) and {f"{ip}:8080" for ip in nodes} <= up else None

    up = wait_for(f"Prometheus: every one of {n_nodes} Ray nodes' targets up", targets_up, 180)
    log(f"2. Prometheus, job ray (Ray's service-discovery file): {n_nodes} nodes {nodes}; all {len(up)} targets "
        f"up: {up}")

    def nmt_series():
        status, body = http(f"{PROMETHEUS}/api/v1/query?query=sum(ray_nmt_requests_total)")
        result = json.loads(body)["data"]["result"]
        if not result or float(result[0]["value"][1]) <= 0:
            return None
        names = json.loads(http(f"{PROMETHEUS}/api/v1/label/__name__/values")[1])["data"]
        return float(result[0]["value"][1]), [n for n in names if n.startswith("ray_nmt_")]

    total, names = wait_for("Prometheus returns ray_nmt_requests_total > 0", nmt_series, 180, every_s=5)
    log(f"2. Prometheus: sum(ray_nmt_requests_total) = {total:.0f}; {len(names)} ray_nmt_ series names: "
        f"{', '.join(sorted(names))}")


def wait_nodes(n_nodes: int) -> dict:
    def alive():
        p = placement()
        return p if len(p["nodes"]) == n_nodes else None

    return wait_for(f"{n_nodes} alive Ray nodes", alive, 300, every_s=5)


def check_scale_out() -> None:
    started = time.monotonic()
    compose("up", "-d", "--no-build", "--scale", "ray-worker=3", *SERVICES)
    wait_nodes(4)
    log(f"3. scaled to 3 workers: 4 alive Ray nodes after {time.monotonic() - started:.0f} s")
    workers = containers("ray-worker")
    wait_for("every worker container's HEALTHCHECK reports healthy", lambda: all(subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", c], capture_output=True, text=True
    ).stdout.strip() == "healthy" for c in workers), 240, every_s=5)
    log(f"3. HEALTHCHECK of the {len(workers)} worker containers: healthy")
    check_prometheus(4)
    # At least 120 s of load; up to 240 s while autoscaling has not yet placed replicas on workers (the head's
    # state API answers slowly under load on two cores, and a slower machine scales later: the check is that
    # replicas land on workers, not how soon).
    load = Load(concurrency=48, seconds=240).start()
    seen: dict[str, int] = {}
    most, on_workers = 0, set()
    while time.monotonic() - load.t0 < 120 or (time.monotonic() - load.t0 < 230 and (most < 2 or not on_workers)):
        time.sleep(10)
        p = placement()
        workers = [ip for ip in p["replicas"] if not p["nodes"].get(ip, True)]
        most, on_workers = max(most, len(p["replicas"])), on_workers | set(workers)
        seen[f"{time.monotonic() - load.t0:.0f}s"] = len(p["replicas"])
    load.stop()
    records = load.join()
    statuses = collections.Counter(r[2] for r in records)
    log(f"3. load of 48 clients for {time.monotonic() - load.t0:.0f} s: {summary(records)}, statuses "
        f"{dict(statuses)}; replicas over time {seen}; at most {most} replicas, on {len(on_workers)} worker node(s) "
        f"{sorted(on_workers)}")
    failed = [r for r in records if r[2] != 200]
    if failed:
        raise CheckFailed(f"scale-out: {len(failed)} requests failed, e.g. {failed[:3]}")
    if most < 2 or not on_workers:
        raise CheckFailed(f"scale-out: autoscaling did not place replicas on workers (most {most}, {on_workers})")


def check_worker_killed() -> None:
    # The victim is chosen before the load: under load on two cores the state API in the head answers in up to a
    # minute, and a kill that came after the load ended would check nothing (a real run did exactly that).
    p = placement()
    by_ip = {container_ip(c): c for c in containers("ray-worker")}
    victims = [by_ip[ip] for ip in p["replicas"] if ip in by_ip]
    if not victims:
        raise CheckFailed(f"kill: no worker container holds a replica ({p})")
    victim = victims[0]
    held = sum(by_ip.get(ip) == victim for ip in p["replicas"])
    load = Load(concurrency=32, seconds=90).start()
    time.sleep(20)
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    t_kill = time.monotonic()
    log(f"4. killed worker container {victim[:12]} (holding {held} of {len(p['replicas'])} replicas) "
        f"{t_kill - load.t0:.0f} s into a 90 s load")
    records = load.join()
    in_flight = [r for r in records if r[0] <= t_kill <= r[1]]
    failed = [r for r in records if r[2] != 200]
    late = [r for r in failed if r[0] > t_kill]
    after = [r for r in records if r[0] > t_kill + 20]
    log(f"4. {summary(records)}; {len(in_flight)} in flight at the kill, {len(failed)} failed "
        f"({len(failed) - len(late)} of them in flight at the kill, {len(late)} sent after it); "
        f"requests sent 20 s or more after the kill: {summary(after)}")
    for r in failed[:5]:
        log(f"4.   failed: sent {r[0] - t_kill:+.1f} s from the kill, status {r[2]}: {r[3][:160]}")
    if not in_flight or not after:
        raise CheckFailed(f"kill: the kill did not fall inside the load ({len(in_flight)} requests in flight at it, "
                          f"{len(after)} sent 20 s or more after it)")
    if late:
        raise CheckFailed(f"kill: {len(late)} requests sent after the kill failed")
    wait_for("the application answers after the kill", translate_ok, 300)
    batch = Load(concurrency=8, seconds=20).start().join()
    log(f"4. after recovery: {summary(batch)}")
    if any(r[2] != 200 for r in batch):
        raise CheckFailed("kill: requests after recovery failed")


def check_scale_in() -> None:
    compose("up", "-d", "--no-build", "--scale", "ray-worker=1", *SERVICES)
    p = wait_nodes(2)
    ok = wait_for("translations after scaling back to 1 worker", translate_ok, 300)
    batch = Load(concurrency=8, seconds=20).start().join()
    log(f"3. back to 1 worker: {len(p['nodes'])} alive Ray nodes, replicas on {p['replicas']}; {summary(batch)}")
    if not ok or any(r[2] != 200 for r in batch):
        raise CheckFailed("scale-in: requests failed after scaling back to 1 worker")


def main() -> int:
    steps = [("1 health and README curl", check_health_and_readme_curl),
             ("2 Prometheus", lambda: check_prometheus(2)),
             ("3 scale to 3 workers under load", check_scale_out),
             ("4 worker killed mid-load", check_worker_killed),
             ("3 back to 1 worker", check_scale_in)]
    for name, step in steps:
        started = time.monotonic()
        try:
            step()
        except CheckFailed as error:
            log(f"FAILED {name}: {error}")
            return 1
        log(f"ok {name} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
