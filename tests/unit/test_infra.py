"""infra/: the Prefect project file, the work-pool templates, the compose stack, the worker image and the services
script, checked by parsing them (no Docker engine here). The real deploy is in tests/integration/test_real_servers.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"
FLOWS = {"flows/pipeline.py:rlhf_pipeline": "rlhf-pipeline", "flows/retrain.py:rlhf_retrain": "rlhf-retrain",
         "flows/collect.py:rlhf_collect": "rlhf-collect"}


@pytest.fixture(scope="module")
def services():
    from rlhf_pipeline.infra import services

    return services


@pytest.fixture(scope="module")
def project_file() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def deployments(project_file) -> dict[str, dict]:
    return {d["name"]: d for d in project_file["deployments"]}


def _template(name: str) -> dict:
    return json.loads((INFRA / name).read_text())


def _render(template: dict, job_variables: dict) -> dict:
    """The job configuration a worker builds: the template's defaults overlaid with the deployment's variables."""
    from prefect.utilities.templating import apply_values

    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values.update(job_variables)
    return apply_values(copy.deepcopy(template["job_configuration"]), values)


# --- prefect.yaml ----------------------------------------------------------------------------------------------------

def test_prefect_yaml_is_what_prefect_deploy_reads(project_file):
    """`prefect deploy` validates the file with this model and skips a file that fails (with a yellow warning only)."""
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(project_file)
    assert [d.name for d in model.deployments] == [d["name"] for d in project_file["deployments"]]
    assert "definitions" in project_file  # the anchors live there, as Prefect documents


def test_deployments_pools_and_entrypoints(deployments):
    assert set(deployments) == {
        "rlhf-pipeline", "rlhf-retrain",
        "rlhf-pipeline-docker", "rlhf-retrain-docker",
        "rlhf-pipeline-kubernetes", "rlhf-retrain-kubernetes",
        "rlhf-collect",
    }
    for name, deployment in deployments.items():
        flow = next(f for f in ("rlhf-pipeline", "rlhf-retrain", "rlhf-collect") if name.startswith(f))
        assert FLOWS[deployment["entrypoint"]] == flow, name
        pool = deployment["work_pool"]["name"]
        suffix = name.removeprefix(flow)
        assert pool == {"": "rlhf-process", "-docker": "rlhf-docker", "-kubernetes": "rlhf-kubernetes"}[suffix], name
    # the default (single machine) ones; the process deployments run in the folder `prefect deploy` ran in
    for name in ("rlhf-pipeline", "rlhf-retrain", "rlhf-collect"):
        pull = deployments[name]["pull"][0]["prefect.deployments.steps.set_working_directory"]
        build = deployments[name]["build"][0]["prefect.deployments.steps.run_shell_script"]
        assert pull["directory"] == "{{ " + build["id"] + ".stdout }}" and build["script"] == "pwd"
    for name, deployment in deployments.items():
        if deployment["work_pool"]["name"] != "rlhf-process":
            assert deployment["build"] is None, name  # no interactive image-build prompt
            assert deployment["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/rlhf"


@pytest.mark.parametrize("entrypoint", sorted(FLOWS))
def test_entrypoints_exist_and_load(entrypoint, deployments):
    """Each entrypoint file exists, imports, is the named flow, and takes the parameters the deployments pass."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    path = entrypoint.split(":")[0]
    assert (PROJECT_ROOT / path).is_file(), path
    flow = load_flow_from_entrypoint(str(PROJECT_ROOT / entrypoint))
    assert flow.name == FLOWS[entrypoint]
    accepted = set(parameter_schema(flow).properties)
    for deployment in deployments.values():
        if deployment["entrypoint"] == entrypoint:
            assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]


