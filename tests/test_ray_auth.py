"""Ray's token authentication on a real Ray head started as the project starts it (`ray start`, RAY_AUTH_MODE=token,
the session's token from conftest), with the dashboard and its Jobs API on: drivers and job submissions without the
token, or with a wrong one, are refused; with the token they work. Then which address each port listens on
(`ss -ltnp`), printed, with the dashboard on loopback only."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from test_multinode import cluster_pids, stop_cluster

RAY = str(Path(sys.executable).with_name("ray"))
DRIVER = """
import ray, sys
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("RESULT connected", ray.get(ray.remote(lambda: 6 * 7).remote()))
except Exception as e:
    print("RESULT refused", type(e).__name__, str(e)[:200].replace(chr(10), " "))
"""
JOB = """
import sys, time
from ray.job_submission import JobSubmissionClient
deadline = time.monotonic() + 60
while True:
    try:
        client = JobSubmissionClient(sys.argv[1])
        print("RESULT submitted", client.submit_job(entrypoint="echo token-job-ran"))
    except Exception as e:
        if "No available agent" in str(e) and time.monotonic() < deadline:  # the head's job agent is starting
            time.sleep(1)
            continue
        print("RESULT refused", type(e).__name__, str(e)[:200].replace(chr(10), " "))
    break
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ.get("RAY_AUTH_TOKEN_PATH"), "conftest sets these"
    port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-auth-")
    result = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
                             f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}",
                             # Its own job agent port: another Ray on this machine may hold the default 52365.
                             f"--dashboard-agent-listen-port={free_port()}",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    try:
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}", "port": port,
               "dashboard_port": dashboard_port, "metrics_port": metrics_port, "temp_dir": temp_dir,
               "token": Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
               "home": tmp_path_factory.mktemp("home")}
    finally:
        stop_cluster(temp_dir, port)


def client_env(head, token: str | None) -> dict:
    """The environment of a client on this machine: with ``token`` as RAY_AUTH_TOKEN, or with no token anywhere
    (no RAY_AUTH_TOKEN(_PATH), a HOME without ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(head["home"])
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def run_clients(script: str, address: str, envs: dict[str, dict]) -> dict[str, str]:
    """Runs the client script once per environment, all at once (a refused driver retries for ~20 s), and returns
    each one's RESULT line."""
    procs = {name: subprocess.Popen([sys.executable, "-c", script, address], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True) for name, env in envs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=120)
        out[name] = next((line for line in stdout.splitlines() if line.startswith("RESULT")), "RESULT none")
    return out


def test_a_driver_without_the_token_or_with_a_wrong_one_is_refused(head):
    results = run_clients(DRIVER, head["gcs"], {
        "none": client_env(head, None), "wrong": client_env(head, "0" * 64),
        # A client that does not even turn token mode on still cannot connect without the token.
        "disabled": client_env(head, None) | {"RAY_AUTH_MODE": "disabled"},
        "right": client_env(head, head["token"])})
    assert results["right"] == "RESULT connected 42", results
    for name in ("none", "wrong", "disabled"):
        assert results[name].startswith("RESULT refused"), (name, results[name])


def test_a_job_submission_without_the_token_is_refused(head):
    results = run_clients(JOB, head["dashboard"], {
        "none": client_env(head, None), "wrong": client_env(head, "0" * 64),
        "disabled": client_env(head, None) | {"RAY_AUTH_MODE": "disabled"},
        "right": client_env(head, head["token"])})
    for name in ("none", "wrong", "disabled"):
        assert results[name].startswith("RESULT refused"), (name, results[name])
    assert results["right"].startswith("RESULT submitted"), results
    job_id = results["right"].split()[-1]

    def get(path, token=None):
        request = urllib.request.Request(head["dashboard"] + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    assert get("/api/version")[0] == 401 and get("/api/version", "0" * 64)[0] in (401, 403)
    assert get(f"/api/jobs/{job_id}")[0] == 401  # nor can anyone read the jobs
    deadline, status = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        code, body = get(f"/api/jobs/{job_id}", head["token"])
        status = json.loads(body)["status"] if code == 200 else code
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    assert status == "SUCCEEDED"
    assert "token-job-ran" in get(f"/api/jobs/{job_id}/logs", head["token"])[1]


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP listener of ``pids``, from `ss -ltnp`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', " ".join(fields[5:])):
            if int(pid) in pids:
                found.add((address.strip("[]").removeprefix("::ffff:"), int(port), name))
    return sorted(found, key=lambda x: (x[1], x[0]))


def test_listening_addresses_dashboard_on_loopback_and_every_port_listed(head):
    found = listeners(cluster_pids(head["temp_dir"], head["port"]))
    print("\nRAY LISTENERS (address, port, process) of a head started like scripts/serve.sh's, dashboard on:")
    for entry in found:
        print("  ", entry)
    by_port = {}
    for address, port, _ in found:
        by_port.setdefault(port, set()).add(address)
    assert by_port[head["dashboard_port"]] == {"127.0.0.1"}  # the dashboard and its Jobs API: loopback only
    # README's port table: the GCS and the metrics export port listen on every interface on Ray 2.60 (no option
    # binds them to loopback); the GCS refuses clients without the token (above). A Ray that binds them otherwise
    # fails here, and the table must change with it.
    assert by_port[head["port"]] & {"0.0.0.0", "*"}, by_port.get(head["port"])
    assert by_port[head["metrics_port"]] & {"0.0.0.0", "*"}, by_port.get(head["metrics_port"])


def test_the_images_entrypoint_makes_a_token_when_none_is_given_and_ray_needs_it(tmp_path):
    """deploy/ray_token_entrypoint.sh with the images' RAY_AUTH_MODE=token and no token (a lone container): it
    makes one in ~/.ray/auth_token (0600) and the Ray it starts refuses a driver without it."""
    home, temp_dir, port = tmp_path / "home", tempfile.mkdtemp(prefix="ray-entrypoint-"), free_port()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    entrypoint = Path(__file__).resolve().parents[1] / "deploy" / "ray_token_entrypoint.sh"
    try:
        result = subprocess.run([str(entrypoint), "ray", "start", "--head", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                                 f"--metrics-export-port={free_port()}",
                                 f"--dashboard-agent-listen-port={free_port()}"],
                                env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        token_file = home / ".ray" / "auth_token"
        assert "this container's token is in" in result.stderr
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text().strip()) >= 32
        head = {"home": tmp_path / "nohome"}
        head["home"].mkdir()
        results = run_clients(DRIVER, f"127.0.0.1:{port}", {
            "none": client_env(head, None), "right": client_env(head, token_file.read_text().strip())})
        assert results["none"].startswith("RESULT refused") and results["right"] == "RESULT connected 42", results
    finally:
        stop_cluster(temp_dir, port)