def test_retrain_schedule_is_a_valid_cron_in_step_with_params(deployments):
    from prefect.client.schemas.schedules import CronSchedule

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    retrain = params.get("retrain", {"cron": "0 3 * * 1", "timezone": "UTC"})
    for name in ("rlhf-retrain", "rlhf-retrain-docker", "rlhf-retrain-kubernetes"):
        (schedule,) = deployments[name]["schedules"]
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on an invalid cron or zone
        assert schedule["cron"] == retrain["cron"] == "0 3 * * 1", name
        assert schedule["timezone"] == retrain.get("timezone", "UTC") == "UTC", name
    # one active weekly retrain: the single-machine one; the GPU variants start paused
    assert deployments["rlhf-retrain"]["schedules"][0]["active"] is True
    assert deployments["rlhf-retrain-docker"]["schedules"][0]["active"] is False
    assert deployments["rlhf-retrain-kubernetes"]["schedules"][0]["active"] is False
    for name, deployment in deployments.items():
        assert "schedules" in deployment, name  # else an interactive `prefect deploy` asks for one
        if name.startswith("rlhf-pipeline"):
            assert deployment["schedules"] is None, name
    comment = (INFRA / "prefect.yaml").read_text()
    assert "retrain.cron" in comment  # the cron points at its source of truth


def test_docker_pool_requests_gpus(deployments):
    template = _template("docker-base-job-template.json")
    variables = deployments["rlhf-pipeline-docker"]["work_pool"]["job_variables"]
    requests = variables["container_create_kwargs"]["device_requests"]
    assert any(["gpu"] in r["capabilities"] and r["driver"] == "nvidia" for r in requests)
    rendered = _render(template, variables)
    # what prefect-docker passes to docker-py's containers.create(**container_create_kwargs)
    assert rendered["container_create_kwargs"]["device_requests"] == requests
    assert rendered["image"] == "rlhf-worker:latest"
    assert deployments["rlhf-retrain-docker"]["work_pool"] == deployments["rlhf-pipeline-docker"]["work_pool"]
    # docker-py accepts these dicts as DeviceRequest
    from docker.types import DeviceRequest

    assert DeviceRequest(**requests[0])["Capabilities"] == [["gpu"]]


def test_kubernetes_pool_requests_a_gpu(deployments):
    template = _template("k8s-base-job-template.json")
    variables = deployments["rlhf-pipeline-kubernetes"]["work_pool"]["job_variables"]
    rendered = _render(template, variables)
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "rlhf-worker:latest"
    assert rendered["namespace"] == variables["namespace"]
    # the template's own default asks for one GPU too
    assert _render(template, {})["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"


def test_pool_creation_commands_are_documented(services):
    text = (INFRA / "prefect.yaml").read_text() + (PROJECT_ROOT / "README.md").read_text()
    assert "--base-job-template infra/k8s-base-job-template.json" in text
    assert "prefect gcl create gpu --limit 1" in text
    assert {name: pool_type for name, (pool_type, _) in services.WORK_POOLS.items()} == {
        "rlhf-process": "process", "rlhf-docker": "docker", "rlhf-kubernetes": "kubernetes"}
    for _, template in services.WORK_POOLS.values():
        assert template is None or template.is_file()
    assert services.GPU_LIMIT == ("gpu", 1)


# --- docker-compose.yaml, Dockerfiles --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_compose_services(compose):
    services = compose["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "worker"} <= set(services)
    prefect = services["prefect-server"]
    assert "prefect server start" in _command(prefect)
    assert prefect["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@prefect-db:5432/" in prefect["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert services["prefect-db"]["image"].startswith("postgres")
    mlflow = services["mlflow"]
    command = _command(mlflow)
    assert "mlflow server" in command
    assert re.search(r"--artifacts-destination[= ]s3://", command)
    assert re.search(r"--backend-store-uri[= ]\"?postgresql://\S+@mlflow-db:5432/", command)
    assert "--allowed-hosts" in command and "mlflow:*" in command  # other containers call it by its service name
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert (INFRA / mlflow["build"]["dockerfile"]).is_file()
    assert "psycopg2" in (INFRA / mlflow["build"]["dockerfile"]).read_text()


def test_compose_is_private_and_refuses_default_secrets(compose):
    """Issue 11, item 14: every published port binds to 127.0.0.1 unless RLHF_BIND_ADDRESS opts in; no secret has a
    default (compose refuses to start while one is unset); `check-secrets` refuses known defaults and short values
    before anything starts; Prefect's API and MLflow (its basic-auth app) ask for credentials."""
    import subprocess

    text = (INFRA / "docker-compose.yaml").read_text()
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${RLHF_BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    secret = r"\$\{(\w*(?:PASSWORD|USER|SECRET|AUTH|KEY)\w*)(:?[-?])"
    used = re.findall(secret, text)
    assert used and all(op == ":?" for _, op in used), [v for v, op in used if op != ":?"]

    def depends(name: str) -> set[str]:
        direct = set(services[name].get("depends_on", {}) or {})
        return direct | {d for dep in direct for d in depends(dep)}

    assert all("check-secrets" in depends(name) for name in services if name != "check-secrets")
    script = services["check-secrets"]["command"][0].replace("$$", "$")
    strong = {"PREFECT_DB_PASSWORD": "pg-Prefect-7f3a9c2e", "MLFLOW_DB_PASSWORD": "pg-Mlflow-91bd20aa",
              "MINIO_ROOT_PASSWORD": "minio-5e8a1f77c3", "MLFLOW_ADMIN_PASSWORD": "admin-0c4f9e2b71",
              "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-6a1d8e3f90b2", "PREFECT_API_AUTH_STRING": "rlhf:api-3b7c5d9e1f"}
    run = lambda env: subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)  # noqa: E731
    assert run(strong).returncode == 0
    for name, value in (("MINIO_ROOT_PASSWORD", "minioadmin"), ("MLFLOW_ADMIN_PASSWORD", "password1234"),
                        ("PREFECT_DB_PASSWORD", "change-me"), ("MLFLOW_DB_PASSWORD", "short"),
                        ("PREFECT_API_AUTH_STRING", "no-colon-here-at-all")):
        refused = run({**strong, name: value})
        assert refused.returncode == 1 and name in refused.stdout, (name, refused.stdout)

    mlflow = services["mlflow"]
    assert "--app-name basic-auth" in _command(mlflow) and mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert "admin_password = %s" in _command(mlflow)  # written from the environment at start, not in the image
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    worker = services["worker"]["environment"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= set(worker)
    assert "@" not in worker["MLFLOW_TRACKING_URI"]  # credentials by variable, never inside the URI
    example = (INFRA / ".env.example").read_text()
    assert "RLHF_BIND_ADDRESS=127.0.0.1" in example and "infra/.env" in (PROJECT_ROOT / ".gitignore").read_text()


def test_compose_worker_gets_a_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert _command(worker).startswith("prefect worker start --pool rlhf-process")
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    build = worker["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile.worker"
    # the setup service creates the pools and the limit, then deploys prefect.yaml
    setup = _command(compose["services"]["setup"])
    assert "python -m rlhf_pipeline.infra.services setup" in setup and "deploy --all --prefect-file infra/prefect.yaml" in setup
    # the docker pool's flow-run containers join the compose network and share its volumes
    docker_vars = yaml.safe_load((INFRA / "prefect.yaml").read_text())["definitions"]["work_pools"]["docker_gpu"][
        "job_variables"]
    assert docker_vars["networks"] == [compose["networks"]["default"]["name"]]
    for volume in docker_vars["volumes"]:
        assert compose["volumes"][volume.split(":")[0]]["name"] == volume.split(":")[0]


def test_worker_dockerfile():
    text = (INFRA / "Dockerfile.worker").read_text()
    images = re.findall(r"^ARG CUDA_IMAGE=(\S+)|^FROM (\S+)", text, flags=re.M)
    base = next(a or b for a, b in images)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "runtime" in base
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
    assert re.search(r'^CMD \["prefect", "worker", "start"', text, flags=re.M)
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", text, flags=re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for source in line.split()[:-1]:
            assert (PROJECT_ROOT / source).exists(), source
    assert (INFRA / "Dockerfile.worker.dockerignore").read_text().count(".venv") == 1


# --- services.py, Makefile -------------------------------------------------------------------------------------------

def test_services_backends_fall_back_to_sqlite(services, tmp_path):
    unreachable = "postgresql://postgres@127.0.0.1:1/postgres"
    ok, why = services.postgres_reachable(unreachable)
    assert not ok and why
    backends = services.choose_backends(tmp_path, tmp_path / ".services", "auto", unreachable, log=lambda line: None)
    assert backends.kind == "sqlite"
    assert backends.prefect_database_url == f"sqlite+aiosqlite:///{tmp_path / '.services' / 'prefect.db'}"
    assert backends.mlflow_backend_store_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(services.ServiceError):
        services.choose_backends(tmp_path, tmp_path / ".services", "yes", unreachable, log=lambda line: None)
    assert services.choose_backends(tmp_path, tmp_path / "s", "no", log=lambda line: None).kind == "sqlite"


def test_services_urls(services):
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    assert services.database_url(admin, "rlhf_prefect", "asyncpg") == \
        "postgresql+asyncpg://postgres@127.0.0.1:5432/rlhf_prefect"
    assert services.database_url(admin, "rlhf_mlflow") == "postgresql://postgres@127.0.0.1:5432/rlhf_mlflow"
    assert services.prefect_api_url(4200) == "http://127.0.0.1:4200/api"
    port = services.free_port()
    assert 0 < port < 65536 and not services.port_in_use(port)


def test_services_stop_and_status_without_servers(services, tmp_path, capsys):
    assert services.main(["--state-dir", str(tmp_path), "stop"]) == 0
    assert "not running" in capsys.readouterr().out
    assert services.main(["--state-dir", str(tmp_path), "status"]) == 1


def test_makefile_targets():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^services:.*\n\t.*-m rlhf_pipeline\.infra\.services start", makefile, flags=re.M)
    assert re.search(r"^services-stop:.*\n\t.*-m rlhf_pipeline\.infra\.services stop", makefile, flags=re.M)
    assert "/.services/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()
    assert re.search(r"^label-studio:.*\n\t.*-m rlhf_pipeline\.infra\.label_studio start --port \$\(LABEL_STUDIO_PORT\)",
                     makefile, flags=re.M)
    assert re.search(r"^label-studio-stop:.*\n\t.*-m rlhf_pipeline\.infra\.label_studio stop", makefile, flags=re.M)
    assert "/.label-studio/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()


# --- Ray: KubeRay cluster, compose head and GPU worker, RAY_ADDRESS in the pools ---------------------------------------

@pytest.fixture(scope="module")
def ray_cluster() -> list[dict]:
    return list(yaml.safe_load_all((INFRA / "kuberay-cluster.yaml").read_text()))


def test_kuberay_cluster_has_a_gpu_worker_group_and_shared_storage(ray_cluster):
    cluster = next(d for d in ray_cluster if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    pin = re.search(r'"ray\[train\]==([^"]+)"', (PROJECT_ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["spec"]["rayVersion"] == pin  # the cluster runs the Ray the pipeline is pinned to
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    images = {c["image"] for g in (head, gpu) for c in g["template"]["spec"]["containers"]}
    assert images == {"rlhf-worker:latest"}
    for group in (head, gpu):
        container = group["template"]["spec"]["containers"][0]
        assert {e["name"]: e.get("value") for e in container["env"]}["RAY_AUTH_MODE"] == "token"
        assert container["envFrom"] == [{"secretRef": {"name": "rlhf-ray-auth"}}]
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/opt/rlhf/runs", "/opt/rlhf-cache"}
    claim = next(d for d in ray_cluster if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pools_and_compose_point_flow_runs_at_the_ray_head(deployments, compose, ray_cluster):
    cluster = next(d for d in ray_cluster if d["kind"] == "RayCluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    k8s = deployments["rlhf-pipeline-kubernetes"]["work_pool"]["job_variables"]["env"]
    assert k8s["RAY_ADDRESS"] == f"{name}-head-svc.{namespace}.svc.cluster.local:6379"  # KubeRay's head service
    template = json.loads((INFRA / "k8s-base-job-template.json").read_text())
    rendered = _render(template, deployments["rlhf-pipeline-kubernetes"]["work_pool"]["job_variables"])
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "rlhf-ray-auth", "optional": True}}]
    docker = deployments["rlhf-pipeline-docker"]["work_pool"]["job_variables"]["env"]
    services = compose["services"]
    assert docker["RAY_ADDRESS"] == services["worker"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert _command(services["ray-head"]).startswith("ray start --head --block --port=6379 --num-cpus=0")
    assert _command(services["ray-worker"]).startswith("ray start --address=ray-head:6379")
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # a run's folder and the model cache are the same volumes, at the same paths, for the Prefect worker and Ray
    assert set(services["ray-worker"]["volumes"]) == set(services["worker"]["volumes"])
    assert "RAY_AUTH_TOKEN:?" in services["worker"]["environment"]["RAY_AUTH_TOKEN"]  # no default secret
